"""Side by side with the anchors: the same random-weight checkpoint exported by us, by
onnxruntime-genai's model builder and by litert-torch's `export_hf`, each artifact benchmarked in its
own process, in one run, as ratios to the anchor beside the memory-bandwidth bound. Not run in CI
(exports ~15 min for gemma3-1b, ~7 min per round of runs); docs/notes/anchors.md has the numbers.

  python tools/bench_anchors.py --models gemma3-270m --steps 16 --repeats 1     # a quick check
  python tools/bench_anchors.py --models gemma3-270m,gemma3-1b --rounds 2       # the tables
  python tools/bench_anchors.py --models gemma3-1b --reuse --rounds 3           # runs only, artifacts kept
  python tools/bench_anchors.py --models gemma3-1b --recipes int4-b32,dynamic-int8 --reuse

Per model a bf16 safetensors checkpoint of random weights (tools/bench_scale.write_checkpoint) with
a SentencePiece tokenizer padded to the vocabulary (tools/bench_litertlm.padded_tokenizer), and
beside it an HF folder (links to the same weights + config.json from bench_scale.hf_config_json,
max_position_embeddings = --context) for the two other exporters. Per recipe (default int4-b32),
context --context (4096):

  row              exporter                           runtime                     anchor of
  ours tflite      python -m export --target tflite   runtime_py (LiteRT CompiledModel)
  ours litertlm    python -m export --target litertlm LiteRT-LM (litert_lm.Engine, CPU)
  ours onnx py     python -m export --target onnx     runtime_py (onnxruntime)
  ours onnx og     the same folder                    onnxruntime-genai (og.Generator)
  builder onnx og  onnxruntime_genai.models.builder   onnxruntime-genai           ours onnx py, og
  litert-torch     litert_torch...export_hf           LiteRT-LM (its .litertlm)   ours tflite, litertlm

Recipes: int4-b32 = ours int4-b32; the builder's `-p int4` with block_size=32 accuracy_level=4 (int4
blocks of 32, int8 activations in MatMulNBits, as ours); litert-torch with an ai-edge-quantizer
recipe of dynamic int4 weights in BLOCKWISE_32 on every supported op (FULLY_CONNECTED and the
embedding lookup). dynamic-int8 = ours dynamic-int8; the builder's `-p int8` with block_size=128;
litert-torch's `dynamic_wi8_afp32` (per-channel int8). (The dynamic-int8 rows have not been run
yet: --recipes dynamic-int8 is wired, not validated.)

Columns
  dec@128, dec@end  decode tokens/s at position ~128 and near the end of the context (~4060 of
                    4096). runtime_py: bench_runtime.decode_rate (the position set directly; earlier
                    rows hold zeros: the same cost as real history), median of --repeats.
                    onnxruntime-genai and LiteRT-LM: a real prompt of that length is prefilled first
                    (128 tokens, or context - steps - 8), then --steps greedy tokens are timed
                    (LiteRT-LM: its own benchmark counter, in each engine's second session over the
                    prompt: the first packs the weights, bench_litertlm.engine_child; the first
                    session's TTFT is cold_ttft in the JSON). Random weights can sample the end token;
                    onnxruntime-genai runs with min_length so it does not stop; LiteRT-LM's decoded
                    count is in the JSON.
  TTFT              a 128-token prompt: prefill + the first token (runtime_py: bench_runtime.bench;
                    LiteRT-LM: its time-to-first-token counter; onnxruntime-genai: append_tokens +
                    generate_next_token + get_next_tokens)
  RSS128, peak      peak RSS (VmHWM) of the artifact's process after load, the 128-token prompt and
                    the decode at ~128 (RSS128), and at the end, after the long prompt too (peak).
                    runtime_py has no long prompt (the position is set): one number. A long prompt
                    appended whole to onnxruntime-genai costs [prompt, vocab] f32 logits in the
                    builder's graph (all positions: 4 GiB at 4060 x 262144); ours returns the last.
  MiB               the artifact: the .tflite / .litertlm file, or model.onnx + its data
  bound             the measured bandwidth / the artifact's bytes: a decode step reads every weight
                    once (the tied table as the LM head; KV-cache reads not counted, so the bound is
                    optimistic at the end of the context). The 270M's weights fit this machine's L3
                    (480 MiB on the Xeon here), so it can run above the DRAM bound.
  %bound            dec@128 / bound
  xdec128, xdecend, xTTFT, xRSS128  this row / its anchor (same model and recipe): litert-torch in
                    LiteRT-LM for the TFLite rows, the builder in onnxruntime-genai for the ONNX rows.
                    >1 is faster for the decode ratios; <1 is faster / smaller for TTFT and RSS.

Bandwidth: --bw-threads threads each summing its share of a 1 GiB float32 array (np.add.reduce
releases the GIL), best of --bw-repeats, measured at the start, before each further round and at the
end of the run (it varies between days on these machines); the bound uses the largest. The load
average is printed with it and stored with every run: other work on a shared machine slows rows
unevenly. --rounds N runs every row N times, round after round, and keeps each row's best (highest
tok/s, lowest TTFT; RSS: the largest); the JSON holds every round.

onnxruntime-genai's builder (0.18) and transformers 5: the builder reads Gemma 3's RoPE settings flat
(config.rope_parameters["rope_type"], config.rope_theta, config.rope_local_base_freq) as
transformers 4 wrote them, but transformers 5's Gemma3TextConfig holds them nested per layer type
(rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}) -> KeyError: 'rope_type'
in builders/base.py make_rope_init. Writing a transformers-4 config.json (rope_theta,
rope_local_base_freq, rope_scaling) does not help: AutoConfig.from_pretrained converts it back to
the nested form. So the builder runs in a child process (`_BUILDER`) that wraps
transformers.AutoConfig.from_pretrained: after loading, a nested rope_parameters becomes the
full-attention dict (rope_type, rope_theta[, factor]), config.rope_theta its theta and
config.rope_local_base_freq the sliding layers' theta, what the builder's Gemma3Model reads. (A
"linear" full-attention scaling, Gemma 3 4B+, would then also scale the builder's local cos/sin
caches: its Gemma3Model shares rope_attrs between both; 270M and 1B use "default".) The builder also
needs the onnx-ir package, which onnxruntime-genai does not declare. bench_scale.run_ort_genai is not
reused for the call: it has no hook for this patch and always builds int4; hf_config_json is.

litert-torch: it cannot share this environment (its torch/transformers pins); it runs from
--lt-python, a separate virtual environment:
  python3.11 -m venv /work/venv-lt
  /work/venv-lt/bin/pip install torch==2.13.0                    # the CPU wheel on local disk
  /work/venv-lt/bin/pip install --no-deps litert-torch==0.10.0
  /work/venv-lt/bin/pip install -c <(echo torch==2.13.0+cpu) absl-py numpy scipy safetensors \
      multipledispatch transformers tabulate "ai-edge-litert[model-utils]==2.3.0" \
      "ai-edge-quantizer==0.10.*" "litert-converter==0.5.*" "torchao>=0.17.0" jax==0.10.2 \
      jaxlib==0.10.2 jaxtyping fire sentencepiece rich "litert-lm-builder==0.18.1" pillow
(its declared dependencies minus kagglehub, torch held at the local CPU wheel). `export_hf` then
needs two shims, applied by `_LITERT_TORCH` in its child process:
  - litert_torch.generative.export_hf.core.patches replaces transformers' use_kernel_forward_from_hub
    with a decorator that returns the class unchanged, but transformers 5.25 with `kernels` 0.19
    installed (a transformers dependency) decorates apply_rotary_pos_emb with use_kernelized_func,
    which then raises "Function `apply_rotary_pos_emb` is not decorated with
    @use_kernel_forward_from_hub" while importing modeling_gemma3 / modeling_lfm2: the shim makes
    use_kernelized_func the no-op transformers uses when `kernels` is absent.
  - model_ext/bonsai_flux2 imports tensorflow.lite.python.schema_py_generated at import time
    (tensorflow is not a declared dependency): the shim maps it to ai_edge_litert's identical
    schema_py_generated (with module specs, for torch._dynamo's find_spec walk). Nothing on the
    Gemma 3 path runs TensorFlow.
Its bundle runs in LiteRT-LM; its .tflite is not run in runtime_py, which reads only artifacts with
gemma-edge metadata. Without --lt-python (or if it fails) the row says "not run: <reason>".

Prints the table and writes JSON (--json, default WORK/bench_anchors.json).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_litertlm import TOKENIZER, _child, padded_tokenizer  # noqa: E402
from bench_scale import BUILDER_CHILD as _BUILDER  # noqa: E402
from bench_scale import hf_config_json, run_export, write_checkpoint  # noqa: E402

MIB, GiB = 2**20, 2**30


# litert-torch's export_hf in its own environment, with the two shims (module docstring)
_LITERT_TORCH = r"""
import importlib.machinery, runpy, sys, types
import transformers.integrations as integrations
import transformers.integrations.hub_kernels as hub_kernels

def _no_kernels(*args, **kwargs):
    return lambda cls: cls

hub_kernels.use_kernelized_func = integrations.use_kernelized_func = _no_kernels
from ai_edge_litert import schema_py_generated
for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
sys.modules["tensorflow.lite.python"].schema_py_generated = schema_py_generated
sys.modules["tensorflow.lite.python.schema_py_generated"] = schema_py_generated
sys.argv = ["export_hf"] + sys.argv[1:]
try:
    runpy.run_module("litert_torch.generative.export_hf", run_name="__main__")
finally:
    print("PEAK", next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""

# ai-edge-quantizer recipe for litert-torch at int4-b32 (RecipeManager.add_dynamic_config(".*",
# ALL_SUPPORTED, 4, BLOCKWISE_32) written out)
LT_INT4_B32 = [{"regex": ".*", "operation": "*", "algorithm_key": "min_max_uniform_quantize",
                "op_config": {"weight_tensor_config": {"num_bits": 4, "symmetric": True,
                                                       "granularity": "BLOCKWISE_32", "dtype": "INT"},
                              "compute_precision": "INTEGER", "explicit_dequantize": False,
                              "skip_checks": False, "min_weight_elements": 0}}]
BUILDER_PRECISION = {"int4-b32": ["-p", "int4", "--extra_options", "block_size=32", "accuracy_level=4"],
                     "dynamic-int8": ["-p", "int8", "--extra_options", "block_size=128", "accuracy_level=4"]}

# (row, exporter's artifact key, runtime child)
ROWS = [("ours tflite", "ours-tflite", "py"), ("ours litertlm", "ours-litertlm", "engine"),
        ("ours onnx py", "ours-onnx", "py"), ("ours onnx og", "ours-onnx", "genai"),
        ("builder onnx og", "builder", "genai"), ("litert-torch", "litert-torch", "engine")]
ANCHOR = {"ours tflite": "litert-torch", "ours litertlm": "litert-torch", "ours onnx py": "builder onnx og",
          "ours onnx og": "builder onnx og"}


def _vmhwm() -> int:
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))


def _artifact_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("model.onnx*"))
    return path.stat().st_size


# ---- bandwidth ------------------------------------------------------------------------------------

def bandwidth(threads: int = 2, repeats: int = 10, gib: float = 1.0) -> float:
    """Bytes/s: `threads` threads each summing its share of a `gib` GiB float32 array, best of
    `repeats` (np.add.reduce releases the GIL)."""
    import numpy as np

    a = np.ones(int(gib * GiB) // 4, np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0))
    del parts, a
    return best


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---- exports (each its own process) --------------------------------------------------------------

def prepare(model: str, work: Path, context: int) -> tuple[Path, Path]:
    """The checkpoint folder (ours: weights + tokenizer.model) and the HF folder (links to them +
    config.json) for the builder and litert-torch."""
    from models import get_config

    cfg = get_config(model)
    ckpt, hf = work / f"ckpt-{model}", work / f"hf-{model}"
    secs, size, _ = write_checkpoint(model, ckpt)  # the bf16 folder (bench_scale.write_checkpoint)
    if secs:
        print(f"{model}: bf16 checkpoint {size / GiB:.2f} GiB written in {secs:.0f} s", flush=True)
    if not (ckpt / "tokenizer.model").exists():
        padded_tokenizer(TOKENIZER, cfg.vocab_size, ckpt / "tokenizer.model")
    hf.mkdir(exist_ok=True)
    for name in ("model.safetensors", "tokenizer.model"):
        if not (hf / name).exists():
            (hf / name).symlink_to(ckpt / name)
    config = hf_config_json(model)
    if config is None:
        raise SystemExit(f"{model}: not a Gemma 3 text model (the builder's and litert-torch's config)")
    config["max_position_embeddings"] = context  # the builder sizes its cos/sin caches by it
    (hf / "config.json").write_text(json.dumps(config, indent=1))
    return ckpt, hf


def _peak_and_error(proc: subprocess.CompletedProcess, t0: float, log: Path) -> dict:
    log.write_text(proc.stdout + "\n" + proc.stderr)
    peak = re.findall(r"^PEAK (\d+)$", proc.stdout, re.M)
    row = {"export_s": time.perf_counter() - t0, "export_peak": int(peak[-1]) if peak else None}
    if proc.returncode < 0:  # no traceback: killed (SIGKILL: the kernel's OOM killer, as a rule)
        row["error"] = (f"killed by signal {-proc.returncode}" + (" (out of memory? dmesg)" if proc.returncode == -9
                                                                  else "") + f" (log: {log})")
    elif proc.returncode:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and "it/s]" not in ln
                 and not ln.startswith(("W", "I0", "INFO", "WARNING", "[ERROR] `"))]
        row["error"] = (lines[-1] if lines else f"exit {proc.returncode}")[-300:] + f" (log: {log})"
    return row


def export_ours(model: str, ckpt: Path, target: str, recipe: str, out: Path, context: int) -> dict:
    suffix = {"tflite": ".tflite", "litertlm": ".litertlm", "onnx": ""}[target]
    row = run_export(model, ckpt, target, recipe, out, False, context)
    found = [p for p in out.iterdir() if (p.is_dir() if target == "onnx" else p.suffix == suffix)]
    out_row = {"export_s": row.get("export_s", row.get("wall_s"))}
    if row.get("error") or not found:
        out_row["error"] = str(row.get("error") or "no artifact")[-300:]
        return out_row
    return {**out_row, "path": str(found[0])}


def export_builder(hf: Path, recipe: str, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _BUILDER, "-i", str(hf), "-o", str(out), "-e", "cpu",
                           "-c", str(out.parent / f"{out.name}-cache"), *BUILDER_PRECISION[recipe]],
                          capture_output=True, text=True)
    shutil.rmtree(out.parent / f"{out.name}-cache", ignore_errors=True)
    row = _peak_and_error(proc, t0, out.parent / f"{out.name}.log")
    if "error" not in row:
        row["path"] = str(out)
    return row


def export_litert_torch(lt_python: str, hf: Path, recipe: str, out: Path, context: int) -> dict:
    if recipe == "int4-b32":
        quant = out.parent / "litert_torch_int4_b32.json"
        quant.write_text(json.dumps(LT_INT4_B32))
        quant = str(quant)
    else:
        quant = {"dynamic-int8": "dynamic_wi8_afp32"}[recipe]
    t0 = time.perf_counter()
    proc = subprocess.run([lt_python, "-c", _LITERT_TORCH, f"--model={hf}", f"--output_dir={out}",
                           f"--cache_length={context}", "--prefill_lengths=128", f"--quantization_recipe={quant}",
                           "--bundle_litert_lm=True"], capture_output=True, text=True, cwd=out.parent)
    row = _peak_and_error(proc, t0, out.parent / f"{out.name}.log")
    if "error" not in row:
        row["path"] = str(out / "model.litertlm")
    return row


# ---- runs (children of this script) --------------------------------------------------------------

def py_child(a) -> dict:
    from bench_runtime import bench

    r = bench(Path(a.path), a.threads, a.repeats, a.steps)
    return {"dec128": r["decode_tok_s_at_128"], "decend": r["decode_tok_s_at_end"], "end_pos": r["end_position"],
            "ttft": r["ttft_128_s"], "rss": _vmhwm(), "rss128": _vmhwm()}  # no long prompt: one peak


def engine_child(a) -> dict:
    from bench_litertlm import engine_child as run_engine

    def run(prompt_tokens: int) -> dict:
        return run_engine(argparse.Namespace(path=a.path, tokenizer=a.tokenizer, threads=a.threads,
                                             prompt_tokens=prompt_tokens, decode_tokens=a.steps))

    short = run(128)
    rss128 = _vmhwm()
    long = run(a.context - a.steps - 8)
    return {"dec128": short["decode_tps"], "decend": long["decode_tps"], "end_pos": long["prompt_tokens"],
            "ttft": short["ttft_s"], "cold_ttft": short["cold_ttft_s"], "init_s": short["init_s"],
            "decoded": [short["decode_tokens"], long["decode_tokens"]],
            "rss": _vmhwm(), "rss128": rss128}


def genai_child(a) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(a.path)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": a.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def generator(prompt_len: int):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=a.context, min_length=a.context, do_sample=False)
        gen = og.Generator(model, params)
        return gen, np.array([2] + [10 + i % 200 for i in range(prompt_len - 1)], np.int32)

    def decode_rate(gen) -> float:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            gen.generate_next_token()
        return a.steps / (time.perf_counter() - t0)

    ttft, early = [], []
    for i in range(a.repeats + 1):  # the first: warm-up (allocations)
        gen, ids = generator(128)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        int(gen.get_next_tokens()[0])
        if i:
            ttft.append(time.perf_counter() - t0)
            early.append(decode_rate(gen))
        del gen
    rss128 = _vmhwm()
    end_pos = a.context - a.steps - 3
    gen, ids = generator(end_pos)
    gen.append_tokens(ids)
    gen.generate_next_token()
    late = decode_rate(gen)
    return {"dec128": statistics.median(early), "decend": late, "end_pos": end_pos, "ttft": statistics.median(ttft),
            "rss": _vmhwm(), "rss128": rss128}


# ---- table ----------------------------------------------------------------------------------------

COLUMNS = ["model", "recipe", "row", "runtime", "dec@128", "dec@end", "TTFT s", "RSS128 MiB", "peak MiB", "MiB",
           "bound",
           "%bound", "xdec128", "xdecend", "xTTFT", "xRSS128"]
RUNTIME = {"py": "runtime_py", "engine": "LiteRT-LM", "genai": "onnxruntime-genai"}


def _f(x, spec="{:.1f}") -> str:
    return "-" if x is None else spec.format(x)


def table(rows: list[dict], bw: float) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    index = {(r["model"], r["recipe"], r["row"]): r for r in rows}
    for r in rows:
        head = [r["model"], r["recipe"], r["row"], RUNTIME[r["kind"]]]
        if "error" in r:
            lines.append("| " + " | ".join(head + [f"not run: {r['error']}"] + [""] * (len(COLUMNS) - 5)) + " |")
            continue
        size = r.get("bytes")
        bound = bw / size if size else None
        anchor = index.get((r["model"], r["recipe"], ANCHOR.get(r["row"], "")))
        if anchor is not None and "error" in anchor:
            anchor = None

        def ratio(key):
            return r[key] / anchor[key] if anchor and anchor.get(key) and r.get(key) else None

        cells = head + [_f(r["dec128"]), f"{_f(r['decend'])} @{r['end_pos']}", _f(r["ttft"], "{:.3f}"),
                        _f(r["rss128"] / MIB, "{:.0f}"), _f(r["rss"] / MIB, "{:.0f}"),
                        _f(size / MIB if size else None, "{:.0f}"), _f(bound),
                        _f(100 * r["dec128"] / bound if bound else None, "{:.0f}%"),
                        _f(ratio("dec128"), "{:.2f}"), _f(ratio("decend"), "{:.2f}"), _f(ratio("ttft"), "{:.2f}"),
                        _f(ratio("rss128"), "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gemma3-1b", help="comma-separated Gemma 3 text models")
    ap.add_argument("--recipes", default="int4-b32", help="int4-b32 and/or dynamic-int8")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="runtime_py / onnxruntime-genai repeats at ~128 (median)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every row this many times, round after round; each row keeps its best round")
    ap.add_argument("--bw-threads", type=int, default=2)
    ap.add_argument("--bw-repeats", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_anchors"))
    ap.add_argument("--lt-python", default="/work/venv-lt/bin/python",
                    help="python of litert-torch's environment ('' to skip its rows)")
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out (e.g. 'litert-torch')")
    ap.add_argument("--reuse", action="store_true", help="keep artifacts already in --work (else re-export)")
    ap.add_argument("--json", type=Path)
    # child modes
    ap.add_argument("--child", choices=["py", "engine", "genai"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--out-json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        result = {"py": py_child, "engine": engine_child, "genai": genai_child}[a.child](a)
        Path(a.out_json).write_text(json.dumps(result))
        return 0

    for recipe in a.recipes.split(","):
        if recipe not in BUILDER_PRECISION:
            raise SystemExit(f"recipe {recipe}: choose from {', '.join(BUILDER_PRECISION)}")
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    a.work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load0 = load_average()
    bw0 = bandwidth(a.bw_threads, a.bw_repeats)
    print(f"bandwidth at start: {bw0 / 1e9:.1f} GB/s ({a.bw_threads} threads, best of {a.bw_repeats}); "
          f"load average {load0}", flush=True)
    lt_python = a.lt_python if a.lt_python and Path(a.lt_python).exists() else None

    rows = []
    common = ["--threads", str(a.threads), "--steps", str(a.steps), "--repeats", str(a.repeats),
              "--context", str(a.context)]
    for model in a.models.split(","):
        ckpt, hf = prepare(model, a.work, a.context)
        for recipe in a.recipes.split(","):
            wanted = {key for name, key, _ in ROWS if name not in skip}
            arts = {}
            for key in sorted(wanted):
                out = a.work / f"{key}-{model}-{recipe}"
                if key == "litert-torch" and lt_python is None:
                    arts[key] = {"error": f"litert-torch environment not found ({a.lt_python or 'skipped'})"}
                    continue
                if a.reuse and _existing(key, out):
                    arts[key] = {"path": str(_existing(key, out)), "reused": True}
                    continue
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                print(f"{model} {recipe}: exporting {key} ...", flush=True)
                if key.startswith("ours-"):
                    arts[key] = export_ours(model, ckpt, key[len("ours-"):], recipe, out, a.context)
                elif key == "builder":
                    arts[key] = export_builder(hf, recipe, out)
                else:
                    arts[key] = export_litert_torch(lt_python, hf, recipe, out, a.context)
                print(f"  {json.dumps(arts[key])}", flush=True)
            for name, key, kind in ROWS:
                if name in skip:
                    continue
                art = arts[key]
                row = {"model": model, "recipe": recipe, "row": name, "kind": kind, "export": art, "runs": []}
                if "error" in art:
                    row["error"] = f"export: {art['error']}"
                else:
                    row["path"], row["bytes"] = art["path"], _artifact_bytes(Path(art["path"]))
                    row["tokenizer"] = str(ckpt / "tokenizer.model")
                rows.append(row)

    # every row once per round, the rounds one after another: a row's best round is the one least
    # disturbed by whatever else the machine was running
    bws = [bw0]
    for rnd in range(a.rounds):
        if rnd:
            bws.append(bandwidth(a.bw_threads, a.bw_repeats))
            print(f"round {rnd + 1}: bandwidth {bws[-1] / 1e9:.1f} GB/s; load average {load_average()}", flush=True)
        for row in rows:
            if "path" not in row:
                continue
            extra = ["--tokenizer", row["tokenizer"]] if row["kind"] == "engine" else []
            print(f"{row['model']} {row['recipe']}: running {row['row']} in {RUNTIME[row['kind']]} ...", flush=True)
            r = _child(["--child", row["kind"], "--path", row["path"], *extra, *common], __file__)
            row["runs"].append({**r, "load": load_average()})
            print(f"  {json.dumps(row['runs'][-1])}", flush=True)
    for row in rows:
        good = [r for r in row["runs"] if "error" not in r]
        if good:
            row.update({k: v for k, v in good[0].items() if k != "load"})
            row.update(dec128=max(r["dec128"] for r in good), decend=max(r["decend"] for r in good),
                       ttft=min(r["ttft"] for r in good), rss=max(r["rss"] for r in good),
                       rss128=max(r["rss128"] for r in good))
        elif row["runs"]:
            row["error"] = row["runs"][-1]["error"]

    bw1 = bandwidth(a.bw_threads, a.bw_repeats)
    bws.append(bw1)
    load1 = load_average()
    bw = max(bws)
    print(f"\nbandwidth at end: {bw1 / 1e9:.1f} GB/s; load average {load1}")
    print(f"\n{started}; bandwidth {' / '.join(f'{b / 1e9:.1f}' for b in bws)} GB/s (start, each round, end; "
          f"the bound uses {bw / 1e9:.1f}); load average {load0} -> {load1}; {a.threads} threads, context "
          f"{a.context}, {a.steps} decode steps, best of {a.rounds} round(s)\n")
    print("\n".join(table(rows, bw)))
    path = a.json or a.work / "bench_anchors.json"
    path.write_text(json.dumps({"started": started, "bandwidth": bws, "load": [load0, load1],
                                "args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1))
    print(f"\nwrote {path}")
    return 0


def _existing(key: str, out: Path) -> Path | None:
    """An artifact left in `out` by an earlier run (--reuse)."""
    if not out.is_dir():
        return None
    if key in ("ours-tflite", "ours-litertlm"):
        return next(iter(sorted(out.glob("*." + key[len("ours-"):]))), None)
    if key == "ours-onnx":
        return next((p for p in sorted(out.iterdir()) if (p / "genai_config.json").exists()), None)
    if key == "builder":
        return out if (out / "genai_config.json").exists() else None
    return out / "model.litertlm" if (out / "model.litertlm").exists() else None


if __name__ == "__main__":
    sys.exit(main())
