"""The attention block shared by Gemma 2/3 layers and RecurrentGemma's local-attention blocks.

Shapes follow the legend in models/__init__.py.

Projections (and QK-norm) happen in the block; the core (`_global_core` / `_local_core`) applies
RoPE, writes the cache and builds the mask around the `odml.scaled_dot_product_attention`
composite (models/fused.py), which takes q [B, T, H, D], the keys/values it may attend
[B, S, K, D] and an additive mask. With AttentionForm.CACHE_OWNING (the ONNX export's form) the
core itself is one composite (`fused.cached_attention`), because ONNX Runtime's attention owns
RoPE and the cache write.
Caches are [B, K, R, D] (heads first); they are transposed to the composite's layout (a
reshape when K == 1). Cache handling by layer kind:
  GLOBAL: write the chunk into the full-length cache first, then attend over all of it.
  LOCAL:  attend over concat(ring before the write, chunk), then write the chunk into the ring.
          The ring keeps the previous R positions, so a chunk of any length (also one that wraps
          the ring) sees exactly the keys of its window. A one-token decode into a ring of at
          least the window's span writes first and attends over the ring alone (in place).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.cache import (
    dequantize_kv, is_static, quantize_kv, ring_from_window, ring_positions, write_global, write_ring,
)
from models.config import LayerKind, ModelConfig
from models.fused import AttentionForm, attention_mask, cached_attention, scaled_dot_product_attention
from models.layers import Params, apply_rope, linear, rms_norm, rope_frequencies, rotated


def attention_block(p: Params, cfg: ModelConfig, kind: LayerKind, h, start, num_valid, cache: dict,
                    blocks=None, attention: AttentionForm = AttentionForm.SDPA, span: int | None = None, total=None):
    """h: [B, T, E]; start, num_valid: [B] (the chunk is at positions start + t); blocks: None, or
    [B, T] int32 image-block ids (models/multimodal.image_blocks), whose tokens attend each other
    bidirectionally; attention: how the core is traced (models/fused.AttentionForm); span: a
    global layer attends over its cache's first `span` rows only (a context bucket). Returns
    ([B, T, E], new cache)."""
    b, t, _ = h.shape
    heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(p, "attn.q", h).reshape(b, t, heads, d)
    k = linear(p, "attn.k", h).reshape(b, t, kv_heads, d)
    v = linear(p, "attn.v", h).reshape(b, t, kv_heads, d)
    if cfg.qk_norm:  # QK-norm before RoPE (Gemma 3)
        q = rms_norm(q, p["attn.q_norm"], cfg.norm_eps)
        k = rms_norm(k, p["attn.k_norm"], cfg.norm_eps)
    base, scale = cfg.rope_params(kind)
    # RoPE happens inside the core (so that ONNX Runtime's attention can apply it: do_rotary); its
    # frequency table travels as an operand (a constant captured inside a composite would be hoisted
    # into one anyway, ahead of the others)
    rope = dict(rope_base=base, rope_scale=scale, rope_dim=cfg.rope_dim)
    freqs = jnp.asarray(rope_frequencies(base, scale, cfg.rope_dim))
    int8 = "k_scale" in cache  # int8 KV caches (models.cache.quantize_kv): codes and scales travel together
    cache_k = (cache["k"], cache["k_scale"]) if int8 else cache["k"]
    cache_v = (cache["v"], cache["v_scale"]) if int8 else cache["v"]
    if kind is LayerKind.GLOBAL:
        out, ck, cv = cached_attention(_global_core, "gemma_edge.global_attention", q, k, v,
                                       cache_k, cache_v, start, num_valid, blocks=blocks, form=attention, total=total,
                                       rope_freqs=freqs,
                                       scale=cfg.query_scale, logit_cap=cfg.attn_softcap, **rope,
                                       **({} if span is None else {"span": span}))
    else:
        out, ck, cv = cached_attention(_local_core, "gemma_edge.local_attention", q, k, v,
                                       cache_k, cache_v, start, num_valid, blocks=blocks, form=attention,
                                       rope_freqs=freqs, scale=cfg.query_scale, logit_cap=cfg.attn_softcap,
                                       window=cfg.window_span, **rope)
    # [B, T, H, D] -> [B, T, H*D]
    out = linear(p, "attn.o", rotated(p, "attn.o_rotation", out.reshape(b, t, heads * d)), "attn.o_bias")
    if int8:
        return out, {"k": ck[0], "v": cv[0], "k_scale": ck[1], "v_scale": cv[1]}
    return out, {"k": ck, "v": cv}


def _positions(start, t):
    """[B] -> [B, T]: the chunk's positions."""
    return start[:, None] + jnp.arange(t, dtype=start.dtype)[None, :]


def _rope(q, k, positions, rope_base, rope_scale, rope_dim, freqs=None):
    kw = dict(base=rope_base, scale=rope_scale, rope_dim=int(rope_dim), freqs=freqs)
    return apply_rope(q, positions, **kw), apply_rope(k, positions, **kw)


def _chunk_key_blocks(blocks, start, rows: int):
    """Image-block ids of a full-length cache's rows: the chunk's ids at rows start .. start+T-1, 0
    elsewhere (earlier chunks' images are whole and causal to this chunk). [B, T] -> [B, R]"""
    t = blocks.shape[1]
    offset = jnp.arange(rows, dtype=start.dtype)[None, :] - start[:, None]
    inside = (offset >= 0) & (offset < t)
    return jnp.where(inside, jnp.take_along_axis(blocks, jnp.clip(offset, 0, t - 1), axis=1), 0)


def _global_core(q, k, v, cache_k, cache_v, start, num_valid, blocks=None, *, scale, rope_base, rope_scale,
                 rope_dim, logit_cap=None, span=None, total=None, rope_freqs=None):
    """RoPE, write the chunk into the full-length cache, then attend over all of it (over its
    first `span` rows for a context bucket: the chunk's real tokens must lie below it; over its
    first total.shape[0] rows, the positions in use, when `total` is given: models.model.forward)."""
    b, t = q.shape[:2]
    positions = _positions(start, t)
    q, k = _rope(q, k, positions, rope_base, rope_scale, rope_dim, rope_freqs)
    # [B, T, K, D] -> [B, K, T, D], the cache layout
    if isinstance(cache_k, tuple):  # int8 KV: (codes, scales), quantized on write
        ck = _write_int8(write_global, cache_k, k, start)
        cv = _write_int8(write_global, cache_v, v, start)
        rows = _attended_rows(ck[0], span, total)
        keys = dequantize_kv(*(_first_rows(x, rows) for x in ck), q.dtype).transpose(0, 2, 1, 3)
        values = dequantize_kv(*(_first_rows(x, rows) for x in cv), q.dtype).transpose(0, 2, 1, 3)
    else:
        ck = write_global(cache_k, k.transpose(0, 2, 1, 3), start)
        cv = write_global(cache_v, v.transpose(0, 2, 1, 3), start)
        rows = _attended_rows(ck, span, total)
        keys, values = _first_rows(ck, rows).transpose(0, 2, 1, 3), _first_rows(cv, rows).transpose(0, 2, 1, 3)
    k_pos = jnp.broadcast_to(jnp.arange(rows, dtype=positions.dtype), (b, rows))
    k_blocks = None if blocks is None else _chunk_key_blocks(blocks, start, rows)
    mask = attention_mask(positions, k_pos, None, blocks, k_blocks)
    out = scaled_dot_product_attention(q, keys, values, mask, scale=scale, logit_cap=logit_cap)
    return out, ck, cv


def _attended_rows(cache, span, total):
    """Rows of a global cache [B, K, R, D] that attention reads: all, a context bucket's first
    `span`, or the positions in use (total.shape[0], a symbolic dimension in an ONNX graph)."""
    if total is not None:
        return total.shape[0]
    return cache.shape[2] if span is None else min(int(span), cache.shape[2])


def _first_rows(cache, rows):
    """cache[:, :, :rows]; a slice (not a gather) when rows is symbolic."""
    if is_static(rows):
        return cache[:, :, :rows]
    return jax.lax.slice_in_dim(cache, 0, rows, axis=2)


def _write_int8(write, cache: tuple, rows, start) -> tuple:
    """Quantize rows [B, T, K, D] (models.cache.quantize_kv) and write codes and scales with
    `write(cache, chunk [B, K, T, X], start)`."""
    codes, scales = quantize_kv(rows.transpose(0, 2, 1, 3))
    return write(cache[0], codes, start), write(cache[1], scales, start)


def _local_core(q, k, v, ring_k, ring_v, start, num_valid, blocks=None, *, scale, window, rope_base, rope_scale,
                rope_dim, logit_cap=None, rope_freqs=None):
    """RoPE, attend over the ring as it was plus the chunk, then write the chunk into the ring."""
    t = q.shape[1]
    positions = _positions(start, t)
    q, k = _rope(q, k, positions, rope_base, rope_scale, rope_dim, rope_freqs)
    int8 = isinstance(ring_k, tuple)  # int8 KV: (codes, scales); the chunk attends its own rows unrounded
    if not int8 and is_static(t) and t == 1 and blocks is None and ring_k.shape[2] >= window:
        # decode: write the row first, then attend over the ring alone. The ring's R >= span rows
        # then hold the window's keys (the row the write replaces held a position at least R back,
        # outside it), the same keys as the ring before the write plus the chunk. Nothing but the
        # write reads the state input, so a runtime can bind one buffer to the ring's input and
        # output and update one row in place (contract.tflite.in_place_states), where the
        # concatenation copied the ring and the write copied it again into a second buffer.
        ck = write_ring(ring_k, k.transpose(0, 2, 1, 3), start, num_valid)
        cv = write_ring(ring_v, v.transpose(0, 2, 1, 3), start, num_valid)
        mask = attention_mask(positions, ring_positions(start + num_valid, ck.shape[2]), int(window))
        keys, values = ck.transpose(0, 2, 1, 3).astype(k.dtype), cv.transpose(0, 2, 1, 3).astype(v.dtype)
        return scaled_dot_product_attention(q, keys, values, mask, scale=scale, logit_cap=logit_cap), ck, cv
    old_k = dequantize_kv(*ring_k, k.dtype) if int8 else ring_k
    old_v = dequantize_kv(*ring_v, v.dtype) if int8 else ring_v
    k_pos = jnp.concatenate([ring_positions(start, old_k.shape[2]), positions], axis=1)
    keys = jnp.concatenate([old_k.transpose(0, 2, 1, 3).astype(k.dtype), k], axis=1)
    values = jnp.concatenate([old_v.transpose(0, 2, 1, 3).astype(v.dtype), v], axis=1)
    k_blocks = None if blocks is None else jnp.concatenate(
        [jnp.zeros((blocks.shape[0], old_k.shape[2]), blocks.dtype), blocks], axis=1)
    mask = attention_mask(positions, k_pos, int(window), blocks, k_blocks)
    if int8 and is_static(t):
        ring = lambda cache, chunk, s: write_ring(cache, chunk, s, num_valid)  # noqa: E731
        ck, cv = _write_int8(ring, ring_k, k, start), _write_int8(ring, ring_v, v, start)
    elif int8:
        # one graph for every length (ONNX): as below, the new ring is read out of the old one and
        # the chunk (codes and scales alike: old rows keep their codes, only the chunk is quantized)
        rows = ring_k[0].shape[2]

        def new_ring(old: tuple, chunk):
            window = [jnp.concatenate([o.transpose(0, 2, 1, 3), c], axis=1)  # [B, R + T, K, X]
                      for o, c in zip(old, quantize_kv(chunk))]  # per row and head: any axis order
            return tuple(ring_from_window(w, start, num_valid, rows).transpose(0, 2, 1, 3) for w in window)

        ck, cv = new_ring(ring_k, k), new_ring(ring_v, v)
    elif is_static(t):
        ck = write_ring(ring_k, k.transpose(0, 2, 1, 3), start, num_valid)
        cv = write_ring(ring_v, v.transpose(0, 2, 1, 3), start, num_valid)
    else:
        # One graph for every length (ONNX): runtimes bind a state's past and present to one buffer,
        # so the new ring is read out of `keys` (old ring + chunk), which orders every read of the
        # old ring before the write that replaces it.
        rows = ring_k.shape[2]
        ck = ring_from_window(keys, start, num_valid, rows).transpose(0, 2, 1, 3).astype(ring_k.dtype)
        cv = ring_from_window(values, start, num_valid, rows).transpose(0, 2, 1, 3).astype(ring_v.dtype)
    out = scaled_dot_product_attention(q, keys, values, mask, scale=scale, logit_cap=logit_cap)
    return out, ck, cv
