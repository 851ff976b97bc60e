"""The trained tiny checkpoints in tests/fixtures/ (written by tools/train_tiny.py): they load,
stay small, still speak their corpus, and agree with Hugging Face transformers."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from conftest import full_logits
from models import Family, generate, load_checkpoint
from contract.tokenizer import Tokenizer
from tools.train_tiny import (
    FOLDERS,
    HELD_OUT_SEED,
    corpus_words,
    generate_stories,
    sample_prompt,
    words,
)

FIXTURES = Path(__file__).parent / "fixtures"
MAX_BYTES = 8 * 1024 * 1024
NEW_TOKENS = 24


@functools.cache
def load(family: str):
    folder = FIXTURES / FOLDERS[family]
    cfg, params = load_checkpoint(folder)
    return folder, cfg, params, Tokenizer(folder / "tokenizer.model")


@pytest.mark.parametrize("family", FOLDERS)
def test_loads(family):
    _, cfg, params, tokenizer = load(family)
    assert cfg.family is Family(family)
    assert cfg.vocab_size == tokenizer.vocab_size == params["embed"].shape[0]
    assert all(v.dtype == np.float32 for v in params.values())


@pytest.mark.parametrize("family", FOLDERS)
def test_folder_is_small(family):
    folder = FIXTURES / FOLDERS[family]
    assert sum(f.stat().st_size for f in folder.iterdir()) < MAX_BYTES


@pytest.mark.parametrize("family", FOLDERS)
def test_greedy_continuation_speaks_the_corpus(family):
    _, cfg, params, tokenizer = load(family)
    out = generate(params, cfg, [tokenizer.encode(sample_prompt())], NEW_TOKENS,
                   stop_tokens=(tokenizer.eos_id,))
    text = tokenizer.decode(out.tokens[0])
    found = words(text) if out.stopped[0] else words(text)[:-1]  # the last word may be cut short
    assert len(found) >= 10, text
    known = sum(w in corpus_words() for w in found)
    assert known >= 0.9 * len(found), text


def hf_logits(folder: Path, family: str, tokens: np.ndarray) -> np.ndarray:
    import torch
    import transformers as tf

    cls = tf.Gemma3ForCausalLM if family == "gemma3" else tf.RecurrentGemmaForCausalLM
    model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("family", FOLDERS)
def test_logits_match_transformers(family):
    """Gemma 3 across its sliding window; RecurrentGemma within its window (past it, HF's window
    convention differs from the official one we follow: tests/test_hf_oracle.py)."""
    folder, cfg, params, tokenizer = load(family)
    story = generate_stories(1, seed=HELD_OUT_SEED + 1)[0]
    n = cfg.sliding_window + 16 if family == "gemma3" else cfg.sliding_window - 4
    tokens = np.asarray([tokenizer.encode(story)[:n]], np.int32)
    assert tokens.shape[1] == n
    ours, ref = full_logits(params, cfg, tokens), hf_logits(folder, family, tokens)
    scale = np.abs(ref).max()
    assert scale > 1.0
    assert np.abs(ours - ref).max() <= 1e-4 * scale
