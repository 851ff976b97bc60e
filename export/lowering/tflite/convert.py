"""StableHLO -> .tflite with litert-converter (the standalone MLIR converter; no TensorFlow).

Recipe (DESIGN section 6; verified in this repo's tests):
  1. each signature's StableHLO portable artifact is deserialised into one converter MLIR context;
  2. its leading weight arguments are replaced by DenseResourceElementsAttr constants, created
     once per weight and shared by every signature (the file holds each weight once; the numpy
     arrays are not copied, they must stay alive until the flatbuffer is written);
  3. set_signature names inputs/outputs, merge_modules joins the signatures;
  4. the TFL passes run with origin "JAX" and canonicalizing_inf_as_min_max_float = False
     (True crashes the process on dense resources);
  5. the flatbuffer goes to a temporary name, then is renamed: never a partial artifact.
With `holes` (weight names), those weights are not given to the converter: they stay leading
inputs of every signature, named HOLE + name, and the file written is a skeleton that
export/lowering/tflite/streamed.py fills with the weights, stored as the recipe asks, tensor by
tensor (the converter never holds them: a quantized export never holds its f32 weights).
Metadata (a JSON string) is attached as the module attribute `tfl.metadata`, which the
flatbuffer exporter writes into the model's metadata table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

from contract.metadata import METADATA_KEY

if TYPE_CHECKING:  # the converter's side runs without JAX (export/lowering/tflite/worker.py)
    from models.signatures import Signature



def _element_type(ir, dtype: np.dtype):
    if dtype == ml_dtypes.bfloat16:
        return ir.BF16Type.get(), np.uint16
    if dtype == np.float16:
        return ir.F16Type.get(), np.uint16
    if dtype == np.float32:
        return ir.F32Type.get(), None
    if dtype == np.int32:
        return ir.IntegerType.get_signless(32), None
    if dtype == np.int8:
        return ir.IntegerType.get_signless(8), None
    raise TypeError(f"unsupported weight dtype {dtype}")


def _weight_attrs(ir, params: dict) -> dict:
    attrs = {}
    for name, value in params.items():
        arr = np.ascontiguousarray(value)
        element, view = _element_type(ir, arr.dtype)
        ttype = ir.RankedTensorType.get(arr.shape, element)
        buf = arr.view(view) if view else arr
        attrs[name] = (ir.DenseResourceElementsAttr.get_from_buffer(memoryview(buf), name, ttype), ttype)
    return attrs


HOLE = "weight:"  # the input name of a weight left out of the conversion (`holes`)


def _inline_weights(ir, arith, func, module, names: list[str], attrs: dict):
    """Replace the leading weight arguments named in `attrs` by constants; the others (holes)
    stay arguments, in their order."""
    main = next(op for op in module.body.operations
                if isinstance(op, func.FuncOp) and op.sym_name.value == "main")
    block = main.entry_block
    inlined = [i for i, name in enumerate(names) if name in attrs]
    with ir.InsertionPoint(block.operations[0]), ir.Location.unknown():
        for i in inlined:
            attr, ttype = attrs[names[i]]
            block.arguments[i].replace_all_uses_with(arith.ConstantOp(ttype, attr).result)
    for i in reversed(inlined):
        block.erase_argument(i)
    gone = set(inlined)
    ftype = main.type
    inputs = [t for i, t in enumerate(ftype.inputs) if i not in gone]
    main.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(inputs, ftype.results))
    if "arg_attrs" in main.attributes:
        old = main.attributes["arg_attrs"]
        main.attributes["arg_attrs"] = ir.ArrayAttr.get([old[i] for i in range(len(old)) if i not in gone])
    return main


_CONSTANTS = ("tfl.pseudo_const", "arith.constant", "stablehlo.constant")


def _is_f16_constant(ir, value, f16) -> bool:
    owner = value.owner  # the defining op, or a Block for a block argument
    return not isinstance(owner, ir.Block) and owner.operation.name in _CONSTANTS \
        and ir.RankedTensorType(value.type).element_type == f16


def _dequantize_f16_weights(ir, module) -> int:
    """Turn each CAST of a constant f16 weight to f32 into a DEQUANTIZE (the same values).

    A CAST runs every step; LiteRT's DEQUANTIZE of a constant runs once, at preparation, and is
    the form XNNPACK and the quantizers know as float16 weights. bf16 stays a CAST (DEQUANTIZE
    takes no bf16). Returns the number rewritten."""
    f16, f32 = ir.F16Type.get(), ir.F32Type.get()
    casts = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    inner = inner.operation
                    if inner.name == "tfl.cast" and _is_f16_constant(ir, inner.operands[0], f16) \
                            and ir.RankedTensorType(inner.results[0].type).element_type == f32:
                        casts.append(inner)
                    walk(inner)

    walk(module.operation)
    for cast in casts:
        with ir.InsertionPoint(cast), cast.location:
            deq = ir.Operation.create("tfl.dequantize", results=[cast.results[0].type],
                                      operands=[cast.operands[0]])
        cast.results[0].replace_all_uses_with(deq.results[0])
        cast.erase()
    return len(casts)


def lowered(signatures: list[Signature], params: dict, compute: Callable | None = None,
            progress: Callable | None = None) -> list[tuple[str, bytes, list[str], list[str]]]:
    """Each signature as (name, StableHLO portable artifact, its own input names, output names):
    the JAX side of `convert`, every weight a leading argument in `weight_names` order."""
    from export.stablehlo import portable_artifact, stablehlo

    out = []
    for i, sig in enumerate(signatures):
        if progress:
            progress(i, len(signatures), f"lower {sig.name}")
        out.append((sig.name, portable_artifact(stablehlo(sig, params, compute)),
                    [t.name for t in sig.inputs], [t.name for t in sig.outputs]))
    if progress:
        progress(len(signatures), len(signatures), "lowered")
    return out


def convert(signatures: list[Signature], params: dict, path: Path, *, compute: Callable | None = None,
            metadata: str | None = None, progress: Callable | None = None,
            holes: list[str] | None = None) -> Path:
    """Write one .tflite holding every signature, sharing the stored `params`; the weights named
    in `holes` are left out (inputs named HOLE + name, in parameter order, before the
    signature's own inputs), to be filled by export/lowering/tflite/streamed.py."""
    names, inlined = converter_weights(params, holes)
    return convert_lowered(lowered(signatures, params, compute, progress), names, inlined, path,
                           metadata=metadata, holes=holes)


def converter_weights(params: dict, holes: list[str] | None) -> tuple[list[str], dict]:
    """(every weight argument's name, in the lowered signatures' order; the values, read, of
    those not in `holes`: the converter takes them as constants, and they must live until the
    file is written)."""
    from export.stablehlo import weight_names
    from models.lazy import materialize

    left_out = set(holes or ())
    return weight_names(params), materialize({k: v for k, v in params.items() if k not in left_out})


def convert_lowered(signatures: list[tuple[str, bytes, list[str], list[str]]], names: list[str], inlined: dict,
                    path: Path, *, metadata: str | None = None, holes: list[str] | None = None) -> Path:
    """The converter's side of `convert` (no JAX: export/lowering/tflite/worker.py runs it in a
    child process): `signatures` from `lowered`, `names` every weight argument in order,
    `inlined` the values of those not in `holes`."""
    from runtime_py.native_log import import_converter

    conv = import_converter()
    from litert_converter.mlir import ir, passmanager
    from litert_converter.mlir.dialects import arith, func
    from litert_converter.mlir.dialects import stablehlo as shlo

    left_out = set(holes or ())
    holes = [n for n in names if n in left_out]
    ctx = ir.Context()
    conv.prepare_mlir_context(ctx)
    modules = []
    with ctx, ir.Location.unknown():
        attrs = _weight_attrs(ir, {n: inlined[n] for n in names if n not in left_out})
        for name, artifact, inputs, outputs in signatures:
            module = shlo.deserialize_portable_artifact(ctx, artifact)
            main = _inline_weights(ir, arith, func, module, names, attrs)
            conv.set_signature(main.operation, signature_name=name,
                               input_names=[HOLE + n for n in holes] + list(inputs), output_names=list(outputs))
            modules.append(module)
        merged = conv.merge_modules(modules) if len(modules) > 1 else modules[0]
        if metadata is not None:
            merged.operation.attributes["tfl.metadata"] = ir.DictAttr.get(
                {METADATA_KEY: ir.StringAttr.get(metadata)})
        options = conv.ConvertToTFLConfig()
        options.model_origin_framework = "JAX"
        options.canonicalizing_inf_as_min_max_float = False
        conv.run_convert_to_tfl_passes(merged, passmanager.PassManager(), options)
        _dequantize_f16_weights(ir, merged)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            conv.export_flatbuffer_to_file(merged.operation, str(tmp))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return path
