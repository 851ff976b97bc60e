"""The named quantization recipes and the table of which target supports which (the parity gate
each recipe must pass is verify/gates.py's table).

A recipe quantizes every matmul weight (attention, MLP, recurrent-block projections) and the
embedding table; the tied embedding stays one tensor, read both by the lookup and by the logits
matmul. Norm scales, biases, the RG-LRU parameters and the convolution stay f32 (they are a
fraction of a percent of the parameters). Activations and caches stay f32.

What each recipe means on each target (docs/quantization.md has the measurements behind it):

  fp16          weights stored float16, computed in f32 (size only).
  int8          int8 weights, one scale per output channel, dequantized for f32 compute.
  dynamic-int8  int8 weights (symmetric); activations quantized to int8 per row at run time by the
                matmul kernel (TFLite: per-channel weights, with activation smoothing folded in
                where it pays, export/quantize/smooth.py; ONNX: MatMulNBits, a scale per 128
                inputs of each output channel).
  int4-b32      int4 weights, a scale per block of 32 (128) inputs of each output channel,
  int4-b128     scales chosen by a per-block error search, with zero points on ONNX
                (export/quantize/blocks.py); activations quantized per row at run time (TFLite
                dynamic_wi4b{32,128}; ONNX MatMulNBits accuracy_level 4), as the runtimes' fast
                int4 kernels do. A checkpoint's own Q4_0 blocks (GGUF; Google's QAT models) are
                carried over exactly. `--int4-method gptq` (export/quantize/gptq.py) chooses
                the codes from calibration text instead: same layouts, more accurate.
  int4-b32-e8   int4-b32 with the tied embedding / LM head at int8 (per row; ONNX: blocks of
                128): on the real Gemma 3 270M, where the table is 63% of the weights, perplexity
                ratio ~1.3-1.4 instead of ~1.6-1.7, at +50% file and -20..-50% decode speed; the
                table's share (and so the cost) falls with model size.
"""

from __future__ import annotations

import dataclasses

from models.config import Family, ModelConfig


class QuantizationError(ValueError):
    """A recipe that cannot be applied (unknown, unsupported by the target, or not by this model)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    bits: int  # weight bits (16 = float16)
    block: int | None  # inputs per scale; None = one scale per output channel
    dynamic: bool  # activations quantized at run time by the matmul kernel
    table_bits: int | None = None  # the tied embedding / LM head's bits, where not `bits`


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("fp16", "float16 weights, f32 compute", 16, None, False),
    Recipe("int8", "int8 weights per output channel, dequantized to f32", 8, None, False),
    Recipe("dynamic-int8", "int8 weights, int8 activations quantized at run time", 8, None, True),
    Recipe("int4-b32", "int4 weights in blocks of 32, int8 activations at run time", 4, 32, True),
    Recipe("int4-b128", "int4 weights in blocks of 128, int8 activations at run time", 4, 128, True),
    Recipe("int4-b32-e8", "int4-b32 with the embedding / LM head int8: more accurate, larger, slower decode",
           4, 32, True, 8),
]}

# (target, op set) -> {recipe: None if supported, else why not}. Checked before any work starts.
_ONNX_CONTRIB = ("needs ONNX Runtime's contrib ops (MatMulNBits, GatherBlockQuantized); use "
                 "--onnx-ops default, or --quant fp16")
_SUPPORT: dict[tuple[str, str | None], dict[str, str | None]] = {
    ("tflite", None): {name: None for name in RECIPES},
    ("onnx", "default"): {
        "fp16": None,
        "int8": ("ONNX Runtime's CPU has no fast weight-only int8 matmul (MatMulNBits 8-bit with f32 "
                 "compute runs ~10x slower than f32, and a dequantized tied embedding is recomputed "
                 "every step); use --quant dynamic-int8 (int8 weights, int8 activations at run time)"),
        "dynamic-int8": None, "int4-b32": None, "int4-b128": None, "int4-b32-e8": None},
    ("onnx", "standard"): {
        "fp16": None, "int8": _ONNX_CONTRIB, "dynamic-int8": _ONNX_CONTRIB, "int4-b32": _ONNX_CONTRIB,
        "int4-b128": _ONNX_CONTRIB, "int4-b32-e8": _ONNX_CONTRIB},
}


def _key(target: str, op_set: str | None) -> tuple[str, str | None]:
    return (target, None) if target == "tflite" else (target, op_set or "default")


def support(target: str, recipe: str, op_set: str | None = None) -> str | None:
    """None if `target` (with the ONNX op set) runs `recipe`, else the reason it does not."""
    return _SUPPORT[_key(target, op_set)][recipe]


def support_table() -> str:
    """The support table as text (`python -m export --list-quant`)."""
    cols = [("tflite", None), ("onnx", "default"), ("onnx", "standard")]
    head = ["recipe", "tflite", "onnx", "onnx --onnx-ops standard", "what it stores"]
    rows = [[name] + ["yes" if _SUPPORT[c][name] is None else "no" for c in cols] + [r.summary]
            for name, r in RECIPES.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head] + rows]
    notes = sorted({why for c in cols for why in _SUPPORT[c].values() if why})
    return "\n".join(lines + [""] + [f"no: {why}" for why in notes])


def matmul_widths(cfg: ModelConfig) -> dict[str, int]:
    """The contraction (input) width of every quantized matmul of the model."""
    widths = {"embedding / logits (embed_dim)": cfg.embed_dim,
              "attention output (num_heads x head_dim)": cfg.num_heads * cfg.head_dim,
              "MLP down projection (mlp_dim)": cfg.mlp_dim}
    if cfg.family == Family.RECURRENTGEMMA and cfg.recurrent is not None:
        widths["recurrent output (lru_width)"] = cfg.recurrent.lru_width
    if cfg.vision is not None:  # its patch and MLP widths are padded to the block (models.vision.pad_for_blocks)
        widths["vision tower width"] = cfg.vision.width
    return widths


def check(target: str, recipe: str, op_set: str | None = None, cfg: ModelConfig | None = None,
          dtype: str = "f32") -> Recipe:
    """The recipe, after checking that `target` runs it, that the weights are f32 (`dtype`, the
    --dtype storage) and that `cfg`'s matmuls divide into its blocks; raises QuantizationError
    with one line naming the problem and the fix."""
    if recipe not in RECIPES:
        raise QuantizationError(f"unknown quantization recipe '{recipe}'; choose from {', '.join(RECIPES)} "
                                "(python -m export --list-quant)")
    why = support(target, recipe, op_set)
    if why is not None:
        where = target if target == "tflite" else f"onnx (--onnx-ops {op_set or 'default'})"
        raise QuantizationError(f"--quant {recipe} is not supported for --target {where}: {why}")
    if dtype != "f32":
        raise QuantizationError(f"--quant {recipe} quantizes the f32 weights; drop --dtype {dtype}")
    r = RECIPES[recipe]
    if cfg is not None and r.block:
        bad = {k: v for k, v in matmul_widths(cfg).items() if v % r.block}
        if bad:
            what = ", ".join(f"{k} = {v}" for k, v in bad.items())
            smaller = [n for n, o in RECIPES.items() if o.block and o.block < r.block]
            fix = f"use --quant {smaller[0]}" if smaller else "use --quant int8 or dynamic-int8"
            raise QuantizationError(f"--quant {recipe} needs matmul widths divisible by {r.block}, but "
                                    f"{cfg.name} has {what}; {fix}")
    return r
