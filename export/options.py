"""What an export is asked to do: one frozen options object, checked once (`validate`) before any
weights load; `resolve` fills in what depends on the model (context, prefill lengths, op set,
tokenizer, output path) and runs the target's own preflight, still before any work.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


DTYPES = ("f32", "bf16", "f16")
GATE_MODES = ("auto", "memory", "streamed")
INT4_METHODS = ("mse", "gptq")  # how int4 codes are chosen (export/quantize/blocks.py, export/quantize/gptq.py)  # the parity gate's reference (verify/gate.py, export/memory.py)
DEFAULT_PREFILL_LENS = (32, 128)
DEFAULT_CONTEXT = 4096  # capped by the model's own context


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    out_dir: Path = Path("artifacts")
    max_len: int | None = None  # the global caches' context; default min(4096, the model's)
    prefill_lens: tuple[int, ...] | None = None
    # TFLite context buckets (ctx{L}_* signatures); None: 512 and 4096, 16384, 65536 ... below a context above 1024;
    # () for none (models/signatures.context_buckets)
    context_buckets: tuple[int, ...] | None = None  # default DEFAULT_PREFILL_LENS (+ one that holds an image)
    dtype: str = "f32"  # stored float weights, without a recipe
    quant: str | None = None  # a quantization recipe (export/quantize/recipes.py)
    int4_method: str = "mse"  # int4 recipes: per-block error search, or GPTQ on calibration text
    calibration_text: Path | None = None  # GPTQ's / smoothing's text; default export/quantize/calibration.txt
    gptq_damp: float | None = None  # GPTQ's damping, a share of H's mean diagonal; None: gptq.default_damp
    smoothing: bool = True  # TFLite dynamic-int8: activation smoothing folded into the weights (export/quantize/smooth.py)
    rotation: bool = True  # dynamic-int8 (TFLite), int4: matmul inputs rotated per block (export/quantize/rotate.py)
    onnx_ops: str | None = None  # onnx: "default" | "standard"; None picks (standard for vision)
    # onnx integer recipes: MatMulNBits' compute, "int8" (accuracy_level 4: activations int8 per block,
    # ONNX Runtime's fast path) or "f32" (accuracy_level 1: less memory, half the decode speed; docs/memory.md)
    onnx_compute: str = "int8"
    tokenizer: Path | None = None  # default: the checkpoint folder
    name: str | None = None  # the artifact's file (or folder) name; default from model, recipe, context
    verify: bool = True  # run the parity gate
    verify_steps: int = 64
    kv_cache: str = "f32"  # KV cache storage: f32 | int8 (TFLite; models/cache.quantize_kv)
    verify_long: int = 0  # tokens of the gate's long check (verify/long.py); 0: none
    # draft tokens per speculative step: a verify_{K+1} signature and rewindable caches (TFLite);
    # 0: none (models/config.ModelConfig.rewind, runtime_py/speculative.py)
    speculative: int = 0
    # TFLite: trace odml.rms_norm and odml.scaled_dot_product_attention as plain ops (faster on
    # CPU; GPU/NPU delegates lose their fused kernels): models/fused.CPU_INLINED
    inline_composites: bool = False
    gate: str = "auto"  # the parity gate's reference: memory | streamed | auto (verify/gate.py, export/memory.py)
    engine_check: bool = True  # litertlm: run the bundle in LiteRT-LM after the gate
    random_weights: bool = False  # the weights are a random init: a quantized gate only warns
    untrained_context: bool = False  # allow --max-seq-len beyond the model's trained context
    verbose: bool = False  # print stages and progress

    def validate(self, target: str):
        """Every check that needs no model; ValueError with one line naming the problem and the fix."""
        from export.targets import TARGETS

        if target not in TARGETS:
            raise ValueError(f"unknown target '{target}'; choose from {', '.join(TARGETS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype '{self.dtype}'; choose from {', '.join(DTYPES)}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"--max-seq-len {self.max_len} is too small; pass a context of at least 2 tokens")
        if self.gate not in GATE_MODES:
            raise ValueError(f"unknown --gate '{self.gate}'; choose {', '.join(GATE_MODES)}")
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise ValueError(f"--tokenizer {self.tokenizer} does not exist; pass a tokenizer.model (or the folder "
                             "holding it)")
        if self.verify_steps < 1:
            raise ValueError(f"--verify-steps {self.verify_steps} must be at least 1")
        from models.cache import KV_DTYPES

        if self.kv_cache not in KV_DTYPES:
            raise ValueError(f"unknown --kv-cache '{self.kv_cache}'; choose {', '.join(KV_DTYPES)}")
        if self.verify_long:
            if self.verify_long < 2:
                raise ValueError(f"--verify-long {self.verify_long} is too short; pass a prompt length past the "
                                 "sliding window (e.g. 8192)")
            if not self.verify:
                raise ValueError("--verify-long is part of the parity gate: drop --no-verify, or drop --verify-long")
            if self.gate == "streamed":
                raise ValueError("--verify-long runs the JAX model beside the artifact: pass --gate memory (or "
                                 "auto), or drop --verify-long")
        if self.speculative < 0:
            raise ValueError(f"--speculative {self.speculative} must be a number of draft tokens (e.g. 4), or 0")
        if self.speculative and not TARGETS[target].speculative:
            raise ValueError(f"--speculative is TFLite's (verify_K signatures; the {target} graph returns the last "
                             "position's logits only): export --target tflite or litertlm, or drop --speculative")
        if self.inline_composites and not TARGETS[target].inline_composites:
            raise ValueError(f"--inline-composites is TFLite's (the {target} lowering replaces the composites itself); "
                             "drop it")
        if self.int4_method not in INT4_METHODS:
            raise ValueError(f"unknown --int4-method '{self.int4_method}'; choose {', '.join(INT4_METHODS)}")
        if self.int4_method != "mse" and (self.quant is None or not self.quant.startswith("int4")):
            raise ValueError(f"--int4-method {self.int4_method} chooses int4 codes: pass an int4 recipe "
                             "(--quant int4-b32, int4-b128 or int4-b32-e8), or drop --int4-method")
        if self.gptq_damp is not None:
            if self.int4_method != "gptq":
                raise ValueError("--gptq-damp is GPTQ's damping: add --int4-method gptq, or drop --gptq-damp")
            if not 0.0 < self.gptq_damp <= 10.0:
                raise ValueError(f"--gptq-damp {self.gptq_damp} is out of range: pass a share of the statistic's "
                                 "mean diagonal above 0 and at most 10 (default 0.3)")
        if self.calibration_text is not None:
            from export.quantize.smooth import wanted

            if self.int4_method != "gptq" and not wanted(self.quant, TARGETS[target].quant_table, self.smoothing):
                raise ValueError("--calibration-text is read by --int4-method gptq and by TFLite's dynamic-int8 "
                                 "smoothing: add one of them, or drop --calibration-text")
            if not Path(self.calibration_text).is_file():
                raise ValueError(f"--calibration-text {self.calibration_text} is not a file; pass a UTF-8 text file")
        if self.onnx_compute not in ("int8", "f32"):
            raise ValueError(f"unknown --onnx-compute '{self.onnx_compute}'; choose int8 or f32")
        if self.onnx_compute != "int8" and (target != "onnx" or self.quant is None or self.onnx_ops == "standard"):
            raise ValueError("--onnx-compute sets ONNX Runtime's MatMulNBits compute: it needs --target onnx, a --quant "
                             "recipe and the default op set; drop it")
        if self.quant is not None:
            from export.quantize import check

            check(TARGETS[target].quant_table, self.quant, self.onnx_ops or "default" if target == "onnx" else None,
                  dtype=self.dtype)
        TARGETS[target].check_options(self)
        check_output(self.out_dir)

    def context(self, model_context: int) -> int:
        return self.max_len or min(DEFAULT_CONTEXT, model_context)


def check_output(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"output folder {out} is not writable; pass --out to a writable folder")


def parse_prefill_lens(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"--prefill-lens '{text}' is not a comma-separated list of integers") from None


def parse_buckets(text: str | None) -> tuple[int, ...] | None:
    """--context-buckets: None (the default set), 'none' (), or a comma-separated list."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"--context-buckets '{text}' is not a comma-separated list of lengths (or 'none')") from None


def check_prefill_lens(lens, max_len: int) -> list[int]:
    lens = sorted(set(lens))
    for t in lens:
        if t < 2 or t > max_len:
            raise ValueError(f"prefill length {t} must be between 2 and the context ({max_len}); "
                             "lower --prefill-lens or raise --max-seq-len")
    return lens


__all__ = ["DEFAULT_PREFILL_LENS", "DTYPES", "ExportOptions", "check_output", "check_prefill_lens",
           "parse_buckets", "parse_prefill_lens"]
