"""Model configurations: one frozen dataclass for every Gemma 2, Gemma 3 and RecurrentGemma size.

A config is pure data. Layer patterns are tuples of `LayerKind`, tiled to the number of layers;
everything the model code, the caches, the loaders and the exporters need is derived from it.
Sizes and constants come from ../shared/MODEL_SPEC.md (sections 2, 3, 5).
Shapes follow the legend in models/__init__.py.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import ml_dtypes
import numpy as np

from contract.layout import LayerKind  # the layer kinds are part of the artifact contract


class Family(str, enum.Enum):
    GEMMA2 = "gemma2"
    GEMMA3 = "gemma3"
    RECURRENTGEMMA = "recurrentgemma"


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
    """RecurrentGemma's recurrent (RG-LRU) block."""

    lru_width: int  # C
    conv_width: int = 4
    num_gate_blocks: int = 0  # block-diagonal gate blocks; RecurrentGemma uses num_heads
    log_a_scale: float = 8.0  # the constant c in a_t = a^(c * r_t)

    @property
    def gate_block_size(self) -> int:
        return self.lru_width // self.num_gate_blocks


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP So400m/14 encoder of Gemma 3 4B+ (models/vision.py) and the image token ids of the
    prompt layout (MODEL_SPEC 4): the user's `<start_of_image>` (boi_token) expands to
    newline_token, boi_token, tokens_per_image x soft_token, eoi_token, newline_token."""

    image_size: int = 896
    patch_size: int = 14
    width: int = 1152  # Ev
    depth: int = 27
    num_heads: int = 16  # Hv (Dv = Ev / Hv)
    mlp_dim: int = 4304  # Fv
    layer_norm_eps: float = 1e-6
    tokens_per_image: int = 256  # I, after 4x4 average pooling of the 64x64 patch grid
    boi_token: int = 255_999  # <start_of_image>
    eoi_token: int = 256_000  # <end_of_image>
    soft_token: int = 262_144  # <image_soft_token>: one per soft token; its embedding row is never read
    newline_token: int = 108  # "\n\n" around each image

    @property
    def image_length(self) -> int:
        """Positions one image takes in the prompt (260 for Gemma 3)."""
        return self.tokens_per_image + 4

    @property
    def num_patches(self) -> int:  # P
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    pad: int = 0
    eos: int = 1
    bos: int = 2
    end_of_turn: int | None = None  # stop token of instruction-tuned models

    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos,) if self.end_of_turn is None else (self.eos, self.end_of_turn)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model size. Field names follow MODEL_SPEC's notation in comments."""

    name: str
    family: Family
    vocab_size: int  # rows of the embedding table (V)
    embed_dim: int  # E
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # K
    head_dim: int  # D
    mlp_dim: int  # F, per branch (gate and up each have F columns)
    layer_pattern: tuple[LayerKind, ...]  # tiled to num_layers
    sliding_window: int  # W, as published
    max_seq_len: int  # the context the model was trained for; default global cache length
    query_scale: float  # multiplier of q.k (1/sqrt(query_pre_attn_scalar))
    attn_softcap: float | None = None
    final_softcap: float | None = None
    qk_norm: bool = False
    local_rope_base: float = 10_000.0
    global_rope_base: float = 10_000.0
    global_rope_scale: float = 1.0  # linear position interpolation on global layers
    rope_fraction: float = 1.0  # share of each head that is rotated (RecurrentGemma: 0.5)
    # Local attention attends `sliding_window` keys including the current one (Gemma 2/3, HF). The
    # official RecurrentGemma attends one more (the current token plus W previous): MODEL_SPEC 5.4.
    window_extra_key: bool = False
    # RecurrentGemma always multiplies the embedding by the bf16-rounded sqrt(E); Gemma rounds it to
    # the activation dtype.
    embed_scale_bf16: bool = False
    mlp_bias: bool = False
    attn_out_bias: bool = False
    norm_eps: float = 1e-6
    recurrent: RecurrentConfig | None = None
    vision: VisionConfig | None = None
    tokens: SpecialTokens = SpecialTokens()
    instruction_tuned: bool = False  # `-it`: prompts use the chat template
    # Rows the sampler may pick (the HF multimodal Gemma 3 table has 64 placeholder rows past the
    # text vocabulary). None means every row.
    sample_vocab_size: int | None = None
    # Positions a sequence may be rewound by (speculative decoding: rejected draft tokens; export
    # --speculative K sets it to K). Local rings get this many rows past the window, so the rows a
    # rejected token overwrote held keys already outside every later query's window. An export
    # choice, not the architecture's: it changes only the local caches' rows.
    rewind: int = 0

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                f"{self.num_kv_heads}"
            )
        if not self.layer_pattern:
            raise ValueError(f"{self.name}: empty layer_pattern")
        kinds = set(self.layer_pattern)
        if (LayerKind.RECURRENT in kinds) != (self.recurrent is not None):
            raise ValueError(f"{self.name}: recurrent layers need a RecurrentConfig and vice versa")
        if self.recurrent and self.recurrent.lru_width % self.recurrent.num_gate_blocks:
            raise ValueError(f"{self.name}: lru_width must be a multiple of num_gate_blocks")
        rotated = self.head_dim * self.rope_fraction
        if rotated != int(rotated) or int(rotated) % 2:
            raise ValueError(f"{self.name}: rope_fraction * head_dim must be an even integer")
        if self.sliding_window < 1 or self.max_seq_len < 1:
            raise ValueError(f"{self.name}: sliding_window and max_seq_len must be positive")
        if self.rewind < 0:
            raise ValueError(f"{self.name}: rewind must be >= 0")

    # -- derived -------------------------------------------------------------------------------
    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        reps = -(-self.num_layers // len(self.layer_pattern))
        return (self.layer_pattern * reps)[: self.num_layers]

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def window_span(self) -> int:
        """Keys a local query may see, itself included: key position > query position - span."""
        return self.sliding_window + (1 if self.window_extra_key else 0)

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.rope_fraction)

    def embed_scale(self, dtype) -> float:
        """sqrt(E), rounded as the reference does (MODEL_SPEC 1.2, 8.2)."""
        rounding = ml_dtypes.bfloat16 if self.embed_scale_bf16 else np.dtype(dtype)
        return float(np.asarray(math.sqrt(self.embed_dim), np.float32).astype(rounding))

    def rope_params(self, kind: LayerKind) -> tuple[float, float]:
        """(base, linear scale factor) for a layer kind."""
        if kind is LayerKind.GLOBAL:
            return self.global_rope_base, self.global_rope_scale
        return self.local_rope_base, 1.0

    def cache_len(self, kind: LayerKind, max_len: int) -> int:
        """Rows of a layer's KV cache for a context of max_len tokens (0 for recurrent layers)."""
        if kind is LayerKind.GLOBAL:
            return max_len
        if kind is LayerKind.LOCAL:
            return min(self.sliding_window + self.rewind, max_len)
        return 0
