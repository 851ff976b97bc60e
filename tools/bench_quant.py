"""Quantization benchmark: size, accuracy (parity gate vs the f32 JAX model), export cost and
runtime speed of every `--quant` recipe, per model and target, against a float (f32) baseline.

  python tools/bench_quant.py                                         # gemma3-1b (random) + trained tiny models
  python tools/bench_quant.py --models trained                        # the gate-calibration run (docs/quantization.md)
  python tools/bench_quant.py --models gemma3-270m --targets tflite --recipes f32,int8,int4-b32
  python tools/bench_quant.py --models tests/fixtures/gemma3-tiny-trained --recipes int8 --targets onnx
  python tools/bench_quant.py --models gemma3-tiny --contexts 64 --prefill-lens 16 \\
      --recipes f32,int8,int4-b32 --verify-steps 8                    # smoke test, seconds per row

--models: comma list; each entry a registry name (exported with `--random-init 0`), a checkpoint
folder (`--checkpoint`), or `trained` = tests/fixtures/gemma3-tiny-trained and
tests/fixtures/recurrentgemma-tiny-trained. Random weights carry no structure, so their accuracy
figures are only a lower bound on what quantization costs; the trained tiny models are the ones the
recipes' gates were set from. --recipes: `f32` (a plain export, no --quant) plus any of fp16, int8,
dynamic-int8, int4-b32, int4-b128, int4-b32-e8 (default: all). --contexts: default 4096 for registry models and
min(4096, the model's own) for checkpoints; always clamped to the model's max_seq_len.

Every export runs in its own process WITH the parity gate (no --no-verify); a gate failure (exit 1)
is still a measurement and is recorded as FAIL. Pairs a target does not run (export.quantize.support)
and recipes whose blocks do not divide the model's matmul widths (export.quantize.check) are
checked here, before any process starts, and listed as `skipped` with the reason.

Columns:
  ctx            context (--max-seq-len) of the artifact
  file MiB       artifact size: the .tflite file, or the ONNX folder's model.onnx + external data
  file/ideal     file size / ideal size (export.quantize.sizes.ideal_bytes: quantized parameters x
                 bits/8 + the scales the target stores, the rest f32; f32 row: parameters x 4)
  f32/file       parameters x 4 bytes / file size: how many times smaller than f32 weights
  export s       wall time of the export process without its parity gate (process start, load,
                 convert/lower, quantize, write); JSON `wall_s` includes the gate, `stages` has each
  quant s        the `[quantize RECIPE]` stage (TFLite; ONNX quantizes inside `[write]`: `-`)
  RSS MiB        peak RSS (ru_maxrss) of the export process, parity gate included
  rel RMS        mean relative RMS error of the logits vs the f32 JAX model (teacher-forced prompts,
                 every prefill chunk and decode step); f32 rows: the same measure
  SQNR dB        signal-to-quantization-noise ratio of the logits, 10 log10(signal / error power)
  top-1          fraction of steps whose argmax token equals the reference's
  ties           the same, counting a pick the reference scores within 0.01 logit of its maximum
                 (verify.parity.TIE_LOGIT) as agreement; the gates use this one
  KL             mean KL(reference || artifact) of the next-token distributions, nats
  gate           PASS/FAIL of the recipe's gate (verify.gates.gate_for(target, recipe); f32: rel RMS 1e-4)
                 (on random weights the CLI only warns: the gates hold for trained checkpoints)
  TTFT s         time to first token of a 128-token prompt (prefill + argmax)
  dec@128        decode tokens/s at context position 128
  bound          --bandwidth-gbs / file size: decode tokens/s if every step read all weights once
                 at that memory bandwidth (file size approximates the bytes read per token)
  %bound         dec@128 as a percentage of bound
Runtime figures (tools/bench_runtime.py, --threads, each artifact in a fresh process) are taken
when --runtime (default). In contexts shorter than 128 + --steps + 1 the prompt and decode
positions are clamped to fit (marked `*`; the JSON row has `ttft_prompt_len`, `decode_start`).

Prints one table at the end and rewrites the JSON (--json) after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import artifact_bytes, bench_in_child, decode_rate

TRAINED = ("tests/fixtures/gemma3-tiny-trained", "tests/fixtures/recurrentgemma-tiny-trained")
QUANT_RECIPES = ("fp16", "int8", "dynamic-int8", "int4-b32", "int4-b128", "int4-b32-e8")
FLOAT = "f32"
MIB = 2**20
STAGE_DONE = re.compile(r"^\[(?P<name>[^\]]+)\] done in (?P<s>[0-9.]+) s")


# ---- models -------------------------------------------------------------------------------------

def resolve_models(text: str) -> list[dict]:
    """Each --models entry -> {label, source args, cfg}; `trained` expands to both fixtures."""
    from models import config_from_hf, get_config

    out = []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        paths = [ROOT / p for p in TRAINED] if entry == "trained" else None
        if paths is None and ("/" in entry or Path(entry).is_dir()):
            paths = [Path(entry)]
        if paths is None:
            out.append({"label": entry, "args": ["--model", entry, "--random-init", "0"],
                        "cfg": get_config(entry), "checkpoint": None})
            continue
        for p in paths:
            if not (p / "config.json").exists():
                out.append({"label": p.name, "missing": f"no checkpoint at {p} (config.json not found; "
                                                        "an official Orbax folder needs `python -m export --model`)"})
                continue
            if not any(p.glob("*.safetensors")):
                out.append({"label": p.name, "missing": f"no weights in {p} (*.safetensors; "
                                                        "tools/train_tiny.py writes the trained fixtures)"})
                continue
            out.append({"label": p.name, "args": ["--checkpoint", str(p)], "cfg": config_from_hf(p),
                        "checkpoint": str(p)})
    return out


def param_counts(cfg) -> dict:
    """Zero-memory stand-ins with the parameters' shapes (ideal_bytes only reads np.shape)."""
    from models import param_shapes

    base = np.zeros(1, np.float32)
    return {name: np.lib.stride_tricks.as_strided(base, tuple(shape), [0] * len(shape))
            for name, shape in param_shapes(cfg).items()}


def ideal_size(stand_ins: dict, recipe: str, target: str) -> int:
    if recipe == FLOAT:
        return 4 * sum(int(np.prod(np.shape(v))) for v in stand_ins.values())
    from export.quantize.sizes import ideal_bytes

    return ideal_bytes(stand_ins, recipe, target)


def skip_reason(cfg, target: str, recipe: str, op_set: str) -> str | None:
    """Why `target` cannot export `recipe` for this model, or None (checked before any process)."""
    if recipe == FLOAT:
        return None
    from export.quantize import QuantizationError, check, support

    why = support(target, recipe, op_set if target == "onnx" else None)
    if why is not None:
        return f"unsupported by {target}: {why}"
    try:
        check(target, recipe, op_set if target == "onnx" else None, cfg)
    except QuantizationError as e:
        return str(e)
    return None


# ---- export (child process) ---------------------------------------------------------------------

def artifact_path(out: Path, name: str, recipe: str, ctx: int, target: str, op_set: str) -> Path:
    if target == "onnx":
        return out / f"{name}_{recipe}_ctx{ctx}{'' if op_set == 'default' else '_' + op_set}_onnx"
    return out / f"{name}_{recipe}_ctx{ctx}.tflite"


def parity_path(path: Path) -> Path:
    return path / "parity.json" if path.suffix != ".tflite" else path.with_suffix(".parity.json")


def run_export(model: dict, target: str, recipe: str, ctx: int, lens: list[int], out: Path,
               op_set: str, verify_steps: int | None) -> dict:
    """One `python -m export` with the parity gate in a fresh process: wall time, stage times,
    peak RSS (ru_maxrss), exit code, the artifact and its parity JSON."""
    cmd = [sys.executable, "-c",
           ("import resource, sys, runpy; sys.argv = ['export'] + sys.argv[1:];"
           "rc = 0\n"
           "try:\n runpy.run_module('export', run_name='__main__')\n"
           "except SystemExit as e:\n rc = e.code or 0\n"
           "print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)\n"
           "sys.exit(rc)"),
           *model["args"], "--target", target, "--max-seq-len", str(ctx),
           "--prefill-lens", ",".join(map(str, lens)), "--out", str(out)]
    if recipe != FLOAT:
        cmd += ["--quant", recipe]
    if target == "onnx":
        cmd += ["--onnx-ops", op_set]
    if verify_steps is not None:
        cmd += ["--verify-steps", str(verify_steps)]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    expected = artifact_path(out, model["cfg"].name, recipe, ctx, target, op_set)
    start = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    stages = {}
    path = None
    for line in proc.stdout.splitlines():
        m = STAGE_DONE.match(line)
        if m:
            stages[m["name"]] = stages.get(m["name"], 0.0) + float(m["s"])
        elif line.startswith("artifact: "):
            path = Path(line[len("artifact: "):].split()[0].rstrip("/"))
    path = path or expected
    if not path.exists():  # a failed gate leaves NAME.FAILED.<suffix>, never the final name
        from export.driver import failed_path

        if failed_path(path).exists():
            path = failed_path(path)
    peak = next((int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS")), None)
    row = {"exit_code": proc.returncode, "wall_s": wall, "export_s": wall - stages.get("verify", 0.0),
           "quantize_s": next((v for k, v in stages.items() if k.startswith("quantize")), None),
           "stages": stages, "peak_rss": peak, "path": str(path)}
    if proc.returncode not in (0, 1) or not path.exists():
        row["status"] = "error"
        row["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][-400:]
        row["stderr_tail"] = proc.stderr[-3000:]
        return row
    row["file_bytes"] = artifact_bytes(path)
    pj = parity_path(path)
    if pj.exists() and pj.stat().st_mtime >= start - 1:
        body = json.loads(pj.read_text())
        body.pop("steps", None)
        row["parity"] = body
        row["status"] = "pass" if body.get("passed") else "fail"
    else:  # exit 1 before the gate wrote its report
        row["status"] = "error"
        row["error"] = (proc.stderr.strip().splitlines() or ["(no parity report)"])[-1][-400:]
    if proc.returncode == 1 and "parity" in row:
        row["gate_failures"] = [line for line in proc.stderr.splitlines() if line.startswith("parity failed")]
    return row


# ---- runtime (child process) --------------------------------------------------------------------

def runtime_fits(ctx: int, steps: int) -> bool:
    return ctx >= 128 + steps + 1


def clamped_bench(path: Path, threads: int, repeats: int, steps: int) -> dict:
    """tools/bench_runtime.py's bench() for contexts too short for a 128-token prompt and decode
    from position 128: the prompt and the decode start are clamped to fit the context."""
    import statistics

    from runtime_py import load

    session = load(path, threads)
    steps = max(1, min(steps, session.max_len // 2))
    n = max(2, min(128, session.max_len - 1))
    prompt = [2] + [10 + i % 200 for i in range(n - 1)]
    longest = min(max(session.prefill_lengths) if session.prefill_lengths else 1, len(prompt))
    session.prefill(prompt)
    ttft, prefill = [], []
    for _ in range(repeats):
        session.reset()
        t0 = time.perf_counter()
        int(session.prefill(prompt).argmax())
        ttft.append(time.perf_counter() - t0)
        session.reset()
        t0 = time.perf_counter()
        session.prefill(prompt[:longest])
        prefill.append(longest / (time.perf_counter() - t0))
    start = max(0, min(128, session.max_len - steps - 1))
    early = statistics.median(decode_rate(session, start, steps) for _ in range(repeats))
    late_pos = max(start, session.max_len - steps - 1)
    late = statistics.median(decode_rate(session, late_pos, steps) for _ in range(repeats))
    return {"artifact": str(path), "context": session.max_len, "threads": threads,
            "file_bytes": artifact_bytes(path), "ttft_128_s": statistics.median(ttft),
            "prefill_tok_s": statistics.median(prefill), "prefill_len": longest,
            "decode_tok_s_at_128": early, "decode_tok_s_at_end": late, "end_position": late_pos,
            "ttft_prompt_len": n, "decode_start": start, "decode_steps": steps, "clamped": True}


def run_runtime(path: Path, ctx: int, threads: int, repeats: int, steps: int) -> dict:
    """Runtime figures in a fresh process (its peak RSS is the runtime's)."""
    ns = argparse.Namespace(threads=threads, repeats=repeats, steps=steps)
    try:
        if runtime_fits(ctx, steps):
            r = bench_in_child(path, ns)
            r.update(ttft_prompt_len=128, decode_start=128, decode_steps=steps, clamped=False)
            return r
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            proc = subprocess.run([sys.executable, __file__, "--runtime-child", str(path), "--threads",
                                   str(threads), "--repeats", str(repeats), "--steps", str(steps),
                                   "--json", out.name], check=False, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
            return json.loads(Path(out.name).read_text())
    except subprocess.CalledProcessError as e:
        err = (e.stderr or b"").decode(errors="replace").strip().splitlines()
        return {"error": err[-1] if err else f"exit {e.returncode}"}
    except Exception as e:  # noqa: BLE001 - a runtime failure is recorded, the sweep goes on
        return {"error": str(e)[-400:]}


# ---- table --------------------------------------------------------------------------------------

COLUMNS = [("model", "<", 14), ("target", "<", 7), ("recipe", "<", 13), ("ctx", ">", 6),
           ("file MiB", ">", 9), ("file/ideal", ">", 11), ("f32/file", ">", 9), ("export s", ">", 9),
           ("quant s", ">", 8), ("RSS MiB", ">", 8), ("rel RMS", ">", 9), ("SQNR dB", ">", 8),
           ("top-1", ">", 6), ("ties", ">", 6), ("KL", ">", 9), ("gate", ">", 5), ("TTFT s", ">", 8),
           ("dec@128", ">", 9), ("bound", ">", 8), ("%bound", ">", 7)]


def _num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _mib(b) -> str:
    if b is None:
        return "-"
    m = b / MIB
    return f"{m:.0f}" if m >= 100 else f"{m:.1f}" if m >= 1 else f"{m:.3f}"


def table_line(r: dict, columns=COLUMNS) -> str:
    head = [r["model"], r["target"], r["recipe"], str(r.get("context", "-"))]
    if r["status"] == "skipped":
        cells = head + [f"skipped: {r['reason']}"]
        return "".join(f"{c:{a}{w}}" for c, (_, a, w) in zip(cells[:4], columns)) + "  " + cells[4][:160]
    if r["status"] == "error":
        return "".join(f"{c:{a}{w}}" for c, (_, a, w) in zip(head, columns)) + f"  ERROR: {r.get('error', '')[:160]}"
    p = r.get("parity", {})
    rt = r.get("runtime") or {}
    mark = "*" if rt.get("clamped") else ""
    cells = head + [
        _mib(r.get("file_bytes")), _num(r.get("file_over_ideal"), ".3f"), _num(r.get("f32_over_file"), ".2f"),
        _num(r.get("export_s"), ".1f"), _num(r.get("quantize_s"), ".1f"),
        _num(r["peak_rss"] / MIB if r.get("peak_rss") else None, ".0f"),
        _num(p.get("mean_rel_rms"), ".2e"), _num(p.get("sqnr_db"), ".1f"), _num(p.get("top1_agreement"), ".3f"),
        _num(p.get("top1_agreement_ties"), ".3f"), _num(p.get("mean_kl"), ".1e"), "PASS" if p.get("passed") else "FAIL",
        _num(rt.get("ttft_128_s"), ".3f") + (mark if "ttft_128_s" in rt else ""),
        _num(rt.get("decode_tok_s_at_128"), ".1f") + (mark if "decode_tok_s_at_128" in rt else ""),
        _num(r.get("bound_tok_s"), ".0f"), _num(r.get("pct_of_bound"), ".1f")]
    return "".join(f"{c:{a}{w}}" for c, (_, a, w) in zip(cells, columns))


def print_table(rows: list[dict]):
    width = max([len(r["model"]) + 2 for r in rows] + [COLUMNS[0][2]])
    columns = [("model", "<", width)] + COLUMNS[1:]
    header = "".join(f"{n:{a}{w}}" for n, a, w in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(table_line(r, columns))
    if any((r.get("runtime") or {}).get("clamped") for r in rows):
        print("* context too short for a 128-token prompt / decode at 128: clamped (JSON: ttft_prompt_len, "
              "decode_start)")


# ---- main ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gemma3-1b,trained",
                    help="comma list: registry names (random init), checkpoint folders, or 'trained'")
    ap.add_argument("--targets", default="tflite,onnx")
    ap.add_argument("--recipes", default=",".join((FLOAT,) + QUANT_RECIPES),
                    help=f"comma list of {FLOAT} (no --quant) and {', '.join(QUANT_RECIPES)}")
    ap.add_argument("--contexts", help="comma list (default: 4096 for registry models, min(4096, the "
                                       "model's) for checkpoints; clamped to the model's max_seq_len)")
    ap.add_argument("--prefill-lens", default="32,128", help="clamped to each context")
    ap.add_argument("--onnx-ops", choices=["default", "standard"], default="default")
    ap.add_argument("--verify-steps", type=int, help="decode steps of the parity gate (CLI default 64)")
    ap.add_argument("--runtime", action=argparse.BooleanOptionalAction, default=True,
                    help="measure TTFT / decode speed / runtime RSS of each artifact")
    ap.add_argument("--threads", type=int, default=2, help="runtime threads")
    ap.add_argument("--repeats", type=int, default=3, help="runtime repeats (median)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per runtime measurement")
    ap.add_argument("--bandwidth-gbs", type=float, default=31.5,
                    help="memory bandwidth (GB/s, 1e9) for the decode bound: bandwidth / file size")
    ap.add_argument("--out", type=Path, help="where artifacts go (default: a temp dir, kept)")
    ap.add_argument("--json", type=Path, default=Path("bench_quant.json"))
    ap.add_argument("--runtime-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.runtime_child is not None:
        import resource

        row = clamped_bench(args.runtime_child, args.threads, args.repeats, args.steps)
        row["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        args.json.write_text(json.dumps(row))
        return 0

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in (FLOAT,) + QUANT_RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {FLOAT}, {', '.join(QUANT_RECIPES)}")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if any(t not in ("tflite", "onnx") for t in targets):
        ap.error("--targets takes tflite and/or onnx")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_quant_"))
    out.mkdir(parents=True, exist_ok=True)
    wanted_lens = sorted({int(x) for x in args.prefill_lens.split(",") if x.strip()})

    rows: list[dict] = []
    meta = {"artifacts": str(out), "bandwidth_gbs": args.bandwidth_gbs, "threads": args.threads,
            "verify_steps": args.verify_steps, "onnx_ops": args.onnx_ops}

    def save():
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2))

    for model in resolve_models(args.models):
        if "missing" in model:
            print(f"  {model['label']}: skipped ({model['missing']})", flush=True)
            rows.append({"model": model["label"], "target": "-", "recipe": "-", "status": "skipped",
                         "reason": model["missing"]})
            save()
            continue
        cfg = model["cfg"]
        stand_ins = param_counts(cfg)
        n_params = sum(int(np.prod(np.shape(v))) for v in stand_ins.values())
        if args.contexts:
            contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
        else:
            contexts = [4096]
        if args.contexts and max(contexts) > cfg.max_seq_len:
            print(f"  {model['label']}: contexts above the model's {cfg.max_seq_len} use {cfg.max_seq_len}")
        for ctx in sorted({min(c, cfg.max_seq_len) for c in contexts}):
            lens = sorted({max(2, min(t, ctx)) for t in wanted_lens})
            for target in targets:
                for recipe in recipes:
                    row = {"model": model["label"], "checkpoint": model["checkpoint"], "target": target,
                           "recipe": recipe, "context": ctx, "prefill_lens": lens, "params": n_params,
                           "ideal_bytes": ideal_size(stand_ins, recipe, target), "f32_bytes": 4 * n_params}
                    why = skip_reason(cfg, target, recipe, args.onnx_ops)
                    if why is not None:
                        row.update(status="skipped", reason=why)
                        rows.append(row)
                        save()
                        print(f"  {model['label']} {target} {recipe}: skipped ({why.split(';')[0]})", flush=True)
                        continue
                    row.update(run_export(model, target, recipe, ctx, lens, out, args.onnx_ops,
                                          args.verify_steps))
                    if row["status"] != "error":
                        fb = row["file_bytes"]
                        row["file_over_ideal"] = fb / row["ideal_bytes"]
                        row["f32_over_file"] = row["f32_bytes"] / fb
                        row["bound_tok_s"] = args.bandwidth_gbs * 1e9 / fb
                        if args.runtime:
                            rt = run_runtime(Path(row["path"]), ctx, args.threads, args.repeats, args.steps)
                            row["runtime"] = rt
                            if "decode_tok_s_at_128" in rt:
                                row["pct_of_bound"] = 100 * rt["decode_tok_s_at_128"] / row["bound_tok_s"]
                    rows.append(row)
                    save()
                    state = row["status"].upper() if row["status"] != "error" else f"ERROR ({row['error'][:120]})"
                    if (row.get("runtime") or {}).get("error"):
                        state += f"; runtime failed: {row['runtime']['error'][:120]}"
                    print(f"  {model['label']} {target} {recipe} ctx {ctx}: {row['wall_s']:.1f} s, {state}",
                          flush=True)
    print()
    print_table(rows)
    save()
    print(f"artifacts in {out}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
