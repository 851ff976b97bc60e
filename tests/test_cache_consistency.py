"""Prefill in chunks + one-token decode through the static caches equals the full-sequence forward
at every position, for all three families; right padding never corrupts a cache."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAMILIES, TINY, full_logits, jit_forward, random_tokens
from models import LayerKind, get_config, init_cache, init_params

TOTAL = 30  # tokens per sequence: more than three windows of the tiny configs (8)
PREFILL = 21  # tokens fed through prefill chunks; the rest is decoded one at a time
MAX_LEN = 64


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    cfg = get_config(TINY[request.param])
    return cfg, init_params(cfg, seed=1)


def run_chunked(params, cfg, tokens, chunk, pad_seed=None):
    """Prefill tokens[:PREFILL] in right-padded chunks of `chunk`, decode the rest; logits [T, V].

    Pad slots hold random tokens (pad_seed) so that a pad leaking into a cache would show.
    """
    rng = np.random.default_rng(pad_seed)
    cache = init_cache(cfg, 1, MAX_LEN)
    out, starts = [], []
    for s in range(0, PREFILL, chunk):
        n = min(chunk, PREFILL - s)
        block = rng.integers(3, cfg.vocab_size, (1, chunk)).astype(np.int32)
        block[0, :n] = tokens[0, s:s + n]
        logits, cache = jit_forward(params, cfg, jnp.asarray(block), jnp.array([s]), cache, jnp.array([n]))
        out.append(np.asarray(logits)[0, :n])
        starts.append((s, n))
    for s in range(PREFILL, tokens.shape[1]):
        logits, cache = jit_forward(params, cfg, jnp.asarray(tokens[:, s:s + 1]), jnp.array([s]), cache,
                                    jnp.array([1]))
        out.append(np.asarray(logits)[0])
    return np.concatenate(out), starts


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 5, 11])
def test_prefill_decode_equals_full_forward(model, chunk):
    cfg, params = model
    w = cfg.sliding_window
    tokens = random_tokens(TOTAL)
    full = full_logits(params, cfg, tokens, MAX_LEN)[0]
    chunked, starts = run_chunked(params, cfg, tokens, chunk, pad_seed=chunk)
    assert w == 8  # so the chunk sizes above include W - 1 and W
    if chunk == 5:  # this chunking has chunks that cross the end of the ring
        assert any(s % w + n > w for s, n in starts)
    per_position = np.abs(chunked - full).max(axis=-1)
    assert per_position.max() <= 1e-4, per_position


def test_right_padding_does_not_touch_caches(model):
    """A right-padded chunk leaves exactly the cache an unpadded chunk leaves (rings, recurrent
    state, and global rows up to the last real token)."""
    cfg, params = model
    tokens = random_tokens(13)
    exact = init_cache(cfg, 1, MAX_LEN)
    _, exact = jit_forward(params, cfg, jnp.asarray(tokens[:, :5]), jnp.array([0]), exact, jnp.array([5]))
    _, exact = jit_forward(params, cfg, jnp.asarray(tokens[:, 5:13]), jnp.array([5]), exact, jnp.array([8]))

    padded_tokens = np.concatenate([tokens[:, 5:13], random_tokens(3, seed=9)], axis=1)
    padded = init_cache(cfg, 1, MAX_LEN)
    _, padded = jit_forward(params, cfg, jnp.asarray(tokens[:, :5]), jnp.array([0]), padded, jnp.array([5]))
    _, padded = jit_forward(params, cfg, jnp.asarray(padded_tokens), jnp.array([5]), padded, jnp.array([8]))
    for kind, a, b in zip(cfg.layer_kinds, exact, padded):
        for name in a:
            x, y = np.asarray(a[name]), np.asarray(b[name])
            if kind is LayerKind.GLOBAL:  # rows past the prompt may hold pads; they are never read
                x, y = x[:, :, :13], y[:, :, :13]
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=f"{kind} {name}")


def test_batch_rows_at_different_positions(model):
    """One call with two sequences at different positions equals two separate calls."""
    cfg, params = model
    a, b = random_tokens(12, seed=3), random_tokens(12, seed=4)
    caches, singles = [], []
    for toks, n in ((a, 10), (b, 4)):
        cache = init_cache(cfg, 1, MAX_LEN)
        _, cache = jit_forward(params, cfg, jnp.asarray(toks[:, :n]), jnp.array([0]), cache, jnp.array([n]))
        logits, _ = jit_forward(params, cfg, jnp.asarray(toks[:, n:n + 2]), jnp.array([n]), cache,
                                jnp.array([2]))
        caches.append(cache)
        singles.append(np.asarray(logits)[0])
    batch_cache = tuple({k: jnp.concatenate([x[k], y[k]]) for k in x} for x, y in zip(*caches))
    both = np.concatenate([a[:, 10:12], b[:, 4:6]])
    logits, _ = jit_forward(params, cfg, jnp.asarray(both), jnp.array([10, 4]), batch_cache,
                            jnp.array([2, 2]))
    np.testing.assert_allclose(np.asarray(logits), np.stack(singles), atol=1e-5)


def test_cache_shapes_follow_layer_kinds(model):
    cfg, _ = model
    cache = init_cache(cfg, 2, MAX_LEN)
    for kind, layer in zip(cfg.layer_kinds, cache):
        if kind is LayerKind.RECURRENT:
            rc = cfg.recurrent
            assert layer["rg_lru"].shape == (2, rc.lru_width) and layer["rg_lru"].dtype == jnp.float32
            assert layer["conv"].shape == (2, rc.conv_width - 1, rc.lru_width)
        else:
            rows = cfg.sliding_window if kind is LayerKind.LOCAL else MAX_LEN
            assert layer["k"].shape == (2, cfg.num_kv_heads, rows, cfg.head_dim)
            assert layer["v"].shape == layer["k"].shape


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])  # the families with global caches
def test_chunk_longer_than_cache_is_an_error(family):
    cfg = get_config(TINY[family])
    params = init_params(cfg, seed=1)
    cache = init_cache(cfg, 1, 16)
    with pytest.raises(ValueError, match="longer than the cache"):
        jit_forward(params, cfg, jnp.asarray(random_tokens(17)), jnp.array([0]), cache, jnp.array([17]))


def test_bf16_weights_compute_in_bf16_close_to_f32(model):
    """bf16 parameters run the bf16 path (bf16 caches, f32 norms/softmax/logits) and stay close
    to the f32 model."""
    import ml_dtypes

    cfg, params = model
    half = {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()}
    rounded = {k: v.astype(np.float32) for k, v in half.items()}
    tokens = random_tokens(TOTAL)
    cache = init_cache(cfg, 1, MAX_LEN, jnp.bfloat16)
    logits, new_cache = jit_forward(half, cfg, jnp.asarray(tokens), jnp.array([0]), cache,
                                    jnp.array([TOTAL]))
    assert logits.dtype == jnp.float32
    for layer in new_cache:
        for name, x in layer.items():
            assert x.dtype == (jnp.float32 if name == "rg_lru" else jnp.bfloat16), name
    ref = full_logits(rounded, cfg, tokens, MAX_LEN)
    rel_rms = np.sqrt(np.mean((np.asarray(logits) - ref) ** 2) / np.mean(ref**2))
    assert rel_rms < 3e-2, rel_rms
    assert np.mean(np.asarray(logits).argmax(-1) == ref.argmax(-1)) > 0.8


def test_a_used_cache_restarts_at_position_zero(model):
    """Starting a new sequence at position 0 ignores whatever a cache holds: stale attention rows
    are masked by position, conv taps before position 0 are zero, the RG-LRU state resets."""
    cfg, params = model
    tokens = random_tokens(12, seed=5)
    fresh = full_logits(params, cfg, tokens, MAX_LEN)
    cache = init_cache(cfg, 1, MAX_LEN)
    _, used = jit_forward(params, cfg, jnp.asarray(random_tokens(12, seed=6)), jnp.array([0]), cache,
                          jnp.array([12]))
    again, _ = jit_forward(params, cfg, jnp.asarray(tokens), jnp.array([0]), used, jnp.array([12]))
    np.testing.assert_allclose(np.asarray(again), fresh, atol=1e-5)
