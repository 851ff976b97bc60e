"""Give back the resident pages of an artifact's file once the runtime no longer reads them.

Both runtimes map the artifact's file and, while loading, read all of it: ONNX Runtime to prepack
MatMulNBits' weights into its own memory (the tied embedding table included, which
GatherBlockQuantized then reads in place, a few rows per token), XNNPACK to pack a TFLite model's
weights into its weight cache (which it maps instead). The pages read stay in the process's
resident set although decode never touches most of them again: at gemma3-1b int4 that is 206 MiB
of model.onnx.data (a third of the folder) and ~75 MiB of the .tflite (docs/memory.md).

`release_mapped(path)` asks the kernel to reclaim them (madvise MADV_PAGEOUT, Linux 5.4+): a
clean page of a file mapping is a copy of the file, so a later read faults it back in with the
same bytes (the few embedding rows a decode step looks up). Only mappings with no privately
written pages (smaps `Anonymous: 0 kB`) are named, and pages another mapping shares are left
alone by the kernel. PAGEOUT and not DONTNEED, although DONTNEED would keep the pages in the page
cache (a minor fault instead of a disk read, and a faster next load): between reading smaps and
the madvise call, another thread may unmap a listed range (a session of the same artifact
closing) and malloc reuse it, and DONTNEED there would zero live heap memory, which PAGEOUT never
changes (without swap it leaves anonymous memory where it is). Measured cost: the next load of a
gemma3-1b int4 folder reads the ~265 MiB it evicted again (ONNX load 0.9 -> 1.1 s).

Linux only; elsewhere, on older kernels, and with GEMMA_EDGE_KEEP_MAPPED=1 in the environment
(to measure what it saves: tools/bench_runtime_memory.py) it releases nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

MADV_PAGEOUT = 21
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def file_mappings(path) -> list[dict]:
    """This process's mappings of `path` (a file, or every file under a folder): start, end,
    perms, file, rss and anonymous bytes, from /proc/self/smaps ([] where there is none)."""
    target = Path(path).resolve()
    folder = target.is_dir()
    out, current = [], None
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return []
    for line in lines:
        head = line.split(None, 5)
        if head and not head[0].endswith(":"):  # a mapping's first line: range perms offset dev inode [path]
            current = None
            if len(head) < 6 or head[5].endswith(" (deleted)"):
                continue
            file = Path(head[5])
            if file == target or (folder and target in file.parents):
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = {"start": start, "end": end, "perms": head[1], "file": file, "rss": 0, "anonymous": 0}
                out.append(current)
        elif current is not None and head[0] in ("Rss:", "Anonymous:"):
            current[head[0][:-1].lower()] = int(head[1]) * 1024
    return out


def release_mapped(path) -> int:
    """Reclaim this process's resident clean pages of `path` (a file or a folder's files); returns
    the bytes that were resident in the mappings advised. Safe at any time: a page read later is
    read again from the file."""
    if not sys.platform.startswith("linux") or os.environ.get("GEMMA_EDGE_KEEP_MAPPED") == "1":
        return 0
    released = 0
    madvise = _madvise()
    for m in file_mappings(path):
        if m["anonymous"] or not m["rss"]:
            continue
        if madvise(m["start"], m["end"] - m["start"], MADV_PAGEOUT) == 0:
            released += m["rss"]
    return released


def trim_heap() -> bool:
    """Return the heap's free memory to the kernel (glibc's malloc_trim): freed blocks below
    malloc's mmap threshold otherwise stay resident, reused only by later allocations. False
    where there is no malloc_trim (not glibc) or nothing was returned."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.malloc_trim(ctypes.c_size_t(0)))
    except (OSError, AttributeError):
        return False
