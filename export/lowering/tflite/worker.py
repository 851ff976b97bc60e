"""The TFLite converter and the skeleton's flatbuffer work in a child process, beside the weights.

A TFLite export has two long stretches: the converter (its MLIR passes, the flatbuffer read back
with the object API and packed again around the weight offsets; ~12 s at gemma3-1b) and the
weights (read, rotated, block-searched, packed, written; ~25 CPU-s at gemma3-1b int4). Both ran
in the exporter's process, where the converter's Python bindings and the object API hold the
GIL, so export/quantize/ahead.py's background threads quantized almost nothing while it ran
(docs/memory.md, Export time). Here the converter runs in a child process (`Converter`): the
exporter lowers the signatures to StableHLO portable artifacts (JAX, in its own process), hands
them over with the small inlined weights, and while the child converts and places the weights'
offsets, its own threads quantize. The child never imports JAX: the lowering stays with the
exporter, the child gets bytes.

Protocol (pickles over the child's stdin and a duplicate of its stdout; the child's fd 1 is
pointed at stderr, so anything the converter prints goes to the log, never into the protocol):

  -> ("convert", job)            job: lowered signatures, weight names, inlined values, holes,
                                 skeleton path, metadata, layouts (streamed.Layouts)
  <- ("stray", [names])          holes that something other than a matmul reads: the exporter
  -> ("inline", {name: array})   sends their values and the child converts once more
  <- ("placed", (Placement, peak))  every weight's offset (streamed.place), the child's peak RSS
  -> ("finish", {name: scales})  the INT8 per-channel scales, once the weights are written
  <- ("flat", (bytes, peak))     the final flatbuffer, for the front of the file
  -> ("exit", None)
  <- ("error", exception)        any failure in the child, raised again by the exporter

The child's peak resident set is added to the stages' reported peaks (export.memory.
record_helper_peak: parent + child, an upper bound). The artifact is byte for byte the one the
in-process path writes (streamed.fill over
convert.convert; tests/test_streamed_tflite.py).
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Callable

from export.memory import record_helper_peak
from runtime_py.native_log import import_converter


def _root() -> str:
    return str(Path(__file__).resolve().parents[3])


class Converter:
    """The exporter's side: starts the child at construction (its imports overlap the lowering);
    `place(...)` converts and returns the Placement, `finish(values)` the final flatbuffer;
    `close()` ends it, killing it if it does not stop."""

    def __init__(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_root(), env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen([sys.executable, "-m", "export.lowering.tflite.worker"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._busy = False  # a request sent and not yet answered

    def _send(self, kind: str, value):
        self._busy = kind != "exit"
        try:
            pickle.dump((kind, value), self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._died()

    def _receive(self, *expect: str):
        try:
            kind, value = pickle.load(self._proc.stdout)
        except (EOFError, pickle.UnpicklingError):
            self._died()
        self._busy = kind == "stray"  # it waits for the stray weights
        if kind == "error":
            raise value
        if kind not in expect:
            raise RuntimeError(f"internal error: the TFLite converter process answered {kind!r}, expected {expect}")
        return kind, value

    def _died(self):
        code = self._proc.wait()
        raise RuntimeError(f"the TFLite converter process ended with exit code {code} (its messages are above); "
                           "rerun the export, and report it if it repeats")

    def place(self, job: dict, inline: Callable[[list[str]], dict]):
        """Convert `job` (see the module doc) and place its holes; `inline(names)`: the values of
        holes the child found read by something other than a matmul (given to the converter)."""
        self._send("convert", job)
        kind, value = self._receive("stray", "placed")
        if kind == "stray":
            self._send("inline", inline(value))
            kind, value = self._receive("placed")
        placement, peak = value
        record_helper_peak(peak)
        return placement

    def finish(self, values: dict) -> bytes:
        self._send("finish", values)
        flat, peak = self._receive("flat")[1]
        record_helper_peak(peak)
        return flat

    def close(self):
        """End the child: asked to exit when idle, killed when it is still working on a request
        (the export failed or was interrupted meanwhile: its result is not wanted)."""
        if self._proc.poll() is None and self._busy:
            self._proc.kill()
            self._proc.wait()
        if self._proc.poll() is None:
            try:
                self._send("exit", None)
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream and not stream.closed:
                stream.close()


def _convert(job: dict, inlined: dict, holes: list[str]):
    from export.lowering.tflite.convert import convert_lowered
    from export.lowering.tflite.streamed import read_skeleton

    convert_lowered(job["signatures"], job["names"], inlined, Path(job["skeleton"]), metadata=job["metadata"],
                    holes=holes)
    return read_skeleton(Path(job["skeleton"]))


def _serve(inp, out):
    from export.lowering.tflite.streamed import finish, place, stray_holes
    from export.memory import peak_rss

    def send(kind, value):
        pickle.dump((kind, value), out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()

    model = placement = scales = None
    while True:
        try:
            kind, value = pickle.load(inp)
        except EOFError:
            return
        try:
            if kind == "exit":
                return
            if kind == "convert":
                job, inlined, holes = value, dict(value["inlined"]), list(value["holes"])
                model = _convert(job, inlined, holes)
                stray = stray_holes(Path(job["skeleton"]), model)
                if stray:  # weights the converter folds (a vision position table): given to it
                    send("stray", stray)
                    kind, extra = pickle.load(inp)
                    if kind != "inline":
                        raise RuntimeError(f"internal error: expected the stray weights, got {kind!r}")
                    inlined.update(extra)
                    model = _convert(job, inlined, [n for n in holes if n not in set(stray)])
                placement, scales = place(model, job["layouts"])
                send("placed", (placement, peak_rss()))
            elif kind == "finish":
                send("flat", (finish(model, placement, scales, value), peak_rss()))
                model = placement = scales = None
            else:
                raise RuntimeError(f"internal error: unknown request {kind!r}")
        except Exception as e:  # noqa: BLE001 - every failure goes back to the exporter
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001
                e = RuntimeError(f"{type(e).__name__}: {e}")
            send("error", e)


def main():
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the converter prints goes to the log, not into the protocol
    sys.stdout = sys.stderr
    import_converter()  # now, while the exporter lowers (its load-time log filtered: runtime_py/native_log.py)
    for module in ("ai_edge_litert.schema_py_generated", "export.lowering.tflite.convert",
                   "export.lowering.tflite.streamed"):
        importlib.import_module(module)

    _serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    main()
