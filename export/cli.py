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

The command line parses into one frozen Request (the weights' source, the target, the
ExportOptions), validated once before any weights load; the driver (export/driver.py) does the
rest, and this module prints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
from pathlib import Path

from export.options import DTYPES, GATE_MODES, INT4_METHODS, ExportOptions, parse_buckets, parse_prefill_lens


@dataclasses.dataclass(frozen=True)
class Request:
    target: str
    options: ExportOptions
    model: str | None = None
    checkpoint: Path | None = None
    random_init: int | None = None
    vision: bool = True
    memory_check: bool = True
    gguf_blocks: str = "keep"  # "requantize": a GGUF's own blocks are not carried (--gguf-blocks)

    def validate(self):
        """Every check that needs no weights (the options', and where the weights come from)."""
        if self.checkpoint is not None and self.random_init is not None:
            raise ValueError("pass either --checkpoint or --random-init, not both")
        if self.checkpoint is not None and not Path(self.checkpoint).exists():
            raise ValueError(f"--checkpoint {self.checkpoint} does not exist; pass a Hugging Face or Orbax (official "
                             "Flax) checkpoint folder, or a .gguf file")
        if self.checkpoint is None:
            if self.model is None:
                raise ValueError("pass --model NAME (see --list-models) or --checkpoint PATH")
            if self.random_init is None:
                raise ValueError(f"no weights for {self.model}: pass --checkpoint PATH, or --random-init SEED "
                                 "for an architecture dry run")
            from models import get_config

            get_config(self.model)  # an unknown name fails here, in one line
        if self.gguf_blocks != "keep" and (not self.gguf or self.options.quant in (None, "fp16")):
            raise ValueError(f"--gguf-blocks {self.gguf_blocks} is about a GGUF checkpoint's own quantized blocks: "
                             "pass it with a .gguf --checkpoint and an integer --quant recipe, or leave it out")
        self.options.validate(self.target)
        cfg = self.config()
        if cfg is None:  # a checkpoint whose config cannot be read here: the loader says why
            return
        from export.driver import resolve

        resolve(cfg, self.target, self.options)  # context, prefill lengths, recipe x model, tokenizer
        extra = self.source_extra_bytes(cfg)  # a GGUF's header, read once for both checks
        if self.memory_check:
            self.check_memory(cfg=cfg, extra=extra)
        self.check_disk(cfg, extra=extra)

    def config(self):
        """The model's config before any weights load (the registry's, or the checkpoint's own
        config: config.json, GGUF metadata); the vision tower dropped for --no-vision. None when
        the checkpoint's config cannot be read without loading it."""
        from models import get_config

        if self.checkpoint is None:
            cfg = get_config(self.model)
        else:
            from models.loaders import CheckpointError, detect_format, resolve_config

            try:
                cfg = resolve_config(self.checkpoint, self.model, detect_format(self.checkpoint))
            except (CheckpointError, ValueError, OSError, KeyError):
                return None
        return cfg if self.vision else dataclasses.replace(cfg, vision=None)

    def check_memory(self, available: int | None = None, cfg=None, extra: int | None = None):
        """Refuse, before any weights load, an export whose estimated peak memory exceeds this
        machine's (export/memory.py). A config that cannot be read here is left to the loader.
        `extra`: `source_extra_bytes(cfg)` where the caller has it."""
        from export.memory import check_fits

        cfg = cfg or self.config()
        if cfg is None:
            return
        o = self.options
        from export.quantize.smooth import wanted
        from export.targets import TARGETS

        check_fits(cfg, self.target, o.quant, o.dtype, o.verify, self.vision, available, gate=o.gate,
                   gptq=o.int4_method == "gptq", smooth=wanted(o.quant, TARGETS[self.target].quant_table, o.smoothing),
                   extra_artifact=self.source_extra_bytes(cfg) if extra is None else extra)

    def check_disk(self, cfg, free: int | None = None, extra: int | None = None):
        """Refuse an export whose artifact (estimated from the config) would not fit the free space
        of --out, with both numbers. `extra`: `source_extra_bytes(cfg)` where the caller has it."""
        import shutil

        from export.memory import GiB, estimate

        extra = self.source_extra_bytes(cfg) if extra is None else extra
        need = int(1.05 * (estimate(cfg, self.target, self.options.quant, self.options.dtype, verify=False,
                                    vision=self.vision).artifact_bytes + extra)) + 64 * 2**20
        free = shutil.disk_usage(self.options.out_dir).free if free is None else free
        if need > free:
            raise ValueError(f"the artifact needs about {need / GiB:.1f} GiB and {self.options.out_dir} has "
                             f"{free / GiB:.1f} GiB free; free some space or pass --out on another disk")

    @property
    def gguf(self) -> bool:
        from models.loaders.gguf import is_gguf

        return self.checkpoint is not None and is_gguf(self.checkpoint)

    def load(self):
        """(final config, params) from the checkpoint or a random init; the text model's weights
        lazy (models/lazy.py), read one tensor at a time as the export writes them."""
        from models import get_config, init_model, load_checkpoint

        if self.checkpoint is not None:
            return load_checkpoint(self.checkpoint, self.model, vision=self.vision, lazy=True)
        return init_model(get_config(self.model), self.random_init, vision=self.vision, lazy=True)

    def source_extra_bytes(self, cfg) -> int:
        """What a GGUF's own blocks add to the recipe's artifact (export/quantize/sizes.ideal_bytes),
        from the file's header: the layers its mix keeps at 8 bits (4 more bits per weight in an
        int4 recipe) and the f32 offsets of the 4-bit blocks that need them (one per 32 weights: Q4_K
        on both targets, Q4_0 on TFLite, driver.offsets_apart). 0 otherwise."""
        from export.quantize.recipes import RECIPES
        from export.targets import TARGETS

        if not self.carried_from_gguf:
            return 0
        from models.loaders.gguf import GGUFFile, source_blocks

        f = GGUFFile(self.checkpoint)  # its header parsed once for both questions
        recipe, kept, extra = RECIPES[self.options.quant], self.kept(cfg, f), 0
        tflite = TARGETS[self.target].quant_table == "tflite"
        # f32 offsets, one per 32 weights (carried at int4-b32 only): Q4_K's on both targets, Q4_0's
        # (negative scales) on TFLite (driver.offsets_apart); a table only on TFLite at int4
        with_offsets = ("q4_k", "q4_0") if tflite else ("q4_k",)
        table_carried = tflite and recipe.table_bits is None
        for name, (kind, shape, _decode) in source_blocks(f, cfg, lazy=True).items():
            if name in kept:
                extra += shape[0] * shape[1] * (8 - recipe.bits) // 8
            elif recipe.block == 32 and kind in with_offsets and (name != "embed" or table_carried):
                extra += shape[0] * shape[1] // 32 * 4
        return extra

    @property
    def carried_from_gguf(self) -> bool:
        """Whether the checkpoint's own blocks go into the artifact: a GGUF, an integer recipe and
        --gguf-blocks keep."""
        return self.gguf and self.options.quant not in (None, "fp16") and self.gguf_blocks == "keep"

    def kept(self, cfg, gguf=None) -> set[str]:
        """The layers a mixed-precision GGUF (Q4_K_M, ...) holds at 6-8 bits while its others are
        4-5 bits (models.loaders.gguf.mix_kept): the int4 (block) recipes write them at 8 bits.
        `gguf`: the checkpoint already open (a GGUFFile), else it is opened here."""
        from export.quantize.recipes import RECIPES

        if not self.carried_from_gguf or not RECIPES[self.options.quant].block:
            return set()
        from models.loaders.gguf import mix_kept

        return mix_kept(self.checkpoint if gguf is None else gguf, cfg)

    def carried(self, cfg) -> dict | None:
        """A GGUF checkpoint's own Q4_0 / Q8_0 / Q4_K / Q6_K blocks, written exactly where the
        target's format holds them (export/quantize/blocks.py, driver.usable_carried): int4-b32
        recipes take Q4_0 and Q4_K (TFLite: its offsets as a second matmul, driver.offsets_apart),
        ONNX's 8-bit MatMulNBits Q8_0 and Q6_K."""
        if not self.carried_from_gguf:
            return None
        from export.quantize.blocks import pending_source_blocks
        from models.loaders.gguf import source_blocks

        return {n: pending_source_blocks(*b) for n, b in source_blocks(self.checkpoint, cfg, lazy=True).items()}


@contextlib.contextmanager
def gguf_tokenizer(request: Request):
    """The request, with --tokenizer pointing at a SentencePiece tokenizer.model rebuilt from the
    GGUF's vocabulary (models/loaders/gguf_tokenizer.py) when the tokenizer source is a GGUF file
    (the default for a GGUF checkpoint); the file lives in a scratch folder for the export's
    duration (the artifact bundles or converts it)."""
    from models.loaders.gguf import is_gguf

    source = request.options.tokenizer
    if source is None or not is_gguf(source):
        yield request
        return
    from models.loaders.gguf import config_from_gguf
    from models.loaders.gguf_tokenizer import write_tokenizer

    config_from_gguf(Path(source))  # an unsupported file is named by its architecture first, not its vocabulary
    with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as scratch:
        path = Path(scratch) / "tokenizer.model"
        write_tokenizer(Path(source), path)
        yield dataclasses.replace(request, options=dataclasses.replace(request.options, tokenizer=path))


EPILOG = """examples:
  python -m export --model gemma3-270m --random-init 0              # dry run: random weights, .tflite
  python -m export --checkpoint ./gemma-3-1b-it --target litertlm --quant int4-b32
  python -m export --checkpoint gemma-3-270m-Q4_K_M.gguf --target onnx --quant int4-b32
  python -m export --checkpoint ./gemma-3-4b-it --target tflite --prefill-lens 32,128,256   # with vision
  python -m export inspect artifacts/gemma3-270m_f32_ctx4096.tflite                   # what a file holds

subcommands:
  inspect ARTIFACT [--json]   signatures, states, weights, metadata and the parity verdict of an artifact

Every export runs the parity gate against the JAX model (unless --no-verify) and writes
NAME.parity.json beside the artifact; a failed gate leaves the file as NAME.FAILED.<suffix> and
exits 1. Bad arguments exit 2 with one line, before any weights load. docs/export.md has more."""


def build_parser() -> argparse.ArgumentParser:
    from export.targets import TARGETS

    from contract.cli_help import HelpFormatter, prog

    ap = argparse.ArgumentParser(prog=prog("export"), description=__doc__.split("\n")[0], epilog=EPILOG,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", help="registry name; optional with a --checkpoint holding config.json")
    ap.add_argument("--checkpoint", type=Path,
                    help="HF safetensors folder, official Orbax folder, or a GGUF file (llama.cpp's gemma2 / "
                         "gemma3; its tokenizer is rebuilt from the GGUF vocabulary)")
    ap.add_argument("--random-init", type=int, metavar="SEED", help="random weights (architecture dry run)")
    ap.add_argument("--target", choices=list(TARGETS), default="tflite",
                    help="; ".join(f"{name}: {t.help}" for name, t in TARGETS.items()))
    ap.add_argument("--onnx-compute", choices=["int8", "f32"], default="int8",
                    help="onnx with a --quant recipe: how ONNX Runtime's MatMulNBits computes. 'int8' (default): "
                         "activations quantized per block inside the kernel (accuracy_level 4), the fast path; "
                         "'f32' (accuracy_level 1): its packed weights are the codes alone (gemma3-1b int4-b32: "
                         "runtime RSS 1.28x the folder, peak too, instead of 1.46x / 1.84x), at about half the "
                         "decode speed (docs/memory.md)")
    ap.add_argument("--onnx-ops", choices=["default", "standard"], default=None,
                    help="onnx: 'default' uses ONNX Runtime's GroupQueryAttention; 'standard' only standard "
                         "ONNX ops (attention as model-local functions), for runtimes without contrib ops. "
                         "Default: 'default', or standard attention for a model with vision or --kv-cache int8 "
                         "(GroupQueryAttention cannot express the bidirectional attention inside an image, nor "
                         "hold an int8 cache on CPU), with a recipe's contrib matmuls")
    ap.add_argument("--tokenizer", type=Path,
                    help="tokenizer folder or tokenizer.model/.json (default: the --checkpoint folder); "
                         "litertlm needs a SentencePiece tokenizer.model")
    ap.add_argument("--list-onnx-ops", action="store_true", help="print the ONNX lowering's op coverage and exit")
    ap.add_argument("--out", type=Path, default=Path("artifacts"), help="output folder")
    ap.add_argument("--max-seq-len", type=int,
                    help="context of the global caches (default: min(4096, the model's trained context))")
    ap.add_argument("--untrained-context", action="store_true",
                    help="allow a --max-seq-len beyond the model's trained context (Gemma 2: 8192; Gemma 3: 32768 "
                         "for 1B, 131072 for 4B and up); RecurrentGemma takes any length without it")
    ap.add_argument("--kv-cache", choices=["f32", "int8"], default="f32",
                    help="KV cache storage: int8 stores each cached row with one float32 scale per row and head "
                         "(4x smaller caches, quantized on write inside the graph); the parity gate then measures it "
                         "against the f32-cache model (docs/long_context.md). On ONNX the attention is then the standard "
                         "op set's (a folder runtime_py runs; onnxruntime-genai cannot)")
    ap.add_argument("--context-buckets", default=None, metavar="L1,L2|none",
                    help="TFLite: extra ctx{L}_prefill_T / ctx{L}_decode signatures whose global layers attend over "
                         "the first L cache rows only, so decode and prefill cost follows the context in use; "
                         "runtime_py picks the smallest that holds the sequence (LiteRT-LM runs the full-length "
                         "ones). Default above a 1024 context: 512, then 4096,16384,65536... below --max-seq-len; 'none' for none")
    ap.add_argument("--speculative", type=int, default=0, metavar="K",
                    help="TFLite, .litertlm: export for speculative decoding with up to K draft tokens per step: a "
                         "verify_{K+1} signature (logits at every position) and local caches K rows longer than the "
                         "window, so the runtime can rewind past rejected tokens. Export the target and the draft "
                         "(e.g. gemma3-270m) with the same K; run them with `python -m runtime_py generate --draft` "
                         "(docs/decode.md)")
    ap.add_argument("--inline-composites", action="store_true",
                    help="TFLite, .litertlm: trace RMS norm and attention as plain ops instead of the odml.* "
                         "composites: faster on CPU (XNNPACK runs the graph as one partition instead of one per "
                         "composite), but GPU/NPU delegates no longer see the ops "
                         "they swap fused kernels in for (docs/decode.md)")
    ap.add_argument("--prefill-lens", default=None,
                    help="comma-separated prefill signature lengths (tflite; default 32,128). onnx takes "
                         "any length and uses these only to shape the parity prompts")
    ap.add_argument("--dtype", choices=DTYPES, default="f32", help="stored weight dtype (without --quant)")
    ap.add_argument("--quant", metavar="RECIPE",
                    help="post-training quantization recipe: fp16, int8, dynamic-int8, int4-b32, int4-b128, int4-b32-e8 "
                         "(see --list-quant for which target runs which); the parity gate then uses the "
                         "recipe's accuracy thresholds")
    ap.add_argument("--int4-method", choices=INT4_METHODS, default="mse",
                    help="how the int4 recipes choose codes: mse (default: per-block least-error scales, no data) "
                         "or gptq (error-compensating rounding from the model's own activations on a calibration "
                         "text shipped with the project; more accurate, minutes longer; same file and speed)")
    ap.add_argument("--gptq-damp", type=float, default=None, metavar="SHARE",
                    help="--int4-method gptq: the damping added to the calibration statistic's diagonal, as a share "
                         "of its mean (default 0.1 for ONNX's codes with zero points, 0.3 for TFLite's symmetric ones; "
                         "lower fits the calibration text more closely: "
                         "docs/quantization.md#gptq---int4-method-gptq)")
    ap.add_argument("--gguf-blocks", choices=["keep", "requantize"], default="keep",
                    help="a GGUF checkpoint's own blocks with --quant: keep (default: written exactly where the "
                         "target's format holds them, Q4_0 and Q4_K into int4, Q8_0 and Q6_K into ONNX's 8-bit "
                         "MatMulNBits, and the layers a 4-bit mix such as Q4_K_M keeps at 6-8 bits stay 8-bit; "
                         "TFLite adds a small f32 matmul per Q4_K / Q4_0 weight for their offsets and negative "
                         "scales: 4-18%% slower decode measured) or requantize (every weight dequantized and quantized by the "
                         "recipe alone)")
    ap.add_argument("--calibration-text", type=Path, metavar="FILE",
                    help="the calibration text of GPTQ and of TFLite's dynamic-int8 smoothing (UTF-8; a few thousand "
                         "tokens or more, like what the model will read); default: export/quantize/calibration.txt, "
                         "English prose and Python code")
    ap.add_argument("--no-smoothing", action="store_true",
                    help="TFLite dynamic-int8: skip the activation smoothing folded into the weights (on by default "
                         "where a tokenizer is found; halves the recipe's KL to f32 on real weights)")
    ap.add_argument("--no-rotation", action="store_true",
                    help="TFLite dynamic-int8 and the int4 recipes: skip the Hadamard rotation of the matmul inputs "
                         "(on by default; ONNX int4 rotates only the inputs where it lowers the weights' error; "
                         "export/quantize/rotate.py)")
    ap.add_argument("--list-quant", action="store_true", help="print the quantization recipes per target and exit")
    ap.add_argument("--no-verify", action="store_true", help="skip the parity gate")
    ap.add_argument("--skip-memory-check", action="store_true",
                    help="export even when the estimated peak memory exceeds this machine's (export/memory.py)")
    ap.add_argument("--verify-steps", type=int, default=64, help="decode steps of the parity gate")
    ap.add_argument("--verify-long", type=int, default=0, metavar="N",
                    help="add a long check to the parity gate: an N-token prompt prefilled in chunks and decoded, "
                         "compared with the JAX model around every window wrap and chunk boundary up to N "
                         "(verify/long.py; N < --max-seq-len; runs the JAX model in memory)")
    ap.add_argument("--gate", choices=GATE_MODES, default="auto",
                    help="the parity gate's JAX reference: 'memory' holds the f32 model beside the artifact's "
                         "runtime (fastest); 'streamed' runs the artifact first, then the reference one layer at a "
                         "time from the checkpoint (bounded memory); 'auto' streams when the in-memory gate would "
                         "not fit comfortably (docs/memory.md)")
    ap.add_argument("--no-engine-check", action="store_true",
                    help="litertlm: skip running the bundle in LiteRT-LM itself (done by default when the "
                         "litert-lm-api package is installed)")
    ap.add_argument("--no-vision", action="store_true",
                    help="Gemma 3 4B+: export the text model only (default: with the vision encoder and "
                         "image prefill signatures when the weights have a vision tower)")
    ap.add_argument("--stage-memory", action="store_true",
                    help="report each stage's own peak RSS (restarts the process's peak counter at each stage, so "
                         "/usr/bin/time or getrusage on the whole run then see only the last stage's)")
    ap.add_argument("--list-models", action="store_true", help="print the registry and exit")
    return ap


def parse_request(args) -> Request:
    options = ExportOptions(
        out_dir=args.out, max_len=args.max_seq_len,
        prefill_lens=None if args.prefill_lens is None else parse_prefill_lens(args.prefill_lens),
        context_buckets=parse_buckets(args.context_buckets), kv_cache=args.kv_cache,
        dtype=args.dtype, quant=args.quant, int4_method=args.int4_method, gptq_damp=args.gptq_damp,
        calibration_text=args.calibration_text, onnx_ops=args.onnx_ops,
        onnx_compute=args.onnx_compute,
        smoothing=not args.no_smoothing, rotation=not args.no_rotation,
        tokenizer=args.tokenizer or args.checkpoint, verify=not args.no_verify, verify_steps=args.verify_steps,
        verify_long=args.verify_long, speculative=args.speculative, inline_composites=args.inline_composites,
        gate=args.gate,
        engine_check=not args.no_engine_check, random_weights=args.random_init is not None, verbose=True,
        untrained_context=args.untrained_context)
    return Request(args.target, options, args.model, args.checkpoint, args.random_init, not args.no_vision,
                   memory_check=not args.skip_memory_check, gguf_blocks=args.gguf_blocks)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["inspect"]:
        from export.inspect import main as inspect_main

        return inspect_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every writer cleans up after itself: temporary names, scratch folders
        print("\ninterrupted: no artifact was written (partial files removed)", file=sys.stderr)
        return 130


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
    from export import driver

    request = parse_request(args)
    with gguf_tokenizer(request) as request:
        request.validate()
        timer = driver.Timer(verbose=True, stage_peaks=args.stage_memory)
        with timer.stage("load", record=False):
            cfg, params = request.load()
            n = sum(p.size for p in params.values())
            nv = sum(p.size for k, p in params.items() if k.startswith(("vision.", "mm.")))
            vision = f", of which vision tower {nv / 1e6:.1f}M" if nv else ""
            print(f"  {cfg.name} ({cfg.family.value}): {n / 1e6:.1f}M parameters{vision}")
            carried, kept = request.carried(cfg), request.kept(cfg)
        plan = driver.resolve(cfg, request.target, request.options)
        usable = driver.usable_carried(plan, carried)
        if usable:
            kinds = sorted({b.origin for b in usable.values()})
            print(f"  {len(usable)} tensors stored {', '.join(kinds)} in the checkpoint: written exactly where "
                  f"--quant {request.options.quant} holds them")
            if plan.target.quant_table == "tflite" and plan.recipe is not None and plan.recipe.block:
                from export.quantize.blocks import needs_offsets

                offsets = sum(needs_offsets(b) and b.block == plan.recipe.block for b in usable.values())
                if offsets:
                    print(f"  {offsets} of them with per-block offsets (Q4_K's offsets, Q4_0's negative scales: a small "
                          "f32 matmul each, which costs decode speed; --gguf-blocks requantize drops them)")
        if kept:
            print(f"  {len(kept)} layers the checkpoint's mix keeps at 6-8 bits (Q6_K, Q8_0): written at 8 bits")
        result = driver.run(plan, params, timer, consume=True, carried=carried, kept=kept)
        return report(result)


def report(result) -> int:
    """Print the gate's verdict; the exit code (0 pass, 1 a parity or LiteRT-LM failure)."""
    gate = result.gate
    if gate is None:
        print(f"NOT VERIFIED (--no-verify): {result.path} has had no parity check; run the export without "
              "--no-verify to check it against the JAX model")
        return 0
    code = _verdict(result, gate)
    if code:
        print(f"the artifact that failed its gate is left at {result.path} for inspection (not under its final "
              "name)", file=sys.stderr)
    else:
        print(next_step(result))
    return code


def next_step(result) -> str:
    """The command to try the artifact with: runtime_py generate, with --tokenizer where the
    artifact carries none (a .litertlm bundle and an ONNX folder carry theirs)."""
    import shlex

    plan = result.plan
    args = ["python", "-m", "runtime_py", "generate", "--artifact", str(result.path)]
    carries = result.path.suffix == ".litertlm" or result.path.is_dir()
    if not carries:
        tokenizer = plan.tokenizer or plan.options.tokenizer
        if tokenizer is None or "gguf-tokenizer-" in str(tokenizer):  # none, or one rebuilt for this export only
            tokenizer = "TOKENIZER.model"
        args += ["--tokenizer", str(tokenizer)]
    prompt = "Why is the sky blue?" if plan.cfg.instruction_tuned else "The capital of France is"
    args += ["--prompt", prompt]
    note = "  (random weights: expect noise)" if plan.options.random_weights else ""
    return "next: " + " ".join(shlex.quote(a) for a in args) + note


def _verdict(result, gate) -> int:
    r, engine = gate.report, gate.engine
    if engine is not None:
        print(engine.line(), file=sys.stdout if engine.match else sys.stderr)
        if not engine.match and engine.error is None:
            print(f"  reference: {engine.reference_text!r}\n  LiteRT-LM: {engine.engine_text!r}", file=sys.stderr)
    verdict = "PASS" if gate.passed else "FAIL"
    if gate.long is not None:
        lr = gate.long
        probes = sum(1 for st in lr.steps if st.signature != "decode")
        bad = any(f.startswith("long ") for f in gate.failures)
        worst = lr.worst()
        print(f"long check ({gate.long_tokens} tokens: {probes} probed positions, {lr.decode_steps} decode steps): "
              f"max rel RMS {lr.max_rel_rms:.2e}, mean {lr.mean_rel_rms:.2e}, top-1 agreement "
              f"{lr.top1_agreement:.3f}, greedy match {lr.greedy_match[0]} of {lr.decode_steps}, worst at "
              f"{worst.signature} (position {worst.position}) -> {'FAIL' if bad else 'PASS'}",
              file=sys.stderr if bad else sys.stdout)
    if gate.quant is None:
        print(f"parity: max rel RMS {r.max_rel_rms:.2e} (tolerance {gate.gate.max_rel_rms:.0e}), max abs "
              f"{r.max_abs:.2e}, top-1 agreement {r.top1_agreement:.3f}, greedy match "
              f"{r.greedy_match} of {r.decode_steps} -> {verdict} ({gate.path})")
        if gate.failures and not all(f.startswith("long ") for f in gate.failures):
            worst = r.worst()
            print(f"parity failed: worst at signature {worst.signature}, prompt {worst.prompt}, step "
                  f"{worst.step} (position {worst.position}): rel RMS {worst.rel_rms:.2e}, max abs "
                  f"{worst.max_abs:.2e}", file=sys.stderr)
        if gate.failures:
            return 1
        return int(gate.engine_failed)
    print(f"parity ({gate.quant} vs the f32 model): mean rel RMS {r.mean_rel_rms:.2e} "
          f"(SQNR {r.sqnr_db:.1f} dB), top-1 agreement {r.top1_agreement:.3f} "
          f"({r.top1_agreement_ties:.3f} counting ties), mean KL "
          f"{r.mean_kl:.2e}, greedy match {r.greedy_match} of {r.decode_steps} -> {verdict} ({gate.path})")
    if gate.failures and result.plan.options.random_weights:
        # the gates are calibrated on trained weights; random ones give nearly flat logits, on
        # which quantization error is relatively larger and top-1 decided by noise
        print(f"warning: the {gate.quant} gate is not met on random weights ({'; '.join(gate.failures)}); "
              "its thresholds hold for trained checkpoints (docs/quantization.md)", file=sys.stderr)
        return int(gate.engine_failed)
    if gate.failures:
        print(f"parity failed the {gate.quant} gate: {'; '.join(gate.failures)}", file=sys.stderr)
        return 1
    return int(gate.engine_failed)


if __name__ == "__main__":
    sys.exit(main())
