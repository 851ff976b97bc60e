"""--target tflite: one .tflite holding every signature (prefill_{T}, decode; with vision also
vision_encoder and image_prefill_{T}), the weights shared, our metadata in its metadata table.

Float storage is converted straight into the artifact. An integer recipe converts the f32 model
to a scratch file and quantizes it with ai-edge-quantizer into the artifact
(export/quantize/tflite.py); fp16 is the converter's own 16-bit storage (DEQUANTIZE at load).
"""

from __future__ import annotations

from pathlib import Path

from contract.signatures import EMBEDDINGS, INPUT_POS, LOGITS, TOKENS
from export.targets import Target
from models.cache import state_layout
from models.signatures import all_signatures


class TFLiteTarget(Target):
    name = "tflite"
    help = "one .tflite with prefill_T/decode signatures"
    quant_table = "tflite"

    def artifact_name(self, plan) -> str:
        return f"{plan.cfg.name}_{plan.quant or plan.options.dtype}_ctx{plan.max_len}.tflite"

    def signatures(self, plan):
        return all_signatures(plan.cfg, list(plan.lens), plan.max_len, attention=self.attention)

    def write(self, plan, weights, signatures, tmp: Path, timer):
        from export.lowering.tflite.convert import convert

        metadata = plan.metadata(state_layout(plan.cfg, plan.max_len))
        recipe = None if plan.recipe is None or plan.recipe.bits == 16 else plan.recipe
        float_path = tmp if recipe is None else tmp.with_name(tmp.name + ".float.tmp")
        try:
            with timer.stage("convert"):
                convert(signatures, weights.stored, float_path, compute=weights.compute, progress=timer.progress,
                        metadata=metadata.to_json())
            if recipe is not None:
                from export.quantize.tflite import quantize_file

                with timer.stage(f"quantize {plan.quant}", record="quantize"):
                    quantize_file(float_path, tmp, recipe, weights.blocks, weights.stored)
        finally:
            if recipe is not None and float_path.exists():
                float_path.unlink()
        return metadata, {}

    def describe(self, result) -> list[str]:
        return describe_tflite(result.path, result)


def describe_tflite(path: Path, result) -> list[str]:
    """Size, signatures, decode ops and composites of a TFLite model (a .tflite, or a bundle's)."""
    from export.lowering.tflite.inspect import read

    report = read(path)
    lines = [f"artifact: {path}", result.size_line(report.file_bytes)]
    for name, sig in report.signatures.items():
        ins = {n: list(s) for n, s, _ in sig["inputs"]}
        outs = {n: list(s) for n, s, _ in sig["outputs"]}
        if TOKENS not in ins:  # the vision encoder
            lines.append(f"  signature {name}: " + ", ".join(f"{k}{v}" for k, v in ins.items()) + " -> "
                         + ", ".join(f"{k}{v}" for k, v in outs.items()))
            continue
        embeds = f" embeddings{ins.pop(EMBEDDINGS)}" if EMBEDDINGS in ins else ""
        lines.append(f"  signature {name}: tokens{ins.pop(TOKENS)} input_pos{ins.pop(INPUT_POS)}{embeds} "
                     f"+ {len(ins)} states -> logits{outs.pop(LOGITS)} + {len(outs)} states")
    decode = report.op_histogram.get("decode", {})
    top = ", ".join(f"{op} {n}" for op, n in decode.most_common(12))
    lines.append(f"  decode ops: {top}")
    lines.append("  composites: " + ", ".join(f"{k} x{v}" for k, v in sorted(report.composites.items())))
    if report.custom_ops:
        lines.append(f"  CUSTOM ops: {dict(report.custom_ops)}")
    return lines
