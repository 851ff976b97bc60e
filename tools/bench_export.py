"""Export benchmark: wall time, peak RSS and file size of `python -m export` (random init), per
target, and with --runtime the runtime figures of each artifact (tools/bench_runtime.py) beside.

  python tools/bench_export.py                                   # gemma3-270m and gemma3-1b, ctx 512 and 4096
  python tools/bench_export.py --models gemma3-270m --contexts 512 --dtype bf16
  python tools/bench_export.py --models gemma3-270m,gemma3-1b --contexts 4096 --targets tflite,onnx --runtime

Each export runs in a fresh process (`--no-verify`: the parity gate is timed by its own stage
in the CLI output); its peak RSS is the child's ru_maxrss. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import artifact_bytes, bench_in_child  # noqa: E402


def artifact_path(out: Path, model: str, dtype: str, ctx: int, target: str) -> Path:
    if target == "onnx":
        return out / f"{model}_{dtype}_ctx{ctx}_onnx"
    return out / f"{model}_{dtype}_ctx{ctx}.tflite"


def run_export(model: str, ctx: int, dtype: str, lens: str, out: Path, target: str = "tflite") -> dict:
    cmd = [sys.executable, "-c",
           "import resource, sys, runpy; sys.argv = ['export'] + sys.argv[1:];"
           "rc = 0\n"
           "try:\n runpy.run_module('export', run_name='__main__')\n"
           "except SystemExit as e:\n rc = e.code or 0\n"
           "print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)\n"
           "sys.exit(rc)",
           "--model", model, "--random-init", "0", "--max-seq-len", str(ctx), "--prefill-lens", lens,
           "--dtype", dtype, "--no-verify", "--out", str(out), "--target", target]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"export failed: {proc.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS"))
    convert = sum(float(line.split()[-2]) for line in proc.stdout.splitlines()
                  if line.startswith(("[convert] done", "[lower] done", "[write] done")))
    path = artifact_path(out, model, dtype, ctx, target)
    return {"model": model, "target": target, "context": ctx, "dtype": dtype, "wall_s": seconds,
            "convert_s": convert, "peak_rss": peak, "file_bytes": artifact_bytes(path), "path": str(path)}


def weight_bytes(model: str, dtype: str) -> int:
    sys.path.insert(0, str(ROOT))
    from export.driver import STORED
    from models import get_config, param_shapes

    cfg = get_config(model)
    size = STORED[dtype].itemsize
    total = 0
    for name, shape in param_shapes(cfg).items():
        n = 1
        for d in shape:
            n *= d
        total += n * (4 if name == "embed" else size)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gemma3-270m,gemma3-1b")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--prefill-lens", default="32,128")
    ap.add_argument("--targets", default="tflite", help="comma-separated: tflite, onnx")
    ap.add_argument("--runtime", action="store_true", help="also run tools/bench_runtime.py on each artifact")
    ap.add_argument("--threads", type=int, default=2, help="runtime threads (with --runtime)")
    ap.add_argument("--out", type=Path, help="where artifacts go (default: a temp dir; kept for bench_runtime)")
    ap.add_argument("--json", type=Path, default=Path("bench_export.json"))
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_export_"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        for ctx in (int(c) for c in args.contexts.split(",")):
            for target in args.targets.split(","):
                r = run_export(model, ctx, args.dtype, args.prefill_lens, out, target)
                r["weight_bytes"] = weight_bytes(model, args.dtype)
                if args.runtime:
                    r["runtime"] = bench_in_child(Path(r["path"]), argparse.Namespace(
                        threads=args.threads, repeats=3, steps=32))
                rows.append(r)
                print(f"  {model} ctx {ctx} {target}: {r['wall_s']:.1f} s", flush=True)
    mib = 2**20
    header = f"{'model':<14}{'target':>7}{'ctx':>6}{'dtype':>6}{'wall s':>9}{'convert s':>11}" \
             f"{'peak RSS MiB':>14}{'RSS/weights':>13}{'file MiB':>10}{'file/weights':>14}"
    if args.runtime:
        header += f"{'TTFT128 s':>11}{'prefill tok/s':>15}{'decode@128':>12}{'decode@end':>12}{'run RSS MiB':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (f"{r['model']:<14}{r['target']:>7}{r['context']:>6}{r['dtype']:>6}{r['wall_s']:>9.1f}"
                f"{r['convert_s']:>11.1f}{r['peak_rss'] / mib:>14.0f}{r['peak_rss'] / r['weight_bytes']:>13.2f}"
                f"{r['file_bytes'] / mib:>10.0f}{r['file_bytes'] / r['weight_bytes']:>14.3f}")
        if "runtime" in r:
            rt = r["runtime"]
            line += (f"{rt['ttft_128_s']:>11.3f}{rt['prefill_tok_s']:>15.1f}{rt['decode_tok_s_at_128']:>12.1f}"
                     f"{rt['decode_tok_s_at_end']:>12.1f}{rt['peak_rss'] / mib:>13.0f}")
        print(line)
    args.json.write_text(json.dumps({"rows": rows, "artifacts": str(out)}, indent=2))
    print(f"artifacts in {out}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
