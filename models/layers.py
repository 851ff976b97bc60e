"""Numerical building blocks shared by every family. Pure JAX, no parameters of their own.

Shapes follow the legend in models/__init__.py.

Precision policy (MODEL_SPEC 8.1, "recommendation"): matmuls run in the activation dtype with f32
accumulation; norm statistics, RoPE angles, softmax, soft-caps and the RG-LRU gate math run in f32.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from models import fused

F32 = jnp.float32


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


_TAP = None  # see `tap`


@contextlib.contextmanager
def tap(fn):
    """Within the block, every `dense` first calls fn(w, x) with its weight and input (calibration:
    export/quantize/gptq.py collects each matmul's input statistics this way, inside a trace of one
    layer). Not reentrant; the model's numbers are unchanged."""
    global _TAP
    if _TAP is not None:
        raise RuntimeError("dense is already tapped")
    _TAP = fn
    try:
        yield
    finally:
        _TAP = None


OFFSETS = "_offsets"  # suffix of a weight's optional per-block constants (`dense`'s `offsets`)


def dense(x, w, bias=None, offsets=None):
    """x [..., in] @ w[out, in].T (+ bias). Weights are stored [out, in] (becomes FULLY_CONNECTED).

    offsets: None, or f32 [out, in / g], a constant added to every weight of each block of g
    inputs (the weight is w + offsets repeated g times along its inputs), computed as the
    input's block sums times offsets^T: a second, g times narrower FULLY_CONNECTED. An export
    adds it as `<weight>_offsets` where a TFLite int4 weight carries an offset or a negative
    scale that XNNPACK's symmetric, positive-scale blockwise kernel cannot hold (a GGUF's Q4_K
    blocks, value = code * scale - offset; its Q4_0 blocks' negative scales:
    export/quantize/blocks.BlockQuantized.split_offsets, export/driver.offsets_apart)."""
    if _TAP is not None:
        _TAP(w, x)
    y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), preferred_element_type=F32)
    if offsets is not None:
        y = y + offsets_term(x, offsets)
    if bias is not None:
        y = y + bias.astype(F32)
    return y.astype(x.dtype)


def offsets_term(x, offsets):
    """What per-block constants offsets [out, G] add to x [..., in] @ w.T: the input's sums over
    each of the G blocks of in / G channels times offsets^T, f32 [..., out]."""
    g = offsets.shape[1]
    sums = x.reshape(*x.shape[:-1], g, x.shape[-1] // g).astype(F32).sum(axis=-1)
    return jnp.einsum("...g,og->...o", sums, offsets.astype(F32), preferred_element_type=F32)


def linear(p, name: str, x, bias: str | None = None):
    """`dense` of x by the parameter `name` of p (a Params view), with its optional bias
    parameter and its optional `<name>_offsets`."""
    return dense(x, p[name], None if bias is None else p.get(bias), p.get(name + OFFSETS))


def rotate_blocks(x, w, inverse: bool = False):
    """x [..., F] rotated per block of b channels by w [b, b], stored as `dense` stores weights
    ([out, in]: each block times w^T, one FULLY_CONNECTED with no transpose), back to [..., F];
    `inverse`: times w instead (w is orthonormal). export/quantize/rotate.py; not a `dense`, so
    calibration taps do not see it."""
    b = w.shape[0]
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // b, b)
    y = jnp.einsum("...gi,io->...go" if inverse else "...gi,oi->...go", blocks, w.astype(x.dtype),
                   preferred_element_type=F32)
    return y.reshape(x.shape).astype(x.dtype)


def rotated(p, name: str, x):
    """x rotated by the export's optional `name` rotation (export/quantize/rotate.py), else x."""
    r = p.get(name)
    return x if r is None else rotate_blocks(x, r)


def rms_norm(x, scale, eps: float = 1e-6, multiplier: float = 1.0):
    """Gemma RMSNorm with a (1 + scale) gain; statistics in f32 (MODEL_SPEC 1.1). The gain is
    formed outside the `odml.rms_norm` composite, whose second operand is the multiplier;
    `multiplier` scales it further (the final norm folds the logit soft-cap's 1/cap into it)."""
    gain = 1.0 + scale.astype(F32)
    return fused.rms_norm(x, gain if multiplier == 1.0 else gain * multiplier, eps)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def rope_frequencies(base: float, scale: float, rope_dim: int) -> np.ndarray:
    """RoPE's angular frequencies 1 / (scale * base^(2i / rope_dim)), i < rope_dim / 2, computed in
    float64 and rounded once to a float32 constant. A rotation angle is then one float32 product,
    position * frequency, which every runtime computes bit for bit alike. A chain of divisions
    (`position / scale / timescale`) would not: XLA and the TFLite converter fold it into one
    multiply, ONNX Runtime evaluates it literally, and the two round differently by up to an ulp
    of the angle, which grows with the position (2e-3 rad at 32K, ~1e-4 on the logits). Inside a
    StableHLO composite (the ONNX attention cores) the table is an explicit operand
    (models.fused.cached_attention's `rope_freqs`); GroupQueryAttention's cos/sin tables are built
    from the same frequencies (export/lowering/onnx/fused._rope_tables)."""
    i = np.arange(int(rope_dim) // 2, dtype=np.float64)
    return (1.0 / (float(scale) * float(base) ** (2.0 * i / int(rope_dim)))).astype(np.float32)


def apply_rope(x, positions, *, base: float, scale: float = 1.0, rope_dim: int | None = None, freqs=None):
    """Half-split ("rotate_half") RoPE on the first `rope_dim` features of each head.

    x: [B, T, H, D] (keys: [B, T, K, D]); positions: [B, T] int. Angles and the rotation are
    computed in f32 and rounded once. Linear scaling divides positions by `scale`. With
    rope_dim < D the rest passes through (RecurrentGemma rotates half of each head; its
    frequencies use rope_dim as the denominator). freqs: the [rope_dim / 2] frequency table
    (`rope_frequencies`, also the default), passed as an array where a constant must not be
    captured (inside a composite's decomposition).
    """
    d = x.shape[-1]
    rope_dim = d if rope_dim is None else rope_dim
    half = rope_dim // 2
    if freqs is None:
        freqs = rope_frequencies(base, scale, rope_dim)
    angle = positions.astype(F32)[..., None] * freqs  # [B, T, half]: one float32 product per angle
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]  # [B, T, 1, half]
    xf = x.astype(F32)
    a, b, rest = xf[..., :half], xf[..., half:rope_dim], xf[..., rope_dim:]
    out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin, rest], axis=-1)
    return out.astype(x.dtype)
