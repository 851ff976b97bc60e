"""The attention block shared by Gemma 2/3 layers and RecurrentGemma's local-attention blocks.

Projections and RoPE happen here; the core (`layers.attention_core`) sees q, the keys/values it may
attend and their positions. Cache handling by layer kind:
  GLOBAL: write the chunk into the full-length cache first, then attend over all of it.
  LOCAL:  attend over concat(ring before the write, chunk), then write the chunk into the ring.
          The ring keeps the previous R positions, so a chunk of any length (also one that wraps
          the ring) sees exactly the keys of its window.
"""

from __future__ import annotations

import jax.numpy as jnp

from models.cache import ring_positions, write_global, write_ring
from models.config import LayerKind, ModelConfig
from models.layers import Params, apply_rope, attention_core, dense, rms_norm


def attention_block(p: Params, cfg: ModelConfig, kind: LayerKind, h, positions, start,
                    num_valid, cache: dict):
    """h: [B, T, E]; positions: [B, T]; start, num_valid: [B]. Returns ([B, T, E], new cache)."""
    b, t, _ = h.shape
    heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = dense(h, p["attn.q"]).reshape(b, t, heads, d)
    k = dense(h, p["attn.k"]).reshape(b, t, kv_heads, d)
    v = dense(h, p["attn.v"]).reshape(b, t, kv_heads, d)
    if cfg.qk_norm:  # QK-norm before RoPE (Gemma 3)
        q = rms_norm(q, p["attn.q_norm"], cfg.norm_eps)
        k = rms_norm(k, p["attn.k_norm"], cfg.norm_eps)
    base, scale = cfg.rope_params(kind)
    q = apply_rope(q, positions, base=base, scale=scale, rope_dim=cfg.rope_dim)
    k = apply_rope(k, positions, base=base, scale=scale, rope_dim=cfg.rope_dim)
    # [B, T, K, D] -> [B, K, T, D], the cache layout
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    core = dict(scale=cfg.query_scale, logit_cap=cfg.attn_softcap)
    if kind is LayerKind.GLOBAL:
        ck, cv = write_global(cache["k"], k, start), write_global(cache["v"], v, start)
        rows = ck.shape[2]
        k_pos = jnp.broadcast_to(jnp.arange(rows, dtype=positions.dtype), (b, rows))
        out = attention_core(q, ck, cv, positions, k_pos, **core)
    else:
        ring_k, ring_v = cache["k"], cache["v"]
        k_pos = jnp.concatenate([ring_positions(start, ring_k.shape[2]), positions], axis=1)
        keys = jnp.concatenate([ring_k.astype(k.dtype), k], axis=2)
        values = jnp.concatenate([ring_v.astype(v.dtype), v], axis=2)
        out = attention_core(q, keys, values, positions, k_pos, window_span=cfg.window_span, **core)
        ck, cv = write_ring(ring_k, k, start, num_valid), write_ring(ring_v, v, start, num_valid)
    # [B, T, H, D] -> [B, T, H*D]
    out = dense(out.reshape(b, t, heads * d), p["attn.o"], p.get("attn.o_bias"))
    return out, {"k": ck, "v": cv}
