"""Weights known by shape and dtype, read from their source when asked (docs/memory.md).

A `LazyTensor` stands in for a numpy array in a parameter dict: it has `shape`, `dtype`,
`size`, `nbytes` and `ndim`, so everything that only plans (tracing to StableHLO, the memory
estimate, size reports, the ONNX lowering) works on it unchanged, and `load()` (or
`np.asarray`) reads the tensor, applies its transforms, and returns a fresh array that the
caller drops when done. Nothing is cached: a streamed export holds one tensor at a time.

Transforms compose without reading: `.T`, `.astype(dtype)`, `.apply(fn, shape, dtype)`.
Sources: a checkpoint reader (safetensors read by row slices, a GGUF file, Orbax) through
models/loaders, or `random_params` below (a seeded normal per tensor, which never materialises
the whole model). `materialize(params)` turns a dict of them into arrays, for the in-memory paths.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np


class LazyTensor:
    """A tensor of `shape` and `dtype`, produced by `read()` each time it is loaded."""

    __slots__ = ("shape", "dtype", "_read", "name", "_t", "_rows")

    def __init__(self, shape, dtype, read: Callable[[], np.ndarray], name: str | None = None,
                 rows: Callable[[int, int], np.ndarray] | None = None):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self._read = read
        self.name = name
        self._t = None
        self._rows = rows  # (start, stop) -> those rows, where the source can read a slice alone

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def load(self) -> np.ndarray:
        value = np.asarray(self._read())
        if value.shape != self.shape or value.dtype != self.dtype:
            raise RuntimeError(f"internal error: {self.name or 'a lazy tensor'} read as {value.dtype}{list(value.shape)}, "
                               f"declared {self.dtype}{list(self.shape)}")
        return value

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of the tensor: read alone where the source can (a safetensors
        checkpoint), else sliced from a whole read."""
        if self._rows is None:
            return self.load()[start:stop]
        value = np.asarray(self._rows(start, stop))
        want = (min(stop, self.shape[0]) - start, *self.shape[1:])
        if value.shape != want or value.dtype != self.dtype:
            raise RuntimeError(f"internal error: rows of {self.name or 'a lazy tensor'} read as {value.dtype}"
                               f"{list(value.shape)}, declared {self.dtype}{list(want)}")
        return value

    @property
    def reads_rows(self) -> bool:
        return self._rows is not None

    def __array__(self, dtype=None, copy=None):
        value = self.load()
        return value if dtype is None else astype(value, dtype)

    def apply(self, fn: Callable[[np.ndarray], np.ndarray], shape=None, dtype=None) -> "LazyTensor":
        """`fn` applied when loaded; `shape`/`dtype`: of its result, when they change."""
        return LazyTensor(self.shape if shape is None else shape, self.dtype if dtype is None else dtype,
                          lambda: fn(self.load()), self.name)

    @property
    def T(self) -> "LazyTensor":
        """The transpose; the same object each time, so two graphs lowered from one weight can
        tell that they hold the same tensor without reading it."""
        if self._t is None:
            self._t = self.apply(lambda a: a.T, shape=self.shape[::-1])
        return self._t

    def astype(self, dtype, copy: bool = True) -> "LazyTensor":
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        rows = None if self._rows is None else (lambda a, b: astype(self._rows(a, b), dtype))
        return LazyTensor(self.shape, dtype, lambda: astype(self.load(), dtype), self.name, rows)

    def __repr__(self) -> str:
        return f"LazyTensor({self.name or '?'}, {self.dtype}{list(self.shape)})"


def astype(a: np.ndarray, dtype) -> np.ndarray:
    """`a` as `dtype` (no copy when it already is). bfloat16 -> float32, the common checkpoint
    case, widens the 16 bits into the top of a 32-bit word (exact, as bfloat16 is float32's top
    half): ml_dtypes' element-by-element cast took ~8 s of a 1B model's 16-second read."""
    a = np.asarray(a)
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    if a.dtype.name == "bfloat16" and dtype == np.float32:
        out = np.empty(a.shape, np.float32)
        np.left_shift(a.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
        return out
    return a.astype(dtype)


def is_lazy(value) -> bool:
    return isinstance(value, LazyTensor)


def load(value) -> np.ndarray:
    """An array of `value` (read if lazy)."""
    return value.load() if isinstance(value, LazyTensor) else np.asarray(value)


CHUNK_BYTES = 16 << 20


def row_chunks(value, max_bytes: int = CHUNK_BYTES):
    """(start, rows) of a 2-D weight in chunks of at most `max_bytes` as f32: a lazy tensor whose
    source reads row slices is never held whole (the embedding table of a 4B+ model is 2.5 GiB
    and up in f32); anything else is loaded once and sliced. The chunks are small on purpose:
    malloc serves blocks under 32 MiB from memory it keeps and reuses, larger ones with fresh
    pages from the kernel that fault in on first touch (gemma3-1b's weights read in 256 MiB
    chunks took 6-8 s, in 16 MiB ones 1.2 s)."""
    n, width = value.shape[0], int(np.prod(value.shape[1:], dtype=np.int64))
    step = max(1, max_bytes // (4 * max(width, 1)))
    if isinstance(value, LazyTensor) and value.reads_rows:
        for r in range(0, n, step):
            yield r, value.read_rows(r, min(r + step, n))
        return
    whole = load(value)
    for r in range(0, n, step):
        yield r, whole[r:r + step]


def map_rows(value, fn):
    """fn(rows, start) -> f32 rows applied to an array, or to a LazyTensor lazily (keeping its
    row-slice reads where its source has them): the weight transforms of an export
    (export/quantize/smooth.py, export/quantize/rotate.py) use it."""
    if not is_lazy(value):
        return fn(value, 0)
    row_read = None if not value.reads_rows else (lambda a, b: fn(value.read_rows(a, b), a))
    return LazyTensor(value.shape, np.float32, lambda: fn(value.load(), 0), value.name, row_read)


def cast(value, dtype):
    """`value` as `dtype`: a lazy tensor stays lazy (cast when read), an array is cast now."""
    if isinstance(value, LazyTensor):
        return value.astype(dtype)
    return astype(value, dtype)


def materialize(params: dict) -> dict:
    """The dict with every lazy tensor read (arrays pass through)."""
    return {k: load(v) for k, v in params.items()}


def any_lazy(params: dict) -> bool:
    return any(isinstance(v, LazyTensor) for v in params.values())


# ---- seeded random weights, one tensor at a time ------------------------------------------------
def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: the same tensor gets the same values whatever else the model holds."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) & 0xFFFFFFFF


def random_tensor(name: str, shape: tuple, seed: int, dtype=np.float32) -> np.ndarray:
    """One tensor of models.params.init_params (which draws each tensor this way), from its own seed."""
    import math

    rng = np.random.default_rng(tensor_seed(seed, name))
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "a_param":
        a = rng.uniform(0.9, 0.999, size=shape)
        value = np.log(np.expm1(-np.log(a)))  # softplus(a_param) = -log(a)
    elif leaf.endswith("_norm"):
        value = rng.normal(0.0, 0.1, size=shape)
    elif leaf.endswith("_bias"):
        value = rng.normal(0.0, 0.02, size=shape)
    else:
        fan_in = shape[-1] if leaf != "conv_w" else shape[0]
        value = rng.standard_normal(size=shape, dtype=np.float32) / np.float32(math.sqrt(fan_in))
    return np.asarray(value, dtype=dtype)


def random_params(shapes: dict[str, tuple], seed: int = 0, dtype=np.float32) -> dict[str, LazyTensor]:
    """Lazy seeded random weights for a parameter table (`models.params.param_shapes`)."""
    return {name: LazyTensor(shape, dtype, (lambda n=name, s=tuple(shape): random_tensor(n, s, seed, dtype)), name)
            for name, shape in shapes.items()}


__all__ = ["LazyTensor", "any_lazy", "cast", "is_lazy", "load", "materialize", "random_params", "random_tensor"]
