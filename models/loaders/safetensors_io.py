"""Memory-lean reading and writing of safetensors files, single or sharded.

The format: 8 bytes little-endian header length N, N bytes of JSON ({name: {dtype, shape,
data_offsets: [begin, end]}} plus optional "__metadata__"), then the raw tensor bytes. Reading
takes one tensor (or a slice of its rows) at a time with positional reads (os.preadv) into a fresh
array, converted there: nothing of the file is mapped into the process, so peak memory is the
converted parameters plus about one tensor, never a second copy of the checkpoint. (A memory map
read the same bytes ~5x slower, page fault by page fault: 3.2 s vs 0.7 s for gemma3-1b's 2 GB of
bf16 matmul weights.)
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from models.errors import CheckpointError

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFile:
    """One .safetensors file: `names()`, `shape(name)`, `read(name, dtype)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise CheckpointError(f"{self.path}: truncated safetensors file (header runs past the end)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._entries = header
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if self._base + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file: tensor '{name}' needs bytes up to "
                    f"{self._base + end}, the file has {size}; re-download or re-save the checkpoint"
                )
            if entry["dtype"] not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported dtype {entry['dtype']}")
        self._file = open(self.path, "rb")

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._entries[name]["dtype"]]

    def read(self, name: str, dtype=None) -> np.ndarray:
        """The tensor as a fresh (writable, owned) array, converted to `dtype` if given."""
        entry = self._entries[name]
        begin, end = (self._base + o for o in entry["data_offsets"])
        return self._read(begin, end - begin, tuple(entry["shape"]), self.dtype(name), dtype)

    def read_rows(self, name: str, start: int, stop: int, dtype=None) -> np.ndarray:
        """Rows start..stop of a tensor (a contiguous byte range of the file), as a fresh array."""
        entry = self._entries[name]
        shape = entry["shape"]
        dtype_in = self.dtype(name)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype_in.itemsize
        n = max(0, min(stop, shape[0]) - start)
        begin = self._base + entry["data_offsets"][0] + start * row
        return self._read(begin, n * row, (n, *shape[1:]), dtype_in, dtype)

    def _read(self, begin: int, nbytes: int, shape: tuple, dtype_in: np.dtype, dtype) -> np.ndarray:
        from models.lazy import astype

        raw = np.empty(shape, dtype_in)
        view = memoryview(raw.reshape(-1).view(np.uint8))
        done = 0
        while done < nbytes:  # preadv may return less than asked (signals, very large reads)
            got = os.preadv(self._file.fileno(), [view[done:]], begin + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: truncated safetensors file: short read at byte {begin + done}")
            done += got
        return raw if dtype is None else astype(raw, dtype)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsCheckpoint:
    """All tensors of a checkpoint folder (model.safetensors or a sharded index) by name."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (folder / shard).exists():
                    raise CheckpointError(f"{folder}: shard '{shard}' named in {INDEX_FILE} is missing")
        else:
            shards = sorted(p.name for p in folder.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{folder}: no *.safetensors files")
        self._files = [SafetensorsFile(folder / s) for s in shards]
        self._where = {n: f for f in self._files for n in f.names()}

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def read(self, name: str, dtype=None) -> np.ndarray:
        return self._where[name].read(name, dtype)

    def read_rows(self, name: str, start: int, stop: int, dtype=None) -> np.ndarray:
        return self._where[name].read_rows(name, start, stop, dtype)

    def close(self):
        for f in self._files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None):
    """Write tensors (arrays or lazy tensors) as one .safetensors file, atomically (temp file, then
    rename), one tensor in memory at a time."""
    path = Path(path)
    header, offset = {}, 0
    for name, arr in tensors.items():
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": _NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():  # one at a time: a lazy tensor (models/lazy.py) is read here
            f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
    os.replace(tmp, path)

