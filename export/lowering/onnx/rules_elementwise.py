"""Elementwise StableHLO ops: one-to-one ops in a table, the rest as small rules. Every rule folds
to a constant when all its operands are known at export time (shape arithmetic mostly is).

  stablehlo.add(x, y) -> Add, ...  (TABLE below: StableHLO name -> (ONNX op, numpy fold))
  stablehlo.compare(x, y) {comparison_direction} -> Equal | Less | LessOrEqual | ... (NE: Not(Equal))
  stablehlo.select(pred, on_true, on_false) -> Where
  stablehlo.convert(x) -> Cast
  stablehlo.clamp(min, x, max) -> Min(Max(x, min), max)
  stablehlo.constant {value} -> a constant (Constant node)
"""

from __future__ import annotations

import numpy as np

from export.lowering.onnx.graph import NUMPY_TO_ONNX, dense_attr_to_numpy, rule, tensor_type

def _divide(x, y):
    if np.issubdtype(np.asarray(x).dtype, np.integer):
        return np.trunc(np.asarray(x, np.float64) / np.asarray(y, np.float64))  # rounds toward zero
    return np.divide(x, y)


# StableHLO op -> (ONNX op, numpy function used to fold constants)
TABLE = {
    "stablehlo.add": ("Add", np.add),
    "stablehlo.subtract": ("Sub", np.subtract),
    "stablehlo.multiply": ("Mul", np.multiply),
    "stablehlo.divide": ("Div", _divide),  # integers: toward zero, as ONNX Runtime's Div
    "stablehlo.maximum": ("Max", np.maximum),
    "stablehlo.minimum": ("Min", np.minimum),
    "stablehlo.power": ("Pow", np.power),
    "stablehlo.negate": ("Neg", np.negative),
    "stablehlo.abs": ("Abs", np.abs),
    "stablehlo.exponential": ("Exp", np.exp),
    "stablehlo.log": ("Log", np.log),
    "stablehlo.sqrt": ("Sqrt", np.sqrt),
    "stablehlo.tanh": ("Tanh", np.tanh),
    "stablehlo.logistic": ("Sigmoid", None),
    "stablehlo.sine": ("Sin", np.sin),
    "stablehlo.cosine": ("Cos", np.cos),
    "stablehlo.floor": ("Floor", np.floor),
    "stablehlo.ceil": ("Ceil", np.ceil),
    "stablehlo.sign": ("Sign", np.sign),
    "stablehlo.round_nearest_even": ("Round", np.round),
}
BITWISE = {  # bool operands use the logical op, integers the bitwise one
    "stablehlo.and": ("And", "BitwiseAnd", np.bitwise_and),
    "stablehlo.or": ("Or", "BitwiseOr", np.bitwise_or),
    "stablehlo.xor": ("Xor", "BitwiseXor", np.bitwise_xor),
}
COMPARE = {"EQ": ("Equal", np.equal), "LT": ("Less", np.less), "LE": ("LessOrEqual", np.less_equal),
           "GT": ("Greater", np.greater), "GE": ("GreaterOrEqual", np.greater_equal),
           "NE": (None, np.not_equal)}


def result_dtype(op, i: int = 0) -> np.dtype:
    return tensor_type(op.results[i])[1]


def folded(lw, op, fn, args):
    """The folded constant if every operand is known, else None."""
    values = [lw.constant_value(a) for a in args]
    if fn is None or any(v is None for v in values):
        return None
    with np.errstate(all="ignore"):
        return lw.const(np.asarray(fn(*values)).astype(result_dtype(op)))


def _table_rule(onnx_op, fn):
    def lower(lw, op):
        args = [lw.name(v) for v in op.operands]
        return [folded(lw, op, fn, args) or lw.node1(onnx_op, lw.elementwise_operands(args, op))]

    lower.__doc__ = f"-> {onnx_op}"
    return lower


for _name, (_onnx, _fn) in TABLE.items():
    rule(_name)(_table_rule(_onnx, _fn))


def _bitwise_rule(logical, bitwise, fn):
    def lower(lw, op):
        args = [lw.name(v) for v in op.operands]
        kind = logical if result_dtype(op) == np.bool_ else bitwise
        return [folded(lw, op, fn, args) or lw.node1(kind, lw.elementwise_operands(args, op))]

    lower.__doc__ = f"-> {logical} (bool) | {bitwise} (integers)"
    return lower


for _name, (_logical, _bitwise, _fn) in BITWISE.items():
    rule(_name)(_bitwise_rule(_logical, _bitwise, _fn))


@rule("stablehlo.not")
def lower_not(lw, op):
    """not(x) -> Not (bool) | BitwiseNot (integers)."""
    x = lw.operand(op, 0)
    fn = np.logical_not if result_dtype(op) == np.bool_ else np.invert
    return [folded(lw, op, fn, [x]) or lw.node1("Not" if result_dtype(op) == np.bool_ else "BitwiseNot", [x])]


@rule("stablehlo.rsqrt")
def lower_rsqrt(lw, op):
    """rsqrt(x) -> Reciprocal(Sqrt(x))."""
    x = lw.operand(op, 0)
    return [folded(lw, op, lambda v: 1.0 / np.sqrt(v), [x]) or lw.node1("Reciprocal", [lw.node1("Sqrt", [x])])]


@rule("stablehlo.log_plus_one")
def lower_log1p(lw, op):
    """log_plus_one(x) -> Log(Add(x, 1))."""
    x = lw.operand(op, 0)
    one = lw.const(np.array(1, result_dtype(op)))
    return [folded(lw, op, np.log1p, [x]) or lw.node1("Log", [lw.node1("Add", [x, one])])]


@rule("stablehlo.exponential_minus_one")
def lower_expm1(lw, op):
    """exponential_minus_one(x) -> Sub(Exp(x), 1)."""
    x = lw.operand(op, 0)
    one = lw.const(np.array(1, result_dtype(op)))
    return [folded(lw, op, np.expm1, [x]) or lw.node1("Sub", [lw.node1("Exp", [x]), one])]


@rule("stablehlo.is_finite")
def lower_is_finite(lw, op):
    """is_finite(x) -> Not(Or(IsInf(x), IsNaN(x)))."""
    x = lw.operand(op, 0)
    return [folded(lw, op, np.isfinite, [x]) or
            lw.node1("Not", [lw.node1("Or", [lw.node1("IsInf", [x]), lw.node1("IsNaN", [x])])])]


@rule("stablehlo.remainder")
def lower_remainder(lw, op):
    """remainder(x, y) (sign of x, as C's fmod) -> Mod(fmod=1)."""
    args = [lw.name(v) for v in op.operands]
    return [folded(lw, op, np.fmod, args) or lw.node1("Mod", lw.elementwise_operands(args, op), fmod=1)]


@rule("stablehlo.compare")
def lower_compare(lw, op):
    """compare(x, y) {comparison_direction} -> Equal | Less | LessOrEqual | Greater |
    GreaterOrEqual | Not(Equal)."""
    from jax._src.lib.mlir.dialects import hlo

    direction = hlo.ComparisonDirectionAttr(op.attributes["comparison_direction"]).value
    onnx_op, fn = COMPARE[direction]
    args = [lw.name(v) for v in op.operands]
    const = folded(lw, op, fn, args)
    if const:
        return [const]
    args = lw.elementwise_operands(args, op)
    if onnx_op is None:
        return [lw.node1("Not", [lw.node1("Equal", args)])]
    return [lw.node1(onnx_op, args)]


@rule("stablehlo.select")
def lower_select(lw, op):
    """select(pred, on_true, on_false) -> Where."""
    args = [lw.name(v) for v in op.operands]
    return [folded(lw, op, np.where, args) or lw.node1("Where", lw.elementwise_operands(args, op))]


@rule("stablehlo.convert")
def lower_convert(lw, op):
    """convert(x) -> Cast(to=result type) (float -> int rounds toward zero in both)."""
    x = lw.operand(op, 0)
    dtype = result_dtype(op)
    if tensor_type(op.operands[0])[1] == dtype:
        return [x]
    value = lw.constant_value(x)
    if value is not None:
        return [lw.const(value.astype(dtype))]
    out = lw.node1("Cast", [x], to=NUMPY_TO_ONNX[dtype])
    lw.note_cast(out, x)
    return [out]


@rule("stablehlo.clamp")
def lower_clamp(lw, op):
    """clamp(min, x, max) -> Min(Max(x, min), max) (min/max may be scalars or tensors)."""
    lo, x, hi = (lw.name(v) for v in op.operands)
    const = folded(lw, op, lambda a, b, c: np.minimum(np.maximum(b, a), c), [lo, x, hi])
    if const:
        return [const]
    lo, x, hi = lw.elementwise_operands([lo, x, hi], op)
    return [lw.node1("Min", [lw.node1("Max", [x, lo]), hi])]


@rule("stablehlo.constant")
def lower_constant(lw, op):
    """constant {value} -> a Constant node (deduplicated; its value is known to later rules)."""
    shape, dtype = tensor_type(op.results[0])
    return [lw.const(dense_attr_to_numpy(op.attributes["value"], dtype, shape))]
