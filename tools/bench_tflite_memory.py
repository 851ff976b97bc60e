"""Resident memory of a TFLite artifact in LiteRT's two Python APIs, each load in its own process.

  python tools/bench_tflite_memory.py artifacts/gemma3-270m_int4-b32_ctx1024.tflite [--threads 2]

Rows: the Interpreter with its signature runners (what runtime_py uses today); the CompiledModel
API (ai_edge_litert.compiled_model) without and with an XNNPACK weight cache file
(`CpuOptions.xnnpack_weight_cache_path`: a file path, not a folder; the first load packs the
weights into it, later loads map it). Each row loads the model, runs every signature once on zero
inputs (so XNNPACK has packed every weight it will use) and reports the process's resident set,
its peak, and the ratio to the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

MODES = ("interpreter", "compiled", "compiled+cache (first load)", "compiled+cache (reload)")


def _rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(mode: str, path: str, threads: int, cache: str) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    if mode == "interpreter":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path, num_threads=threads)
        for key in interpreter.get_signature_list():
            runner = interpreter.get_signature_runner(key)
            runner(**{n: np.zeros(d["shape"], d["dtype"]) for n, d in runner.get_input_details().items()})
    else:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import Options

        options = Options(hardware_accelerators=HardwareAccelerator.CPU,
                          cpu_options=CpuOptions(num_threads=threads, xnnpack_weight_cache_path=cache))
        model = CompiledModel.from_file(path, options=options)
        for i, (key, sig) in enumerate(model.get_signature_list().items()):
            inputs, outputs = model.create_input_buffers(i), model.create_output_buffers(i)
            details = model.get_input_tensor_details(key)
            for name, buffer in zip(sig["inputs"], inputs):
                buffer.write(np.zeros(details[name]["shape"], np.dtype(details[name]["dtype"])))
            model.run_by_index(i, inputs, outputs)
    return {"rss": _rss_mib(), "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "s": time.perf_counter() - t0, "cache_mib": os.path.getsize(cache) / 2**20 if cache and os.path.exists(cache) else 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args.child[0], args.artifact, args.threads, args.child[1])))
        return 0
    file_mib = os.path.getsize(args.artifact) / 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "weights.xnnpack_cache")
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, args.artifact, "--threads", str(args.threads), "--child",
                                  mode, cache if "cache" in mode else ""], capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                print(f"{mode}: failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
                continue
            rows.append((mode, json.loads(line[0][7:])))
    print(f"\n{os.path.basename(args.artifact)}: {file_mib:.0f} MiB, {args.threads} threads\n")
    print("| API | RSS MiB | peak MiB | RSS / file | cache file MiB | load + one run of each signature s |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows:
        print(f"| {mode} | {r['rss']:.0f} | {r['peak']:.0f} | {r['rss'] / file_mib:.2f} | "
              f"{r['cache_mib']:.0f} | {r['s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
