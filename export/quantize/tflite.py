"""Quantize a converted .tflite with ai-edge-quantizer.

Each recipe maps to one ai-edge-quantizer configuration applied to FULLY_CONNECTED and
EMBEDDING_LOOKUP (the matmul weights and the table). BATCH_MATMUL (RecurrentGemma's
block-diagonal gates) stays float, as on ONNX: dynamic_wi8 turns it into an int8-rhs
BATCH_MATMUL that the TFLite kernel refuses at run time.

  fp16          not here: the converter stores the weights float16 itself, each feeding a
                DEQUANTIZE (export/lowering/tflite/convert.py). ai-edge-quantizer's FLOAT_CASTING
                writes the same pattern but took 500 s and 24.6 GB peak RSS on gemma3-1b (18 s of
                conversion, 4.4 GB, this way).
  int8          weight-only int8, per output channel (DEQUANTIZE ops)
  dynamic-int8  dynamic_wi8_afp32: int8 per-channel weights, activations quantized at run time
  int4-b32/b128 dynamic int4, BLOCKWISE_32 / BLOCKWISE_128 (XNNPACK's blockwise int4 kernels)

The tied embedding is one tensor read by EMBEDDING_LOOKUP and by the logits FULLY_CONNECTED, and
both ops take the same quantization, so the table stays stored once (checked by the tests).
Our metadata survives quantization (ai-edge-quantizer copies the model's metadata table).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from export.quantize.recipes import Recipe


def ai_edge_recipe(recipe: Recipe):
    from ai_edge_quantizer import qtyping, recipe_manager

    if recipe.bits == 16:
        raise ValueError("fp16 is written by the converter (16-bit storage), not by ai-edge-quantizer")

    rm = recipe_manager.RecipeManager()
    for op in (qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.EMBEDDING_LOOKUP):
        if not recipe.dynamic:
            rm.add_weight_only_config(regex=".*", operation_name=op, num_bits=recipe.bits)
        else:
            granularity = (qtyping.QuantGranularity.CHANNELWISE if recipe.block is None
                           else qtyping.QuantGranularity[f"BLOCKWISE_{recipe.block}"])
            rm.add_dynamic_config(regex=".*", operation_name=op, num_bits=recipe.bits, granularity=granularity)
    return rm.get_quantization_recipe()


def quantize_file(src: Path, dst: Path, recipe: Recipe) -> Path:
    """Quantize the float model at `src` into `dst` (written to a temporary name, then renamed)."""
    import logging

    from ai_edge_quantizer import quantizer

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its per-tensor warnings would flood the CLI
    try:
        q = quantizer.Quantizer(str(src), ai_edge_recipe(recipe))
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 in all-zero blocks: fixed below
            result = q.quantize(enable_progress_report=False, enable_progress_bar=False)
        del q
        model = result.quantized_model
        if not isinstance(model, bytearray):
            model = bytearray(model)
        fix_zero_blocks(model)
        with open(tmp, "wb") as f:
            f.write(model)
        del result
        os.replace(tmp, dst)
    finally:
        logging.getLogger().setLevel(level)
        if tmp.exists():
            tmp.unlink()
    return dst


def _buffer_view(buf: bytearray, data) -> np.ndarray | None:
    """A writable uint8 view of a flatbuffer Buffer's bytes inside `buf` (inline or at an offset)."""
    if data.DataLength():
        start = data._tab.Vector(data._tab.Offset(4))
        return np.frombuffer(buf, np.uint8, data.DataLength(), start)
    if data.Offset() > 1:
        return np.frombuffer(buf, np.uint8, data.Size(), data.Offset())
    return None


def fix_zero_blocks(buf: bytearray) -> int:
    """Give every all-zero block of a blockwise-quantized weight scale 1 and code 0, in place.

    ai-edge-quantizer gives such a block (a zero row, a pruned channel) scale 0 and codes from
    0/0, and XNNPACK refuses a zero scale ('unsupported scale value (0.000000)'), so the model
    would not load. Returns the number of blocks fixed."""
    from ai_edge_litert import schema_py_generated as S

    model = S.Model.GetRootAs(buf, 0)
    fixed, seen = 0, set()
    for si in range(model.SubgraphsLength()):
        sg = model.Subgraphs(si)
        for ti in range(sg.TensorsLength()):
            t = sg.Tensors(ti)
            q = t.Quantization()
            if q is None or q.DetailsType() != S.QuantizationDetails.BlockwiseQuantization:
                continue
            if t.Buffer() in seen or t.Type() != S.TensorType.INT4:
                continue
            seen.add(t.Buffer())
            details = S.BlockwiseQuantization()
            table = q.Details()
            details.Init(table.Bytes, table.Pos)
            scale_tensor = sg.Tensors(details.Scales())
            scales_raw = _buffer_view(buf, model.Buffers(scale_tensor.Buffer()))
            codes = _buffer_view(buf, model.Buffers(t.Buffer()))
            if scales_raw is None or codes is None:
                continue
            scales = scales_raw.view(np.float16)
            zero = np.flatnonzero(~(np.abs(scales.astype(np.float32)) > 0))
            if not len(zero):
                continue
            _rows, width = (int(d) for d in t.ShapeAsNumpy())
            block = details.BlockSize()
            per_row = width // block
            for z in zero:  # each block is block/2 bytes of packed int4 codes
                start = ((z // per_row) * width + (z % per_row) * block) // 2
                codes[start:start + block // 2] = 0
            scales[zero] = np.float16(1.0)
            fixed += len(zero)
    return fixed


def zero_scale_count(path: Path) -> int:
    """Quantized tensors with a zero (or non-finite) scale: XNNPACK rejects them, so a tensor with
    an all-zero row or block must still get a positive scale. Used by the tests."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    model = fu.read_model(str(path))
    bad = 0
    for sg in model.subgraphs:
        for t in sg.tensors:
            q = t.quantization
            if q is None:
                continue
            scales = []
            if q.scale is not None and len(q.scale):
                scales.append(np.asarray(q.scale, np.float32))
            details = getattr(q, "details", None)
            if details is not None and getattr(details, "scales", None) is not None:
                buf = model.buffers[sg.tensors[details.scales].buffer].data
                if buf is not None and len(buf):
                    scales.append(np.frombuffer(bytes(buf), np.float16).astype(np.float32))
            bad += sum(int(np.sum(~(np.isfinite(s) & (s > 0)))) for s in scales)
    return bad
