"""Signatures: the pure functions an artifact exports, described by the artifact contract
(contract/signatures.py for names and kinds, contract/layout.py for the states).

Shapes follow the legend in models/__init__.py.

  prefill_{T}(tokens int32[1, T], input_pos int32[T], *states) -> (logits f32[1, 1, V], *states)
  decode     (tokens int32[1, 1], input_pos int32[1], *states) -> (logits f32[1, 1, V], *states)
  vision_encoder(image f32[1, image_size, image_size, 3]) -> soft_tokens f32[1, I, E]
  image_prefill_{T}(tokens, input_pos, embeddings f32[1, T, E], *states) -> (logits, *states)
  verify_{K}(tokens int32[1, K], input_pos int32[K], *states) -> (logits f32[1, K, V], *states)

States are the layout's, in its order, each both an input and an output of the same name (the
TFLite naming). Prefill writes the cache rows of its chunk at input_pos[0] + t. Runtimes right-pad
chunks; the real tokens are the leading run where input_pos[t] == input_pos[0] + t (pad entries,
e.g. 0 or -1, end the run), so pad tokens never overwrite a ring row nor change a recurrent state.
A prefill returns the logits of its last real token only; decode those of its token; verify_{K}
(speculative decoding's check of K tokens: runtime_py/speculative.py) those of every token, pads
included (the runtime reads the real ones).

The image prefill's soft-token positions (tokens == the soft token) read `embeddings` (the runtime
splices each image's soft tokens there) and attend bidirectionally within each image; one per
prefill length T >= I.

A `.litertlm` bundle of a model with vision (LiteRT-LM runs it with images; contract/bundle.py,
docs/litertlm.md) exports the text signatures in their *embedded* form, and three more models:

  prefill_{T}/decode(embeddings f32[1, T, E + 1], input_pos, *states) -> (logits, *states)
  embedder(token_ids int32[1, 1]) -> embeddings f32[1, 1, E + 1]
  vision_encoder(image f32[1, S, S, 3] in [0, 1]) -> features f32[1, P, Ev]
  vision_adapter(features) -> mm_embeddings f32[1, N + 1, E + 1]

Channel E is the image flag (models/multimodal.with_flag); the adapter's last row is
<end_of_image>'s embedding (`eoi_embedding`), since LiteRT-LM does not add that token itself.

The ONNX decoder (`decoder_signature`) is one function for every chunk length, with
onnxruntime-genai's names. Every signature carries the attention form it is traced with
(models/fused.AttentionForm): the exporters lower it, and the JAX reference runs it, in that form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from contract.bundle import ADAPTER_SIGNATURE, EMBEDDER_SIGNATURE, FEATURES, MM_EMBEDDINGS, TOKEN_IDS
from contract.layout import Naming, StateLayout
from contract.metadata import ArtifactMetadata, ImageLayout
from contract.signatures import (
    EMBEDDINGS, IMAGE, INPUT_POS, LOGITS, SOFT_TOKENS, TOKENS, SignatureKind, SignatureSpec, TensorSpec,
    bucket_name, signature_name,
)
from models.cache import state_layout
from models.config import ModelConfig
from models.fused import AttentionForm
from models.model import forward


@dataclasses.dataclass(frozen=True)
class Signature(SignatureSpec):
    """A signature's tensors (the contract's SignatureSpec) plus the function that computes it,
    fn(params, *inputs) -> tuple matching outputs, and the attention form it is traced with."""

    fn: Callable | None = None
    # symbolic-dimension constraints, e.g. "sequence_length <= 4096" (jax.export syntax)
    constraints: tuple[str, ...] = ()
    attention: AttentionForm = AttentionForm.SDPA


def valid_length(input_pos):
    """Length of the leading run input_pos[t] == input_pos[0] + t: the chunk's real tokens."""
    t = input_pos.shape[0]
    run = input_pos == input_pos[0] + jnp.arange(t, dtype=input_pos.dtype)
    return jnp.sum(jnp.cumprod(run.astype(jnp.int32)))


def _specs(layout: StateLayout, naming: Naming) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(s.name(naming), s.shape, s.dtype) for s in layout)


def _cache_of(cfg: ModelConfig, layout: StateLayout, values) -> tuple:
    cache = [dict() for _ in cfg.layer_kinds]
    for spec, value in zip(layout, values):
        cache[spec.layer][spec.kind.value] = value
    return tuple(cache)


def _states_of(layout: StateLayout, cache) -> tuple:
    return tuple(cache[s.layer][s.kind.value] for s in layout)


def build_signature(cfg: ModelConfig, length: int, max_len: int, dtype=jnp.float32, *, image: bool = False,
                    attention: AttentionForm = AttentionForm.SDPA, span: int | None = None, kv: str = "f32",
                    verify: bool = False, embedded: bool = False) -> Signature:
    """The prefill (length > 1) or decode (length == 1) signature for a context of max_len; with
    `image`, the image_prefill_{length} signature (an `embeddings` input after input_pos); with
    `embedded`, its form in a vision bundle (`embeddings` [1, length, E + 1] with the image flag in
    place of tokens: the module docstring); with
    `verify`, verify_{length} (logits at every position); with
    `span`, its context bucket ctx{span}_* (global layers attend over the first span rows); `kv`
    "int8": int8 KV caches with their scales as extra states (models.cache.quantize_kv)."""
    if length < 1 or length > max_len:
        raise ValueError(f"prefill length {length} must be between 1 and the context ({max_len})")
    if span is not None and (image or not length <= span < max_len):
        raise ValueError(f"a context bucket of {span} rows needs a text signature of at most {span} tokens and a "
                         f"larger context (here {max_len})")
    if image and cfg.vision is None:
        raise ValueError(f"{cfg.name} has no vision tower")
    if embedded and (image or cfg.vision is None):
        raise ValueError(f"the embedded decoder is a vision bundle's ({cfg.name}: "
                         f"{'no vision tower' if cfg.vision is None else 'not with image'})")
    if verify and (image or length < 2):
        raise ValueError(f"a verify signature checks at least 2 text tokens (here {length})")
    kind = (SignatureKind.IMAGE_PREFILL if image else SignatureKind.VERIFY if verify
            else SignatureKind.DECODE if length == 1 else SignatureKind.PREFILL)
    layout = state_layout(cfg, max_len, dtype, kv=kv)
    states = _specs(layout, Naming.TFLITE)
    embeddings = (TensorSpec(EMBEDDINGS, (1, length, cfg.embed_dim), np.dtype(np.float32)),) if image else ()
    inputs = (TensorSpec(TOKENS, (1, length), np.dtype(np.int32)),
              TensorSpec(INPUT_POS, (length,), np.dtype(np.int32)), *embeddings, *states)
    if embedded:
        inputs = (TensorSpec(EMBEDDINGS, (1, length, cfg.embed_dim + 1), np.dtype(np.float32)), *inputs[1:])
    rows = length if verify else 1
    outputs = (TensorSpec(LOGITS, (1, rows, cfg.vocab_size), np.dtype(np.float32)), *states)

    def embedded_fn(params, flagged, input_pos, *state_values):
        nv = valid_length(input_pos)
        logits, new_cache = forward(params, cfg, None, input_pos[:1], _cache_of(cfg, layout, state_values), nv[None],
                                    last_only=not verify, attention=attention, span=span, flagged=flagged)
        return (logits, *_states_of(layout, new_cache))

    def fn(params, tokens, input_pos, *rest):
        embeds, state_values = (rest[0], rest[1:]) if image else (None, rest)
        nv = valid_length(input_pos)
        logits, new_cache = forward(params, cfg, tokens, input_pos[:1], _cache_of(cfg, layout, state_values),
                                    nv[None], last_only=not verify, embeddings=embeds, attention=attention,
                                    span=span)
        return (logits, *_states_of(layout, new_cache))

    return Signature(bucket_name(signature_name(kind, length), span), length, inputs, outputs,
                     tuple(t.name for t in states), fn=embedded_fn if embedded else fn, attention=attention)


# ---- a vision bundle's other models (the module docstring; contract/bundle.py) ------------------------
EOI_EMBEDDING = "eoi_embedding"  # the adapter's one derived weight: <end_of_image>'s scaled row [E]


def eoi_embedding(table, cfg: ModelConfig) -> np.ndarray:
    """<end_of_image>'s input row [E] f32, scaled by sqrt(E) exactly as `embed_tokens` scales it
    (`table`: the embedding table as stored, f32 or 16-bit). The vision adapter takes it as the
    weight EOI_EMBEDDING."""
    scale = np.float32(cfg.embed_scale(jnp.float32))
    return np.asarray(table[cfg.vision.eoi_token], np.float32) * scale


def build_embedder_signature(cfg: ModelConfig) -> Signature:
    """embedder(token_ids int32[1, 1]) -> embeddings f32[1, 1, E + 1]: the token's sqrt(E)-scaled
    row, flag 0. LiteRT-LM runs it once per text token."""
    from models.model import embed_tokens
    from models.multimodal import with_flag

    inputs = (TensorSpec(TOKEN_IDS, (1, 1), np.dtype(np.int32)),)
    outputs = (TensorSpec(EMBEDDINGS, (1, 1, cfg.embed_dim + 1), np.dtype(np.float32)),)

    def fn(params, token_ids):
        x = embed_tokens(params, cfg, token_ids).astype(jnp.float32)
        return (with_flag(x, jnp.zeros(token_ids.shape, bool)),)

    return Signature(EMBEDDER_SIGNATURE, 1, inputs, outputs, fn=fn)


def build_bundle_vision_signatures(cfg: ModelConfig) -> tuple[Signature, Signature]:
    """(vision_encoder, vision_adapter) of a vision bundle. The encoder takes the pixels LiteRT-LM
    hands it, RGB in [0, 1] (decoded, resized, divided by 255: no normalisation), and maps them to
    the tower's [-1, 1] itself; it returns the tower's features. The adapter pools and projects
    them to the N soft tokens (flag 1) and appends <end_of_image>'s row (flag 0), so that the
    sequence LiteRT-LM builds is contract/prompt.py's layout."""
    from models.multimodal import with_flag
    from models.vision import encode_patches, project

    v = cfg.vision
    if v is None:
        raise ValueError(f"{cfg.name} has no vision tower")
    f32 = np.dtype(np.float32)
    features = TensorSpec(FEATURES, (1, v.num_patches, v.width), f32)
    encoder = Signature(signature_name(SignatureKind.VISION_ENCODER), 0,
                        (TensorSpec(IMAGE, (1, v.image_size, v.image_size, 3), f32),), (features,),
                        fn=lambda params, image: (encode_patches(params, v, image * 2.0 - 1.0),))

    def adapter(params, feats):
        soft = with_flag(project(params, v, feats), jnp.ones(feats.shape[:1] + (v.tokens_per_image,), bool))
        eoi = with_flag(jnp.asarray(params[EOI_EMBEDDING], jnp.float32)[None, None], jnp.zeros((1, 1), bool))
        return (jnp.concatenate([soft, jnp.broadcast_to(eoi, (feats.shape[0], 1, cfg.embed_dim + 1))], axis=1),)

    out = TensorSpec(MM_EMBEDDINGS, (1, v.tokens_per_image + 1, cfg.embed_dim + 1), f32)
    return encoder, Signature(ADAPTER_SIGNATURE, 0, (features,), (out,), fn=adapter)


def build_vision_signature(cfg: ModelConfig) -> Signature:
    """vision_encoder(image f32[1, image_size, image_size, 3]) -> soft_tokens f32[1, I, E]
    (models/vision.py)."""
    from models.vision import encode_images

    v = cfg.vision
    if v is None:
        raise ValueError(f"{cfg.name} has no vision tower")
    inputs = (TensorSpec(IMAGE, (1, v.image_size, v.image_size, 3), np.dtype(np.float32)),)
    outputs = (TensorSpec(SOFT_TOKENS, (1, v.tokens_per_image, cfg.embed_dim), np.dtype(np.float32)),)

    def fn(params, image):
        return (encode_images(params, v, cfg.embed_dim, image),)

    return Signature(signature_name(SignatureKind.VISION_ENCODER), 0, inputs, outputs, fn=fn)


def image_prefill_lengths(cfg: ModelConfig, prefill_lens) -> list[int]:
    """The prefill lengths that get an image_prefill signature: those that hold an image's soft
    tokens. ValueError (with the fix) when none does."""
    n = cfg.vision.tokens_per_image
    lens = [t for t in prefill_lens if t >= n]
    if not lens:
        raise ValueError(f"images need a prefill length of at least {n} (an image's soft tokens go in one "
                         f"chunk); add one to --prefill-lens, or pass --no-vision for a text-only export")
    return lens


SHORT_BUCKET = 512  # the default's first context bucket (contexts above 1024)


def context_buckets(cfg: ModelConfig, max_len: int, requested=None) -> list[int]:
    """The context buckets of an export: `requested` (checked), or by default 512 and 4096, 16384,
    65536 ... below max_len for a context above 1024 (none up to 1024, nor for a model without
    global layers). The 512 bucket is for chats, which mostly stay short: gemma3-1b int4 decodes
    ~20% faster at position 128 over 512 global rows than over 4096 (docs/decode.md)."""
    from models.config import LayerKind

    if LayerKind.GLOBAL not in cfg.layer_kinds:
        if requested:
            raise ValueError(f"{cfg.name} has no global attention layers: context buckets do not apply; drop "
                             "--context-buckets")
        return []
    if requested is None:
        out, span = ([SHORT_BUCKET] if max_len > 2 * SHORT_BUCKET else []), 4096
        while span < max_len and max_len > 4096:
            out.append(span)
            span *= 4
        return out
    spans = sorted(set(int(x) for x in requested))
    for span in spans:
        if not 2 <= span < max_len:
            raise ValueError(f"context bucket {span} must be between 2 and below the context ({max_len}); lower it "
                             "or raise --max-seq-len")
    return spans


def verify_length(cfg: ModelConfig) -> int | None:
    """The verify signature's tokens for a config exported for speculative decoding (cfg.rewind
    draft tokens plus the last accepted one), else None."""
    return cfg.rewind + 1 if cfg.rewind else None


def all_signatures(cfg: ModelConfig, prefill_lens, max_len: int, dtype=jnp.float32,
                   attention: AttentionForm = AttentionForm.SDPA, buckets=(), kv: str = "f32",
                   embedded: bool = False) -> list[Signature]:
    """Every signature an artifact of this model holds: prefill_{T} and decode, plus verify_{K}
    for a config exported for speculative decoding (cfg.rewind = K - 1), plus, with a vision
    tower, vision_encoder and image_prefill_{T}, plus for each context bucket L its
    ctx{L}_prefill_{T} (T <= L), ctx{L}_verify_{K} and ctx{L}_decode. With `embedded` (a vision
    bundle: the module docstring) the text signatures take flagged embeddings, and embedder,
    vision_encoder (pixels in [0, 1]) and vision_adapter replace vision_encoder and
    image_prefill_{T}."""
    k = verify_length(cfg)
    kw = dict(attention=attention, kv=kv, embedded=embedded)
    sigs = [build_signature(cfg, t, max_len, dtype, **kw) for t in prefill_lens if t > 1]
    sigs.append(build_signature(cfg, 1, max_len, dtype, **kw))
    if k is not None:
        sigs.append(build_signature(cfg, k, max_len, dtype, verify=True, **kw))
    for span in buckets:
        sigs += [build_signature(cfg, t, max_len, dtype, span=span, **kw)
                 for t in [*(t for t in prefill_lens if t > 1), 1] if t <= span]
        if k is not None and k <= span:
            sigs.append(build_signature(cfg, k, max_len, dtype, span=span, verify=True, **kw))
    if embedded:
        return [*sigs, build_embedder_signature(cfg), *build_bundle_vision_signatures(cfg)]
    if cfg.vision is not None:
        sigs.append(build_vision_signature(cfg))
        sigs += [build_signature(cfg, t, max_len, dtype, image=True, attention=attention, kv=kv)
                 for t in image_prefill_lengths(cfg, prefill_lens)]
    return sigs


# ---- the ONNX decoder signature (onnxruntime-genai's conventions, DESIGN section 5) ---------------
SEQ, TOTAL = "sequence_length", "total_sequence_length"
INPUT_IDS, ATTENTION_MASK, INPUTS_EMBEDS = "input_ids", "attention_mask", "inputs_embeds"


def decoder_signature(cfg: ModelConfig, max_len: int, dtype=jnp.float32, image: bool = False,
                      attention: AttentionForm = AttentionForm.CACHE_OWNING, kv: str = "f32") -> Signature:
    """One function for every chunk length (ONNX graphs have symbolic dimensions):

      (input_ids int32[1, T], attention_mask int32[1, start + T], *past) -> (logits f32[1, 1, V], *present)

    With `image`, the image prefill graph: an `inputs_embeds` f32[1, T, E] input after input_ids,
    read at the image soft-token positions (as image_prefill_{T}; contract/prompt.py).

    attention_mask covers the past and the chunk (all ones: batch 1, no padding), so the chunk
    starts at position sum(attention_mask) - T. States are the layout's (window-sized rings for
    local layers), named past_* in and present_* out. Logits are those of the chunk's last token.
    `kv` "int8": int8 KV caches, each with its scales as a state of its own (models.cache.quantize_kv).
    """
    layout = state_layout(cfg, max_len, dtype, kv=kv)
    past, present = _specs(layout, Naming.ONNX_PAST), _specs(layout, Naming.ONNX_PRESENT)
    embeds = (TensorSpec(INPUTS_EMBEDS, (1, SEQ, cfg.embed_dim), np.dtype(np.float32)),) if image else ()
    inputs = (TensorSpec(INPUT_IDS, (1, SEQ), np.dtype(np.int32)), *embeds,
              TensorSpec(ATTENTION_MASK, (1, TOTAL), np.dtype(np.int32)), *past)
    outputs = (TensorSpec(LOGITS, (1, 1, cfg.vocab_size), np.dtype(np.float32)), *present)

    def fn(params, input_ids, *rest):
        embeddings, (attention_mask, *state_values) = (rest[0], rest[1:]) if image else (None, rest)
        t = input_ids.shape[1]
        start = jnp.sum(attention_mask, axis=1, dtype=jnp.int32) - t
        # attention_mask's length, start + T, is the positions in use: global layers attend over that many rows
        logits, new_cache = forward(params, cfg, input_ids, start, _cache_of(cfg, layout, state_values), None,
                                    last_only=True, embeddings=embeddings, attention=attention,
                                    total=attention_mask[0])
        return (logits, *_states_of(layout, new_cache))

    name = "image_prefill" if image else "decoder"
    return Signature(name, 0, inputs, outputs, tuple(t.name for t in past), fn=fn,
                     constraints=(f"{SEQ} <= {max_len}", f"{TOTAL} <= {max_len}"), attention=attention)


def artifact_metadata(cfg: ModelConfig, max_len: int, layout: StateLayout, **fields) -> ArtifactMetadata:
    """The contract's metadata record for an artifact of this model (fields: prefill_lengths,
    weight_dtype, quantization, attention, onnx_op_set)."""
    t = cfg.tokens
    attention = fields.pop("attention", AttentionForm.SDPA)
    return ArtifactMetadata(
        model=cfg.name, family=cfg.family.value, max_seq_len=max_len, states=layout, vocab_size=cfg.vocab_size,
        sliding_window=cfg.sliding_window, bos=t.bos, eos=t.eos, pad=t.pad, stop_tokens=tuple(t.stop_ids()),
        end_of_turn=t.end_of_turn, instruction_tuned=cfg.instruction_tuned,
        sample_vocab_size=cfg.sample_vocab_size, embed_dim=cfg.embed_dim,
        image=None if cfg.vision is None else ImageLayout.of(cfg.vision), config=config_dict(cfg),
        attention=AttentionForm(attention).value, **fields)


def config_dict(cfg: ModelConfig) -> dict:
    """The config as plain JSON data (enums as their values)."""
    raw = dataclasses.asdict(cfg)
    raw["layer_pattern"] = [k.value for k in cfg.layer_pattern]
    raw["family"] = cfg.family.value
    return raw
