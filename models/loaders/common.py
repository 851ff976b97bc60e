"""What every checkpoint format shares: a table from our parameter names to source tensors, checked
against the config before any data is read, then converted tensor by tensor."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

from models.config import ModelConfig
from models.errors import CheckpointError
from models.params import param_shapes

# Embedding rows a checkpoint may carry past the text vocabulary: the official Gemma 2 table has
# 128 unused padding rows (256128 vs 256000); the HF multimodal Gemma 3 table has 64 image
# placeholder rows (262208 vs 262144). Such rows are dropped (MODEL_SPEC 2, 3, 8.3 item 9).
PADDING_EMBED_ROWS = (64, 128)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a parameter comes from: a source tensor name, a layout transform, and the stored
    shape the transform expects where it matters (an einsum weight that is indexed and reshaped
    could otherwise crash, or silently accept a permuted tensor with the same element count)."""

    name: str
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    shape: tuple[int, ...] | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x if self.transform is None else self.transform(x)


class TensorReader(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str, dtype=None) -> np.ndarray: ...


def _fmt(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _shape_after(src: Source, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape `src.transform` gives, computed on a zero-stride stand-in (no memory); None if
    the transform cannot take a tensor of that shape."""
    try:
        return tuple(src.apply(np.broadcast_to(np.zeros((), np.float32), shape)).shape)
    except (ValueError, IndexError):
        return None


def assemble(cfg: ModelConfig, reader: TensorReader, sources: dict[str, Source], *,
             dtype=np.float32, ignore: Callable[[str], bool] = lambda name: False,
             where: str = "checkpoint", lazy: bool = False) -> dict[str, np.ndarray]:
    """Check the checkpoint against the config, then read and convert every parameter.

    With `lazy`, nothing is read: each parameter is a models.lazy.LazyTensor that reads and
    converts its tensor when loaded (the reader must stay open while they are used).
    Raises CheckpointError (one line) for the first missing, mis-shaped or unexpected tensor.
    """
    expected = param_shapes(cfg)
    available = set(reader.names())
    hint = f"is the model ({cfg.name}) right for this checkpoint?"
    for ours, shape in expected.items():
        src = sources[ours]
        if src.name not in available:
            raise CheckpointError(
                f"{where}: missing tensor '{src.name}' (expected for {ours}, shape {_fmt(shape)}); {hint}"
            )
        stored = reader.shape(src.name)
        if src.shape is not None:
            if stored != src.shape:
                raise CheckpointError(
                    f"{where}: tensor '{src.name}' has shape {_fmt(stored)}, expected "
                    f"{_fmt(src.shape)} for {cfg.name}; {hint}"
                )
            continue
        got = _shape_after(src, stored)
        if got != shape and not (got and _is_padded_embedding(ours, got, shape)):
            raise CheckpointError(
                f"{where}: tensor '{src.name}' has shape {_fmt(stored)}, expected "
                f"{_fmt(shape)} after layout conversion for {cfg.name}; {hint}"
            )
    used = {s.name for s in sources.values()}
    for name in sorted(available - used):
        if not ignore(name):
            raise CheckpointError(f"{where}: unexpected tensor '{name}' (not part of {cfg.name}); {hint}")

    if lazy:
        return {ours: _lazy_param(reader, sources[ours], shape, dtype, ours) for ours, shape in expected.items()}
    params = {}
    cache: dict[str, np.ndarray] = {}  # a source feeding two parameters (official kv_einsum)
    readers_left = _use_counts(sources[o].name for o in expected)
    for ours, shape in expected.items():
        src = sources[ours]
        raw = cache[src.name] if src.name in cache else reader.read(src.name, dtype)
        readers_left[src.name] -= 1
        if readers_left[src.name]:
            cache[src.name] = raw
        else:
            cache.pop(src.name, None)
        value = src.apply(raw)
        if value.shape != shape:  # padded embedding rows
            value = value[: shape[0]]
        params[ours] = np.ascontiguousarray(value, dtype=dtype)
        del raw, value
    return params


def _lazy_param(reader: TensorReader, src: Source, shape: tuple, dtype, ours: str):
    from models.lazy import LazyTensor

    def read():
        value = src.apply(reader.read(src.name, dtype))
        if value.shape != shape:  # padded embedding rows
            value = value[: shape[0]]
        return np.ascontiguousarray(value, dtype=dtype)

    def rows(start, stop):  # a row slice of the stored tensor, read alone
        return np.ascontiguousarray(reader.read_rows(src.name, start, min(stop, shape[0]), dtype), dtype=dtype)

    sliceable = src.transform is None and len(shape) == 2 and hasattr(reader, "read_rows")
    return LazyTensor(shape, dtype, read, ours, rows if sliceable else None)


def _use_counts(names: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return counts


def _is_padded_embedding(ours: str, got, shape) -> bool:
    return ours == "embed" and got[1:] == shape[1:] and got[0] - shape[0] in PADDING_EMBED_ROWS
