"""Signatures: the kinds an artifact exports, their names (one formatter, one parser), and the
description of a signature's tensors.

  prefill_{T}(tokens int32[1, T], input_pos int32[T], *states) -> (logits f32[1, 1, V], *states)
  decode     (tokens int32[1, 1], input_pos int32[1], *states) -> (logits f32[1, 1, V], *states)
  image_prefill_{T}(tokens, input_pos, embeddings f32[1, T, E], *states) -> (logits, *states)
  vision_encoder(image f32[1, S, S, 3]) -> soft_tokens f32[1, N, E]
  verify_{K}(tokens int32[1, K], input_pos int32[K], *states) -> (logits f32[1, K, V], *states)

verify_{K} is prefill_{K} returning the logits at every position: speculative decoding checks K
tokens (the last accepted one and K - 1 drafted) in one call (runtime_py/speculative.py). An
artifact with it has local rings K - 1 rows longer than the window, so the runtime may rewind the
position past rejected tokens (models/config.ModelConfig.rewind).

The image prefill is not named `prefill_*`: LiteRT-LM takes every `prefill*` signature as one of
its own text prefills.

Context buckets (TFLite, long contexts): `ctx{L}_prefill_{T}` and `ctx{L}_decode` are prefill_{T}
and decode over the same states whose global layers attend over the first L rows of their caches
only, so their cost follows the context in use; they hold positions below L. The prefix keeps
them out of LiteRT-LM's `prefill*` match (it runs the full-length signatures).
"""

from __future__ import annotations

import dataclasses
import enum
import re

import numpy as np

# inputs that are not states
TOKENS, INPUT_POS, EMBEDDINGS, IMAGE = "tokens", "input_pos", "embeddings", "image"
LOGITS, SOFT_TOKENS = "logits", "soft_tokens"


class SignatureKind(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    IMAGE_PREFILL = "image_prefill"
    VISION_ENCODER = "vision_encoder"
    VERIFY = "verify"

    @property
    def has_states(self) -> bool:
        return self is not SignatureKind.VISION_ENCODER


def signature_name(kind: SignatureKind | str, length: int = 0) -> str:
    """The name of a signature: `decode`, `vision_encoder`, `prefill_{T}`, `image_prefill_{T}`,
    `verify_{K}`."""
    kind = SignatureKind(kind)
    if kind in (SignatureKind.DECODE, SignatureKind.VISION_ENCODER):
        return kind.value
    return f"{kind.value}_{int(length)}"


_NAME = re.compile(r"(prefill|image_prefill|verify)_(\d+)")
_BUCKET = re.compile(r"ctx(\d+)_(prefill_\d+|verify_\d+|decode)")


def bucket_name(name: str, span: int | None) -> str:
    """The context-bucket variant of prefill_{T}, verify_{K} or decode attending over `span` rows (None: the
    name itself)."""
    return name if span is None else f"ctx{int(span)}_{name}"


def split_bucket(name: str) -> tuple[str, int | None]:
    """(base signature name, span) of a context-bucket name; (name, None) for any other."""
    m = _BUCKET.fullmatch(name)
    return (m.group(2), int(m.group(1))) if m else (name, None)


def parse_signature(name: str) -> tuple[SignatureKind, int]:
    """(kind, length) of a signature name; decode has length 1, the vision encoder 0. A context
    bucket's are its base signature's."""
    name = split_bucket(name)[0]
    if name == SignatureKind.DECODE.value:
        return SignatureKind.DECODE, 1
    if name == SignatureKind.VISION_ENCODER.value:
        return SignatureKind.VISION_ENCODER, 0
    m = _NAME.fullmatch(name)
    if not m:
        raise ValueError(f"unexpected signature '{name}' (want decode, prefill_<T>, image_prefill_<T>, "
                         "verify_<K>, vision_encoder)")
    return SignatureKind(m.group(1)), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or strings for symbolic dimensions (ONNX graphs)
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class SignatureSpec:
    """A signature's tensors. `states` names the inputs (each also an output of the same name,
    for the TFLite naming) that carry state from call to call, in layout order."""

    name: str
    length: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[str, ...] = ()

    @property
    def kind(self) -> SignatureKind:
        return parse_signature(self.name)[0]

    @property
    def span(self) -> int | None:
        """The rows of the global caches it attends over, for a context bucket; None for all."""
        return split_bucket(self.name)[1]

    @property
    def state_inputs(self) -> tuple[TensorSpec, ...]:
        by_name = {t.name: t for t in self.inputs}
        return tuple(by_name[n] for n in self.states)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)
