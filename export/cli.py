"""`python -m export`: model -> signatures -> StableHLO -> artifact -> parity gate.

  python -m export --model gemma3-270m --random-init 0 --target tflite
  python -m export --checkpoint ./gemma-3-1b-it --target tflite --max-seq-len 4096 --prefill-lens 32,128
  python -m export --checkpoint ./gemma-3-1b-it --target onnx [--onnx-ops standard]
  python -m export --checkpoint ./gemma-3-1b-it --target tflite --quant int4-b32
  python -m export --checkpoint ./gemma-3-1b-it --target litertlm --quant int4-b32
  python -m export inspect artifacts/gemma-3-1b-it_int4-b32_ctx4096.litertlm
  python -m export --list-models
  python -m export --list-onnx-ops
  python -m export --list-quant

Bad input exits 2 with one line naming the problem and the fix; a parity failure exits 1 and says
where (signature, step, error). Artifacts are written to a temporary name and renamed, so a
failed or interrupted export never leaves a partial file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

DTYPES = ("f32", "bf16", "f16")
# The gate compares with the source model holding the stored weights (f32 compute in both), so one
# tolerance serves every stored dtype: relative RMS error of logits, identical greedy tokens.
TOLERANCE = 1e-4
GREEDY_STEPS = 64
DEFAULT_PREFILL_LENS = (32, 128)


class Stage:
    """Prints `[stage] ... done in N s` around a block."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.t0 = time.perf_counter()
        print(f"[{self.name}] ...", flush=True)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"[{self.name}] done in {time.perf_counter() - self.t0:.1f} s", flush=True)


def progress(i: int, n: int, label: str):
    width = 24
    filled = int(width * i / n)
    end = "\n" if i == n else ""
    print(f"\r  [{'#' * filled}{'.' * (width - filled)}] {i}/{n} {label:<24}", end=end, flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="registry name; optional with a --checkpoint holding config.json")
    ap.add_argument("--checkpoint", type=Path, help="HF safetensors or official Orbax folder")
    ap.add_argument("--random-init", type=int, metavar="SEED", help="random weights (architecture dry run)")
    ap.add_argument("--target", choices=["tflite", "litertlm", "onnx"], default="tflite",
                    help="tflite: one .tflite with prefill_T/decode signatures; litertlm: that model bundled "
                         "with its tokenizer and LiteRT-LM's metadata, for LiteRT-LM; onnx: an "
                         "onnxruntime-genai folder (model.onnx, genai_config.json, tokenizer)")
    ap.add_argument("--onnx-ops", choices=["default", "standard"], default=None,
                    help="onnx: 'default' uses ONNX Runtime's GroupQueryAttention; 'standard' only standard "
                         "ONNX ops (attention as model-local functions), for runtimes without contrib ops. "
                         "Default: 'default', or 'standard' for a model with vision (GroupQueryAttention "
                         "cannot express the bidirectional attention inside an image)")
    ap.add_argument("--tokenizer", type=Path,
                    help="tokenizer folder or tokenizer.model/.json (default: the --checkpoint folder); "
                         "litertlm needs a SentencePiece tokenizer.model")
    ap.add_argument("--list-onnx-ops", action="store_true", help="print the ONNX lowering's op coverage and exit")
    ap.add_argument("--out", type=Path, default=Path("artifacts"), help="output folder")
    ap.add_argument("--max-seq-len", type=int, help="context of the global caches (default min(4096, model's))")
    ap.add_argument("--prefill-lens", default=None,
                    help="comma-separated prefill signature lengths (tflite; default 32,128). onnx takes "
                         "any length and uses these only to shape the parity prompts")
    ap.add_argument("--dtype", choices=DTYPES, default="f32", help="stored weight dtype (without --quant)")
    ap.add_argument("--quant", metavar="RECIPE",
                    help="post-training quantization recipe: fp16, int8, dynamic-int8, int4-b32, int4-b128 "
                         "(see --list-quant for which target runs which); the parity gate then uses the "
                         "recipe's accuracy thresholds")
    ap.add_argument("--list-quant", action="store_true", help="print the quantization recipes per target and exit")
    ap.add_argument("--no-verify", action="store_true", help="skip the parity gate")
    ap.add_argument("--verify-steps", type=int, default=64, help="decode steps of the parity gate")
    ap.add_argument("--no-engine-check", action="store_true",
                    help="litertlm: skip running the bundle in LiteRT-LM itself (done by default when the "
                         "litert-lm-api package is installed)")
    ap.add_argument("--no-vision", action="store_true",
                    help="Gemma 3 4B+: export the text model only (default: with the vision encoder and "
                         "image prefill signatures when the weights have a vision tower)")
    ap.add_argument("--list-models", action="store_true", help="print the registry and exit")
    return ap.parse_args(argv)


def load_source(args):
    from models import get_config, init_params, load_checkpoint

    if args.checkpoint is not None:
        if args.random_init is not None:
            raise ValueError("pass either --checkpoint or --random-init, not both")
        return load_checkpoint(args.checkpoint, args.model, vision=not args.no_vision)
    if args.model is None:
        raise ValueError("pass --model NAME (see --list-models) or --checkpoint PATH")
    if args.random_init is None:
        raise ValueError(f"no weights for {args.model}: pass --checkpoint PATH, or --random-init SEED "
                         "for an architecture dry run")
    cfg = get_config(args.model)
    params = init_params(cfg, args.random_init)
    if cfg.vision is not None and not args.no_vision:
        from models.vision import init_vision_params

        params.update(init_vision_params(cfg.vision, cfg.embed_dim, args.random_init))
    from models.multimodal import with_vision

    return with_vision(cfg, params), params


def check_output(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"output folder {out} is not writable; pass --out to a writable folder")


def parse_prefill_lens(text: str, max_len: int) -> list[int]:
    try:
        lens = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--prefill-lens '{text}' is not a comma-separated list of integers") from None
    for t in lens:
        if t < 2 or t > max_len:
            raise ValueError(f"prefill length {t} must be between 2 and the context ({max_len}); "
                             "lower --prefill-lens or raise --max-seq-len")
    return lens


def verify_prompts(cfg, max_len: int, lens: list[int], steps: int) -> list[list[int]]:
    """Prompts that cross the sliding window and wrap the ring during decode: a long one (two
    prefill chunks when they fit), a short one; tokens drawn from the vocabulary after BOS."""
    rng = np.random.default_rng(0)
    window = cfg.sliding_window
    # decode from window - steps/2 onwards crosses the window and wraps the local rings
    long_len = min(max(lens[-1] + lens[0] // 2, window - steps // 2), max_len - steps)
    short_len = min(max(3, window // 2), max_len - steps)
    prompts = []
    for n in (long_len, short_len):
        if n >= 1:
            p = rng.integers(3, cfg.vocab_size, n).tolist()
            p[0] = cfg.tokens.bos
            prompts.append(p)
    return prompts


def verify_images(cfg, max_len: int, lens: list[int], steps: int):
    """(prompts, images) of the gate's image prompt for a model with vision: text, an image, more
    text, a second image, then text reaching past the sliding window; random pixels in [-1, 1]."""
    v = cfg.vision
    rng = np.random.default_rng(1)
    tail = max(2, min(cfg.sliding_window, max_len - steps - 2 * v.image_length - 8))
    prompt = [cfg.tokens.bos, *rng.integers(3, 250, 3).tolist(), v.boi_token, *rng.integers(3, 250, 2).tolist(),
              v.boi_token, *rng.integers(3, 250, tail).tolist()]
    if len(prompt) + 2 * (v.image_length - 1) + steps > max_len:
        return [], []
    s = v.image_size
    images = [rng.uniform(-1.0, 1.0, (1, s, s, 3)).astype(np.float32) for _ in range(2)]
    return [prompt], [images]


def quant_target(target: str) -> str:
    """The quantization support table a target uses: a .litertlm holds a TFLite model."""
    return "tflite" if target == "litertlm" else target


def engine_check(result, reference, cfg, max_len: int, lens: list[int], steps: int, reference_name: str):
    """Run the bundle in LiteRT-LM: greedy text from a prompt that crosses the sliding window must
    equal the reference session's. None (with a note) when litert-lm-api is not installed."""
    from models.tokenizer import Tokenizer
    from runtime_py import litertlm_engine

    if not litertlm_engine.available():
        print("note: litert-lm-api is not installed, so the bundle was not run in LiteRT-LM itself "
              "(pip install litert-lm-api, or pass --no-engine-check to silence this)")
        return None
    tok = Tokenizer(result.tokenizer)
    n = max(2, min(steps, max_len // 4))
    target = min(cfg.sliding_window + lens[0] // 2 + 1, max_len - n - 1)
    prompt = litertlm_engine.window_crossing_prompt(tok, target, max_len - n - 1)
    stops = cfg.tokens.stop_ids() if cfg.instruction_tuned else (cfg.tokens.eos,)
    with Stage("LiteRT-LM"):
        try:
            return litertlm_engine.check_greedy(result.path, reference, tok, prompt, n, stops,
                                                reference_name=reference_name)
        except RuntimeError as e:  # the engine's own log above says why
            return litertlm_engine.EngineCheck(len(tok.encode(prompt)), False, 0, "", "", reference_name,
                                               error=str(e))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["inspect"]:
        from export.inspect import main as inspect_main

        return inspect_main(argv[1:])
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def list_onnx_ops() -> int:
    import export.lowering.onnx.convert  # noqa: F401  (registers the rules)
    from export.lowering.onnx.fused import OP_SETS
    from export.lowering.onnx.graph import RULES

    print(f"StableHLO ops with an ONNX rule ({len(RULES)}):")
    for name in sorted(RULES):
        doc = (RULES[name].__doc__ or "").strip().splitlines()
        print(f"  {name:<40} {doc[0] if doc else ''}")
    for op_set, table in OP_SETS.items():
        print(f"composites, op set '{op_set}' (others run their decomposition):")
        for name in sorted(table):
            print(f"  {name:<40} {(table[name].__doc__ or '').strip().splitlines()[0]}")
    return 0


def run(args) -> int:
    if args.list_models:
        from models.__main__ import cmd_list

        return cmd_list(args)
    if args.list_onnx_ops:
        return list_onnx_ops()
    if args.list_quant:
        from export.quantize import support_table

        print(support_table())
        return 0
    from export.pipeline import export_onnx, export_tflite

    if args.quant is not None:  # the support table is checked before any work starts
        from export.quantize import check

        check(quant_target(args.target), args.quant, (args.onnx_ops or "default") if args.target == "onnx" else None,
              dtype=args.dtype)
    check_output(args.out)
    if args.target == "litertlm":  # a missing tokenizer is refused before the weights load
        from export.litertlm import find_tokenizer

        find_tokenizer(args.tokenizer or args.checkpoint)
    with Stage("load"):
        cfg, params = load_source(args)
        n = sum(p.size for p in params.values())
        nv = sum(p.size for k, p in params.items() if k.startswith(("vision.", "mm.")))
        vision = f", of which vision tower {nv / 1e6:.1f}M" if nv else ""
        print(f"  {cfg.name} ({cfg.family.value}): {n / 1e6:.1f}M parameters{vision}")
    max_len = args.max_seq_len or min(4096, cfg.max_seq_len)
    if max_len < 2:
        raise ValueError(f"--max-seq-len {max_len} is too small")
    if args.prefill_lens is None and args.target == "onnx":
        lens = [t for t in DEFAULT_PREFILL_LENS if t <= max_len] or [max(2, max_len // 2)]
    else:
        lens = parse_prefill_lens(args.prefill_lens or ",".join(map(str, DEFAULT_PREFILL_LENS)), max_len)
    if cfg.vision is not None:
        from export.signatures import image_prefill_lengths

        n = cfg.vision.tokens_per_image
        if args.prefill_lens is None and max(lens) < n <= max_len:  # the default lengths hold no image
            lens.append(min(1 << (n - 1).bit_length(), max_len))
        image_prefill_lengths(cfg, lens)
    if args.target == "litertlm":  # the rest of the bundle's checks, before the export starts
        from export.litertlm import preflight

        preflight(cfg, lens, args.tokenizer or args.checkpoint)
    if args.target == "onnx":
        op_set = args.onnx_ops or ("standard" if cfg.vision is not None else "default")
        if args.onnx_ops is None and cfg.vision is not None:
            print("note: a model with vision exports with --onnx-ops standard (GroupQueryAttention cannot "
                  "express the bidirectional attention inside an image; --no-vision keeps it for text)")
            if args.quant is not None:
                from export.quantize import QuantizationError, check

                try:
                    check("onnx", args.quant, op_set, dtype=args.dtype)
                except QuantizationError:
                    raise QuantizationError(
                        f"--quant {args.quant} is not available with --onnx-ops standard, which a model with vision "
                        "exports with (GroupQueryAttention cannot express the attention inside an image): use "
                        "--quant fp16 (see python -m export --list-quant), or --no-vision") from None
        tokenizer = args.tokenizer or args.checkpoint
        if tokenizer is not None and not Path(tokenizer).exists():
            raise ValueError(f"tokenizer not found: {tokenizer}")
        result = export_onnx(cfg, params, out_dir=args.out, max_len=max_len, dtype=args.dtype,
                             op_set=op_set, tokenizer_source=tokenizer, stage=Stage, lens=lens,
                             quant=args.quant)
        if not result.tokenizer_files:
            print(f"warning: no tokenizer found{f' in {tokenizer}' if tokenizer else ''}: {result.path} has "
                  "the model and genai_config.json but onnxruntime-genai also needs tokenizer.json and "
                  "tokenizer_config.json; pass --tokenizer PATH (a folder with tokenizer.json or a "
                  "SentencePiece tokenizer.model)", file=sys.stderr)
    elif args.target == "litertlm":
        from export.pipeline import export_litertlm

        result = export_litertlm(cfg, params, out_dir=args.out, max_len=max_len, prefill_lens=lens,
                                 tokenizer=args.tokenizer or args.checkpoint, dtype=args.dtype, stage=Stage,
                                 progress=progress, quant=args.quant)
    else:
        result = export_tflite(cfg, params, out_dir=args.out, max_len=max_len, prefill_lens=lens,
                               dtype=args.dtype, stage=Stage, progress=progress, quant=args.quant)
    print(result.summary())
    if args.no_verify:
        return 0
    from runtime_py import load, parity, reference_session

    steps = max(1, min(args.verify_steps, max_len - 4))
    with Stage("verify"):
        # the reference holds its own (device) copy of the weights: drop the host copies before the
        # runtime loads the artifact, so the gate needs about twice the weights, not three times
        reference = reference_session(cfg, result.reference_params, lens, max_len)
        result.reference_params = result.stored_params = params = None
        session = load(result.path)
        prompts = verify_prompts(cfg, max_len, lens, steps)
        images = [None] * len(prompts)
        if result.cfg.vision is not None:
            more, imgs = verify_images(result.cfg, max_len, lens, steps)
            prompts, images = prompts + more, images + imgs
        report = parity(reference, session, prompts, steps, images)
        engine = None
        if args.target == "litertlm" and not args.no_engine_check:
            # float bundles against the JAX model; quantized ones (whose gate above measured them
            # against JAX) against our interpreter running the same bundle
            engine = engine_check(result, reference if result.quant is None else session, cfg, max_len, lens,
                                  steps, "the JAX model" if result.quant is None else "runtime_py's interpreter")
        del session
        tol, greedy = TOLERANCE, min(GREEDY_STEPS, steps)
        if result.quant is None:
            ok, failures, gate = report.passes(tol, greedy), [], {"tolerance_rel_rms": tol,
                                                                  "greedy_steps_required": greedy}
        else:
            from export.quantize import RECIPES

            failures = RECIPES[result.quant].gate.failures(report)
            ok, gate = not failures, {"quantization": result.quant, **RECIPES[result.quant].gate.as_dict()}
        parity_path = result.path / "parity.json" if result.path.is_dir() else result.path.with_suffix(".parity.json")
        tmp = parity_path.with_name(parity_path.name + ".tmp")
        extra = {"litert_lm": engine.as_dict()} if engine is not None else {}
        tmp.write_text(report.to_json(artifact=result.path.name, gate=gate, passed=ok, **extra))
        os.replace(tmp, parity_path)
    worst = report.worst()
    if engine is not None:
        print(engine.line(), file=sys.stdout if engine.match else sys.stderr)
        if not engine.match and engine.error is None:
            print(f"  reference: {engine.reference_text!r}\n  LiteRT-LM: {engine.engine_text!r}", file=sys.stderr)
    engine_failed = engine is not None and not engine.match  # exits 1 after the gate's own report
    if result.quant is None:
        print(f"parity: max rel RMS {report.max_rel_rms:.2e} (tolerance {tol:.0e}), max abs "
              f"{report.max_abs:.2e}, top-1 agreement {report.top1_agreement:.3f}, greedy match "
              f"{report.greedy_match} of {report.decode_steps} -> {'PASS' if ok else 'FAIL'} ({parity_path})")
    else:
        print(f"parity ({result.quant} vs the f32 model): mean rel RMS {report.mean_rel_rms:.2e} "
              f"(SQNR {report.sqnr_db:.1f} dB), top-1 agreement {report.top1_agreement:.3f} "
              f"({report.top1_agreement_ties:.3f} counting ties), mean KL "
              f"{report.mean_kl:.2e}, greedy match {report.greedy_match} of {report.decode_steps} -> "
              f"{'PASS' if ok else 'FAIL'} ({parity_path})")
        if failures and args.random_init is not None:
            # the gates are calibrated on trained weights; random ones give nearly flat logits, on
            # which quantization error is relatively larger and top-1 decided by noise
            print(f"warning: the {result.quant} gate is not met on random weights ({'; '.join(failures)}); "
                  "its thresholds hold for trained checkpoints (docs/quantization.md)", file=sys.stderr)
            return int(engine_failed)
        if failures:
            print(f"parity failed the {result.quant} gate: {'; '.join(failures)}", file=sys.stderr)
            return 1
        return int(engine_failed)
    if not ok:
        print(f"parity failed: worst at signature {worst.signature}, prompt {worst.prompt}, step "
              f"{worst.step} (position {worst.position}): rel RMS {worst.rel_rms:.2e}, max abs "
              f"{worst.max_abs:.2e}", file=sys.stderr)
        return 1
    return int(engine_failed)


if __name__ == "__main__":
    sys.exit(main())
