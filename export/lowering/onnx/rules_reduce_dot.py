"""Reductions and contractions.

  stablehlo.reduce(x, init) {dimensions} body{add|max|min|mul|and|or}
      -> ReduceSum | ReduceMax | ReduceMin | ReduceProd (keepdims=0), then the body op with init
         unless init is the op's identity (bool and/or reduce as int32 Min/Max)
  stablehlo.dot_general(lhs, rhs) {batching, contracting dims}
      weight rhs [N, K] contracted on K, used only by matmuls -> MatMul(lhs, W^T) (W stored [K, N])
      weight rhs used elsewhere too (the tied embedding)      -> Gemm(lhs as 2-D, W, transB=1)
      anything else                                           -> Einsum
"""

from __future__ import annotations

import string

import numpy as np
from onnx import TensorProto

from export.lowering.onnx.graph import UnsupportedOpError, op_name, rule, source_location, tensor_type
from export.lowering.onnx.rules_shape import axes

REDUCERS = {  # body op -> (ONNX reduce op, ONNX elementwise op, identity)
    "stablehlo.add": ("ReduceSum", "Add", 0),
    "stablehlo.maximum": ("ReduceMax", "Max", -np.inf),
    "stablehlo.minimum": ("ReduceMin", "Min", np.inf),
    "stablehlo.multiply": ("ReduceProd", "Mul", 1),
    "stablehlo.and": ("ReduceMin", "And", True),
    "stablehlo.or": ("ReduceMax", "Or", False),
}
NP_REDUCE = {"ReduceSum": np.sum, "ReduceMax": np.max, "ReduceMin": np.min, "ReduceProd": np.prod}


def _identity_for(identity, dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer) and np.isinf(identity):
        info = np.iinfo(dtype)
        return np.array(info.min if identity < 0 else info.max, dtype)
    return np.array(identity, dtype)


@rule("stablehlo.reduce")
def lower_reduce(lw, op):
    """reduce(x, init) {dimensions}, a one-op body -> Reduce* (+ the init when not the identity)."""
    if len(op.operands) != 2:
        raise UnsupportedOpError(f"unsupported variadic reduce at {source_location(op)}")
    body = [o for o in op.regions[0].blocks[0].operations if op_name(o) != "stablehlo.return"]
    if len(body) != 1 or op_name(body[0]) not in REDUCERS:
        raise UnsupportedOpError(f"unsupported reduce body {[op_name(o) for o in body]} at {source_location(op)}")
    reduce_op, combine, identity = REDUCERS[op_name(body[0])]
    dims = [int(d) for d in op.attributes["dimensions"]]
    x, init = lw.operand(op, 0), lw.operand(op, 1)
    _, dtype = tensor_type(op.operands[0])
    value = lw.constant_value(x)
    init_value = lw.constant_value(init)
    if value is not None and init_value is not None and reduce_op in NP_REDUCE:
        out = NP_REDUCE[reduce_op](value, axis=tuple(dims))
        return [lw.const(np.asarray(out).astype(dtype))]
    boolean = dtype == np.bool_
    src = lw.node1("Cast", [x], to=TensorProto.INT32) if boolean else x
    out = lw.node1(reduce_op, [src, axes(lw, dims)], keepdims=0)
    if boolean:
        out = lw.node1("Cast", [out], to=TensorProto.BOOL)
    if init_value is None or not np.array_equal(init_value, _identity_for(identity, dtype)):
        out = lw.node1(combine, [out, init])
    return [out]


def _letters(n: int, used: str = "") -> list[str]:
    return [c for c in string.ascii_letters if c not in used][:n]


@rule("stablehlo.dot_general")
def lower_dot_general(lw, op):
    """dot_general(lhs, rhs) {lhs/rhs batching and contracting dims} -> MatMul | Gemm | Einsum."""
    from jax._src.lib.mlir.dialects import hlo

    dn = hlo.DotDimensionNumbers(op.attributes["dot_dimension_numbers"])
    lb, lc = list(dn.lhs_batching_dimensions), list(dn.lhs_contracting_dimensions)
    rb, rc = list(dn.rhs_batching_dimensions), list(dn.rhs_contracting_dimensions)
    lhs, rhs = lw.operand(op, 0), lw.operand(op, 1)
    l_shape, l_dtype = tensor_type(op.operands[0])
    r_shape, _ = tensor_type(op.operands[1])
    out_shape, out_dtype = tensor_type(op.results[0])
    if l_dtype != out_dtype:
        lhs = lw.node1("Cast", [lhs], to=_onnx_type(out_dtype))
    weight = lw.weight_source(rhs)
    if weight is not None and not lb and len(r_shape) == 2 and rc == [1] and lc == [len(l_shape) - 1]:
        return [lw.weight_matmul(lhs, weight, l_shape, out_shape, out_dtype)]
    # general case: Einsum, output = batch, lhs free, rhs free (StableHLO's order)
    letters = _letters(len(l_shape) + len(r_shape))
    l_sub = letters[:len(l_shape)]
    r_sub = letters[len(l_shape):]
    for a, b in zip(lb + lc, rb + rc):
        r_sub[b] = l_sub[a]
    l_free = [l_sub[i] for i in range(len(l_shape)) if i not in lb + lc]
    r_free = [r_sub[i] for i in range(len(r_shape)) if i not in rb + rc]
    out_sub = [l_sub[i] for i in lb] + l_free + r_free
    equation = f"{''.join(l_sub)},{''.join(r_sub)}->{''.join(out_sub)}"
    r_dtype = tensor_type(op.operands[1])[1]
    if r_dtype != out_dtype:
        rhs = lw.node1("Cast", [rhs], to=_onnx_type(out_dtype))
    return [lw.node1("Einsum", [lhs, rhs], equation=equation)]


def _onnx_type(dtype):
    from export.lowering.onnx.graph import NUMPY_TO_ONNX

    return NUMPY_TO_ONNX[np.dtype(dtype)]
