"""Shape and data-movement ops: reshape, broadcast, transpose, concatenate, slice, iota,
get_dimension_size and their dynamic forms (symbolic sequence lengths make those common).

  stablehlo.reshape(x) -> Reshape(x, static shape)
  stablehlo.dynamic_reshape(x, shape) -> Reshape(x, Cast<int64>(shape))
  stablehlo.broadcast_in_dim(x) {broadcast_dimensions} -> [Transpose] -> Unsqueeze -> Expand
  stablehlo.dynamic_broadcast_in_dim(x, shape) -> the same with a computed shape
  stablehlo.transpose(x) {permutation} -> Transpose
  stablehlo.concatenate(xs) {dimension} -> Concat
  stablehlo.slice(x) {start, limit, strides} -> Slice
  stablehlo.real_dynamic_slice(x, start, limit, strides) -> Slice
  stablehlo.iota {iota_dimension} -> a constant
  stablehlo.dynamic_iota(shape) {iota_dimension} -> Range -> Unsqueeze -> Expand
  stablehlo.get_dimension_size(x) {dimension} -> Shape(start, end) -> Reshape [] -> Cast<int32>
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from export.lowering.onnx.graph import rule, tensor_type

FOLD_LIMIT = 1 << 16  # largest constant (elements) built at export time instead of at run time


def i64(lw, name: str) -> str:
    """An integer tensor as int64 (ONNX shape and index inputs)."""
    value = lw.constant_value(name)
    if value is not None:
        return lw.const(value.astype(np.int64))
    return lw.node1("Cast", [name], to=TensorProto.INT64)


def shape_of(lw, name: str, value) -> str:
    """The shape of an MLIR value as an int64 tensor: a constant when fully static."""
    shape, _ = tensor_type(value)
    if all(d is not None for d in shape):
        return lw.const(np.array(shape, np.int64))
    return lw.node1("Shape", [name])


def dim_of(lw, name: str, value, axis: int) -> str:
    """One dimension as an int64 [1] tensor."""
    shape, _ = tensor_type(value)
    if shape[axis] is not None:
        return lw.const(np.array([shape[axis]], np.int64))
    return lw.node1("Shape", [name], start=axis, end=axis + 1)


def axes(lw, values) -> str:
    return lw.const(np.array(list(values), np.int64))


@rule("stablehlo.reshape")
def lower_reshape(lw, op):
    """reshape(x) -> Reshape(x, static result shape)."""
    x = lw.operand(op, 0)
    shape, _ = tensor_type(op.results[0])
    value = lw.constant_value(x)
    if value is not None:
        return [lw.const(value.reshape(shape))]
    return [lw.node1("Reshape", [x, lw.const(np.array(shape, np.int64))])]


@rule("stablehlo.dynamic_reshape")
def lower_dynamic_reshape(lw, op):
    """dynamic_reshape(x, shape) -> Reshape(x, Cast<int64>(shape)); with one dynamic result dim,
    Reshape(x, static shape with -1 there) (no run-time shape arithmetic)."""
    x, shape = lw.operand(op, 0), lw.operand(op, 1)
    value, shape_value = lw.constant_value(x), lw.constant_value(shape)
    if value is not None and shape_value is not None:
        return [lw.const(value.reshape(shape_value))]
    result, _ = tensor_type(op.results[0])
    if sum(d is None for d in result) == 1 and all(d != 0 for d in result):
        return [lw.node1("Reshape", [x, lw.const(np.array([-1 if d is None else d for d in result], np.int64))])]
    return [lw.node1("Reshape", [x, i64(lw, shape)])]


def _broadcast(lw, op, x: str, dims: list[int], out_shape: str | None, static_shape):
    """The broadcast value (an Expand), remembering its un-expanded, rank-matched source: an ONNX
    op that broadcasts (Add, Mul, Where, ...) takes the source when another operand has the full
    shape (Lowering.elementwise_operands), so the Expand (e.g. of a softmax's row max to
    [heads, T, S]) is never materialised unless something else needs it."""
    out, source = _broadcast_nodes(lw, op, x, dims, out_shape, static_shape)
    if out != source and lw.constant_value(out) is None:
        lw.broadcast_source[out] = source
    return out


def _broadcast_nodes(lw, op, x: str, dims: list[int], out_shape: str | None, static_shape):
    """(broadcast value, the rank-matched operand it expands)."""
    rank_out = len(static_shape)
    value = lw.constant_value(x)
    if value is not None and out_shape is None and int(np.prod(static_shape)) <= FOLD_LIMIT:
        order = [int(i) for i in np.argsort(dims)]
        moved = np.transpose(value, order)  # operand dims in output order
        sorted_dims = sorted(dims)
        expanded = moved.reshape([moved.shape[sorted_dims.index(i)] if i in sorted_dims else 1
                                  for i in range(rank_out)])
        out = lw.const(np.broadcast_to(expanded, static_shape).copy())
        return out, out
    order = None
    if list(dims) != sorted(dims):
        order = [int(i) for i in np.argsort(dims)]
        x = lw.node1("Transpose", [x], perm=order)
        dims = sorted(dims)
    missing = [i for i in range(rank_out) if i not in dims]
    if missing:
        x = lw.node1("Unsqueeze", [x, axes(lw, missing)])
    in_shape, _ = tensor_type(op.operands[0])
    in_shape = [in_shape[i] for i in order] if order is not None else in_shape
    unsqueezed = [in_shape[dims.index(i)] if i in dims else 1 for i in range(rank_out)]
    if out_shape is None:
        if unsqueezed == list(static_shape):
            return x, x
        out_shape = lw.const(np.array(static_shape, np.int64))
    return lw.node1("Expand", [x, out_shape]), x


@rule("stablehlo.broadcast_in_dim")
def lower_broadcast_in_dim(lw, op):
    """broadcast_in_dim(x) {broadcast_dimensions} -> [Transpose] -> Unsqueeze -> Expand."""
    dims = list(op.attributes["broadcast_dimensions"])
    shape, _ = tensor_type(op.results[0])
    return [_broadcast(lw, op, lw.operand(op, 0), dims, None, shape)]


@rule("stablehlo.dynamic_broadcast_in_dim")
def lower_dynamic_broadcast_in_dim(lw, op):
    """dynamic_broadcast_in_dim(x, output_dimensions) {broadcast_dimensions} -> Unsqueeze -> Expand."""
    dims = list(op.attributes["broadcast_dimensions"])
    shape, _ = tensor_type(op.results[0])
    target = lw.operand(op, 1)
    target_value = lw.constant_value(target)
    if target_value is not None:
        return [_broadcast(lw, op, lw.operand(op, 0), dims, None, [int(d) for d in target_value])]
    in_shape, _ = tensor_type(op.operands[0])
    # a dynamic result dim that the operand already has (mapped from a dynamic operand dim)
    # needs no size in Expand's shape: 1 broadcasts to it
    carried = {d for i, d in enumerate(dims) if in_shape[i] is None}
    if all(s is not None or i in carried for i, s in enumerate(shape)):
        static = lw.const(np.array([1 if s is None else s for s in shape], np.int64))
        return [_broadcast(lw, op, lw.operand(op, 0), dims, static, shape)]
    return [_broadcast(lw, op, lw.operand(op, 0), dims, i64(lw, target), shape)]


@rule("stablehlo.transpose")
def lower_transpose(lw, op):
    """transpose(x) {permutation} -> Transpose(perm)."""
    perm = [int(p) for p in op.attributes["permutation"]]
    x = lw.operand(op, 0)
    value = lw.constant_value(x)
    if value is not None:
        return [lw.const(np.transpose(value, perm))]
    if perm == sorted(perm):
        return [x]
    return [lw.node1("Transpose", [x], perm=perm)]


@rule("stablehlo.concatenate")
def lower_concatenate(lw, op):
    """concatenate(xs) {dimension} -> Concat(axis)."""
    axis = int(op.attributes["dimension"].value)
    xs = [lw.name(v) for v in op.operands]
    values = [lw.constant_value(x) for x in xs]
    if all(v is not None for v in values):
        return [lw.const(np.concatenate(values, axis=axis))]
    return [lw.node1("Concat", xs, axis=axis)]


@rule("stablehlo.slice")
def lower_slice(lw, op):
    """slice(x) {start_indices, limit_indices, strides} -> Slice."""
    starts = [int(v) for v in op.attributes["start_indices"]]
    limits = [int(v) for v in op.attributes["limit_indices"]]
    strides = [int(v) for v in op.attributes["strides"]]
    x = lw.operand(op, 0)
    value = lw.constant_value(x)
    if value is not None:
        return [lw.const(value[tuple(slice(a, b, s) for a, b, s in zip(starts, limits, strides))])]
    in_shape, _ = tensor_type(op.operands[0])
    keep = [i for i in range(len(starts)) if not (starts[i] == 0 and strides[i] == 1 and limits[i] == in_shape[i])]
    if not keep:
        return [x]
    return [lw.node1("Slice", [x, axes(lw, [starts[i] for i in keep]), axes(lw, [limits[i] for i in keep]),
                                axes(lw, keep), axes(lw, [strides[i] for i in keep])])]


@rule("stablehlo.real_dynamic_slice")
def lower_real_dynamic_slice(lw, op):
    """real_dynamic_slice(x, start, limit, strides) -> Slice."""
    x, start, limit, strides = (lw.name(v) for v in op.operands)
    return [lw.node1("Slice", [x, i64(lw, start), i64(lw, limit), axes(lw, range(len(tensor_type(op.operands[0])[0]))),
                               i64(lw, strides)])]


def _iota(shape, dim: int, dtype) -> np.ndarray:
    index = np.arange(shape[dim]).reshape([-1 if i == dim else 1 for i in range(len(shape))])
    return np.broadcast_to(index, shape).astype(dtype)


@rule("stablehlo.iota")
def lower_iota(lw, op):
    """iota {iota_dimension} -> a constant."""
    shape, dtype = tensor_type(op.results[0])
    return [lw.const(_iota(shape, int(op.attributes["iota_dimension"].value), dtype))]


@rule("stablehlo.dynamic_iota")
def lower_dynamic_iota(lw, op):
    """dynamic_iota(output_shape) {iota_dimension} -> Range(0, n) -> Unsqueeze -> Expand."""
    shape_name = lw.operand(op, 0)
    dim = int(op.attributes["iota_dimension"].value)
    _, dtype = tensor_type(op.results[0])
    value = lw.constant_value(shape_name)
    if value is not None:
        return [lw.const(_iota([int(d) for d in value], dim, dtype))]
    from export.lowering.onnx.graph import NUMPY_TO_ONNX

    shape64 = i64(lw, shape_name)
    n = lw.node1("Gather", [shape64, lw.const(np.array(dim, np.int64))], axis=0)
    rng = lw.node1("Range", [lw.const(np.array(0, np.int64)), n, lw.const(np.array(1, np.int64))])
    rank = len(tensor_type(op.results[0])[0])
    if rank > 1:
        rng = lw.node1("Unsqueeze", [rng, axes(lw, [i for i in range(rank) if i != dim])])
        rng = lw.node1("Expand", [rng, shape64])
    return [lw.node1("Cast", [rng], to=NUMPY_TO_ONNX[dtype])]


@rule("stablehlo.get_dimension_size")
def lower_get_dimension_size(lw, op):
    """get_dimension_size(x) {dimension} -> Cast<int32>(Reshape(Shape(x, d, d+1), []))."""
    dim = int(op.attributes["dimension"].value)
    shape, _ = tensor_type(op.operands[0])
    if shape[dim] is not None:
        return [lw.const(np.array(shape[dim], np.int32))]
    size = lw.node1("Shape", [lw.operand(op, 0)], start=dim, end=dim + 1)
    scalar = lw.node1("Reshape", [size, lw.const(np.array([], np.int64))])
    return [lw.node1("Cast", [scalar], to=TensorProto.INT32)]
