"""How much LiteRT's native code writes to stderr.

ai-edge-litert logs every environment it creates, every accelerator it registers or fails to find
(NPU, GPU, the OpenVINO compiler plugin) and every XNNPACK delegate, at INFO and WARNING, on
stderr: ~35 lines per load, and more at exit, interleaved with a generation's text and the
exporter's progress. Its Python package has no way to change that (LiteRT issue 7420), and the
process-wide environment variables of TensorFlow's logging do not reach it. Its two loggers each
keep their threshold in one variable of the shared library that every ai_edge_litert extension
links (`libpywrap_litert_common.so`): LiteRT's default logger and TFLite's minimal logger. Those
symbols are in the library's symbol table (not exported), so this module finds them there, checks
that each holds a plausible severity (0-4), and sets the threshold.

`$GEMMA_EDGE_LITERT_LOG` picks it: `verbose`, `info` (LiteRT's own default), `warning`, `error`
(ours: what is left is what went wrong) or `silent`. Where the library or its symbols are not
found (another platform, a future ai-edge-litert that strips or renames them) nothing is changed
and LiteRT logs as it always did; nothing here can fail a load. LiteRT-LM has its own setting
(runtime_py/litertlm_engine.py sets it to ERROR).

The converter (litert_converter, used by the exporter) logs through absl instead: TensorFlow's
"oneDNN custom operations are on" at INFO while its library loads, and absl's note that it writes
to stderr before it is initialized. `import_converter` imports it with stderr captured and
replays what the setting keeps (absl's INFO lines and that note are dropped above `info`), then
calls absl's public `SetMinLogLevel`, which the library exports, with the same setting."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import mmap
import os
import re
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

ENV = "GEMMA_EDGE_LITERT_LOG"
LEVELS = {"verbose": 0, "info": 1, "warning": 2, "error": 3, "silent": 4}
DEFAULT = "error"
LIBRARIES = ("libpywrap_litert_common.so", "libLiteRt.so")
CONVERTER_LIBRARIES = ("libLiteRTCompilerMLIR.so",)
# absl::SetMinLogLevel(absl::LogSeverityAtLeast), its inline namespace's version left open
SET_MIN_LOG_LEVEL = re.compile(rb"_ZN4absl\d+lts_\d+14SetMinLogLevelENS0_18LogSeverityAtLeastE")
ABSL_LEVELS = {0: 0, 1: 0, 2: 1, 3: 2, 4: 1000}  # ours -> absl's kInfo, kWarning, kError, kInfinity
# an absl INFO line ("I0000 00:00:1796569671.333145    3726 port.cc:153] ...") and absl's note
ABSL_QUIET = re.compile(r"^(I\d{4} [\d:.]+ +\d+ \S+:\d+\] |WARNING: All log messages before absl::InitializeLog\(\))")
THRESHOLDS = (
    b"_ZN12_GLOBAL__N_113MinimalLogger21minimum_log_severity_E",  # LiteRT's default logger
    b"_ZN6tflite16logging_internal13MinimalLogger21minimum_log_severity_E",  # TFLite's minimal logger
)

_ELF_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                     ("value", "<u8"), ("size", "<u8")])
_done: dict[str, int] = {}  # library path -> thresholds set there


def level() -> int:
    """The severity threshold `$GEMMA_EDGE_LITERT_LOG` asks for (default: error)."""
    name = os.environ.get(ENV, DEFAULT).strip().lower() or DEFAULT
    if name not in LEVELS:
        raise ValueError(f"{ENV}={name!r} is not a LiteRT log level: use one of {', '.join(LEVELS)}")
    return LEVELS[name]


def _elf(data) -> tuple[int, list[tuple]] | None:
    """(the lowest virtual address the loadable segments start at, the section headers) of a
    little-endian ELF64 file's bytes, or None for anything else."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    segments = [struct.unpack_from("<IIQQ", data, phoff + i * phentsize) for i in range(phnum)]
    vaddr0 = min((p[3] for p in segments if p[0] == 1), default=0)  # PT_LOAD
    return vaddr0, [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]


def symbols(path: str | Path, names=THRESHOLDS) -> tuple[dict[bytes, tuple[int, int]], int]:
    """{name: (value, size)} of the named symbols in an ELF64 file's symbol table, and the lowest
    virtual address its loadable segments start at (the load bias's reference)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        elf = _elf(data)
        if elf is None:
            return {}, 0
        vaddr0, sections = elf
        found = {}
        for sec in sections:
            if sec[1] != 2 or sec[9] != _ELF_SYM.itemsize:  # SHT_SYMTAB
                continue
            strings = sections[sec[6]]
            table = np.frombuffer(data, _ELF_SYM, count=sec[5] // _ELF_SYM.itemsize, offset=sec[4]).copy()
            for name in names:
                at = data.find(b"\0" + name + b"\0", strings[4], strings[4] + strings[5])
                if at < 0:
                    continue
                hit = np.flatnonzero(table["name"] == at + 1 - strings[4])
                if len(hit):
                    found[name] = (int(table["value"][hit[0]]), int(table["size"][hit[0]]))
        return found, vaddr0


def _mapped_libraries(names=LIBRARIES) -> dict[str, int]:
    """{path: address of its mapping at file offset 0} for the libraries of these names this
    process has loaded (Linux: /proc/self/maps), where the file at that path is still the one
    mapped (same inode: a library replaced on disk since, by an upgrade, is left alone)."""
    out = {}
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and Path(parts[5]).name in names and int(parts[2], 16) == 0:
            try:
                same = os.stat(parts[5]).st_ino == int(parts[4])
            except (OSError, ValueError):
                same = False
            if same:
                out.setdefault(parts[5], int(parts[0].split("-")[0], 16))
    return out


def quiet_litert(threshold: int | None = None) -> int:
    """Set LiteRT's native log threshold (default: `level()`) in every loaded LiteRT library not
    set before; returns how many thresholds this call set. Call after importing an ai_edge_litert
    extension and before creating a model."""
    threshold = level() if threshold is None else int(threshold)
    done = 0
    for path, start in _mapped_libraries().items():
        if _done.get(path) == threshold:
            continue
        try:
            found, vaddr0 = symbols(path)
        except (OSError, ValueError, struct.error):
            found, vaddr0 = {}, 0
        bias = start - (vaddr0 & ~(mmap.PAGESIZE - 1))
        for value, size in found.values():
            kind = {1: ctypes.c_int8, 4: ctypes.c_int32}.get(size)
            if kind is None:
                continue
            cell = kind.from_address(bias + value)
            if -1 <= cell.value <= 4:  # a severity: the symbol is what its name says
                cell.value = threshold
                done += 1
        _done[path] = threshold
    return done


def dynamic_names(path: str | Path, pattern: re.Pattern) -> list[bytes]:
    """The names in an ELF64 file's dynamic string table that match `pattern`."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        elf = _elf(data)
        sections = elf[1] if elf else []
        out = []
        for sec in sections:
            if sec[1] == 11:  # SHT_DYNSYM: its linked section holds the names
                strings = sections[sec[6]]
                out += [m.group(0) for m in pattern.finditer(data[strings[4]:strings[4] + strings[5]])]
        return out


def quiet_converter(threshold: int | None = None) -> int:
    """Set absl's minimum log level (default: from `level()`) in the converter's loaded library;
    returns how many libraries it was set in. Call after importing litert_converter's extension."""
    threshold = level() if threshold is None else int(threshold)
    done = 0
    for path in _mapped_libraries(CONVERTER_LIBRARIES):
        try:
            names = dynamic_names(path, SET_MIN_LOG_LEVEL)
            if len(names) != 1:
                continue
            setter = getattr(ctypes.CDLL(path), names[0].decode())
        except (OSError, AttributeError, ValueError, struct.error):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], None
        setter(ABSL_LEVELS[threshold])
        done += 1
    return done


@contextlib.contextmanager
def filtered_stderr(keep):
    """Capture what is written to file descriptor 2 (native code included) inside the block, then
    write the lines `keep(line)` accepts to sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if keep(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def import_converter():
    """litert_converter's extension, imported with its load-time log filtered by `level()`, and
    absl's level set for what it logs later (`quiet_converter`)."""
    name = "litert_converter.converter_api_ext"
    threshold = level()
    if name in sys.modules:
        return sys.modules[name]
    with filtered_stderr(lambda line: threshold <= LEVELS["info"] or not ABSL_QUIET.match(line)):
        module = importlib.import_module(name)
    quiet_converter(threshold)
    return module
