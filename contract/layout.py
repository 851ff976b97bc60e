"""The state layout: every state tensor an artifact carries between calls, computed once from the
layer kinds, with its name in each target's naming scheme.

  attention layer i (global or local): key, value         [1, K, R, D]  R = context (global) or the
                                                                         local cache's rows (local)
    with an int8 KV cache also:        key/value scale     [1, K, R, 1] float32 (one per token and head)
  recurrent layer i:                   conv               [1, conv_width - 1, lru_width]
                                       recurrent (RG-LRU) [1, lru_width] float32

Names (DESIGN section 5):

  state       TFLite / LiteRT-LM      ONNX input (past)           ONNX output (present)
  key         kv_cache_k_{i}          past_key_values.{i}.key     present.{i}.key
  value       kv_cache_v_{i}          past_key_values.{i}.value   present.{i}.value
  key scale   kv_cache_k_{i}_scale    past_key_values.{i}.key_scale   present.{i}.key_scale
  value scale kv_cache_v_{i}_scale    past_key_values.{i}.value_scale present.{i}.value_scale
  conv        kv_cache_conv_{i}       past.{i}.conv               present.{i}.conv
  recurrent   kv_cache_lru_{i}        past.{i}.recurrent          present.{i}.recurrent

LiteRT-LM carries a state between calls only when its name starts with `kv_cache_`, hence the
recurrent states' TFLite names; onnxruntime-genai discovers layers at any index by these names.
A name is produced from (layer, kind) here and nowhere else; nothing parses one back.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np


class LayerKind(str, enum.Enum):
    """What a layer's temporal-mixing block is; decides its state layout."""

    GLOBAL = "global"  # full causal attention; KV cache of max_seq_len positions
    LOCAL = "local"  # sliding-window attention; ring-buffer KV cache of `window` positions
    RECURRENT = "recurrent"  # RG-LRU block; fixed-size state (RecurrentGemma)

    @property
    def is_attention(self) -> bool:
        return self is not LayerKind.RECURRENT


class StateKind(str, enum.Enum):
    """Which tensor of a layer's state; the value is the key of the model's per-layer cache dict."""

    KEY = "k"
    VALUE = "v"
    CONV = "conv"
    RECURRENT = "rg_lru"
    KEY_SCALE = "k_scale"  # int8 KV caches: the per-token, per-head scale of the key rows
    VALUE_SCALE = "v_scale"


class Naming(str, enum.Enum):
    """A target's naming scheme for states (ONNX names inputs and outputs differently)."""

    TFLITE = "tflite"  # .tflite and .litertlm: one name, both input and output
    ONNX_PAST = "onnx_past"  # ONNX graph inputs
    ONNX_PRESENT = "onnx_present"  # ONNX graph outputs


_NAMES = {
    StateKind.KEY: ("kv_cache_k_{i}", "past_key_values.{i}.key", "present.{i}.key"),
    StateKind.VALUE: ("kv_cache_v_{i}", "past_key_values.{i}.value", "present.{i}.value"),
    StateKind.CONV: ("kv_cache_conv_{i}", "past.{i}.conv", "present.{i}.conv"),
    StateKind.RECURRENT: ("kv_cache_lru_{i}", "past.{i}.recurrent", "present.{i}.recurrent"),
    StateKind.KEY_SCALE: ("kv_cache_k_{i}_scale", "past_key_values.{i}.key_scale", "present.{i}.key_scale"),
    StateKind.VALUE_SCALE: ("kv_cache_v_{i}_scale", "past_key_values.{i}.value_scale", "present.{i}.value_scale"),
}
_SCHEMES = (Naming.TFLITE, Naming.ONNX_PAST, Naming.ONNX_PRESENT)
# onnxruntime-genai's genai_config keys for each state kind's input and output name templates
_GENAI_KEYS = {StateKind.KEY: "key", StateKind.VALUE: "value", StateKind.CONV: "conv",
               StateKind.RECURRENT: "recurrent", StateKind.KEY_SCALE: "key_scale",
               StateKind.VALUE_SCALE: "value_scale"}


def genai_templates(kind: StateKind) -> dict[str, tuple[str, str]]:
    """{"inputs": (genai_config key, "%d" template), "outputs": (...)} of a state kind, e.g.
    inputs ("past_key_names", "past_key_values.%d.key")."""
    _, past, present = _NAMES[kind]
    key = _GENAI_KEYS[kind]
    return {"inputs": (f"past_{key}_names", past.replace("{i}", "%d")),
            "outputs": (f"present_{key}_names", present.replace("{i}", "%d"))}


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """One state tensor: its layer, the layer's kind, which state it is, shape and dtype."""

    layer: int
    layer_kind: LayerKind
    kind: StateKind
    shape: tuple[int, ...]
    dtype: np.dtype

    def name(self, naming: Naming | str = Naming.TFLITE) -> str:
        return _NAMES[self.kind][_SCHEMES.index(Naming(naming))].format(i=self.layer)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def rows(self) -> int | None:
        """Positions an attention cache holds (dimension 2); None for recurrent states."""
        return self.shape[2] if self.kind not in (StateKind.CONV, StateKind.RECURRENT) else None

    def to_dict(self) -> dict:
        return {"layer": self.layer, "layer_kind": self.layer_kind.value, "kind": self.kind.value,
                "shape": list(self.shape), "dtype": np.dtype(self.dtype).name}

    @classmethod
    def from_dict(cls, d: dict) -> StateSpec:
        return cls(int(d["layer"]), LayerKind(d["layer_kind"]), StateKind(d["kind"]),
                   tuple(int(x) for x in d["shape"]), np.dtype(d["dtype"]))


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Every state of a model, in signature order (layer by layer; key before value, conv before
    the RG-LRU state)."""

    states: tuple[StateSpec, ...]

    @classmethod
    def build(cls, layer_kinds: Sequence[LayerKind], *, max_len: int, local_rows: int, kv_heads: int = 0,
              head_dim: int = 0, conv_width: int = 0, lru_width: int = 0, dtype=np.float32,
              kv_dtype=None) -> StateLayout:
        """The layout of a model whose layers are `layer_kinds`, for a context of max_len: global
        caches hold max_len rows, local ones `local_rows` (a ring), recurrent states are fixed
        (the RG-LRU state is always float32; the others take `dtype`). `kv_dtype` int8: the KV
        caches are int8 with a float32 scale per row and head (key, value, key scale, value scale)."""
        dtype, states = np.dtype(dtype), []
        int8 = kv_dtype is not None and np.dtype(kv_dtype) == np.int8
        for i, kind in enumerate(layer_kinds):
            kind = LayerKind(kind)
            if kind is LayerKind.RECURRENT:
                states += [StateSpec(i, kind, StateKind.CONV, (1, conv_width - 1, lru_width), dtype),
                           StateSpec(i, kind, StateKind.RECURRENT, (1, lru_width), np.dtype(np.float32))]
            else:
                rows = max_len if kind is LayerKind.GLOBAL else local_rows
                shape = (1, kv_heads, rows, head_dim)
                kv = np.dtype(np.int8) if int8 else dtype
                states += [StateSpec(i, kind, StateKind.KEY, shape, kv), StateSpec(i, kind, StateKind.VALUE, shape, kv)]
                if int8:
                    scale = (1, kv_heads, rows, 1)
                    states += [StateSpec(i, kind, StateKind.KEY_SCALE, scale, np.dtype(np.float32)),
                               StateSpec(i, kind, StateKind.VALUE_SCALE, scale, np.dtype(np.float32))]
        return cls(tuple(states))

    def __iter__(self) -> Iterator[StateSpec]:
        return iter(self.states)

    def __len__(self) -> int:
        return len(self.states)

    def names(self, naming: Naming | str = Naming.TFLITE) -> list[str]:
        return [s.name(naming) for s in self.states]

    def by_name(self, naming: Naming | str = Naming.TFLITE) -> dict[str, StateSpec]:
        return {s.name(naming): s for s in self.states}

    def layer_kinds(self) -> dict[int, LayerKind]:
        return {s.layer: s.layer_kind for s in self.states}

    def bytes_by_layer_kind(self) -> dict[str, int]:
        out = Counter()
        for s in self.states:
            out[s.layer_kind.value] += s.nbytes
        return dict(out)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states)

    def kv_bytes_per_token(self) -> int:
        """Bytes the states grow by per token of context: the global layers' cache rows (local
        rings and recurrent states have a fixed size)."""
        return sum(s.nbytes // s.shape[2] for s in self.states if s.layer_kind.value == "global")

    def to_list(self) -> list[dict]:
        return [s.to_dict() for s in self.states]

    @classmethod
    def from_list(cls, items: Sequence[dict]) -> StateLayout:
        return cls(tuple(StateSpec.from_dict(d) for d in items))
