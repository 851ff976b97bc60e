"""Indexing ops: gather (the single-axis take that jnp.take / take_along_axis / slicing with a
symbolic size produce), dynamic_slice and dynamic_update_slice. StableHLO clamps start indices so
a slice stays in bounds; ONNX Gather rejects out-of-range indices, so indices are clamped too.

  stablehlo.gather(x, idx) {collapsed = start_index_map = [a], full slices elsewhere}
      -> Gather(x, Clip(idx, 0, dim_a - 1), axis=a) [-> Transpose]
  stablehlo.dynamic_gather(x, idx, sizes) {a take, as gather; or a slice of dynamic size whose
      collapsed dims have size 1}
      -> Slice(x, clamp(idx), clamp(idx) + sizes) [-> Squeeze(collapsed dims)]
  stablehlo.dynamic_slice(x, *starts) {slice_sizes} -> Slice(x, clamp(starts), + sizes)
  stablehlo.dynamic_update_slice(x, update, *starts)
      -> ScatterElements(x, arange(update dims) + clamp(start), update, axis=a)
         (offsets other than on one axis a must be the constant 0)
"""

from __future__ import annotations

import numpy as np

from export.lowering.onnx.graph import UnsupportedOpError, op_name, rule, source_location, tensor_type
from export.lowering.onnx.rules_shape import axes, dim_of, i64, shape_of


def _clamped_start(lw, start64: str, dim: str, size: str) -> str:
    """max(0, min(start, dim - size)), int64 [1] tensors."""
    hi = lw.node1("Sub", [dim, size])
    values = [lw.constant_value(n) for n in (start64, hi)]
    if all(v is not None for v in values):
        return lw.const(np.maximum(0, np.minimum(values[0], values[1])).astype(np.int64))
    return lw.node1("Max", [lw.node1("Min", [start64, hi]), lw.const(np.array([0], np.int64))])


def _unsupported(op, why: str):
    return UnsupportedOpError(f"unsupported form of {op_name(op)} at {source_location(op)}: {why}")


def _is_take(dn, idx_shape) -> bool:
    index_map = list(dn.start_index_map)
    return (len(index_map) == 1 and list(dn.collapsed_slice_dims) == index_map
            and not list(dn.operand_batching_dims) and len(idx_shape) >= 1
            and dn.index_vector_dim == len(idx_shape) - 1 and idx_shape[-1] == 1)


def _take(lw, op, dn):
    """A single-axis take: Gather(x, clamp(idx), axis=a), transposed to StableHLO's output order."""
    x_shape, _ = tensor_type(op.operands[0])
    idx_shape, _ = tensor_type(op.operands[1])
    a = list(dn.start_index_map)[0]
    x, idx = lw.operand(op, 0), lw.operand(op, 1)
    # [..., 1] -> [...]
    idx = lw.node1("Squeeze", [idx, axes(lw, [len(idx_shape) - 1])]) if lw.constant_value(idx) is None \
        else lw.const(lw.constant_value(idx)[..., 0])
    value = lw.constant_value(idx)
    if value is not None and x_shape[a] is not None:
        idx = lw.const(np.clip(value, 0, x_shape[a] - 1).astype(np.int64))
    else:
        hi = lw.node1("Sub", [dim_of(lw, x, op.operands[0], a), lw.const(np.array([1], np.int64))])
        hi = lw.node1("Reshape", [hi, lw.const(np.array([], np.int64))])
        idx = lw.node1("Min", [lw.node1("Max", [i64(lw, idx), lw.const(np.array(0, np.int64))]), hi])
    out = lw.node1("Gather", [x, idx], axis=a)
    # ONNX puts the index dims at a; StableHLO at the output positions not in offset_dims
    rank_out = len(tensor_type(op.results[0])[0])
    batch_positions = [i for i in range(rank_out) if i not in list(dn.offset_dims)]
    n_batch = len(batch_positions)
    offsets = iter(range(len(x_shape) - 1))
    want = [("b", batch_positions.index(i)) if i in batch_positions else ("o", next(offsets))
            for i in range(rank_out)]
    have = [("o", i) for i in range(a)] + [("b", j) for j in range(n_batch)] + \
           [("o", i) for i in range(a, len(x_shape) - 1)]
    if want != have:
        out = lw.node1("Transpose", [out], perm=[have.index(w) for w in want])
    return [out]


@rule("stablehlo.gather")
def lower_gather(lw, op):
    """gather(x, idx) {collapsed_slice_dims = start_index_map = [a], full slices on other dims,
    index_vector_dim = last (size 1)} -> Gather(axis=a) on clamped indices."""
    from jax._src.lib.mlir.dialects import hlo

    dn = hlo.GatherDimensionNumbers(op.attributes["dimension_numbers"])
    x_shape, _ = tensor_type(op.operands[0])
    idx_shape, _ = tensor_type(op.operands[1])
    sizes = [int(s) for s in op.attributes["slice_sizes"]]
    if not _is_take(dn, idx_shape):
        raise _unsupported(op, "only single-axis takes are lowered")
    a = list(dn.start_index_map)[0]
    if any(sizes[d] != x_shape[d] and d != a for d in range(len(sizes))):
        raise _unsupported(op, "partial slices on non-indexed dims")
    return _take(lw, op, dn)


@rule("stablehlo.dynamic_gather")
def lower_dynamic_gather(lw, op):
    """dynamic_gather(x, idx, slice_sizes) {offset_dims = all dims, no collapsed dims}: a slice of
    (possibly symbolic) size at clamped starts -> Slice."""
    from jax._src.lib.mlir.dialects import hlo

    dn = hlo.GatherDimensionNumbers(op.attributes["dimension_numbers"])
    x_shape, _ = tensor_type(op.operands[0])
    collapsed = [int(d) for d in dn.collapsed_slice_dims]
    out_shape, _ = tensor_type(op.results[0])
    rank_out = len(out_shape)
    idx_shape, _ = tensor_type(op.operands[1])
    if _is_take(dn, idx_shape):  # a take whose table has a symbolic dim: full slices elsewhere
        kept = [d for d in range(len(x_shape)) if d not in collapsed]
        offset_sizes = [out_shape[i] for i in dn.offset_dims]
        if all(o is None or x_shape[d] is None or o == x_shape[d] for o, d in zip(offset_sizes, kept)):
            return _take(lw, op, dn)
    if rank_out != len(x_shape) - len(collapsed) or list(dn.offset_dims) != list(range(rank_out)) \
            or list(dn.operand_batching_dims) or idx_shape != [len(dn.start_index_map)] \
            or not set(collapsed) <= set(int(d) for d in dn.start_index_map):
        raise _unsupported(op, "only slices (a start index vector, no batch dims) are lowered")
    x, idx, sizes = (lw.name(v) for v in op.operands)
    index_map = [int(d) for d in dn.start_index_map]
    sizes64 = i64(lw, sizes)
    starts, ends = [], []
    for j, d in enumerate(index_map):
        start = lw.node1("Slice", [i64(lw, idx), axes(lw, [j]), axes(lw, [j + 1])]) \
            if lw.constant_value(idx) is None else lw.const(lw.constant_value(idx).astype(np.int64)[j:j + 1])
        size = lw.node1("Slice", [sizes64, axes(lw, [d]), axes(lw, [d + 1])]) \
            if lw.constant_value(sizes64) is None else lw.const(lw.constant_value(sizes64)[d:d + 1])
        start = _clamped_start(lw, start, dim_of(lw, x, op.operands[0], d), size)
        starts.append(start)
        ends.append(lw.node1("Add", [start, size]))
    cat = (lambda xs: xs[0]) if len(starts) == 1 else (lambda xs: lw.node1("Concat", xs, axis=0))
    out = lw.node1("Slice", [x, cat(starts), cat(ends), axes(lw, index_map)])
    if collapsed:  # collapsed dims have slice size 1
        out = lw.node1("Squeeze", [out, axes(lw, collapsed)])
    return [out]


@rule("stablehlo.dynamic_slice")
def lower_dynamic_slice(lw, op):
    """dynamic_slice(x, *starts) {slice_sizes} -> Slice(x, clamp(starts), clamp(starts) + sizes)."""
    x = lw.operand(op, 0)
    sizes = [int(s) for s in op.attributes["slice_sizes"]]
    x_shape, _ = tensor_type(op.operands[0])
    dims = [d for d in range(len(sizes)) if not (x_shape[d] is not None and sizes[d] == x_shape[d])]
    if not dims:
        return [x]
    starts, ends = [], []
    for d in dims:
        start = lw.node1("Reshape", [i64(lw, lw.operand(op, 1 + d)), lw.const(np.array([1], np.int64))]) \
            if lw.constant_value(lw.operand(op, 1 + d)) is None \
            else lw.const(np.array([lw.constant_value(lw.operand(op, 1 + d))], np.int64).reshape(1))
        size = lw.const(np.array([sizes[d]], np.int64))
        start = _clamped_start(lw, start, dim_of(lw, x, op.operands[0], d), size)
        starts.append(start)
        ends.append(lw.node1("Add", [start, size]))
    cat = (lambda xs: xs[0]) if len(starts) == 1 else (lambda xs: lw.node1("Concat", xs, axis=0))
    return [lw.node1("Slice", [x, cat(starts), cat(ends), axes(lw, dims)])]


@rule("stablehlo.dynamic_update_slice")
def lower_dynamic_update_slice(lw, op):
    """dynamic_update_slice(x, update, *starts) with a non-zero start on one axis a at most
    -> ScatterElements(x, broadcast(arange(update_a) + clamp(start_a)), update, axis=a)."""
    x, update = lw.operand(op, 0), lw.operand(op, 1)
    x_shape, _ = tensor_type(op.operands[0])
    u_shape, _ = tensor_type(op.operands[1])
    starts = [lw.operand(op, 2 + d) for d in range(len(x_shape))]
    moving = [d for d, s in enumerate(starts) if not (lw.constant_value(s) is not None and int(lw.constant_value(s)) == 0)]
    if not moving:
        if u_shape == x_shape:
            return [update]
        moving = [0]
    if len(moving) > 1:
        raise _unsupported(op, "offsets on more than one axis")
    a = moving[0]
    start = lw.node1("Reshape", [i64(lw, starts[a]), lw.const(np.array([1], np.int64))])
    size = dim_of(lw, update, op.operands[1], a)
    start = _clamped_start(lw, start, dim_of(lw, x, op.operands[0], a), size)
    stop = lw.node1("Add", [start, size])
    rows = lw.node1("Range", [lw.node1("Squeeze", [start]), lw.node1("Squeeze", [stop]),
                              lw.const(np.array(1, np.int64))])
    rank = len(u_shape)
    if rank > 1:
        rows = lw.node1("Unsqueeze", [rows, axes(lw, [i for i in range(rank) if i != a])])
    indices = lw.node1("Expand", [rows, shape_of(lw, update, op.operands[1])])
    return [lw.node1("ScatterElements", [x, indices, update], axis=a)]
