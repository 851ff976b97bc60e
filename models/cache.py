"""Static-shape caches: explicit pytrees, one dict per layer, no hidden counters.

Shapes follow the legend in models/__init__.py.

Layouts (heads first, as Hugging Face, LiteRT-LM and ONNX Runtime's GroupQueryAttention expect):
  global attention layer: {"k", "v"}: [B, K, R, D] with R = max_len; row r holds position r.
  local attention layer:  {"k", "v"}: [B, K, R, D] with R = min(W, max_len), a ring buffer;
                          position p lives in row p % R.
  recurrent layer:        {"conv": [B, conv_width - 1, C] (last raw conv inputs, oldest first),
                          "rg_lru": [B, C] float32}.
  int8 KV caches (kv="int8"): "k", "v" hold int8 codes and "k_scale", "v_scale" [B, K, R, 1]
                          float32 their per-row, per-head scales (`quantize_kv`), written together.
Nothing in a cache records positions: the caller passes the chunk's start position, and every
row's position follows from it (see `ring_positions`). That keeps caches exactly the tensors a
runtime passes in and out.

Right-padded chunks: only the first `num_valid` tokens of a chunk are real. Pad tokens never
write a ring row nor change a recurrent state. Global layers may write pad rows past the prompt:
those rows hold positions after every real query and are overwritten before they become visible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from contract.layout import StateLayout
from models.config import LayerKind, ModelConfig

Cache = tuple  # tuple of per-layer dicts


def is_static(n) -> bool:
    """True for a concrete length; False for a symbolic one (the ONNX export traces one graph for
    every chunk length, so length-specialised shortcuts must not fire for it)."""
    return isinstance(n, int)


def state_layout(cfg: ModelConfig, max_len: int | None = None, dtype=np.float32,
                 local_rows: int | None = None, kv: str = "f32") -> StateLayout:
    """The artifact contract's state layout of this model for a context of max_len (default
    cfg.max_seq_len): the caches below, batch 1. `local_rows` overrides the local rings' rows for a
    runtime that owns them (ONNX Runtime's GroupQueryAttention: export/lowering/onnx/fused.py).
    `kv` "int8": int8 KV caches with a float32 scale per row and head (`quantize_kv`)."""
    if kv not in KV_DTYPES:
        raise ValueError(f"unknown KV cache type '{kv}'; choose {', '.join(KV_DTYPES)}")
    max_len = cfg.max_seq_len if max_len is None else max_len
    rc = cfg.recurrent
    return StateLayout.build(
        cfg.layer_kinds, max_len=max_len,
        local_rows=cfg.cache_len(LayerKind.LOCAL, max_len) if local_rows is None else local_rows,
        kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, conv_width=rc.conv_width if rc else 0,
        lru_width=rc.lru_width if rc else 0, dtype=np.dtype(dtype), kv_dtype=np.int8 if kv == "int8" else None)


KV_DTYPES = ("f32", "int8")


def quantize_kv(x):
    """Rows [B, K, T, D] -> (int8 codes [B, K, T, D], float32 scales [B, K, T, 1]): symmetric, one
    scale per row and head, max |x| / 127, rounded to nearest."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round(xf / scale), -127, 127).astype(jnp.int8)
    return codes, scale


def dequantize_kv(codes, scale, dtype=jnp.float32):
    return (codes.astype(jnp.float32) * scale).astype(dtype)


def init_cache(cfg: ModelConfig, batch: int, max_len: int | None = None, dtype=jnp.float32, kv: str = "f32") -> Cache:
    """Zeroed caches for `batch` sequences of up to `max_len` tokens (default cfg.max_seq_len):
    one dict per layer, keyed by StateKind value, shaped as `state_layout` says."""
    layers = [dict() for _ in cfg.layer_kinds]
    for spec in state_layout(cfg, max_len, dtype, kv=kv):
        layers[spec.layer][spec.kind.value] = jnp.zeros((batch, *spec.shape[1:]), spec.dtype)
    return tuple(layers)


def cache_max_len(cfg: ModelConfig, cache: Cache) -> int | None:
    """The context a cache was built for: its global layers' length (None if it has none)."""
    for kind, layer in zip(cfg.layer_kinds, cache):
        if kind is LayerKind.GLOBAL:
            return layer["k"].shape[2]
    return None


def ring_positions(start, rows: int):
    """Absolute position held by each ring row before a chunk starting at `start` is written.

    start: [B] int32 -> [B, R] (R = rows); -1 where the row was never written. Row r holds the
    latest position p < start with p % R == r.
    """
    last = start[:, None] - 1
    pos = last - jnp.mod(last - jnp.arange(rows, dtype=start.dtype)[None, :], rows)
    return jnp.where(pos >= 0, pos, -1)


def write_ring(ring, chunk, start, num_valid):
    """Write the valid tokens of a chunk into a ring buffer at rows (start + t) % R.

    ring: [B, K, R, D]; chunk: [B, K, T, D]; start, num_valid: [B]. With T > R only the last R valid
    tokens survive, as in a sequential write.
    """
    rows, t = ring.shape[2], chunk.shape[2]
    if is_static(t) and t == 1:  # decode: one row, never wraps -> a dynamic_update_slice per sequence
        slot = jnp.mod(start, rows)
        return _update_rows(ring, chunk, slot, num_valid > 0)
    src, written = _ring_sources(start, num_valid, rows)
    gathered = jnp.take_along_axis(chunk, jnp.clip(src, 0, t - 1)[:, None, :, None], axis=2)
    return jnp.where(written[:, None, :, None], gathered, ring)


def _ring_sources(start, num_valid, rows: int):
    """For each ring row r ([B, R]): the chunk token t that a write of the chunk leaves there (the
    last valid t with (start + t) % R == r), and whether any valid token lands there at all."""
    dist = jnp.mod(jnp.arange(rows, dtype=start.dtype)[None, :] - start[:, None], rows)  # [B, R]
    nv = num_valid[:, None]
    return dist + rows * (jnp.maximum(nv - 1 - dist, 0) // rows), dist < nv


def ring_from_window(window, start, num_valid, rows: int):
    """The ring after writing a chunk, gathered from `window` = concat(ring rows, chunk) along axis 1.

    window: [B, R + T, ...] (the R ring rows, then the T chunk tokens); start, num_valid: [B].
    Returns [B, R, ...]: row r holds the last valid chunk token t with (start + t) % R == r, else
    its old value. The same result as `write_ring`, as one gather.
    """
    src, written = _ring_sources(start, num_valid, rows)
    index = jnp.where(written, rows + src, jnp.arange(rows, dtype=start.dtype)[None, :])
    index = index.reshape(*index.shape, *([1] * (window.ndim - 2)))
    return jnp.take_along_axis(window, index, axis=1)


def write_global(cache, chunk, start):
    """Write a chunk into a full-length cache at rows start .. start + T - 1.

    cache: [B, K, R, D]; chunk: [B, K, T, D]; start: [B]. Rows at or past R are dropped (they can
    only hold pad tokens: callers check that real tokens fit). dynamic_update_slice clamps its
    offset to R - T, so near the end the chunk is shifted to keep every row at its position.
    """
    r, t = cache.shape[2], chunk.shape[2]
    if is_static(t) and t > r:
        raise ValueError(f"chunk of {t} tokens does not fit a cache of {r} positions")
    if is_static(t) and t == 1:
        return _update_rows(cache, chunk, start, None)
    offset = jnp.minimum(start, r - t)
    shift = start - offset  # > 0 only when the chunk runs past the end
    src = jnp.arange(t, dtype=start.dtype)[None, :] - shift[:, None]  # [B, T]
    moved = jnp.take_along_axis(chunk, jnp.clip(src, 0, t - 1)[:, None, :, None], axis=2)
    old = jnp.stack([
        jax.lax.dynamic_slice_in_dim(cache[i], offset[i], t, axis=1) for i in range(cache.shape[0])
    ])
    rows = jnp.where((src >= 0)[:, None, :, None], moved, old)
    return _update_rows(cache, rows, offset, None)


def _update_rows(cache, rows, offset, keep_new):
    """Per sequence: cache[i, :, offset[i]:offset[i]+T] = rows[i] (old rows where keep_new is False).

    Batch 1 (every exported signature) is one dynamic_update_slice on the 4-D cache, nothing
    between the state input and the state output: a runtime that binds one buffer to both (LiteRT's
    DYNAMIC_UPDATE_SLICE skips its copy when its input and output share memory) writes T rows."""
    if cache.shape[0] == 1:
        new = rows.astype(cache.dtype)
        if keep_new is not None:
            old = jax.lax.dynamic_slice_in_dim(cache, offset[0], new.shape[2], axis=2)
            new = jnp.where(keep_new[0], new, old)
        zero = jnp.zeros((), offset.dtype)
        return jax.lax.dynamic_update_slice(cache, new, (zero, zero, offset[0], zero))
    out = []
    for i in range(cache.shape[0]):
        new = rows[i]
        if keep_new is not None:
            old = jax.lax.dynamic_slice_in_dim(cache[i], offset[i], new.shape[1], axis=1)
            new = jnp.where(keep_new[i], new, old)
        out.append(jax.lax.dynamic_update_slice_in_dim(cache[i], new.astype(cache.dtype), offset[i], 1))
    return jnp.stack(out)
