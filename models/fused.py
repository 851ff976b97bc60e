"""Fused ops: StableHLO composites with a reference decomposition (DESIGN section 3).

Shapes follow the legend in models/__init__.py.

Each op is a `jax.lax.composite`: JAX (and every runtime that does not know the name) runs the
decomposition; a runtime or delegate that knows the name may swap in a fused kernel. Names,
operand orders and attributes follow what LiteRT knows (litert-torch's conventions):

  odml.embedding_lookup(ids int32[B*T], table[V, E]) -> [B*T, E]              (no attributes)
  odml.rms_norm(x[..., E], gain[E]) -> like x (QK-norm: [..., D])             epsilon: f32
      gain is the *effective* multiplier (Gemma's 1 + scale is added outside the composite)
  odml.scaled_dot_product_attention(q[B, T, H, D], k[B, S, K, D], v[B, S, K, D],
                                    mask[B, 1, T, S] additive f32) -> [B, T, H, D]
      scale: f32, logit_cap: f32 (absent when there is no soft-cap); soft-cap before the mask
  gemma_edge.bidirectional_attention(q[B, T, H, D], k[B, T, H, D], v[B, T, H, D]) -> [B, T, H, D]
      scale: f32. Unmasked multi-head attention (the vision tower's): ONNX lowers it to the
      standard Attention op (opset 23), which never keeps more than one head's [T, T] logits in
      flight where the op-by-op form materialised [H, T, T] several times (docs/vision.md)
  gemma_edge.linear_recurrence(a[B, T, C], x[B, T, C], h0[B, C]) -> h[B, T, C]
      h_t = a_t * h_{t-1} + x_t in f32: the RG-LRU scan (prefill) and step (decode). One output:
      the final state h[:, -1] is sliced outside, because LiteRT-LM 0.18 cannot run a composite
      with several outputs (its prefill fails with "Input tensor N lacks data"; docs/litertlm.md)
  gemma_edge.global_attention / gemma_edge.local_attention (AttentionForm.CACHE_OWNING, the form
      the ONNX export traces): the attention core *with* RoPE and its cache write,
      (q[B, T, H, D], k[B, T, K, D], v, cache_k[B, K, R, D], cache_v, start[B], num_valid[B])
      -> (out[B, T, H, D], cache_k', cache_v');  scale, logit_cap, window (local: keys a query sees),
      rope_base, rope_scale, rope_dim (q and k arrive before RoPE, which the op applies)

Rules that keep composites intact through conversion: no weights inside a composite (quantizers
skip them), decompositions close over no arrays (closed-over constants would become extra leading
operands), attributes are numpy f32 scalars.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
# Masked attention logits: the official implementations' K_MASK, as an additive f32 bias.
MASK_VALUE = -2.3819763e38

_DECOMPOSED = contextvars.ContextVar("decomposed", default=False)


@contextlib.contextmanager
def decomposed():
    """While active, fused ops trace as their plain decompositions, with no composite around
    them: the same computation, and differentiable (JAX defines no derivative for a composite).
    tools/train_tiny.py trains through this; exports never use it."""
    token = _DECOMPOSED.set(True)
    try:
        yield
    finally:
        _DECOMPOSED.reset(token)


_INLINED = contextvars.ContextVar("inlined", default=frozenset())

# What `--inline-composites` traces as plain ops (TFLite): LiteRT's CPU path runs each composite
# as a call of its decomposition subgraph, which XNNPACK delegates as a partition of its own (183
# in gemma3-1b's decode); inline, the graph is one partition (docs/decode.md has the figures). The
# embedding lookup stays a composite: its quantized table is read through it.
CPU_INLINED = ("odml.rms_norm", "odml.scaled_dot_product_attention")


@contextlib.contextmanager
def inlined(names=CPU_INLINED):
    """While active, the fused ops named trace as their decompositions (same computation), so a
    CPU graph has no composite call for them; delegates that know the names lose their kernels."""
    token = _INLINED.set(frozenset(names))
    try:
        yield
    finally:
        _INLINED.reset(token)


def _composite(impl, name: str):
    if _DECOMPOSED.get() or name in _INLINED.get():
        return impl
    return jax.lax.composite(impl, name=name)


class AttentionForm(str, enum.Enum):
    """How an attention layer is traced; an explicit argument of `forward`, carried by each
    signature (models/signatures.py), so the JAX reference runs exactly the graph a target exports.

    SDPA: RoPE and the cache write are plain ops around `odml.scaled_dot_product_attention`, the
        composite LiteRT's kernels know (TFLite, LiteRT-LM; the default everywhere else).
    CACHE_OWNING: the whole core, RoPE and cache write included, is one composite
        (`gemma_edge.{global,local}_attention`): ONNX Runtime's GroupQueryAttention owns the KV
        cache and applies RoPE itself, so the ONNX lowering needs them as one op.
    Both compute the same numbers (the composite's decomposition is the SDPA form's code).
    """

    SDPA = "sdpa"
    CACHE_OWNING = "cache_owning"


def cached_attention(impl, name: str, q, k, v, cache_k, cache_v, start, num_valid, blocks=None, *,
                     form: AttentionForm = AttentionForm.SDPA, total=None, rope_freqs=None, **attributes):
    """Run `impl(q, k, v, cache_k, cache_v, start, num_valid[, blocks], **attributes) -> (out, ck, cv)`,
    as the composite `name` for AttentionForm.CACHE_OWNING, inline for SDPA. Operands past the
    seventh, in this order: `total` (an array whose dimension is the positions in use:
    models.model.forward), `rope_freqs` (RoPE's frequency table [rope_dim / 2] f32:
    models.layers.rope_frequencies), `blocks` (image-block ids [B, T], multimodal prefill only).
    `total` and `rope_freqs` reach `impl` as keywords."""
    extras = {k_: x for k_, x in (("total", total), ("rope_freqs", rope_freqs)) if x is not None}
    if extras:
        base, keys = impl, tuple(extras)

        def impl(q, k, v, cache_k, cache_v, start, num_valid, *rest, **attrs):
            named = dict(zip(keys, rest[:len(keys)]))
            return base(q, k, v, cache_k, cache_v, start, num_valid, *rest[len(keys):], **named, **attrs)

    operands = (q, k, v, cache_k, cache_v, start, num_valid) + tuple(extras.values()) + (
        () if blocks is None else (blocks,))
    if AttentionForm(form) is AttentionForm.SDPA:
        return impl(*operands, **attributes)
    attrs = {k_: None if v_ is None else np.float32(v_) if isinstance(v_, float) else np.int32(v_)
             for k_, v_ in attributes.items()}
    return _composite(impl, name)(*operands, **attrs)


def embedding_lookup(table, ids):
    """table [V, E], ids int [...] -> [..., E] (out-of-range ids clip)."""

    def impl(flat_ids, tbl):
        return jnp.take(tbl, flat_ids, axis=0, mode="clip")

    flat = ids.reshape(-1).astype(jnp.int32)
    out = _composite(impl, "odml.embedding_lookup")(flat, table)
    return out.reshape(*ids.shape, table.shape[-1])


def rms_norm(x, gain, eps: float):
    """x * rsqrt(mean(x^2) + eps) * gain, statistics in f32."""

    def impl(x, gain, *, epsilon):
        xf = x.astype(F32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + epsilon)
        return (y * gain.astype(F32)).astype(x.dtype)

    return _composite(impl, "odml.rms_norm")(x, gain, epsilon=np.float32(eps))


def scaled_dot_product_attention(q, k, v, mask, *, scale: float, logit_cap: float | None = None):
    """q [B, T, H, D]; k, v [B, S, K, D]; mask [B, 1, T, S] additive. -> [B, T, H, D].

    Query head h reads kv head h // G (contiguous groups, G = H / K).
    """

    def impl(q, k, v, mask, *, scale, logit_cap=None):
        b, t, h, d = q.shape
        kv = k.shape[2]
        # [B, T, H, D] -> [B, T, K, G, D]
        qg = q.reshape(b, t, kv, h // kv, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=F32) * scale
        if logit_cap is not None:
            logits = logit_cap * jnp.tanh(logits / logit_cap)
        logits = logits + mask[:, :, None].astype(F32)  # [B, 1, 1, T, S] over kv heads and groups
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=F32)
        return out.reshape(b, t, h, d).astype(v.dtype)

    cap = None if logit_cap is None else np.float32(logit_cap)
    return _composite(impl, "odml.scaled_dot_product_attention")(
        q, k, v, mask, scale=np.float32(scale), logit_cap=cap)


def bidirectional_attention(q, k, v, *, scale: float):
    """Unmasked multi-head attention: q, k, v [B, T, H, D] -> [B, T, H, D] (f32 logits)."""

    def impl(q, k, v, *, scale):
        logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=F32) * scale
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bhts,bshd->bthd", probs, v, preferred_element_type=F32).astype(v.dtype)

    return _composite(impl, "gemma_edge.bidirectional_attention")(q, k, v, scale=np.float32(scale))


def attention_mask(q_pos, k_pos, window_span: int | None = None, q_blocks=None, k_blocks=None):
    """Additive mask [B, 1, T, S]: 0 where 0 <= k_pos <= q_pos (and k_pos > q_pos - window_span),
    MASK_VALUE elsewhere. q_pos [B, T], k_pos [B, S]; k_pos < 0 marks an empty cache row.
    q_blocks [B, T] / k_blocks [B, S] (image-block ids, 0 = none): a query also sees the later
    keys of its own block (bidirectional attention inside an image), still within the window."""
    kp, qp = k_pos[:, None, :], q_pos[:, :, None]
    visible = (kp >= 0) & (kp <= qp)
    if q_blocks is not None:
        qb, kb = q_blocks[:, :, None], k_blocks[:, None, :]
        visible |= (kp >= 0) & (qb > 0) & (qb == kb)
    if window_span is not None:
        visible &= kp > qp - window_span
    return jnp.where(visible, 0.0, MASK_VALUE).astype(F32)[:, None]


def linear_recurrence(a, x, h0):
    """h_t = a_t * h_{t-1} + x_t over axis 1 in f32. a, x [B, T, C]; h0 [B, C] -> (h, h_T).

    A one-token call is a single multiply-add; a longer one a parallel (log-depth) scan, which has
    a static graph (no while loop) and the same value up to f32 rounding. A symbolic length (the
    ONNX export's one graph for every chunk length) traces a sequential scan: its exporter replaces
    the composite with an ONNX Scan anyway.
    """

    def impl(a, x, h0):
        if not isinstance(a.shape[1], int):
            def step(h, ax):
                h = ax[0] * h + ax[1]
                return h, h

            _, h = jax.lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(x, 1, 0)))
            return jnp.moveaxis(h, 0, 1)
        if a.shape[1] == 1:
            return (a[:, 0] * h0 + x[:, 0])[:, None]
        # fold the initial state into the first step, then combine (a1, x1) o (a2, x2)
        x = jnp.concatenate([x[:, :1] + a[:, :1] * h0[:, None], x[:, 1:]], axis=1)

        def combine(left, right):
            (a1, x1), (a2, x2) = left, right
            return a1 * a2, a2 * x1 + x2

        _, h = jax.lax.associative_scan(combine, (a, x), axis=1)
        return h

    h = _composite(impl, "gemma_edge.linear_recurrence")(a.astype(F32), x.astype(F32), h0.astype(F32))
    return h, h[:, -1]
