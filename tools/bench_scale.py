"""Every released size through the CLI, as a user runs it, with time and memory per stage.

  python tools/bench_scale.py [--models gemma3-1b,gemma3-4b] [--targets onnx,tflite,litertlm]
                              [--recipes int4-b32,dynamic-int8] [--no-gate] [--work DIR] [--keep]
                              [--context 1024] [--ort-genai] [--checkpoint-format bf16|gguf-q4_0]
                              [--no-smoothing]

Per model: a bf16 safetensors checkpoint of random weights is written to disk first, tensor by
tensor (models/loaders/hf.save_checkpoint), so the path measured is the one a user's checkpoint
takes (memory-mapped, read lazily). `--checkpoint-format gguf-q4_0` writes a GGUF of random Q4_0
blocks instead (models/loaders/gguf_random.py; Gemma 2/3 only): the form of Google's QAT
releases, whose blocks an int4-b32 export carries as they are, and a quarter of bf16's disk (the
27B sizes: 15 GB instead of 54). Then per target x recipe, in its own process:

  python -m export --model M --checkpoint CKPT --target T --quant R --stage-memory [--no-verify]

and from its `[stage] done in N s, peak RSS X GiB` lines: export wall time and peak RSS (every
stage before the gate), gate time, mode and peak RSS, artifact size, gate result; then, in
another process, runtime_py's resident memory after loading the artifact and decoding, and its
decode tokens/s (not run where runtime_py's expected footprint would pass 90% of the machine's
memory). An export that the up-front memory check refuses is a row with the memory it
needs. A `.litertlm` bundle must carry a tokenizer and random weights have none: the bundles
take the tiny test fixture's (tests/fixtures/gemma3-tiny-trained), which changes nothing measured
here. `--ort-genai`: onnxruntime-genai's own model builder on the same checkpoint at int4 (its
time and peak RSS beside ours), for Gemma 3 text models.

Not run in CI (minutes to an hour per size); numbers go to docs/memory.md. Prints a table and
writes JSON to DIR/bench_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = ["gemma3-270m", "gemma3-1b", "gemma2-2b", "recurrentgemma-2b", "gemma3-4b", "gemma2-9b",
         "recurrentgemma-9b", "gemma3-12b", "gemma2-27b", "gemma3-27b"]
STAGE = re.compile(r"^\[(?P<name>[^\]]+)\] done in (?P<s>[\d.]+) s(?:, peak RSS (?P<gib>[\d.]+) GiB)?")
GiB = 2**30

_RUNTIME = r"""
import json, sys, time
from runtime_py import load
s = load(sys.argv[1], num_threads=2)
prompt = [2] + [(7 * i) % 1000 + 3 for i in range(31)]
s.prefill(prompt)
t0 = time.perf_counter(); n = 16
for i in range(n):
    s.decode(3 + i)
rate = n / (time.perf_counter() - t0)
# VmHWM, this process's own peak: after fork + exec, ru_maxrss also counts the parent's RSS at the fork
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rss": peak, "tok_s": rate}))
"""


def write_checkpoint(model: str, folder: Path, fmt: str = "bf16") -> tuple[float, int, Path]:
    """(seconds, bytes, what --checkpoint takes) to write the checkpoint, in a subprocess (its
    memory is not ours): bf16 safetensors, or a GGUF of Q4_0 blocks (`gguf-q4_0`,
    models/loaders/gguf_random.py; a quarter of the disk, what a user of Google's QAT Q4_0 GGUFs
    exports from, and its int4 blocks are carried into the artifact as they are)."""
    if fmt == "gguf-q4_0":
        file = folder / "model.gguf"
        code = ("import sys; from models import get_config; from models.loaders.gguf_random import save_random_gguf; "
                "save_random_gguf(get_config(sys.argv[1]), sys.argv[2], 0)")
    else:
        file = folder / "model.safetensors"
        code = ("import sys, ml_dtypes; from models import get_config, init_model; "
                "from models.loaders.hf import save_checkpoint; "
                "cfg, p = init_model(get_config(sys.argv[1]), 0, vision=False, lazy=True); "
                "save_checkpoint(cfg, p, sys.argv[2], ml_dtypes.bfloat16)")
    where = file.parent if fmt == "bf16" else file
    if file.exists():
        return 0.0, file.stat().st_size, where
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, model, str(folder if fmt == "bf16" else file)], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - t0, file.stat().st_size, where


def bundle_tokenizer(model: str, ckpt: Path, out: Path) -> Path:
    """The tokenizer a random-weight bundle carries: the checkpoint folder's tokenizer.model, else
    the trained tiny model's padded with unused pieces to the vocabulary (LiteRT-LM detokenizes
    every sampled id, and a random model samples anywhere in its table: with the tiny 768-piece
    model as it is, the first id past 768 stops LiteRT-LM's decode, "Token id ... is out of range")."""
    from bench_litertlm import TOKENIZER, padded_tokenizer
    from models import get_config

    own = ckpt / "tokenizer.model"
    if ckpt.is_dir() and own.exists():
        return own
    out.mkdir(parents=True, exist_ok=True)
    return padded_tokenizer(TOKENIZER, get_config(model).vocab_size, out.parent / f".tokenizer-{model}.model")


def run_export(model: str, ckpt: Path, target: str, recipe: str, out: Path, gate: bool, context: int,
               extra: list[str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "export", "--model", model, "--checkpoint", str(ckpt), "--target", target,
           "--quant", recipe, "--out", str(out), "--stage-memory", "--max-seq-len", str(context), "--no-vision",
           "--no-engine-check", *(extra or [])]
    if not gate:
        cmd.append("--no-verify")
    if target == "litertlm":  # a bundle carries a tokenizer: the checkpoint's, or one padded to the vocabulary
        cmd += ["--tokenizer", str(bundle_tokenizer(model, ckpt, out))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    row = {"rc": proc.returncode, "wall_s": wall}
    text = proc.stdout + proc.stderr
    if proc.returncode == 2:
        row["error"] = next((ln for ln in text.splitlines() if ln.startswith("error:")), text[-300:])
        return row
    export_s, export_peak, gate_s, gate_peak, mode = 0.0, 0.0, None, None, None
    for line in proc.stdout.splitlines():
        m = STAGE.match(line.strip())
        if not m:
            continue
        name, secs, gib = m["name"], float(m["s"]), float(m["gib"] or 0)
        if name.startswith("verify ("):  # the gate, its inner stages included
            gate_s, gate_peak, mode = secs, gib, name[len("verify ("):-1]
        elif not name.startswith(("verify:", "LiteRT-LM")):  # load, lower/write, convert/quantize, bundle
            export_s += secs
            export_peak = max(export_peak, gib)
    row.update(export_s=export_s, export_peak_gib=export_peak, gate_s=gate_s, gate_peak_gib=gate_peak, gate_mode=mode)
    verdict = re.search(r"-> (PASS|FAIL)", text)
    row["gate"] = verdict.group(1) if verdict else None
    arts = [p for p in out.iterdir() if not p.name.startswith(".")  # the artifact, not its parity report / plot
            and (p.suffix in (".tflite", ".litertlm") or (p.is_dir() and (p / "model.onnx").exists()))]
    if arts:
        art = max(arts, key=lambda p: p.stat().st_mtime)
        row["artifact"] = str(art)
        row["artifact_bytes"] = (sum(f.stat().st_size for f in art.glob("model.onnx*")) if art.is_dir()
                                 else art.stat().st_size)
    if proc.returncode not in (0, 1):
        row["error"] = text[-500:]
    return row


def run_runtime(artifact: str, target: str, recipe: str, size: int) -> dict:
    from export.memory import _runtime_factor, total_memory

    need = _runtime_factor("onnx" if target == "onnx" else "tflite", recipe) * size + GiB
    if need > 0.9 * total_memory():  # would only meet the OOM killer
        return {"runtime_error": f"not run: needs ~{need / GiB:.0f} GiB, the machine has {total_memory() / GiB:.0f}"}
    proc = subprocess.run([sys.executable, "-c", _RUNTIME, artifact], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode:
        return {"runtime_error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"runtime_rss": out["rss"], "tok_s": out["tok_s"]}


def hf_config_json(model: str) -> dict | None:
    """transformers' config.json for a Gemma 3 text model (for onnxruntime-genai's builder), made by
    the installed transformers from our config's numbers."""
    import transformers

    from models import get_config

    cfg = get_config(model)
    if cfg.family.value != "gemma3":
        return None
    full = {"rope_type": "default", "rope_theta": cfg.global_rope_base}
    if cfg.global_rope_scale != 1.0:
        full = {"rope_type": "linear", "factor": cfg.global_rope_scale, "rope_theta": cfg.global_rope_base}
    hf = transformers.Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, query_pre_attn_scalar=cfg.head_dim, sliding_window=cfg.sliding_window,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        layer_types=["sliding_attention" if k.value == "local" else "full_attention" for k in cfg.layer_kinds],
        rope_parameters={"full_attention": full,
                         "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_base}})
    body = hf.to_dict()
    body["architectures"] = ["Gemma3ForCausalLM"]
    body["torch_dtype"] = "bfloat16"
    return body


# onnxruntime-genai's builder in a child process. The builder (0.18) reads Gemma 3's RoPE settings
# flat, as transformers 4 wrote them (rope_parameters["rope_type"], rope_theta, rope_local_base_freq);
# transformers 5 nests them per layer type (KeyError: 'rope_type'), and converts a transformers-4
# config.json back on load, so the loaded config is flattened here (tools/bench_anchors.py's
# docstring has the check against our JAX model). The builder also needs `onnx-ir` installed.
BUILDER_CHILD = r"""
import runpy, sys, transformers
_load = transformers.AutoConfig.from_pretrained.__func__

def _flat_rope(cls, *args, **kwargs):
    config = _load(cls, *args, **kwargs)
    for c in (config, getattr(config, "text_config", None)):
        rope = getattr(c, "rope_parameters", None)
        if isinstance(rope, dict) and "full_attention" in rope:
            full = dict(rope["full_attention"])
            c.rope_parameters = full
            c.rope_theta = full["rope_theta"]
            c.rope_local_base_freq = rope.get("sliding_attention", full)["rope_theta"]
    return config

transformers.AutoConfig.from_pretrained = classmethod(_flat_rope)
sys.argv = ["builder"] + sys.argv[1:]
try:
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
finally:
    print("PEAK", next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def run_ort_genai(model: str, ckpt: Path, out: Path) -> dict:
    config = hf_config_json(model)
    if config is None:
        return {"error": "not a Gemma 3 text model"}
    (ckpt / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BUILDER_CHILD, "-i", str(ckpt), "-o", str(out), "-p", "int4", "-e", "cpu",
                           "-c", str(out / "cache")], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (ckpt / "config.json").unlink()
    peak = re.search(r"PEAK (\d+)", proc.stdout)
    row = {"rc": proc.returncode, "wall_s": wall, "peak_gib": int(peak.group(1)) / GiB if peak else None}
    if proc.returncode:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gemma3-270m,gemma3-1b")
    ap.add_argument("--targets", default="onnx,tflite")
    ap.add_argument("--recipes", default="int4-b32,dynamic-int8")
    ap.add_argument("--no-gate", action="store_true")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"))
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and artifacts")
    ap.add_argument("--ort-genai", action="store_true")
    ap.add_argument("--checkpoint-format", choices=["bf16", "gguf-q4_0"], default="bf16",
                    help="bf16 safetensors (default), or a GGUF of Q4_0 blocks (Gemma 2/3: the 27B sizes fit the "
                         "disk)")
    ap.add_argument("--no-smoothing", action="store_true",
                    help="pass --no-smoothing (TFLite dynamic-int8's calibration runs the model over the text: "
                         "hours at 27B on 2 cores)")
    args = ap.parse_args()

    from export.memory import check_fits
    from models import get_config

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        cfg = get_config(model)
        ckpt = args.work / f"ckpt-{model}"
        fits = []
        for target in args.targets.split(","):
            for recipe in args.recipes.split(","):
                try:
                    est = check_fits(cfg, target, recipe, verify=not args.no_gate, vision=False)
                    fits.append((target, recipe, est))
                except ValueError as e:
                    rows.append({"model": model, "target": target, "recipe": recipe, "error": str(e)})
                    print(f"{model} {target} {recipe}: refused: {e}", flush=True)
        if not fits:
            continue
        secs, size, ckpt_path = write_checkpoint(model, ckpt, args.checkpoint_format)
        print(f"{model}: {args.checkpoint_format} checkpoint {size / GiB:.2f} GiB written in {secs:.0f} s", flush=True)
        for target, recipe, est in fits:
            out = args.work / f"out-{model}-{target}-{recipe}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            row = {"model": model, "target": target, "recipe": recipe, "estimate_gib": est.peak / GiB,
                   "checkpoint": args.checkpoint_format}
            row.update(run_export(model, ckpt_path, target, recipe, out, not args.no_gate, args.context,
                                  ["--no-smoothing"] if args.no_smoothing else None))
            if row.get("artifact"):
                row.update(run_runtime(row["artifact"], target, recipe, row["artifact_bytes"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        if args.ort_genai and args.checkpoint_format == "bf16" and hf_config_json(model) is not None:
            out = args.work / f"ortgenai-{model}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            row = {"model": model, "target": "ort-genai builder", "recipe": "int4"}
            row.update(run_ort_genai(model, ckpt, out))
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)

    (args.work / "bench_scale.json").write_text(json.dumps(rows, indent=1))
    head = ("| model | target | recipe | export s | export peak GiB | artifact GiB | peak - artifact | gate | gate s "
            "| gate peak GiB | runtime RSS / file | decode tok/s |")
    print("\n" + head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        if "export_s" not in r:
            print(f"| {r['model']} | {r['target']} | {r['recipe']} | " + (
                f"{r['wall_s']:.0f} (wall) | {r.get('peak_gib') or 0:.2f} | | | | | | | |" if "wall_s" in r
                else f"refused: {r.get('error', '')[:120]} | | | | | | | | |"))
            continue
        art = r.get("artifact_bytes", 0) / GiB
        rt = r.get("runtime_rss")
        print(f"| {r['model']} | {r['target']} | {r['recipe']} | {r['export_s']:.0f} | {r['export_peak_gib']:.2f} "
              f"| {art:.2f} | {r['export_peak_gib'] - art:+.2f} | {r.get('gate') or '-'} ({r.get('gate_mode') or '-'}) "
              f"| {r['gate_s'] or 0:.0f} | {r['gate_peak_gib'] or 0:.2f} "
              f"| {(rt / r['artifact_bytes']) if rt and r.get('artifact_bytes') else 0:.2f} "
              f"| {r.get('tok_s', 0):.1f} |")
    print(f"\n(peak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
