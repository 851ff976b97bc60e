"""Signatures: the pure functions an artifact exports, with the tensor names of DESIGN section 5.

  prefill_{T}(tokens int32[1, T], input_pos int32[T], *states) -> (logits f32[1, 1, V], *states)
  decode     (tokens int32[1, 1], input_pos int32[1], *states) -> (logits f32[1, 1, V], *states)

States, each both an input and an output of the same name, per layer i:
  attention layer: kv_cache_k_{i}, kv_cache_v_{i}   [1, K, rows, D]  (rows = context for global
                   layers, the window for local ones; see models/cache.py)
  recurrent layer: kv_cache_conv_{i} [1, conv_width - 1, lru_width], kv_cache_lru_{i} [1, lru_width] f32
                   (LiteRT-LM carries a state between calls only when its name starts with kv_cache_)

Prefill writes the cache rows of its chunk at input_pos[0] + t. Runtimes right-pad chunks; the real
tokens are the leading run where input_pos[t] == input_pos[0] + t (pad entries, e.g. 0 or -1, end
the run), so pad tokens never overwrite a ring row nor change a recurrent state. A prefill
returns the logits of its last real token only (the vocabulary projection of every position would
dominate a long prefill); decode returns the logits of its token.

Gemma 3 with vision adds (models/multimodal.py; docs/vision.md):
  vision_encoder(image f32[1, S, S, 3]) -> soft_tokens f32[1, N, E]
  image_prefill_{T}(tokens int32[1, T], input_pos int32[T], embeddings f32[1, T, E], *states)
      -> (logits, *states): a prefill whose image soft-token positions (tokens == the soft token)
      read `embeddings` (the runtime splices each image's soft tokens there) and attend
      bidirectionally within each image. One per prefill length T >= N. The names avoid the
      `prefill` prefix, which LiteRT-LM takes as its own text prefill signatures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from models.cache import init_cache
from models.config import LayerKind, ModelConfig
from models.model import forward
from runtime_py.session import SignatureInfo, TensorInfo


@dataclasses.dataclass(frozen=True)
class Signature(SignatureInfo):
    """A signature's tensors (the runtime's SignatureInfo) plus the function that computes it:
    fn(params, *inputs) -> tuple matching outputs."""

    fn: Callable | None = None
    # symbolic-dimension constraints, e.g. "sequence_length <= 4096" (jax.export syntax)
    constraints: tuple[str, ...] = ()


def state_names(cfg: ModelConfig) -> list[tuple[int, str, str]]:
    """(layer, cache key, tensor name) of every state tensor, in signature order."""
    names = []
    for i, kind in enumerate(cfg.layer_kinds):
        if kind is LayerKind.RECURRENT:
            names += [(i, "conv", f"kv_cache_conv_{i}"), (i, "rg_lru", f"kv_cache_lru_{i}")]
        else:
            names += [(i, "k", f"kv_cache_k_{i}"), (i, "v", f"kv_cache_v_{i}")]
    return names


def state_specs(cfg: ModelConfig, max_len: int, dtype=jnp.float32) -> list[TensorInfo]:
    cache = init_cache_shapes(cfg, max_len, dtype)
    return [TensorInfo(name, cache[i][key].shape, np.dtype(cache[i][key].dtype))
            for i, key, name in state_names(cfg)]


def init_cache_shapes(cfg: ModelConfig, max_len: int, dtype):
    import jax

    return jax.eval_shape(lambda: init_cache(cfg, 1, max_len, dtype))


def valid_length(input_pos):
    """Length of the leading run input_pos[t] == input_pos[0] + t: the chunk's real tokens."""
    t = input_pos.shape[0]
    run = input_pos == input_pos[0] + jnp.arange(t, dtype=input_pos.dtype)
    return jnp.sum(jnp.cumprod(run.astype(jnp.int32)))


VISION_ENCODER = "vision_encoder"
IMAGE_PREFILL = "image_prefill_{}"


def signature_kind(name: str) -> tuple[str, int]:
    """('decode' | 'prefill' | 'image_prefill' | 'vision_encoder', length) of a signature name."""
    import re

    if name in ("decode", VISION_ENCODER):
        return name, 1 if name == "decode" else 0
    m = re.fullmatch(r"(prefill|image_prefill)_(\d+)", name)
    if not m:
        raise ValueError(f"unexpected signature '{name}' (want decode, prefill_<T>, image_prefill_<T>, "
                         f"{VISION_ENCODER})")
    return m.group(1), int(m.group(2))


def build_signature(cfg: ModelConfig, length: int, max_len: int, dtype=jnp.float32,
                    name: str | None = None, image: bool = False) -> Signature:
    """The prefill (length > 1) or decode (length == 1) signature for a context of max_len; with
    `image`, the image_prefill_{length} signature (an `embeddings` input after input_pos)."""
    if length < 1 or length > max_len:
        raise ValueError(f"prefill length {length} must be between 1 and the context ({max_len})")
    if image and cfg.vision is None:
        raise ValueError(f"{cfg.name} has no vision tower")
    name = name or (IMAGE_PREFILL.format(length) if image else "decode" if length == 1 else f"prefill_{length}")
    states = state_specs(cfg, max_len, dtype)
    layout = state_names(cfg)
    embeddings = (TensorInfo("embeddings", (1, length, cfg.embed_dim), np.dtype(np.float32)),) if image else ()
    inputs = (TensorInfo("tokens", (1, length), np.dtype(np.int32)),
              TensorInfo("input_pos", (length,), np.dtype(np.int32)), *embeddings, *states)
    outputs = (TensorInfo("logits", (1, 1, cfg.vocab_size), np.dtype(np.float32)), *states)

    def fn(params, tokens, input_pos, *rest):
        embeds, state_values = (rest[0], rest[1:]) if image else (None, rest)
        cache = [dict() for _ in cfg.layer_kinds]
        for (i, key, _), value in zip(layout, state_values):
            cache[i][key] = value
        nv = valid_length(input_pos)
        logits, new_cache = forward(params, cfg, tokens, input_pos[:1], tuple(cache), nv[None],
                                    last_only=True, embeddings=embeds)
        return (logits, *(new_cache[i][key] for i, key, _ in layout))

    return Signature(name, length, inputs, outputs, fn)


def build_vision_signature(cfg: ModelConfig) -> Signature:
    """vision_encoder(image f32[1, S, S, 3]) -> soft_tokens f32[1, N, E] (models/vision.py)."""
    from models.vision import encode_images

    v = cfg.vision
    if v is None:
        raise ValueError(f"{cfg.name} has no vision tower")
    inputs = (TensorInfo("image", (1, v.image_size, v.image_size, 3), np.dtype(np.float32)),)
    outputs = (TensorInfo("soft_tokens", (1, v.tokens_per_image, cfg.embed_dim), np.dtype(np.float32)),)

    def fn(params, image):
        return (encode_images(params, v, cfg.embed_dim, image),)

    return Signature(VISION_ENCODER, 0, inputs, outputs, fn)


def image_prefill_lengths(cfg: ModelConfig, prefill_lens) -> list[int]:
    """The prefill lengths that get an image_prefill signature: those that hold an image's soft
    tokens. ValueError (with the fix) when none does."""
    n = cfg.vision.tokens_per_image
    lens = [t for t in prefill_lens if t >= n]
    if not lens:
        raise ValueError(f"images need a prefill length of at least {n} (an image's soft tokens go in one "
                         f"chunk); add one to --prefill-lens, or pass --no-vision for a text-only export")
    return lens


def all_signatures(cfg: ModelConfig, prefill_lens, max_len: int, dtype=jnp.float32) -> list[Signature]:
    """Every signature an artifact of this model holds: prefill_{T} and decode, plus, with a vision
    tower, vision_encoder and image_prefill_{T}."""
    sigs = [build_signature(cfg, t, max_len, dtype) for t in prefill_lens if t > 1]
    sigs.append(build_signature(cfg, 1, max_len, dtype))
    if cfg.vision is not None:
        sigs.append(build_vision_signature(cfg))
        sigs += [build_signature(cfg, t, max_len, dtype, image=True) for t in image_prefill_lengths(cfg, prefill_lens)]
    return sigs


# ---- the ONNX decoder signature (onnxruntime-genai's conventions, DESIGN section 5) ---------------
SEQ, TOTAL = "sequence_length", "total_sequence_length"


def decoder_state_names(cfg: ModelConfig) -> list[tuple[int, str, str, str]]:
    """(layer, cache key, input name, output name) of every state, in signature order, numbered by
    model layer (onnxruntime-genai discovers KV and recurrent layers at any indices by name)."""
    names = []
    for i, kind in enumerate(cfg.layer_kinds):
        if kind is LayerKind.RECURRENT:
            names += [(i, "conv", f"past.{i}.conv", f"present.{i}.conv"),
                      (i, "rg_lru", f"past.{i}.recurrent", f"present.{i}.recurrent")]
        else:
            names += [(i, "k", f"past_key_values.{i}.key", f"present.{i}.key"),
                      (i, "v", f"past_key_values.{i}.value", f"present.{i}.value")]
    return names


def build_decoder_signature(cfg: ModelConfig, max_len: int, dtype=jnp.float32, image: bool = False) -> Signature:
    """One function for every chunk length (ONNX graphs have symbolic dimensions):

      (input_ids int32[1, T], attention_mask int32[1, L], *past) -> (logits f32[1, 1, V], *present)

    With `image`, the image prefill graph: an `inputs_embeds` f32[1, T, E] input after input_ids,
    read at the image soft-token positions (as image_prefill_{T}; models/multimodal.py).

    attention_mask covers the past and the chunk (all ones: batch 1, no padding), so the chunk
    starts at position sum(attention_mask) - T. States have the same static shapes as the TFLite
    signatures' (window-sized rings for local layers). Logits are those of the chunk's last token.
    """
    cache = init_cache_shapes(cfg, max_len, dtype)
    layout = decoder_state_names(cfg)
    past = tuple(TensorInfo(name, cache[i][key].shape, np.dtype(cache[i][key].dtype))
                 for i, key, name, _ in layout)
    present = tuple(TensorInfo(out, t.shape, t.dtype) for (_, _, _, out), t in zip(layout, past))
    embeds = (TensorInfo("inputs_embeds", (1, SEQ, cfg.embed_dim), np.dtype(np.float32)),) if image else ()
    inputs = (TensorInfo("input_ids", (1, SEQ), np.dtype(np.int32)), *embeds,
              TensorInfo("attention_mask", (1, TOTAL), np.dtype(np.int32)), *past)
    outputs = (TensorInfo("logits", (1, 1, cfg.vocab_size), np.dtype(np.float32)), *present)

    def fn(params, input_ids, *rest):
        embeddings, (attention_mask, *state_values) = (rest[0], rest[1:]) if image else (None, rest)
        cache = [dict() for _ in cfg.layer_kinds]
        for (i, key, _, _), value in zip(layout, state_values):
            cache[i][key] = value
        t = input_ids.shape[1]
        start = jnp.sum(attention_mask, axis=1, dtype=jnp.int32) - t
        logits, new_cache = forward(params, cfg, input_ids, start, tuple(cache), None, last_only=True,
                                    embeddings=embeddings)
        return (logits, *(new_cache[i][key] for i, key, _, _ in layout))

    name = "image_prefill" if image else "decoder"
    return Signature(name, 0, inputs, outputs, fn, constraints=(f"{SEQ} <= {max_len}",))
