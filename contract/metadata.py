"""The artifact metadata record: what an exported artifact is, written by `export/` into every
artifact (the TFLite model's metadata table under `gemma_edge`, the ONNX model's metadata_props
under the same key) and read by `runtime_py/`, `python -m export inspect` and the tools.

A frozen, versioned record with a JSON round trip. `format` is bumped whenever a field changes
meaning; a reader refuses a format it does not know in one line (re-export the artifact).

Format history:
  1  (before the house issue) states as {name, layer, kind, shape, dtype} in the target's naming
  2  states as the contract's StateLayout (layer, layer kind, state kind, shape, dtype: names are
     derived, never stored), the image prompt layout as its own record, the attention form
"""

from __future__ import annotations

import dataclasses
import json

from contract.layout import StateLayout

METADATA_KEY = "gemma_edge"
FORMAT_VERSION = 2


class MetadataError(ValueError):
    """An artifact's metadata is missing or from a format this reader does not know."""


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """How images sit in a Gemma 3 prompt (models/multimodal.py): the user's `<start_of_image>`
    (boi_token) expands to newline, boi, tokens_per_image x soft_token, eoi, newline; the vision
    encoder takes [1, image_size, image_size, 3] pixels in [-1, 1]."""

    image_size: int
    tokens_per_image: int
    boi_token: int
    eoi_token: int
    soft_token: int
    newline_token: int

    @property
    def image_length(self) -> int:
        """Positions one image takes in the prompt (260 for Gemma 3)."""
        return self.tokens_per_image + 4

    @classmethod
    def of(cls, vision) -> ImageLayout:
        """From any object with the same fields (models.config.VisionConfig)."""
        return cls(**{f.name: getattr(vision, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class ArtifactMetadata:
    model: str
    family: str  # gemma2 | gemma3 | recurrentgemma
    max_seq_len: int
    states: StateLayout
    vocab_size: int
    sliding_window: int
    bos: int
    eos: int
    pad: int = 0
    stop_tokens: tuple[int, ...] = ()
    end_of_turn: int | None = None
    instruction_tuned: bool = False
    sample_vocab_size: int | None = None  # rows the sampler may pick (None: every row)
    embed_dim: int = 0
    prefill_lengths: tuple[int, ...] = ()
    context_buckets: tuple[int, ...] = ()  # TFLite: spans of the ctx{L}_* signatures (contract/signatures.py)
    weight_dtype: str = "f32"  # stored float weights: f32 | bf16 | f16
    quantization: str | None = None  # the recipe, None for float storage
    quant_method: str | None = None  # how the codes were chosen (int4: mse | gptq) and the weights'
    # transforms (smoothed, rotated), joined by +: "gptq+rotated", "smoothed+rotated"
    attention: str = "sdpa"  # the attention form the graphs were traced with (models.fused)
    onnx_op_set: str | None = None
    image: ImageLayout | None = None  # Gemma 3 with a vision encoder
    config: dict = dataclasses.field(default_factory=dict, compare=False)  # the full model config, for tools
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        body = dataclasses.asdict(self)
        body["states"] = self.states.to_list()
        body["stop_tokens"] = list(self.stop_tokens)
        body["prefill_lengths"] = list(self.prefill_lengths)
        body["context_buckets"] = list(self.context_buckets)
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "artifact") -> ArtifactMetadata:
        try:
            body = json.loads(text)
        except (TypeError, ValueError) as e:
            raise MetadataError(f"{where}: its gemma-edge metadata is not JSON ({e})") from None
        version = body.get("format")
        if version != FORMAT_VERSION:
            raise MetadataError(f"{where}: metadata format {version} is not the {FORMAT_VERSION} this "
                                "gemma-edge reads; re-export the artifact with this version")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(body) - fields
        if unknown:
            raise MetadataError(f"{where}: unknown metadata fields {sorted(unknown)}; re-export the artifact")
        body["states"] = StateLayout.from_list(body["states"])
        body["stop_tokens"] = tuple(body.get("stop_tokens", ()))
        body["prefill_lengths"] = tuple(body.get("prefill_lengths", ()))
        body["context_buckets"] = tuple(body.get("context_buckets", ()))
        if body.get("image"):
            body["image"] = ImageLayout(**body["image"])
        return cls(**body)

    def replace(self, **changes) -> ArtifactMetadata:
        return dataclasses.replace(self, **changes)
