"""--target tflite: one .tflite holding every signature (prefill_{T}, decode; with vision also
vision_encoder and image_prefill_{T}), the weights shared, our metadata in its metadata table.

The converter lowers the graph with the matmul weights and the table left out (weight holes,
export/lowering/tflite/convert.py) into a scratch skeleton; the streamed writer
(export/lowering/tflite/streamed.py) then writes the artifact, each of those weights read from the
checkpoint, stored as the recipe says (export/quantize/tflite.py: float, float16, INT8 per
channel, INT4 blockwise, ai-edge-quantizer's layouts) and dropped: no export holds the model's f32
weights. The other weights (norm scales, the recurrent block's gates and convolution) are small
and go to the converter as constants, as does a 2-D weight that something other than a matmul
reads (the vision tower's position table, which the converter folds into the patch bias): the
skeleton shows them (`stray_holes`), and the graph is converted once more with them inlined.
The converter, the skeleton's read and the flatbuffer's packing run in a child process fed the
lowered signatures (export/lowering/tflite/worker.py), beside this process's quantizing threads.
"""

from __future__ import annotations

import contextlib
import math

from pathlib import Path

from contract.signatures import EMBEDDINGS, INPUT_POS, LOGITS, TOKENS
from export.targets import Target
from models.cache import state_layout
from models.signatures import all_signatures


class TFLiteTarget(Target):
    name = "tflite"
    help = "one .tflite with prefill_T/decode signatures"
    quant_table = "tflite"
    context_buckets = True
    speculative = True
    inline_composites = True

    def artifact_name(self, plan) -> str:
        kv = "_kv8" if plan.options.kv_cache == "int8" else ""
        spec = f"_spec{plan.cfg.rewind}" if plan.cfg.rewind else ""
        return f"{plan.cfg.name}_{plan.quant or plan.options.dtype}{kv}{spec}_ctx{plan.max_len}.tflite"

    def signatures(self, plan):
        return all_signatures(plan.cfg, list(plan.lens), plan.max_len, attention=self.attention, buckets=plan.buckets,
                              kv=plan.options.kv_cache)

    def write(self, plan, weights, signatures, tmp: Path, timer):
        metadata = plan.metadata(state_layout(plan.cfg, plan.max_len, kv=plan.options.kv_cache))
        write_model(plan, weights, signatures, tmp, timer, metadata=metadata.to_json())
        return metadata, {}

    def describe(self, result) -> list[str]:
        return describe_tflite(result.path, result)


def write_model(plan, weights, signatures, path: Path, timer, params: dict | None = None,
                metadata: str | None = None) -> Path:
    """Convert `signatures` into one .tflite at `path` over `params` (default: every stored weight;
    a vision bundle's sections each pass their own), the matmul weights and the table stored as
    the plan's recipe says; `metadata`: our metadata JSON, for the file runtime_py loads.

    The signatures are lowered here; the converter and the flatbuffer work run in a child process
    (export/lowering/tflite/worker.py) while this one's threads quantize the weights."""
    from export.lowering.tflite.convert import converter_weights, lowered
    from export.lowering.tflite.streamed import write_flatbuffer, write_weights
    from export.lowering.tflite.worker import Converter
    from export.quantize.sizes import is_quantized_weight
    from export.quantize.ahead import Ahead
    from export.quantize.tflite import encoder, int4_encoded, int4_holes, layout
    from models.fused import inlined
    from models.layers import OFFSETS
    from models.lazy import materialize

    params = weights.stored if params is None else params
    # the weights, and an int4 weight's block offsets (models.layers.dense: f32 holes, streamed as
    # the weights are, never through the converter)
    holes = [n for n, v in params.items() if is_quantized_weight(n, tuple(v.shape)) or n.endswith(OFFSETS)]
    skeleton = path.with_name(path.name + ".skeleton.tmp")
    trace = inlined() if plan.options.inline_composites else contextlib.nullcontext()
    blocks = weights.blocks
    converter = Converter()  # its imports run while the signatures are lowered
    ahead = None
    try:
        # the int4 weights are quantized in the background from here on (export/quantize/ahead.py);
        # the lowering holds the GIL, the converter's process does not
        ahead = Ahead(int4_holes(plan.recipe, blocks, holes), lambda name: int4_encoded(blocks[name]),
                      cost=lambda name: math.prod(blocks[name].shape))
        with timer.stage("convert"):
            with trace:
                signatures = lowered(signatures, params, weights.compute, timer.progress)
            names, inlined_values = converter_weights(params, holes)
            job = {"signatures": signatures, "names": names, "holes": holes, "inlined": inlined_values,
                   "skeleton": str(skeleton), "metadata": metadata, "layouts": layout(plan.recipe, blocks, holes)}
            placement = converter.place(job, lambda names: materialize({n: params[n] for n in names}))
            del job, signatures
        with timer.stage(f"write weights ({plan.quant or plan.storage})", record="weights"):
            with open(path, "wb") as f:
                values = write_weights(f, placement, encoder(weights.stored, blocks, ahead), progress=timer.progress)
                write_flatbuffer(f, placement, converter.finish(values))
    finally:
        if ahead is not None:
            ahead.close()
        converter.close()
        # the skeleton, and its own temporary name if the converter's process died writing it
        for scratch in (skeleton, skeleton.with_name(skeleton.name + ".tmp")):
            scratch.unlink(missing_ok=True)
    return path


def describe_tflite(path: Path, result) -> list[str]:
    """Size, signatures, decode ops and composites of a TFLite model (a .tflite, or a bundle's)."""
    from export.lowering.tflite.inspect import read

    report = read(path)
    lines = [f"artifact: {path}", result.size_line(report.file_bytes)]
    for name, sig in report.signatures.items():
        ins = {n: list(s) for n, s, _ in sig["inputs"]}
        outs = {n: list(s) for n, s, _ in sig["outputs"]}
        if INPUT_POS not in ins:  # the vision encoder
            lines.append(f"  signature {name}: " + ", ".join(f"{k}{v}" for k, v in ins.items()) + " -> "
                         + ", ".join(f"{k}{v}" for k, v in outs.items()))
            continue
        tokens = f"tokens{ins.pop(TOKENS)} " if TOKENS in ins else ""  # none in a vision bundle's decoder
        embeds = f" embeddings{ins.pop(EMBEDDINGS)}" if EMBEDDINGS in ins else ""
        lines.append(f"  signature {name}: {tokens}input_pos{ins.pop(INPUT_POS)}{embeds} "
                     f"+ {len(ins)} states -> logits{outs.pop(LOGITS)} + {len(outs)} states")
    decode = report.op_histogram.get("decode", {})
    top = ", ".join(f"{op} {n}" for op, n in decode.most_common(12))
    lines.append(f"  decode ops: {top}")
    lines.append("  composites: " + (", ".join(f"{k} x{v}" for k, v in sorted(report.composites.items()))
                                      or "none (--inline-composites)"))
    if report.custom_ops:
        lines.append(f"  CUSTOM ops: {dict(report.custom_ops)}")
    return lines
