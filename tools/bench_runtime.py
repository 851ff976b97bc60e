"""Runtime benchmark of exported artifacts: prefill tokens/s, time to first token, decode tokens/s.

  python tools/bench_runtime.py ARTIFACT [ARTIFACT ...] [--threads 2]

ARTIFACT: a .tflite file or an ONNX folder (python -m export --target onnx).

Each artifact runs in its own process (its peak RSS is reported). Per artifact: time to first
token for a 128-token prompt (prefill + the first sampled token),
prefill tokens/s of the largest prefill signature, decode tokens/s at context position ~128 and
near the end of the context (every step attends over its full window/context). Median of
--repeats runs. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def artifact_bytes(path: Path) -> int:
    """A .tflite file's size, or an ONNX folder's model.onnx plus its external data."""
    return sum(p.stat().st_size for p in path.glob("model.onnx*")) if path.is_dir() else path.stat().st_size


def decode_rate(session, start: int, steps: int) -> float:
    """Decode tokens/s for `steps` tokens from position `start` (state fast-forwarded)."""
    session.reset()
    session.position = start  # positions before `start` hold zeros: same cost as real history
    t0 = time.perf_counter()
    for i in range(steps):
        session.decode(3 + i % 100)
    return steps / (time.perf_counter() - t0)


def bench(path: Path, threads: int, repeats: int, steps: int) -> dict:
    from runtime_py import load

    session = load(path, threads)
    prompt = [2] + [10 + i % 200 for i in range(127)]
    ttft, prefill = [], []
    # the largest prefill signature, at most the prompt (ONNX graphs take any length)
    longest = min(max(session.prefill_lengths) if session.prefill_lengths else 1, len(prompt))
    session.prefill(prompt)  # warm-up (allocations)
    for _ in range(repeats):
        session.reset()
        t0 = time.perf_counter()
        logits = session.prefill(prompt)
        int(logits.argmax())
        ttft.append(time.perf_counter() - t0)
        session.reset()
        t0 = time.perf_counter()
        session.prefill(prompt[:longest])
        prefill.append(longest / (time.perf_counter() - t0))
    early = statistics.median(decode_rate(session, 128, steps) for _ in range(repeats))
    late_pos = max(128, session.max_len - steps - 1)
    late = statistics.median(decode_rate(session, late_pos, steps) for _ in range(repeats))
    return {"artifact": str(path), "context": session.max_len, "threads": threads,
            "file_bytes": artifact_bytes(path), "ttft_128_s": statistics.median(ttft),
            "prefill_tok_s": statistics.median(prefill), "prefill_len": longest,
            "decode_tok_s_at_128": early, "decode_tok_s_at_end": late, "end_position": late_pos}


def bench_in_child(path: Path, args) -> dict:
    """Run one artifact's benchmark in a fresh process, so its peak RSS is its own."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, str(path), "--threads", str(args.threads), "--repeats",
                        str(args.repeats), "--steps", str(args.steps), "--json", out.name, "--child"],
                       check=True, capture_output=True)
        return json.loads(Path(out.name).read_text())[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--json", type=Path, default=Path("bench_runtime.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import resource

        row = bench(args.artifacts[0], args.threads, args.repeats, args.steps)
        row["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        args.json.write_text(json.dumps([row]))
        return 0
    rows = [bench_in_child(p, args) for p in args.artifacts]
    header = f"{'artifact':<36}{'ctx':>6}{'MiB':>7}{'TTFT128 s':>11}{'prefill tok/s':>15}" \
             f"{'decode@128':>12}{'decode@end':>12}{'peak RSS MiB':>14}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{Path(r['artifact']).name:<36}{r['context']:>6}{r['file_bytes'] / 2**20:>7.0f}"
              f"{r['ttft_128_s']:>11.3f}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s_at_128']:>12.1f}"
              f"{r['decode_tok_s_at_end']:>12.1f}{r['peak_rss'] / 2**20:>14.0f}")
    args.json.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
