"""Signatures: the kinds an artifact exports, their names (one formatter, one parser), and the
description of a signature's tensors.

  prefill_{T}(tokens int32[1, T], input_pos int32[T], *states) -> (logits f32[1, 1, V], *states)
  decode     (tokens int32[1, 1], input_pos int32[1], *states) -> (logits f32[1, 1, V], *states)
  image_prefill_{T}(tokens, input_pos, embeddings f32[1, T, E], *states) -> (logits, *states)
  vision_encoder(image f32[1, S, S, 3]) -> soft_tokens f32[1, N, E]

The image prefill is not named `prefill_*`: LiteRT-LM takes every `prefill*` signature as one of
its own text prefills.
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

    @property
    def has_states(self) -> bool:
        return self is not SignatureKind.VISION_ENCODER


def signature_name(kind: SignatureKind | str, length: int = 0) -> str:
    """The name of a signature: `decode`, `vision_encoder`, `prefill_{T}`, `image_prefill_{T}`."""
    kind = SignatureKind(kind)
    if kind in (SignatureKind.DECODE, SignatureKind.VISION_ENCODER):
        return kind.value
    return f"{kind.value}_{int(length)}"


_NAME = re.compile(r"(prefill|image_prefill)_(\d+)")


def parse_signature(name: str) -> tuple[SignatureKind, int]:
    """(kind, length) of a signature name; decode has length 1, the vision encoder 0."""
    if name == SignatureKind.DECODE.value:
        return SignatureKind.DECODE, 1
    if name == SignatureKind.VISION_ENCODER.value:
        return SignatureKind.VISION_ENCODER, 0
    m = _NAME.fullmatch(name)
    if not m:
        raise ValueError(f"unexpected signature '{name}' (want decode, prefill_<T>, image_prefill_<T>, "
                         "vision_encoder)")
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
    def state_inputs(self) -> tuple[TensorSpec, ...]:
        by_name = {t.name: t for t in self.inputs}
        return tuple(by_name[n] for n in self.states)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)
