"""Checkpoint load benchmark: load time and peak RSS of an HF safetensors checkpoint.

  python tools/bench_load.py                      # gemma3-1b, bf16 file, loaded as f32
  python tools/bench_load.py --model gemma3-270m --file-dtype f32 --load-dtype bf16

Writes a random-init checkpoint (HF names, `--file-dtype`) once into --workdir, then loads it in a
fresh process per repeat and reports that process's wall time and peak RSS (ru_maxrss), the RSS it
had before loading (Python + JAX imports), and the ratio of the peak to the loaded parameter bytes.
Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}

_WRITE = """
import sys, numpy as np, ml_dtypes
from models import get_config, init_params
from models.loaders.hf import to_hf_tensors
from models.loaders.safetensors_io import save_file
name, dtype, out = sys.argv[1:4]
cfg = get_config(name)
dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
save_file(to_hf_tensors(cfg, init_params(cfg, 0, dt)), out + "/model.safetensors")
"""

_LOAD = """
import json, resource, sys, time, numpy as np, ml_dtypes
from models import load_checkpoint
def rss_now():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
name, dtype, folder = sys.argv[1:4]
dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
before = rss_now()
t0 = time.perf_counter()
cfg, params = load_checkpoint(folder, name, dtype=dt)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loaded = sum(p.nbytes for p in params.values())
print(json.dumps({"seconds": seconds, "rss_before": before, "peak_rss": peak, "loaded_bytes": loaded}))
"""


def _python(code: str, *args: str) -> str:
    env_path = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True,
                         text=True, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin",
                                         "JAX_PLATFORMS": "cpu"})
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-1b")
    ap.add_argument("--file-dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--load-dtype", choices=DTYPES, default="f32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="where the checkpoint is written (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=Path("bench_load.json"))
    args = ap.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_load_"))
    folder = workdir / f"{args.model}-{args.file_dtype}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model.safetensors").exists():
        print(f"writing random-init {args.model} ({args.file_dtype}) to {folder} ...", flush=True)
        _python(_WRITE, args.model, DTYPES[args.file_dtype], str(folder))
    file_bytes = (folder / "model.safetensors").stat().st_size

    runs = [json.loads(_python(_LOAD, args.model, DTYPES[args.load_dtype], str(folder)))
            for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["seconds"])
    gib = 2**30
    rows = [
        ("model", args.model),
        ("file", f"{args.file_dtype}, {file_bytes / gib:.2f} GiB"),
        ("loaded as", f"{args.load_dtype}, {best['loaded_bytes'] / gib:.2f} GiB"),
        ("load time (best of %d)" % len(runs), f"{best['seconds']:.1f} s"),
        ("RSS before load (imports)", f"{best['rss_before'] / gib:.2f} GiB"),
        ("peak RSS", f"{best['peak_rss'] / gib:.2f} GiB"),
        ("peak RSS / loaded bytes", f"{best['peak_rss'] / best['loaded_bytes']:.3f}"),
        ("(peak - imports) / loaded bytes",
         f"{(best['peak_rss'] - best['rss_before']) / best['loaded_bytes']:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    args.json.write_text(json.dumps({"model": args.model, "file_dtype": args.file_dtype,
                                     "load_dtype": args.load_dtype, "file_bytes": file_bytes,
                                     "runs": runs}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
