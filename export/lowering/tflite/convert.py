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
Metadata (a JSON string) is attached as the module attribute `tfl.metadata`, which the
flatbuffer exporter writes into the model's metadata table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from contract.metadata import METADATA_KEY

from export.stablehlo import portable_artifact, stablehlo, weight_names
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


def _inline_weights(ir, arith, func, module, names: list[str], attrs: dict):
    main = next(op for op in module.body.operations
                if isinstance(op, func.FuncOp) and op.sym_name.value == "main")
    block = main.entry_block
    n = len(names)
    with ir.InsertionPoint(block.operations[0]), ir.Location.unknown():
        for i, name in enumerate(names):
            attr, ttype = attrs[name]
            block.arguments[i].replace_all_uses_with(arith.ConstantOp(ttype, attr).result)
    for i in reversed(range(n)):
        block.erase_argument(i)
    ftype = main.type
    main.attributes["function_type"] = ir.TypeAttr.get(ir.FunctionType.get(ftype.inputs[n:], ftype.results))
    if "arg_attrs" in main.attributes:
        old = main.attributes["arg_attrs"]
        main.attributes["arg_attrs"] = ir.ArrayAttr.get([old[i] for i in range(n, len(old))])
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


def convert(signatures: list[Signature], params: dict, path: Path, *, compute: Callable | None = None,
            metadata: str | None = None, progress: Callable | None = None) -> Path:
    """Write one .tflite holding every signature, sharing the stored `params`."""
    from litert_converter import converter_api_ext as conv
    from litert_converter.mlir import ir, passmanager
    from litert_converter.mlir.dialects import arith, func
    from litert_converter.mlir.dialects import stablehlo as shlo

    from models.lazy import materialize

    params = materialize(params)  # the converter reads every weight; they live until the file is written
    names = weight_names(params)
    ctx = ir.Context()
    conv.prepare_mlir_context(ctx)
    modules = []
    with ctx, ir.Location.unknown():
        attrs = _weight_attrs(ir, params)
        for i, sig in enumerate(signatures):
            if progress:
                progress(i, len(signatures), f"lower {sig.name}")
            module = shlo.deserialize_portable_artifact(ctx, portable_artifact(stablehlo(sig, params, compute)))
            main = _inline_weights(ir, arith, func, module, names, attrs)
            conv.set_signature(main.operation, signature_name=sig.name,
                               input_names=[t.name for t in sig.inputs],
                               output_names=[t.name for t in sig.outputs])
            modules.append(module)
        if progress:
            progress(len(signatures), len(signatures), "lowered")
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
