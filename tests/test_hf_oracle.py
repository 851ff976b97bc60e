"""The independent oracle: Hugging Face transformers (torch, CPU, fp32) on tiny random checkpoints
saved with save_pretrained and loaded by our loader."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import FAMILIES, TINY, full_logits, hf_model, random_tokens
from models import generate, get_config, load_checkpoint
from models.config import Family

PROMPT_LEN = 20  # longer than twice the tiny sliding window (8)
NEW_TOKENS = 24


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def hf_greedy(model, prompt: np.ndarray, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_config_from_hf_matches_registry(hf_checkpoints, family):
    cfg, _ = load_checkpoint(hf_checkpoints[family][0])
    tiny = get_config(TINY[family])
    differs = {"name", "max_seq_len"}  # RecurrentGemma's HF config has no context length
    for field in dataclasses.fields(tiny):
        if field.name not in differs:
            assert getattr(cfg, field.name) == getattr(tiny, field.name), field.name


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_logits_match_hf(hf_checkpoints, family):
    folder, model = hf_checkpoints[family]
    cfg, params = load_checkpoint(folder)
    tokens = random_tokens(PROMPT_LEN)
    ours, ref = full_logits(params, cfg, tokens), hf_logits(model, tokens)
    assert np.abs(ref).max() > 1.0  # the comparison is not between two near-zero tensors
    per_position = np.abs(ours - ref).max(axis=(0, 2))
    assert per_position.max() <= 1e-4, per_position


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_greedy_matches_hf(hf_checkpoints, family):
    folder, model = hf_checkpoints[family]
    cfg, params = load_checkpoint(folder)
    prompt = random_tokens(PROMPT_LEN, seed=1)
    ours = generate(params, cfg, prompt.tolist(), NEW_TOKENS, stop_tokens=())
    assert ours.tokens[0] == hf_greedy(model, prompt, NEW_TOKENS)


def test_recurrentgemma_matches_hf_within_window(hf_checkpoints):
    """Official semantics (W + 1 keys) and HF's (W keys) agree while the sequence fits W."""
    folder, model = hf_checkpoints["recurrentgemma"]
    cfg, params = load_checkpoint(folder)
    assert cfg.window_extra_key  # we follow the official reference
    tokens = random_tokens(cfg.sliding_window)
    assert np.abs(full_logits(params, cfg, tokens) - hf_logits(model, tokens)).max() <= 1e-4


def test_recurrentgemma_differs_from_hf_beyond_window(hf_checkpoints):
    """Past W tokens HF drops the key the official reference keeps: the difference is real, and
    it is exactly the window convention (an official window of W - 1 is HF's window of W)."""
    folder, model = hf_checkpoints["recurrentgemma"]
    cfg, params = load_checkpoint(folder)
    tokens = random_tokens(PROMPT_LEN)
    ref = hf_logits(model, tokens)
    w = cfg.sliding_window
    err = np.abs(full_logits(params, cfg, tokens) - ref).max(axis=(0, 2))
    assert err[:w].max() <= 1e-4 and err[w:].max() > 1e-2

    as_hf = dataclasses.replace(cfg, sliding_window=w - 1)
    assert as_hf.window_span == w
    err = np.abs(full_logits(params, as_hf, tokens) - ref).max(axis=(0, 2))
    assert err.max() <= 1e-4, err


def test_recurrentgemma_greedy_matches_hf_with_hf_window(hf_checkpoints):
    folder, model = hf_checkpoints["recurrentgemma"]
    cfg, params = load_checkpoint(folder)
    as_hf = dataclasses.replace(cfg, sliding_window=cfg.sliding_window - 1)
    prompt = random_tokens(PROMPT_LEN, seed=1)
    ours = generate(params, as_hf, prompt.tolist(), NEW_TOKENS, stop_tokens=(), max_len=128)
    assert ours.tokens[0] == hf_greedy(model, prompt, NEW_TOKENS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads_as_f32(tmp_path, dtype):
    """bf16/f16 safetensors are converted exactly (every 16-bit value is an f32 value)."""
    model = hf_model("gemma3", seed=3).to(dtype)
    model.save_pretrained(tmp_path)
    cfg, params = load_checkpoint(tmp_path)
    assert cfg.family is Family.GEMMA3
    ref = model.model.layers[2].mlp.up_proj.weight.detach().float().numpy()
    assert params["layers.2.mlp.up"].dtype == np.float32
    np.testing.assert_array_equal(params["layers.2.mlp.up"], ref)
    np.testing.assert_array_equal(params["embed"], model.model.embed_tokens.weight.detach().float().numpy())
