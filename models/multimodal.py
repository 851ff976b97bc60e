"""Gemma 3 prompts with images, the JAX side (MODEL_SPEC 4): the bidirectional image-block ids
the attention mask reads. The token layout itself (markers, soft-token runs, the splice, chunk
planning) is pure Python and lives in contract/prompt.py, where runtime_py imports it without JAX.

Attention. Causal everywhere, and bidirectional inside each contiguous run of soft tokens (an
image's 256 tokens see each other; boi, eoi and the newlines stay causal). Local layers AND this
with their window.
"""

from __future__ import annotations

import jax.numpy as jnp


def image_blocks(is_soft):
    """[B, T] bool (soft-token positions) -> [B, T] int32: 1, 2, ... for the tokens of each run of
    soft tokens, 0 for every other token."""
    is_soft = is_soft.astype(jnp.int32)
    # concatenate, not pad: the ONNX lowering has no rule for stablehlo.pad
    prev = jnp.concatenate([jnp.zeros_like(is_soft[:, :1]), is_soft[:, :-1]], axis=1)
    starts = is_soft * (1 - prev)
    # a running count of run starts, as a masked sum rather than cumsum (whose reduce_window has no
    # ONNX rule); computed once per call, [T, T] int32
    t = jnp.arange(is_soft.shape[1], dtype=jnp.int32)
    upto = (t[None, :] <= t[:, None]).astype(jnp.int32)  # [query t, start s]: s <= t
    return jnp.sum(starts[:, None, :] * upto[None], axis=-1) * is_soft


# ---- the image flag of a vision bundle's decoder (docs/litertlm.md) --------------------------------
# LiteRT-LM feeds a vision bundle's decoder embeddings only, no token ids: the embedder's rows for
# text, the vision adapter's for an image. The decoder still needs to know which positions hold
# image soft tokens (they attend bidirectionally within their image), so its input carries one
# more channel, the flag: 1 on soft-token rows, 0 on every other row.
def with_flag(x, is_soft):
    """x [B, T, E] and is_soft [B, T] (bool or 0/1) -> [B, T, E + 1]: x with the image flag appended."""
    flag = jnp.asarray(is_soft).astype(x.dtype)[..., None]
    return jnp.concatenate([x, jnp.broadcast_to(flag, (*x.shape[:-1], 1))], axis=-1)


def split_flag(flagged, dim: int):
    """[B, T, E + 1] -> (x [B, T, E], is_soft [B, T] bool): a flag above 0.5 marks a soft token."""
    return flagged[..., :dim], flagged[..., dim] > 0.5
