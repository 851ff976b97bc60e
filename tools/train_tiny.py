"""Train a tiny Gemma 3 and a tiny RecurrentGemma on a generated story corpus; write both as
Hugging Face checkpoint folders (the committed test fixtures in tests/fixtures/).

  python tools/train_tiny.py --out tests/fixtures                     # both models
  python tools/train_tiny.py --out /tmp/tiny --models gemma3 --steps 50

Everything is generated here, deterministically from --seed: a corpus of short children's stories
from a small grammar (`generate_stories`), a SentencePiece BPE tokenizer trained on it with the
Gemma conventions (pad 0, eos 1, bos 2, unk 3, byte fallback, no dummy prefix, turn markers as
user-defined pieces), and the two models, trained in float32 on CPU with AdamW. Every matmul's
input dimension is a multiple of 128, so blockwise int4 quantization (block 128) applies to all
of them: these models exist to measure quantization error on weights that carry real structure.

Each folder holds config.json (loadable by `models.config_from_hf` and by transformers 5),
model.safetensors (float32), tokenizer.model and a README.md with the command, the final loss and
a greedy sample. The script checks that the folder loads back with the same logits.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import random
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repo's `models`, not an installed copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sentencepiece as spm

from models import (
    config_from_hf,
    forward,
    generate,
    init_cache,
    init_params,
    load_checkpoint,
)
from models.fused import decomposed
from models.loaders.hf import to_hf_tensors
from models.loaders.safetensors_io import save_file
from contract.tokenizer import Tokenizer

# ---- the corpus ---------------------------------------------------------------------------------
# A story is: an introduction, a habit, a find, optionally a friend who asks about it, and an
# ending. The hero's name, pronoun, animal and the found object recur across sentences, so the
# model has to carry them over more than a sliding window (32 tokens) to continue a story well.

_HEROES = {
    "Tom": "he", "Ben": "he", "Max": "he", "Sam": "he", "Leo": "he", "Jack": "he",
    "Lily": "she", "Mia": "she", "Anna": "she", "Lucy": "she", "Emma": "she", "Zoe": "she",
}
_POSSESSIVE = {"he": "his", "she": "her"}
_ANIMALS = ("cat", "dog", "bird", "fox", "rabbit", "bear", "duck", "frog", "mouse", "owl", "pig",
            "horse")
_TRAITS = ("little", "big", "happy", "sleepy", "brave", "kind", "shy", "funny", "curious", "old")
_COLORS = ("red", "blue", "green", "yellow", "pink", "orange", "purple", "white")
_THINGS = ("ball", "kite", "box", "hat", "boat", "book", "cup", "drum", "car", "shell")
_PLACES = ("park", "garden", "forest", "river", "house", "school", "beach", "farm", "hill", "lake")
_ACTIVITIES = ("play", "run", "jump", "sing", "read", "swim", "dance", "draw")
_SPOTS = ("tree", "rock", "bed", "bush", "table", "bench")
_FOODS = ("apple", "cake", "cookie", "carrot", "fish", "egg")
_FEELINGS = ("happy", "glad", "proud", "tired", "safe")

# Sentence templates per story part; {slots} are filled from the story's cast.
_INTROS = (
    "Once upon a time, there was {trait_a} {trait} {animal} named {name}.",
    "{name} was {trait_a} {trait} {animal} who lived near the {place}.",
    "There once was {trait_a} {trait} {animal}. {Poss} name was {name}.",
)
_HABITS = (
    "{Pron} liked to {activity} in the {place}.",
    "Every day, {name} went to the {place} to {activity}.",
    "{name} loved to eat {food_a} {food} every morning.",
)
_FINDS = (
    "One day, {name} found {color_a} {color} {thing} under the {spot}.",
    "One day, {pron} saw {color_a} {color} {thing} near the {spot}.",
    "One morning, {name} got {color_a} {color} {thing} from {poss} mom.",
)
_MEETINGS = (
    "Then {pron} met {trait2_a} {trait2} {animal2} named {name2}.",
    "{name2} the {animal2} came to say hello.",
)
_ASKS = (
    '"Can I play with your {thing}?" asked {name2}.',
    '"What a nice {color} {thing}!" said {name2}.',
)
_ANSWERS = (
    '"Yes, let us play together," said {name}.',
    '"Thank you," said {name} with a big smile.',
)
_TOGETHER = (
    "They played with the {color} {thing} all day.",
    "{name} and {name2} became good friends.",
)
_ENDINGS = (
    "When the sun went down, {name} went home.",
    "At night, {pron} went to bed and felt {feeling}.",
    "{name} was very {feeling}. The end.",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def iter_stories(seed: int):
    """An endless stream of stories from the grammar, deterministic in `seed` (one story per
    string, no newlines)."""
    rng = random.Random(seed)
    while True:
        name, name2 = rng.sample(sorted(_HEROES), 2)
        pron = _HEROES[name]
        cast = dict(
            name=name, name2=name2, pron=pron, Pron=pron.capitalize(), poss=_POSSESSIVE[pron],
            Poss=_POSSESSIVE[pron].capitalize(), animal=rng.choice(_ANIMALS),
            animal2=rng.choice(_ANIMALS), trait=rng.choice(_TRAITS), trait2=rng.choice(_TRAITS),
            color=rng.choice(_COLORS), thing=rng.choice(_THINGS), place=rng.choice(_PLACES),
            activity=rng.choice(_ACTIVITIES), spot=rng.choice(_SPOTS), food=rng.choice(_FOODS),
            feeling=rng.choice(_FEELINGS),
        )
        for slot in ("trait", "trait2", "color", "food"):
            cast[slot + "_a"] = _article(cast[slot])
        parts = [_INTROS, _HABITS, _FINDS]
        if rng.random() < 0.6:
            parts += [_MEETINGS, _ASKS, _ANSWERS, _TOGETHER]
        parts.append(_ENDINGS)
        yield " ".join(rng.choice(part).format(**cast) for part in parts)


def generate_stories(n: int, seed: int) -> list[str]:
    """The first `n` stories of `iter_stories(seed)`."""
    return list(itertools.islice(iter_stories(seed), n))


def corpus_words() -> frozenset[str]:
    """Every word (lower case, letters only) the grammar can produce."""
    lists = (_HEROES, _POSSESSIVE.values(), _HEROES.values(), _ANIMALS, _TRAITS, _COLORS, _THINGS,
             _PLACES, _ACTIVITIES, _SPOTS, _FOODS, _FEELINGS, ("a", "an"))
    templates = (_INTROS, _HABITS, _FINDS, _MEETINGS, _ASKS, _ANSWERS, _TOGETHER, _ENDINGS)
    text = " ".join(w for group in lists for w in group)
    text += " " + " ".join(re.sub(r"\{\w+\}", " ", t) for group in templates for t in group)
    return frozenset(words(text))


def words(text: str) -> list[str]:
    """The words of `text`: runs of letters, lower-cased."""
    return re.findall(r"[a-z]+", text.lower())


HELD_OUT_SEED = 2024  # a story stream not trained on (training uses --seed, default 0)


def sample_prompt() -> str:
    """A held-out corpus prompt (a story opening: its first sentence and the start of the next)
    for greedy samples and the fixture tests."""
    story = generate_stories(1, seed=HELD_OUT_SEED)[0]
    first, rest = story.split(". ", 1)
    return f"{first}. {' '.join(rest.split()[:2])}"


# ---- the tokenizer ------------------------------------------------------------------------------
VOCAB_SIZE = 768  # the grammar's words all become single pieces well before this size
TOKENIZER_STORIES = 5000


def train_tokenizer(stories: list[str]) -> bytes:
    """A SentencePiece BPE model with Gemma's conventions, trained on `stories` (serialized)."""
    model = io.BytesIO()  # not a file: the model would record its temporary path
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(stories), model_writer=model, vocab_size=VOCAB_SIZE,
        model_type="bpe", add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        num_threads=1, minloglevel=2)  # one thread: the same pieces on every machine
    return model.getvalue()


def pack_rows(tokenizer: Tokenizer, stories, n_rows: int, row_len: int) -> np.ndarray:
    """[n_rows, row_len] token ids: `<bos> story <eos>` back to back, each row starting with a new
    story (so position 0 holds <bos>, as in generation) and cut at row_len."""
    rows, row = [], []
    for story in stories:
        row += tokenizer.encode(story, add_bos=True, add_eos=True)
        if len(row) >= row_len:
            rows.append(row[:row_len])
            row = []
            if len(rows) == n_rows:
                return np.asarray(rows, np.int32)
    raise ValueError("ran out of stories")


# ---- the models ---------------------------------------------------------------------------------
_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
               head_dim=32, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
               pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
               attention_bias=False, attention_dropout=0.0, dtype="float32")

# Hugging Face config.json contents (transformers 5 field names).
HF_CONFIGS = {
    # Gemma 3 (as gemma3-270m/1b: 5 local + 1 global, no RoPE scaling); every matmul input is 128
    # wide (hidden, 4 heads x 32) or 512 (MLP down).
    "gemma3": dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", **_COMMON,
        num_key_value_heads=1, intermediate_size=512, query_pre_attn_scalar=32, sliding_window=32,
        max_position_embeddings=512, layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
        final_logit_softcapping=None, attn_logit_softcapping=None,
        use_bidirectional_attention=False),
    # RecurrentGemma: (recurrent, recurrent, attention) x 2. HF's intermediate_size is twice the
    # MLP branch width: 768 -> branches of 384 = 3 x 128 (RecurrentGemma's 3 x width).
    "recurrentgemma": dict(
        architectures=["RecurrentGemmaForCausalLM"], model_type="recurrent_gemma", **_COMMON,
        num_key_value_heads=1, intermediate_size=768, lru_width=128, attention_window_size=32,
        conv1d_width=4, logits_soft_cap=30.0, block_types=["recurrent", "recurrent", "attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0,
                         "partial_rotary_factor": 0.5},
        embeddings_scale_by_sqrt_dim=True),
}
FOLDERS = {"gemma3": "gemma3-tiny-trained", "recurrentgemma": "recurrentgemma-tiny-trained"}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; steps were sized to 2-5 minutes per model on 2 CPU cores."""

    steps: int
    batch: int = 16
    seq_len: int = 128  # tokens per row (the model sees seq_len, predicts seq_len)
    peak_lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0


DEFAULT_STEPS = {"gemma3": 500, "recurrentgemma": 600}


def loss_fn(params, cfg, rows):
    """Mean next-token cross-entropy of rows [B, T + 1]: a prefill at position 0 into a fresh cache
    is the causal forward pass over the first T tokens."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    b, t = inputs.shape
    with decomposed():  # composites have no derivative: trace their decompositions
        logits, _ = forward(params, cfg, inputs, 0, init_cache(cfg, b, t))
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _matrices(params: dict) -> dict:
    """Weight decay mask: matrices and tables only, not norm scales, biases or `a_param`."""
    return {k: v.ndim >= 2 for k, v in params.items()}


def train(cfg, settings: TrainSettings, rows: np.ndarray, seed: int, log_every: int = 50):
    """AdamW with linear warmup and cosine decay on `rows` [steps * batch, seq_len + 1], one fresh
    batch per step. Returns (float32 numpy params, mean loss of the last `log_every` steps)."""
    warmup = min(settings.warmup, settings.steps // 2)  # short runs (smoke tests) still decay
    schedule = optax.warmup_cosine_decay_schedule(0.0, settings.peak_lr, warmup, settings.steps,
                                                  end_value=settings.peak_lr / 20)
    optimizer = optax.chain(
        optax.clip_by_global_norm(settings.clip),
        optax.adamw(schedule, weight_decay=settings.weight_decay, mask=_matrices))
    params = {k: jnp.asarray(v) for k, v in init_params(cfg, seed).items()}
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, cfg, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start, recent = time.time(), []
    for i in range(settings.steps):
        batch = jnp.asarray(rows[i * settings.batch:(i + 1) * settings.batch])
        params, opt_state, loss = step(params, opt_state, batch)
        recent = (recent + [float(loss)])[-log_every:]
        if (i + 1) % log_every == 0 or i == 0:
            print(f"  step {i + 1:4d}/{settings.steps}  loss {np.mean(recent):.4f}  "
                  f"lr {float(schedule(i)):.2e}  {time.time() - start:6.1f}s", flush=True)
    return {k: np.asarray(v, np.float32) for k, v in params.items()}, float(np.mean(recent))


def greedy_sample(params, cfg, tokenizer: Tokenizer, prompt: str, new_tokens: int = 32) -> str:
    """The greedy continuation of `prompt` (stops at <eos>)."""
    out = generate(params, cfg, [tokenizer.encode(prompt)], new_tokens,
                   stop_tokens=(cfg.tokens.eos,))
    return tokenizer.decode(out.tokens[0])


def check_folder(folder: Path, cfg, params, rows: np.ndarray):
    """The written folder loads through `load_checkpoint` to the same config and logits."""
    loaded_cfg, loaded = load_checkpoint(folder)
    if loaded_cfg != cfg:
        raise RuntimeError(f"{folder}: loads as {loaded_cfg}, trained as {cfg}")
    tokens = jnp.asarray(rows[:2, :-1])
    ours, _ = forward(params, cfg, tokens, 0, init_cache(cfg, 2, tokens.shape[1]))
    theirs, _ = forward(loaded, cfg, tokens, 0, init_cache(cfg, 2, tokens.shape[1]))
    diff = float(jnp.abs(ours - theirs).max())
    if diff != 0.0:
        raise RuntimeError(f"{folder}: the loaded weights' logits differ by up to {diff}")


def folder_readme(name: str, cfg, command: str, settings: TrainSettings, loss: float,
                  seconds: float, prompt: str, sample: str, size: int) -> str:
    return f"""# {name}

A tiny {cfg.family.value} ({cfg.num_layers} layers, hidden {cfg.embed_dim}, vocabulary \
{cfg.vocab_size}) trained from scratch on generated children's stories, for tests: quantization \
error on weights with real structure, and HF/export parity on a model whose output means something.
Not a useful language model.

Produced by (from the repository root; deterministic in its seed):

    {command}

- training: {settings.steps} steps of {settings.batch} x {settings.seq_len} tokens, AdamW \
(peak lr {settings.peak_lr}, cosine decay), float32, {seconds:.0f} s on the generating machine
- final training loss (mean of the last 50 steps): {loss:.4f}
- files: {size / 1e6:.2f} MB (config.json, model.safetensors in float32, tokenizer.model)

Greedy sample (`models.generate`, float32):

- prompt: `{prompt}`
- continuation: `{sample.strip()}`
"""


def build(family: str, out: Path, tokenizer_bytes: bytes, stories_seed: int, steps: int,
          command: str):
    """Train one model on the stories of `stories_seed` and write and check its folder."""
    folder = out / FOLDERS[family]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(HF_CONFIGS[family], indent=2) + "\n")
    (folder / "tokenizer.model").write_bytes(tokenizer_bytes)
    cfg = config_from_hf(folder)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise RuntimeError(f"the tokenizer has {tokenizer.vocab_size} pieces, the model "
                           f"{cfg.vocab_size} rows")
    settings = TrainSettings(steps=steps)
    rows = pack_rows(tokenizer, iter_stories(stories_seed), settings.steps * settings.batch,
                     settings.seq_len + 1)
    print(f"{FOLDERS[family]}: training on {rows.size} tokens", flush=True)
    start = time.time()
    params, loss = train(cfg, settings, rows, seed=stories_seed)
    seconds = time.time() - start
    save_file(to_hf_tensors(cfg, params), folder / "model.safetensors")
    check_folder(folder, cfg, params, rows)
    prompt = sample_prompt()
    sample = greedy_sample(params, cfg, tokenizer, prompt)
    size = sum(f.stat().st_size for f in folder.iterdir())  # before the README
    (folder / "README.md").write_text(
        folder_readme(FOLDERS[family], cfg, command, settings, loss, seconds, prompt, sample, size))
    print(f"{FOLDERS[family]}: loss {loss:.4f}, {seconds:.0f} s, {size / 1e6:.2f} MB\n"
          f"  {prompt} >>> {sample}", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    parser.add_argument("--models", default="gemma3,recurrentgemma",
                        help="comma-separated: gemma3, recurrentgemma")
    parser.add_argument("--steps", type=int, help="training steps (default: per model)")
    parser.add_argument("--seed", type=int, default=0, help="corpus and initialisation seed")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "tools/train_tiny.py", *argv])
    families = args.models.split(",")
    for family in families:
        if family not in HF_CONFIGS:
            parser.error(f"unknown model '{family}'; choose from {', '.join(HF_CONFIGS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer_bytes = train_tokenizer(generate_stories(TOKENIZER_STORIES, args.seed))
    for family in families:
        build(family, args.out, tokenizer_bytes, args.seed, args.steps or DEFAULT_STEPS[family],
              command)


if __name__ == "__main__":
    main()
