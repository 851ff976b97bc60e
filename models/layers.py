"""Numerical building blocks shared by every family. Pure JAX, no parameters of their own.

Shape legend used in this package:
  B batch, T query (chunk) length, S key length, E embed_dim, H query heads, K kv heads,
  G = H / K queries per kv head, D head_dim, F mlp width per branch, V vocab rows, R cache rows.

Precision policy (MODEL_SPEC 8.1, "recommendation"): matmuls run in the activation dtype with f32
accumulation; norm statistics, RoPE angles, softmax, soft-caps and the RG-LRU gate math run in f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
# Masked attention logits are *replaced* by this value (the official implementations' K_MASK).
MASK_VALUE = -2.3819763e38


class Params:
    """A view of the flat parameter dict under a name prefix: `Params(p, "layers.3.")["attn.q"]`."""

    def __init__(self, params: dict, prefix: str = ""):
        self._params, self._prefix = params, prefix

    def __getitem__(self, name: str):
        return self._params[self._prefix + name]

    def get(self, name: str):
        return self._params.get(self._prefix + name)

    def scope(self, prefix: str) -> "Params":
        return Params(self._params, self._prefix + prefix)


def dense(x, w, bias=None):
    """x [..., in] @ w[out, in].T (+ bias). Weights are stored [out, in] (becomes FULLY_CONNECTED)."""
    y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), preferred_element_type=F32)
    if bias is not None:
        y = y + bias.astype(F32)
    return y.astype(x.dtype)


def rms_norm(x, scale, eps: float = 1e-6):
    """Gemma RMSNorm with a (1 + scale) gain; statistics in f32 (MODEL_SPEC 1.1)."""
    xf = x.astype(F32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(var + eps)
    return (y * (1.0 + scale.astype(F32))).astype(x.dtype)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def softcap(x, cap: float | None):
    """cap * tanh(x / cap) in f32; identity when cap is None."""
    if cap is None:
        return x
    return cap * jnp.tanh(x.astype(F32) / cap)


def apply_rope(x, positions, *, base: float, scale: float = 1.0, rope_dim: int | None = None):
    """Half-split ("rotate_half") RoPE on the first `rope_dim` features of each head.

    x: [B, T, N, D]; positions: [B, T] int. Angles and the rotation are computed in f32 and rounded
    once. Linear scaling divides positions by `scale`. With rope_dim < D the rest passes through
    (RecurrentGemma rotates half of each head; its frequencies use rope_dim as the denominator).
    """
    d = x.shape[-1]
    rope_dim = d if rope_dim is None else rope_dim
    half = rope_dim // 2
    timescale = base ** ((2.0 / rope_dim) * jnp.arange(half, dtype=F32))  # [half]
    angle = positions.astype(F32)[..., None] / scale / timescale  # [B, T, half]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]  # [B, T, 1, half]
    xf = x.astype(F32)
    a, b, rest = xf[..., :half], xf[..., half:rope_dim], xf[..., rope_dim:]
    out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin, rest], axis=-1)
    return out.astype(x.dtype)


def attention_core(q, k, v, q_pos, k_pos, *, scale: float, logit_cap: float | None = None,
                   window_span: int | None = None):
    """Scaled dot-product attention with GQA, soft-cap, causal and sliding-window masks.

    q: [B, T, H, D]; k, v: [B, K, S, D]; q_pos: [B, T] and k_pos: [B, S] absolute positions
    (k_pos < 0 marks an empty cache slot). A key is visible iff 0 <= k_pos <= q_pos and, with a
    window, k_pos > q_pos - window_span. Query head n reads kv head n // G (contiguous groups).
    Returns [B, T, H, D] in v's dtype.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    # [B, T, H, D] -> [B, T, K, G, D]
    qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
    logits = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=F32) * scale
    logits = softcap(logits, logit_cap)
    kp, qp = k_pos[:, None, :], q_pos[:, :, None]  # [B, 1, S], [B, T, 1]
    visible = (kp >= 0) & (kp <= qp)
    if window_span is not None:
        visible &= kp > qp - window_span
    logits = jnp.where(visible[:, None, None], logits, MASK_VALUE)  # [B, K, G, T, S]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v, preferred_element_type=F32)
    return out.reshape(b, t, h, d).astype(v.dtype)
