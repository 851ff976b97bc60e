"""TFLite quantization: the tensors each recipe stores (`layout`, `encode`: what the streamed writer,
export/lowering/tflite/streamed.py, fills a skeleton's weight holes with), and ai-edge-quantizer,
kept as the test oracle those tensors are compared with bit for bit (`quantize_file`).

Ours, by recipe (the same tensors as ai-edge-quantizer's, tests/test_streamed_tflite.py):
  fp16          the weights stored float16, each CAST to f32 turned into a DEQUANTIZE
  int8          INT8 per output row (ai-edge-quantizer's symmetric narrow range: scale =
                max|row| / 127, codes rint(w / scale) in [-127, 127]) + DEQUANTIZE
  dynamic-int8  the same INT8 tensors read directly by FULLY_CONNECTED / EMBEDDING_LOOKUP
  int4-b*       INT4 blockwise: our blocks (export/quantize/blocks.py), scales made positive
  int4-b32-e8   int4-b32, the tied table INT8 per row as in dynamic-int8
Only weights read solely as matmul / lookup weights are quantized (what ai-edge-quantizer's
FULLY_CONNECTED / EMBEDDING_LOOKUP configuration reaches); the others keep their float storage.

The oracle: each recipe maps to one ai-edge-quantizer configuration applied to FULLY_CONNECTED and
EMBEDDING_LOOKUP (the matmul weights and the table). BATCH_MATMUL (RecurrentGemma's
block-diagonal gates) stays float, as on ONNX: dynamic_wi8 turns it into an int8-rhs
BATCH_MATMUL that the TFLite kernel refuses at run time.

  fp16          not here: the converter stores the weights float16 itself, each feeding a
                DEQUANTIZE (export/lowering/tflite/convert.py). ai-edge-quantizer's FLOAT_CASTING
                writes the same pattern but took 500 s and 24.6 GB peak RSS on gemma3-1b (18 s of
                conversion, 4.4 GB, this way).
  int8          weight-only int8, per output channel (DEQUANTIZE ops)
  dynamic-int8  dynamic_wi8_afp32: int8 per-channel weights, activations quantized at run time
  int4-b32/b128 dynamic int4, BLOCKWISE_32 / BLOCKWISE_128 (XNNPACK's blockwise int4 kernels);
                the codes and scales are then overwritten with ours (export/quantize/blocks.py:
                per-block MSE scales, or a checkpoint's Q4_0 blocks). int4-b32-e8: the tied table
                gets dynamic int8 per channel instead (the LM head's FULLY_CONNECTED singled out
                by its scope, `table_scopes`).

The tied embedding is one tensor read by EMBEDDING_LOOKUP and by the logits FULLY_CONNECTED, and
both ops take the same quantization, so the table stays stored once (checked by the tests).
Our metadata survives quantization (ai-edge-quantizer copies the model's metadata table).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from export.quantize.recipes import Recipe
from export.quantize.sizes import TABLE


def channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, f32 scale per row): ai-edge-quantizer's symmetric per-channel int8, value
    for value (bound = max(|min|, |max|, 1e-9) per row, scale = bound / 127, narrow range)."""
    w = np.asarray(w, np.float32)
    bound = np.maximum(np.abs(w.min(axis=1, keepdims=True)), np.abs(w.max(axis=1, keepdims=True)))
    scale = np.maximum(bound, 1e-9) / 127.0
    q = np.clip(np.rint(np.divide(w, scale)), -127, 127).astype(np.int8)  # callers pass row chunks
    return q, scale.reshape(-1).astype(np.float32)


def layout(recipe: Recipe | None, blocks: dict | None, holes=()):
    """How `recipe` stores each hole (export.lowering.tflite.streamed.Layouts: hole -> Layout,
    as data, for the converter's child process): INT4 blocks for the weights planned at 4 bits,
    INT8 per channel for the table of a recipe with `table_bits` 8, for the weights an int4 recipe
    plans at 8 bits (a mixed-precision GGUF's wide layers) and for every quantizable
    weight of the 8-bit recipes (a DEQUANTIZE before the readers unless dynamic), float
    otherwise; the block offsets among `holes` (models.layers.dense's `<weight>_offsets`, read
    by a FULLY_CONNECTED too) float32."""
    from export.lowering.tflite.streamed import Layout, Layouts
    from models.layers import OFFSETS

    if recipe is None or recipe.bits == 16:
        return Layouts()
    if recipe.bits == 4:
        named = {n: (Layout("INT4", block=b.block), tuple(b.shape)) for n, b in (blocks or {}).items() if b.bits == 4}
        if recipe.table_bits == 8 and TABLE not in named:
            named[TABLE] = (Layout("INT8"), None)
        # the layers a mixed-precision GGUF keeps at 6-8 bits (planned at 8: blocks.plan_blocks `kept`):
        # int8 per channel, read by FULLY_CONNECTED with dynamic int8 activations as the table's
        named.update({n: (Layout("INT8"), None) for n, b in (blocks or {}).items() if b.bits == 8 and n != TABLE})
        named.update({n: (Layout("FLOAT32"), None) for n in holes if n.endswith(OFFSETS)})
        return Layouts(recipe.name, named)
    return Layouts(recipe.name, quantized=Layout("INT8", dequantize=not recipe.dynamic))


def int4_encoded(block_quantized):
    """The INT4 hole's Encoded of a BlockQuantized / PendingBlocks (computed if pending)."""
    from export.lowering.tflite.streamed import Encoded
    from export.quantize.blocks import resolved

    b, _moved = resolved(block_quantized).positive()  # XNNPACK refuses negative scales (GGUF Q4_0 has them)
    return Encoded(b.tflite_int4(), b.scales)


def int4_holes(recipe: Recipe | None, blocks: dict | None, holes) -> list[str]:
    """The names among `holes` that `layout` stores as INT4 (the ones `int4_encoded` fills), in
    the writer's order (sorted): what export.quantize.ahead can compute ahead of the writer."""
    if recipe is None or recipe.bits != 4 or not blocks:
        return []
    return sorted(n for n in holes if n in blocks and blocks[n].bits == 4)


def encoder(weights: dict, blocks: dict | None, ahead=None):
    """(name, layout) -> export.lowering.tflite.streamed.Encoded, reading `weights` (arrays or
    lazy tensors) one at a time; INT4 weights from `ahead` (export.quantize.ahead.Ahead over
    `int4_encoded`) when given."""
    from export.lowering.tflite.streamed import Encoded
    from models.lazy import load, row_chunks

    def fn(name: str, lay) -> Encoded:
        if lay.type == "INT4":
            return ahead.take(name) if ahead is not None else int4_encoded(blocks[name])
        if lay.type == "INT8":  # per row: computed over row chunks (models.lazy.row_chunks)
            value = weights[name]
            codes, scales = np.empty(tuple(value.shape), np.int8), np.empty(value.shape[0], np.float32)
            for r, rows in row_chunks(value):
                codes[r:r + len(rows)], scales[r:r + len(rows)] = channel_int8(rows)
            return Encoded(codes, scales)
        return Encoded(np.asarray(load(weights[name])))

    return fn


def ai_edge_recipe(recipe: Recipe, table_scopes: list[str] | None = None):
    """ai-edge-quantizer's recipe for `recipe`. With `table_scopes` (the scopes of the
    FULLY_CONNECTED ops reading the tied table, `table_scopes()`), the table's ops get int8 per
    channel (dynamic) while the other matmuls get the recipe's int4 blocks: its later, narrower
    entry wins for those ops."""
    import re

    from ai_edge_quantizer import qtyping, recipe_manager

    if recipe.bits == 16:
        raise ValueError("fp16 is written by the converter (16-bit storage), not by ai-edge-quantizer")

    fc, lookup = qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.EMBEDDING_LOOKUP
    rm = recipe_manager.RecipeManager()
    for op in (fc, lookup):
        if not recipe.dynamic:
            rm.add_weight_only_config(regex=".*", operation_name=op, num_bits=recipe.bits)
        else:
            granularity = (qtyping.QuantGranularity.CHANNELWISE if recipe.block is None
                           else qtyping.QuantGranularity[f"BLOCKWISE_{recipe.block}"])
            rm.add_dynamic_config(regex=".*", operation_name=op, num_bits=recipe.bits, granularity=granularity)
    if table_scopes:
        channelwise = qtyping.QuantGranularity.CHANNELWISE
        rm.add_dynamic_config(regex=".*", operation_name=lookup, num_bits=8, granularity=channelwise)
        rm.add_dynamic_config(regex="^(?:" + "|".join(re.escape(s) for s in table_scopes) + ")$",
                              operation_name=fc, num_bits=8, granularity=channelwise)
    return rm.get_quantization_recipe()


def _op_name(model, op) -> str:
    from ai_edge_litert import schema_py_generated as S

    code = model.OperatorCodes(op.OpcodeIndex())
    value = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    return next(k for k, v in vars(S.BuiltinOperator).items() if v == value)


def table_scopes(path: Path) -> list[str] | None:
    """ai-edge-quantizer's scopes (output tensor names joined by ';', then ';') of the
    FULLY_CONNECTED ops that read the embedding table (the tied LM head), or None if they cannot
    be singled out (a FULLY_CONNECTED of another weight has the same scope)."""
    from ai_edge_litert import schema_py_generated as S

    buf = memoryview(np.memmap(path, np.uint8, mode="r"))
    model = S.Model.GetRootAs(buf, 0)
    ops = []  # (subgraph, op name, op)
    for si in range(model.SubgraphsLength()):
        sg = model.Subgraphs(si)
        for oi in range(sg.OperatorsLength()):
            op = sg.Operators(oi)
            ops.append((sg, _op_name(model, op), op))
    tables = {sg.Tensors(op.Inputs(1)).Buffer() for sg, name, op in ops if name == "EMBEDDING_LOOKUP"}
    head, other = set(), set()
    for sg, name, op in ops:
        if name != "FULLY_CONNECTED":
            continue
        names = [sg.Tensors(op.Outputs(i)).Name().decode() for i in range(op.OutputsLength())
                 if op.Outputs(i) >= 0]
        scope = ";".join(n for n in names if n) + ";"
        (head if sg.Tensors(op.Inputs(1)).Buffer() in tables else other).add(scope)
    if not head or head & other:
        return None
    return sorted(head)


def quantize_file(src: Path, dst: Path, recipe: Recipe, blocks: dict | None = None,
                  stored: dict | None = None) -> Path:
    """Quantize the float model at `src` into `dst` (written to a temporary name, then renamed).

    With `blocks` (parameter name -> export.quantize.blocks.BlockQuantized) and the `stored` f32
    weights the float model was converted from, every blockwise INT4 tensor that holds one of
    those weights gets exactly the given codes and scales (`place_blocks`)."""
    import logging

    from ai_edge_quantizer import quantizer

    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # its per-tensor warnings would flood the CLI
    try:
        table = (blocks or {}).get(TABLE)
        scopes = table_scopes(src) if table is not None and table.bits == 8 and recipe.bits == 4 else None
        if table is not None and table.bits == 8 and recipe.bits == 4 and scopes is None:
            raise RuntimeError("internal error: the LM head's FULLY_CONNECTED cannot be told apart from the "
                               "other matmuls by its output name, so the int8 table cannot be configured")
        q = quantizer.Quantizer(str(src), ai_edge_recipe(recipe, scopes))
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 in all-zero blocks: fixed below
            result = q.quantize(enable_progress_report=False, enable_progress_bar=False)
        del q
        model = result.quantized_model
        if not isinstance(model, bytearray):
            model = bytearray(model)
        fix_zero_blocks(model)
        if blocks:
            place_blocks(src, model, blocks, stored)
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


def _int4_tensors(buf: bytearray):
    """(name, tensor shape, codes view, float16 scales view, block size) of every blockwise INT4
    tensor of the flatbuffer in `buf`, each buffer once."""
    from ai_edge_litert import schema_py_generated as S

    model = S.Model.GetRootAs(buf, 0)
    seen = set()
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
            scales = _buffer_view(buf, model.Buffers(sg.Tensors(details.Scales()).Buffer()))
            codes = _buffer_view(buf, model.Buffers(t.Buffer()))
            if scales is None or codes is None:
                continue
            yield t.Name().decode(), tuple(int(d) for d in t.ShapeAsNumpy()), codes, scales.view(np.float16), \
                details.BlockSize()


def _float_weight_names(path: Path, digests: dict[bytes, str]) -> dict[str, str]:
    """Tensor name -> parameter name for the float model's constant tensors whose bytes equal a
    parameter's (`digests`: blake2b of the f32 bytes -> name). The converter names constants
    after their MLIR op, not our parameters, so the content is the key; ai-edge-quantizer keeps
    the tensor names."""
    import hashlib

    from ai_edge_litert import schema_py_generated as S

    out = {}
    buf = memoryview(np.memmap(path, np.uint8, mode="r"))  # no copy of a file of several GiB
    model = S.Model.GetRootAs(buf, 0)
    for si in range(model.SubgraphsLength()):
        sg = model.Subgraphs(si)
        for ti in range(sg.TensorsLength()):
            t = sg.Tensors(ti)
            if t.Type() != S.TensorType.FLOAT32 or t.ShapeLength() != 2:
                continue
            data = model.Buffers(t.Buffer())
            if data.DataLength():
                start = data._tab.Vector(data._tab.Offset(4))
                raw = buf[start:start + data.DataLength()]
            elif data.Offset() > 1:
                raw = buf[data.Offset():data.Offset() + data.Size()]
            else:
                continue
            name = digests.get(hashlib.blake2b(raw, digest_size=16).digest())
            if name is not None:
                out[t.Name().decode()] = name
    return out


def place_blocks(float_path: Path, buf: bytearray, blocks: dict, stored: dict) -> int:
    """Overwrite, in the quantized flatbuffer `buf`, the codes and scales of every INT4 tensor
    holding a weight of `blocks` with the given ones (same layout: the bytes only change).
    Returns the number of tensors placed; raises if a weight of `blocks` that the quantizer made
    INT4 could not be placed (a wrong block size or shape)."""
    import hashlib

    from export.quantize.blocks import resolved

    digests = {hashlib.blake2b(np.ascontiguousarray(stored[n], np.float32).tobytes(), digest_size=16).digest(): n
               for n, b in blocks.items() if b.bits == 4 and n in stored}
    names = _float_weight_names(float_path, digests)
    placed, unplaced = set(), []
    for tname, shape, codes, scales, block in _int4_tensors(buf):
        pname = names.get(tname)
        if pname is None:
            unplaced.append(tname)
            continue
        b, _moved = resolved(blocks[pname]).positive()  # XNNPACK refuses negative scales (GGUF Q4_0 has them)
        if b.shape != shape or b.block != block:
            raise RuntimeError(f"internal error: {pname} is INT4 {shape} in blocks of {block} in the artifact, "
                               f"but {b.shape} in blocks of {b.block} in the plan")
        codes[:] = b.tflite_int4()
        scales[:] = b.scales.reshape(-1)
        placed.add(pname)
    missed = sorted(set(digests.values()) - placed)
    if missed and unplaced:  # an INT4 weight kept the quantizer's own codes: it was not found by content
        raise RuntimeError(f"internal error: the int4 codes of {', '.join(missed[:3])} could not be placed; INT4 "
                           f"tensors {', '.join(unplaced[:3])} hold ai-edge-quantizer's own")
    return len(placed)


def fix_zero_blocks(buf: bytearray) -> int:
    """Give every all-zero block of a blockwise-quantized weight scale 1 and code 0, in place.

    ai-edge-quantizer gives such a block (a zero row, a pruned channel) scale 0 and codes from
    0/0, and XNNPACK refuses a zero scale ('unsupported scale value (0.000000)'), so the model
    would not load. Returns the number of blocks fixed."""
    fixed = 0
    for _name, (_rows, width), codes, scales, block in _int4_tensors(buf):
        zero = np.flatnonzero(~(np.abs(scales.astype(np.float32)) > 0))
        if not len(zero):
            continue
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
