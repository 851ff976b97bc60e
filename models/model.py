"""The model: embedding, the layer stack of a family, final norm, tied unembedding.

Shapes follow the legend in models/__init__.py.

`forward` is the one code path for prefill of T tokens at any start position and for one-token
decode; a full-sequence forward is a prefill at position 0 into a fresh cache.
"""

from __future__ import annotations

import jax.numpy as jnp

from models.cache import Cache, cache_max_len, is_static
from models.config import Family, ModelConfig
from models.fused import AttentionForm, embedding_lookup
from models.gemma import gemma_layer
from models.griffin import griffin_layer
from models.layers import F32, OFFSETS, Params, offsets_term, rms_norm, rotate_blocks, rotated
from models.multimodal import image_blocks, split_flag

_LAYER_FNS = {
    Family.GEMMA2: gemma_layer,
    Family.GEMMA3: gemma_layer,
    Family.RECURRENTGEMMA: griffin_layer,
}


def activation_dtype(params: dict):
    """bf16 weights compute in bf16 (with f32 accumulation and f32 norms/softmax); f16 and f32
    weights compute in f32 (f16 activations overflow in Gemma: MODEL_SPEC 8.3 item 12)."""
    return jnp.bfloat16 if params["embed"].dtype == jnp.bfloat16 else F32


# Optional [E] per-channel multiplier of the looked-up rows: an export that scales the tied table's
# columns (export/quantize/smooth.py folds activation smoothing into the LM head) undoes it here, so
# the lookup reads the same embeddings. Checkpoints never hold it.
EMBED_CHANNEL_SCALE = "embed_channel_scale"
# Optional [b, b] rotation of the LM head's input per block of b channels, the tied table's columns
# rotated to match (export/quantize/rotate.py); the lookup rotates its rows back. Checkpoints never hold it.
HEAD_ROTATION = "final_norm_rotation"
# the int4 table's per-block constants [V, E / 32] where TFLite holds a checkpoint's own blocks
# (export/driver.offsets_apart): the lookup adds its row, the LM head its block-sum matmul
TABLE_OFFSETS = "embed" + OFFSETS


def embed_tokens(params: dict, cfg: ModelConfig, tokens):
    """tokens [B, T] -> [B, T, E], scaled by sqrt(E) rounded as the reference does."""
    dtype = activation_dtype(params)
    x = embedding_lookup(params["embed"], tokens).astype(dtype)
    if TABLE_OFFSETS in params:  # a TFLite int4 table's per-block constants (models.layers.dense's offsets)
        c = embedding_lookup(params[TABLE_OFFSETS], tokens)  # [B, T, E / g]
        x = x + jnp.repeat(c, x.shape[-1] // c.shape[-1], axis=-1).astype(dtype)
    if HEAD_ROTATION in params:  # the table's columns are rotated (export/quantize/rotate.py): rotate the rows back
        x = rotate_blocks(x, params[HEAD_ROTATION], inverse=True)
    x = x * jnp.asarray(cfg.embed_scale(dtype), dtype)
    if EMBED_CHANNEL_SCALE in params:
        x = x * params[EMBED_CHANNEL_SCALE].astype(dtype)
    return x


def forward(params: dict, cfg: ModelConfig, tokens, start_pos, cache: Cache, num_valid=None,
            last_only: bool = False, embeddings=None, attention: AttentionForm = AttentionForm.SDPA,
            span: int | None = None, flagged=None, total=None):
    """Run T tokens through the model, reading and writing the caches.

    params: flat dict (models.params); tokens: [B, T] int; start_pos: [B] or scalar int, the
    position of tokens[:, 0]; cache: from `init_cache`; num_valid: [B] or scalar, how many
    tokens of each row are real (the rest is right padding that must not touch the caches;
    default T). Returns (logits [B, T, V] float32, new cache); with last_only, logits
    [B, 1, V] of each row's last real token (a prefill needs no more, and the vocabulary
    projection of every position is the most expensive part of a long prefill).

    embeddings: [B, T, E] (Gemma 3 with vision, models/multimodal.py): at the positions where
    tokens hold the image soft token, the model reads these rows instead of the embedding table,
    and each run of soft tokens attends bidirectionally. Without it (text), tokens are only looked up.

    attention: how attention layers are traced (models/fused.AttentionForm): the same numbers in
    either form; an export passes its target's form so the reference runs the exported graph.

    span: global layers attend over the first `span` rows of their caches only (a context bucket,
    models/signatures.py); the chunk's real tokens must lie below it. None: every row.
    total: an array whose only dimension is the number of positions in use after this chunk
    (start + T; a symbolic dimension in the ONNX graph, models/signatures.decoder_signature):
    global layers then attend over that many cache rows only, so a graph with one shape for
    every length pays for the context in use (AttentionForm.CACHE_OWNING; its values are unused).

    flagged: [B, T, E + 1] input embeddings with the image flag (models/multimodal.with_flag), in
    place of tokens (pass tokens=None): a vision bundle's decoder, which LiteRT-LM feeds the
    embedder's and the vision adapter's rows. The rows are used as they are (text rows already
    scaled), and each run of flagged rows attends bidirectionally, as soft tokens do.
    """
    b, t = (tokens if flagged is None else flagged).shape[:2]
    start = jnp.broadcast_to(jnp.asarray(start_pos, jnp.int32), (b,))
    nv = jnp.broadcast_to(jnp.asarray(t if num_valid is None else num_valid, jnp.int32), (b,))
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    max_len = cache_max_len(cfg, cache)
    if max_len is not None and is_static(t) and t > max_len:
        raise ValueError(f"a chunk of {t} tokens is longer than the cache ({max_len} positions)")

    extra = {"attention": AttentionForm(attention)}
    if span is not None and cfg.family is not Family.RECURRENTGEMMA:  # Griffin has no global layers
        extra["span"] = int(span)
    if total is not None and cfg.family is not Family.RECURRENTGEMMA:
        extra["total"] = total
    if flagged is not None:
        if cfg.vision is None or cfg.family is not Family.GEMMA3:
            raise ValueError(f"{cfg.name} has no vision tower: its decoder takes tokens, not flagged embeddings")
        x, is_soft = split_flag(flagged, cfg.embed_dim)
        x = x.astype(activation_dtype(params))
        extra["blocks"] = image_blocks(is_soft)
    elif embeddings is None:
        x = embed_tokens(params, cfg, tokens)
    else:
        if cfg.vision is None or cfg.family is not Family.GEMMA3:
            raise ValueError(f"{cfg.name} has no vision tower: it takes no image embeddings")
        is_soft = tokens == cfg.vision.soft_token
        x = embed_tokens(params, cfg, jnp.where(is_soft, 0, tokens))
        x = jnp.where(is_soft[..., None], embeddings.astype(x.dtype), x)
        extra["blocks"] = image_blocks(is_soft)
    new_cache = []
    for i in range(len(cfg.layer_kinds)):
        x, layer_cache = apply_layer(params, cfg, i, x, positions, start, nv, cache[i], **extra)
        new_cache.append(layer_cache)
    if last_only:  # [B, T, E] -> [B, 1, E]
        x = jnp.take_along_axis(x, jnp.maximum(nv - 1, 0)[:, None, None], axis=1)
    return unembed(params, cfg, x), tuple(new_cache)


def apply_layer(params: dict, cfg: ModelConfig, i: int, x, positions, start, num_valid, layer_cache, **extra):
    """Layer i of the stack (its weights are params' "layers.{i}." entries): x [B, T, E] ->
    (x, the layer's new cache). `forward` runs every layer through here; calibration
    (export/quantize/gptq.py) runs them one at a time."""
    layer_fn = _LAYER_FNS[cfg.family]
    return layer_fn(Params(params, f"layers.{i}."), cfg, cfg.layer_kinds[i], x, positions, start, num_valid,
                    layer_cache, **extra)


def head_input(params: dict, cfg: ModelConfig, x):
    """What the tied output projection reads: the final norm, with the soft-cap's 1/cap (below)."""
    cap = cfg.final_softcap
    return rms_norm(x, params["final_norm"], cfg.norm_eps, multiplier=1.0 if cap is None else 1.0 / cap)


def unembed(params: dict, cfg: ModelConfig, x):
    """Final norm, tied output projection, final soft-cap. x [B, T, E] -> logits [B, T, V] f32.

    The soft-cap's 1/cap is folded into the final norm's gain: cap * tanh((x W^T) / cap) equals
    cap * tanh((x / cap) W^T). A division after the matmul is what the TFLite converter folds into
    the matmul's weight, which for the tied table means a [V, E] multiply every step and, once
    quantized, a second float copy of the table."""
    cap = cfg.final_softcap
    x = rotated(params, HEAD_ROTATION, head_input(params, cfg, x))
    table = params["embed"].astype(x.dtype)
    logits = jnp.einsum("bte,ve->btv", x, table, preferred_element_type=F32)
    if TABLE_OFFSETS in params:
        logits = logits + offsets_term(x, params[TABLE_OFFSETS])
    return logits if cap is None else cap * jnp.tanh(logits)
