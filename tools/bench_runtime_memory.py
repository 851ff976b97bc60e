"""runtime_py's resident memory per artifact, with and without giving back the artifact's mapped
pages after load (runtime_py/pages.py), each load in its own process.

  python tools/bench_runtime_memory.py ART [ART ...] [--threads 2] [--rounds 2] [--context-tokens 128]

ART: a .tflite, .litertlm or ONNX folder. Each process loads the artifact with runtime_py,
prefills a 128-token prompt, decodes 32 tokens (timed), and reads its own /proc/self/smaps:
the resident set (RSS) and its peak (VmHWM), the artifact's own mapped pages, the packed weights
(XNNPACK's weight cache mapping for TFLite; anonymous memory, where ONNX Runtime keeps its
prepacked weights, for ONNX: the states are in it too), the heap, and the states' buffers
(the KV caches at the artifact's context, from its metadata; TFLite holds a second buffer for a
state a signature does not update in place), which an artifact needs whatever the runtime:
"(RSS - states) / file" is the ratio of what the runtime adds to the weights. One load first, not reported, builds the XNNPACK
weight cache so that every row is a reload; then the two modes alternate `--rounds` times
("kept": GEMMA_EDGE_KEEP_MAPPED=1; "released": the default) and the median of each column is
printed. Ratios are to the artifact's size on disk (a folder: all its files).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20

_CHILD = r"""
import json, sys, time
from pathlib import Path
from runtime_py import load
from runtime_py.pages import file_mappings

path, threads, n_prompt = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
s = load(path, num_threads=threads)
load_s = time.perf_counter() - t0
s.prefill([2] + [(7 * i) % 1000 + 3 for i in range(n_prompt - 1)])
t0 = time.perf_counter(); n = 32
for i in range(n):
    s.decode(3 + i)
tok_s = n / (time.perf_counter() - t0)
states = s.metadata.states.nbytes
backend = getattr(s.backend, "decoder", s.backend)
if hasattr(backend, "_buffers"):  # TFLite CompiledBackend: a second buffer for a state not updated in place
    states = sum(spec.nbytes * sum(b is not None for b in backend._buffers.get(spec.name("tflite"), [1]))
                 for spec in s.metadata.states)
parts, cur = {"anon": 0, "heap": 0, "cache": 0, "other": 0}, None
for line in open("/proc/self/smaps"):
    f = line.split(None, 5)
    if not f[0].endswith(":"):
        name = f[5].strip() if len(f) > 5 else ""
        cur = ("heap" if name == "[heap]" else "cache" if name.endswith(".xnnpack_cache") else
               "anon" if not name or name.startswith("[anon") else "other")
    elif f[0] == "Rss:":
        parts[cur] += int(f[1]) * 1024
own = sum(m["rss"] for m in file_mappings(path if path.is_dir() else path))
if path.suffix == ".litertlm" and getattr(s, "weight_cache", None) is not None:
    own += sum(m["rss"] for m in file_mappings(Path(s.weight_cache).parent) if m["file"].suffix == ".tflite")
status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(("VmRSS", "VmHWM"))}
print(json.dumps({"load_s": load_s, "tok_s": tok_s, "rss": status["VmRSS"], "peak": status["VmHWM"],
                  "artifact_pages": own, "states": states, **parts}))
"""


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def run_child(path: Path, threads: int, prompt: int, keep: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GEMMA_EDGE_KEEP_MAPPED="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(threads), str(prompt)], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{path}: the runtime child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--context-tokens", type=int, default=128, help="prompt length before the timed decode")
    args = parser.parse_args(argv)
    rows = []
    for path in args.artifacts:
        run_child(path, args.threads, args.context_tokens, keep=True)  # builds the weight cache if any
        results = {"kept": [], "released": []}
        for _ in range(args.rounds):
            for mode in results:
                results[mode].append(run_child(path, args.threads, args.context_tokens, keep=mode == "kept"))
        size = size_of(path)
        for mode, runs in results.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append((path.name, mode, size, med))
    head = ("| artifact | pages | file MiB | RSS MiB | RSS / file | peak MiB | peak / file | artifact pages MiB "
            "| packed MiB | heap MiB | states MiB | (RSS - states) / file | load s | decode tok/s |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, mode, size, m in rows:
        packed = m["cache"] if m["cache"] else m["anon"]
        print(f"| {name} | {mode} | {size / MiB:.0f} | {m['rss'] / MiB:.0f} | {m['rss'] / size:.2f} | "
              f"{m['peak'] / MiB:.0f} | {m['peak'] / size:.2f} | {m['artifact_pages'] / MiB:.0f} | {packed / MiB:.0f} | "
              f"{m['heap'] / MiB:.0f} | {m['states'] / MiB:.0f} | {(m['rss'] - m['states']) / size:.2f} | "
              f"{m['load_s']:.2f} | {m['tok_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
