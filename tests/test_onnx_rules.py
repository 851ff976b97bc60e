"""Every StableHLO -> ONNX rule (export/lowering/onnx/) against JAX, table-driven (in the style of
onnxscript's ops_test_data): each case is traced to StableHLO, lowered with the default op set,
saved, run with ONNX Runtime and compared with `jax.jit` on random inputs. Cases with a symbolic
dimension "T" run twice: static (T = 5) and symbolic (T fed at run time), so the dynamic forms
of the ops get exercised too. Each case lists the StableHLO ops it must actually lower.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402

from export.lowering.onnx.convert import assemble, lower_to_graph, save  # noqa: E402  (registers the rules)
from export.lowering.onnx.graph import RULES, UnsupportedOpError  # noqa: E402
from export.stablehlo import input_specs  # noqa: E402
from models.signatures import Signature  # noqa: E402
from export.stablehlo import weight_names  # noqa: E402
from models import fused  # noqa: E402
from contract.signatures import TensorSpec  # noqa: E402

T_VALUE = 5  # the size "T" takes in static runs and is fed in symbolic ones
CONSTRAINTS = ("T <= 64",)
F32, I32, BOOL, BF16 = np.float32, np.int32, np.bool_, jnp.bfloat16


# ---- input specs -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    shape: tuple
    dtype: type
    gen: Callable  # (rng, concrete shape) -> array


def F(*shape):
    """Normal float32."""
    return Spec(shape, F32, lambda r, s: r.standard_normal(s).astype(F32) * 2)


def Pos(*shape):
    """Positive float32 (log, sqrt, pow)."""
    return Spec(shape, F32, lambda r, s: r.uniform(0.1, 3.0, s).astype(F32))


def Unit(*shape):
    """float32 in (0, 1) (recurrence gates)."""
    return Spec(shape, F32, lambda r, s: r.uniform(0.05, 0.95, s).astype(F32))


def I(*shape, lo=-9, hi=10):  # noqa: E743
    """int32 in [lo, hi)."""
    return Spec(shape, I32, lambda r, s: r.integers(lo, hi, s).astype(I32))


def FI(*shape):
    """float32 with small integer values (so that comparisons see ties)."""
    return Spec(shape, F32, lambda r, s: r.integers(-2, 3, s).astype(F32))


def NZ(*shape):
    """Non-zero int32 (divisors), both signs."""
    return Spec(shape, I32, lambda r, s: (r.integers(1, 5, s) * r.choice([-1, 1], s)).astype(I32))


def B(*shape):
    return Spec(shape, BOOL, lambda r, s: r.random(s) < 0.5)


def V(value, dtype=I32):
    """A fixed value (start offsets, indices with out-of-range entries)."""
    value = np.asarray(value, dtype)
    return Spec(value.shape, dtype, lambda r, s: value)


def Halves(*shape):
    """float32 with exact halves (round half to even), negatives and NaN/inf."""
    base = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, -3.7, np.inf, -np.inf, np.nan, 0.0], F32)
    return Spec(shape, F32, lambda r, s: np.resize(base, s).astype(F32))


# ---- cases ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    fn: Callable  # fn(*inputs), or fn(params, *inputs) when params is given
    inputs: tuple
    ops: tuple  # StableHLO ops (lw.ops_seen keys) the static run must lower
    dyn_ops: tuple | None = None  # the same for the symbolic run (default: ops)
    tol: float = 1e-5  # rtol = atol for float outputs; integer and bool outputs compare exactly
    params: dict | None = None
    nodes: tuple = ()  # ONNX op types the model must contain (graph or functions)
    t_values: tuple = (T_VALUE,)  # sizes fed for "T" in the symbolic run
    xfail: str | None = None  # a known rule bug (strict)
    xfail_modes: tuple = ("static", "sym")  # the runs that bug breaks
    folds: tuple | None = None  # all known at export time: the only ops besides Constant/Identity

    @property
    def symbolic(self) -> bool:
        return any(isinstance(d, str) for s in self.inputs for d in s.shape)


def C(id, fn, inputs, ops, **kw):
    return Case(id, fn, tuple(inputs), tuple(ops), **kw)


def _logistic_primitive():
    """jax lowers lax.logistic to exp/divide; a primitive that lowers to stablehlo.logistic."""
    from jax._src.lib.mlir.dialects import hlo
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    p = Primitive("stablehlo_logistic_for_tests")
    p.def_abstract_eval(lambda x: x)
    mlir.register_lowering(p, lambda ctx, x: [hlo.logistic(x)])
    return p.bind


hlo_logistic = _logistic_primitive()
rng0 = np.random.default_rng(0)
W_NK = rng0.standard_normal((6, 4)).astype(F32) * 0.5  # a weight [N, K]
EMB = rng0.standard_normal((10, 4)).astype(F32)  # an embedding table [V, D]

S = "stablehlo."


def linear(x, w):
    """x [..., K] @ w [N, K]^T as the models write it (`x @ w.T` traces a transpose of w instead)."""
    return jnp.einsum("...k,nk->...n", x, w)


ELEMENTWISE = [  # (id, fn, inputs, ops): one-to-one float ops, each alone
    ("add", jnp.add, [F(3, 4), F(3, 4)], ["add"]),
    ("subtract", jnp.subtract, [F(3, 4), F(3, 4)], ["subtract"]),
    ("multiply", jnp.multiply, [F(3, 4), F(3, 4)], ["multiply"]),
    ("divide", jnp.divide, [F(3, 4), Pos(3, 4)], ["divide"]),
    ("maximum", jnp.maximum, [F(3, 4), F(3, 4)], ["maximum"]),
    ("minimum", jnp.minimum, [F(3, 4), F(3, 4)], ["minimum"]),
    ("power", jnp.power, [Pos(3, 4), F(3, 4)], ["power"]),
    ("negate", jnp.negative, [F(3, 4)], ["negate"]),
    ("abs", jnp.abs, [F(3, 4)], ["abs"]),
    ("exp", jnp.exp, [F(3, 4)], ["exponential"]),
    ("log", jnp.log, [Pos(3, 4)], ["log"]),
    ("log1p", jnp.log1p, [Pos(3, 4)], ["log_plus_one"]),
    ("expm1", jnp.expm1, [F(3, 4)], ["exponential_minus_one"]),
    ("sqrt", jnp.sqrt, [Pos(3, 4)], ["sqrt"]),
    ("rsqrt", jax.lax.rsqrt, [Pos(3, 4)], ["rsqrt"]),
    ("tanh", jnp.tanh, [F(3, 4)], ["tanh"]),
    ("logistic", hlo_logistic, [F(3, 4)], ["logistic"]),
    ("sine", jnp.sin, [F(3, 4)], ["sine"]),
    ("cosine", jnp.cos, [F(3, 4)], ["cosine"]),
    ("floor", jnp.floor, [F(3, 4)], ["floor"]),
    ("ceil", jnp.ceil, [F(3, 4)], ["ceil"]),
    ("sign", jnp.sign, [F(3, 4)], ["sign"]),
    ("round_half_even", jnp.round, [Halves(3, 4)], ["round_nearest_even"]),
]
CMP = {"eq": jnp.equal, "ne": jnp.not_equal, "lt": jnp.less, "le": jnp.less_equal,
       "gt": jnp.greater, "ge": jnp.greater_equal}

CASES: list[Case] = [C(i, f, xs, [S + o for o in ops]) for i, f, xs, ops in ELEMENTWISE]
CASES += [C(f"compare_{d}_{t}", fn, [g(3, 4), g(3, 4)], [S + "compare"])
          for d, fn in CMP.items() for t, g in (("f32", FI), ("i32", lambda *s: I(*s, lo=-2, hi=3)))]
CASES += [
    C("elementwise_symbolic", lambda x, y: jnp.tanh(x) * y - jnp.exp(-jnp.abs(y)), [F("T", 4), F("T", 4)],
      [S + "tanh", S + "multiply", S + "subtract", S + "exponential"]),
    C("add_broadcast_symbolic", lambda x, y: x + y + 1.0, [F("T", 4), F(4)],
      [S + "add", S + "broadcast_in_dim"], dyn_ops=[S + "add", S + "dynamic_broadcast_in_dim"]),
    C("divide_i32_trunc", jax.lax.div, [I(4, 5), NZ(4, 5)], [S + "divide"]),
    C("floor_divide_i32", jnp.floor_divide, [I(4, 5), NZ(4, 5)], [S + "divide", S + "select"]),
    C("fmod_i32", jnp.fmod, [I(4, 5), NZ(4, 5)], [S + "remainder"]),
    C("remainder_i32", jnp.remainder, [I(4, 5), NZ(4, 5)], [S + "remainder"]),
    C("fmod_f32", jnp.fmod, [F(4, 5), Pos(4, 5)], [S + "remainder"]),
    C("max_min_i32", lambda x, y: (jnp.maximum(x, y), jnp.minimum(x, y), -x, jnp.abs(x), jnp.sign(x)),
      [I(3, 4), I(3, 4)], [S + "maximum", S + "minimum", S + "negate", S + "abs", S + "sign"]),
    C("is_finite", jnp.isfinite, [Halves(3, 4)], [S + "is_finite"],
      ),
    *[C(f"{name}_{t}", fn, [g(3, 4), g(3, 4)], [S + name])
      for name, fn in (("and", jnp.bitwise_and), ("or", jnp.bitwise_or), ("xor", jnp.bitwise_xor))
      for t, g in (("bool", B), ("i32", I))],
    C("not_bool", jnp.logical_not, [B(3, 4)], [S + "not"]),
    C("not_i32", jnp.bitwise_not, [I(3, 4)], [S + "not"]),
    C("select", jnp.where, [B(3, 4), F(3, 4), F(3, 4)], [S + "select"]),
    C("select_symbolic", lambda c, x: jnp.where(c, x, 0.5), [B("T", 3), F("T", 3)], [S + "select"]),
    C("convert_f32_i32", lambda x: x.astype(I32), [F(3, 4)], [S + "convert"]),
    C("convert_i32_f32_bool_f32", lambda x, b: (x.astype(F32), b.astype(F32)), [I(3, 4), B(3, 4)],
      [S + "convert"]),
    C("convert_bf16_f16_roundtrip", lambda x: (x.astype(BF16).astype(F32), x.astype(jnp.float16).astype(F32)),
      [F(3, 4)], [S + "convert"], tol=0.0),
    C("clamp_scalar_bounds", lambda x: jax.lax.clamp(F32(-1.0), x, F32(1.5)), [F(3, 4)], [S + "clamp"]),
    C("clamp_tensor_bounds", jax.lax.clamp, [F(3, 4), F(3, 4), F(3, 4)], [S + "clamp"]),
    C("clip_i32", lambda x: jnp.clip(x, -3, 4), [I(3, 4)], [S + "maximum", S + "minimum"]),
    C("constants", lambda x: (x + jnp.array([[1.5, -2.0, 0.25, 7.0]], F32), x * 3.0,
                              jnp.array([True, False, True, True]) & (x[0] > 0)),
      [F(3, 4)], [S + "constant", S + "add", S + "multiply"]),
    C("constant_i32_f16", lambda x: (x + jnp.array([3, -4, 5, 6], I32),
                                     x.astype(F32) * jnp.array([0.5, 1.5, -2.0, 3.0], jnp.float16).astype(F32)),
      [I(3, 4)], [S + "constant", S + "convert"]),
    C("constant_bf16", lambda x: x + jnp.array([1.5, -2.25, 3.0, 0.125], BF16).astype(F32),
      [F(3, 4)], [S + "constant", S + "convert"],
      ),
    # ---- shapes ----
    C("reshape", lambda x: x.reshape(2, 6, 1), [F(3, 4)], [S + "reshape"]),
    C("reshape_symbolic", lambda x: x.reshape(-1, 2), [F("T", 4)], [S + "reshape"],
      dyn_ops=[S + "dynamic_reshape", S + "get_dimension_size"]),
    C("broadcast_to", lambda x: jnp.broadcast_to(x, (2, 3, 4)), [F(3, 1)], [S + "broadcast_in_dim"]),
    # unit-shaped broadcasts into elementwise ops are elided (ONNX broadcasts), unless every operand
    # is one; a broadcast that is itself an output stays
    C("broadcast_elided_into_elementwise", lambda x, s: (x * s + 2.0, jnp.maximum(s, 0.5) * jnp.ones_like(x),
                                                         jnp.broadcast_to(s, x.shape)),
      [F("T", 3), F(1)], [S + "multiply", S + "broadcast_in_dim"],
      dyn_ops=[S + "multiply", S + "dynamic_broadcast_in_dim"], nodes=("Expand",)),
    C("dynamic_reshape_one_symbolic_dim", lambda x: (x.reshape(x.shape[0], 2, 2), x.reshape(-1)),
      [F("T", 4)], [S + "reshape"], dyn_ops=[S + "dynamic_reshape"]),
    C("broadcast_in_dim_permuted", lambda x: jax.lax.broadcast_in_dim(x, (4, 2, 3), (2, 0)), [F(3, 4)],
      [S + "broadcast_in_dim"], nodes=("Transpose", "Expand")),
    C("broadcast_in_dim_permuted_symbolic",
      lambda x: jax.lax.broadcast_in_dim(x, (x.shape[1], 2, x.shape[0]), (2, 0)), [F("T", 4)],
      [S + "broadcast_in_dim"], dyn_ops=[S + "dynamic_broadcast_in_dim"]),
    C("broadcast_const_permuted", lambda x: x + jax.lax.broadcast_in_dim(
        jnp.arange(12.0, dtype=F32).reshape(3, 4), (4, 2, 3), (2, 0)), [F(4, 2, 3)], [S + "broadcast_in_dim"]),
    C("broadcast_to_symbolic", lambda x, y: jnp.broadcast_to(x, y.shape) * y, [F(1, 4), F("T", 4)],
      [S + "broadcast_in_dim"], dyn_ops=[S + "dynamic_broadcast_in_dim"]),
    C("symbolic_inner_axis", lambda x: (jnp.sum(x, axis=1), x.reshape(-1), jnp.arange(x.shape[1]) + x),
      [I(2, "T")], [S + "reduce", S + "reshape", S + "iota"],
      dyn_ops=[S + "reduce", S + "dynamic_reshape", S + "dynamic_iota", S + "get_dimension_size"]),
    C("transpose", lambda x: jnp.transpose(x, (2, 0, 1)), [F(2, 3, 4)], [S + "transpose"]),
    C("transpose_symbolic", lambda x: jnp.transpose(x, (1, 0, 2)), [F("T", 3, 2)], [S + "transpose"]),
    C("concatenate", lambda x, y: jnp.concatenate([x, y, x], axis=1), [F(3, 2), F(3, 4)], [S + "concatenate"]),
    C("concatenate_symbolic", lambda x, y: jnp.concatenate([x, y], axis=0), [F("T", 2), F(3, 2)],
      [S + "concatenate"]),
    C("slice_strided", lambda x: (x[1:5:2, ::3], x[:, 1:3], x[-1]), [F(6, 7)], [S + "slice"]),
    C("slice_symbolic_tail", lambda x: x[1:], [F("T", 3)], [S + "slice"],
      dyn_ops=[S + "dynamic_gather"]),
    C("real_dynamic_slice", lambda x, i: jax.lax.dynamic_slice(x, (0, i), (x.shape[0], 2)),
      [F("T", 4), V(1)], [S + "dynamic_slice"], dyn_ops=[S + "real_dynamic_slice"]),
    C("iota", lambda x: x + jnp.arange(12, dtype=I32).reshape(3, 4), [I(3, 4)], [S + "iota"]),
    C("iota_symbolic", lambda x: (x * jnp.arange(x.shape[0], dtype=I32), jnp.arange(x.shape[0], dtype=F32)),
      [I("T")], [S + "iota"], dyn_ops=[S + "dynamic_iota"]),
    C("iota_2d_symbolic", lambda x: jax.lax.broadcasted_iota(I32, (x.shape[0], 3), 1) + x, [I("T", 3)],
      [S + "iota"], dyn_ops=[S + "dynamic_iota"]),
    C("get_dimension_size", lambda x: x * x.shape[0] + jnp.zeros((x.shape[0], 2), I32), [I("T", 2)],
      [S + "broadcast_in_dim"], dyn_ops=[S + "get_dimension_size", S + "dynamic_broadcast_in_dim"]),
    # ---- indexing: starts and indices out of range must clamp as in JAX ----
    C("dynamic_slice_1axis", lambda x, i: tuple(jax.lax.dynamic_slice(x, (i + d, 0), (2, 4))
                                                for d in (0, 5, -9, -1 - i)),
      [F(6, 4), V(2)], [S + "dynamic_slice"]),
    C("dynamic_slice_const_starts", lambda x: tuple(jax.lax.dynamic_slice(x, (jnp.int32(d), 0), (2, 3))
                                                    for d in (1, 9, -1, -20)), [F(6, 4)], [S + "dynamic_slice"]),
    C("dynamic_slice_2axes", lambda x, i: tuple(jax.lax.dynamic_slice(x, (i + d, i - d), (2, 3))
                                                for d in (0, 4, -7)),
      [F(6, 5), V(1)], [S + "dynamic_slice"], nodes=("Concat", "Slice")),
    C("dynamic_slice_symbolic", lambda x, i: tuple(jax.lax.dynamic_slice(x, (0, i + d), (x.shape[0], 2))
                                                   for d in (0, 9, -9)), [F("T", 5), V(1)],
      [S + "dynamic_slice"], dyn_ops=[S + "real_dynamic_slice"]),
    C("dynamic_update_slice", lambda x, u, i: tuple(jax.lax.dynamic_update_slice(x, u, (i + d, 0))
                                                    for d in (0, 5, -9, -1 - i)),
      [F(6, 4), F(2, 4), V(2)], [S + "dynamic_update_slice"]),
    C("dynamic_update_slice_const_starts", lambda x, u: tuple(
        jax.lax.dynamic_update_slice(x, u, (jnp.int32(d), jnp.int32(0))) for d in (3, 9, -1, -20)),
      [F(6, 4), F(2, 4)], [S + "dynamic_update_slice"]),
    C("dynamic_update_slice_axis1", lambda x, u, i: tuple(jax.lax.dynamic_update_slice(x, u, (0, i + d))
                                                          for d in (0, 7, -8)),
      [F("T", 6), F("T", 2), V(3)], [S + "dynamic_update_slice"]),
    C("dynamic_update_slice_zero_starts", lambda x, u: (jax.lax.dynamic_update_slice(x, u, (0, 0)),
                                                        jax.lax.dynamic_update_slice(x, x * 2, (0, 0))),
      [F(5, 4), F(2, 3)], [S + "dynamic_update_slice"]),
    C("take_axis0_clip", lambda x, i: jnp.take(x, i, axis=0, mode="clip"), [F(5, 3), V([[4, -3], [0, 9]])],
      [S + "gather"]),
    C("take_axis1_clip", lambda x, i: jnp.take(x, i, axis=1, mode="clip"), [F(2, 5, 3), V([1, 7, -2])],
      [S + "gather"]),
    C("take_index_input", lambda x, i: jnp.take(x, i, axis=1, mode="clip"), [F(3, 4), I(2, 3, lo=-6, hi=8)],
      [S + "gather"]),
    C("take_symbolic_table", lambda x, i: jnp.take(x, i, axis=0, mode="clip"), [F("T", 4), V([0, 3, 8, -1])],
      [S + "gather"]),
    C("take_along_axis_1d", lambda x, i: jnp.take_along_axis(x, i, axis=0, mode="clip"),
      [F(6), V([5, 0, 11, -4, 2])], [S + "gather"]),
    C("getitem_index", lambda x, i: x[i], [F(6, 2), V([1, -2, 5])], [S + "gather"]),
    C("take_axis1_symbolic_rows", lambda x, i: jnp.take(x, i, axis=1, mode="clip"),
      [F("T", 4), V([2, 0, 7])], [S + "gather"], dyn_ops=[S + "dynamic_gather"]),
    C("dynamic_slice_symbolic_axis", lambda x, i: tuple(jax.lax.dynamic_slice(x, (i + d, 1), (1, 2))
                                                        for d in (0, 9, -9)), [F("T", 4), V(2)],
      [S + "dynamic_slice"]),
    C("dynamic_update_slice_symbolic_axis",
      lambda x, u, i: tuple(jax.lax.dynamic_update_slice(x, u, (i + d, 0)) for d in (0, 9, -9)),
      [F("T", 4), F(1, 4), V(2)], [S + "dynamic_update_slice"]),
    C("gather_batch_dims_last", lambda x, i: jax.lax.gather(
        x, i[:, None], jax.lax.GatherDimensionNumbers(offset_dims=(0, 1), collapsed_slice_dims=(1,),
                                                      start_index_map=(1,)), (2, 1, 3), mode="clip"),
      [F(2, 5, 3), V([4, 0, 8, -1])], [S + "gather"], nodes=("Gather", "Transpose")),
    C("index_scalar_symbolic", lambda x, i: tuple(o for d in (0, 7, -9) for o in (x[:, i + d], x[i + d])),
      [F("T", 4), V(-1)], [S + "dynamic_slice"],
      dyn_ops=[S + "dynamic_gather", S + "dynamic_slice"]),
    C("index_slice_symbolic", lambda x, i: (x[i, 1:], x[:, :x.shape[0] - 1]), [F("T", 4, "T"), V(2)],
      [S + "dynamic_slice"], dyn_ops=[S + "dynamic_gather"]),
    C("take_fill_mode", lambda x, i: jnp.take(x, i, axis=0), [F(5, 3), V([4, -3, 0, 9])], [S + "gather"]),
    C("nan_inf_propagation", lambda x, y: (jnp.maximum(x, y), jnp.minimum(x, y), jax.lax.clamp(F32(-1.0), x, F32(1.0)),
                                           jnp.floor(x), jnp.ceil(x), jnp.sign(x), jnp.abs(x), jnp.tanh(x)),
      [Halves(3, 4), F(3, 4)], [S + "maximum", S + "minimum", S + "clamp", S + "floor", S + "sign"]),
    C("reduce_nan", lambda x: (jnp.sum(x, axis=1), jnp.max(x, axis=1), jnp.min(x, axis=0)), [Halves(3, 4)],
      [S + "reduce"],
      xfail="not a rule bug: ONNX Runtime's CPU ReduceMax/ReduceMin propagate NaN only when it comes "
            "first along the axis (max(1, nan, 0) = 1, max(inf, -inf, nan, 0) = inf), unlike "
            "StableHLO/JAX (and ONNX's 'similar to numpy'); rules_reduce_dot.py maps reduce max/min "
            "to them directly"),
    # ---- reductions ----
    C("reduce_sum_max_min_prod", lambda x: (jnp.sum(x, axis=(0, 2)), jnp.max(x, axis=1), jnp.min(x, axis=0),
                                            jnp.prod(x, axis=2)), [F(2, 3, 4)], [S + "reduce"]),
    C("reduce_i32", lambda x: (jnp.sum(x, axis=1), jnp.max(x, axis=0), jnp.min(x), jnp.prod(x, axis=1)),
      [I(3, 4, lo=-3, hi=4)], [S + "reduce"]),
    C("reduce_all_any", lambda b: (jnp.all(b, axis=1), jnp.any(b, axis=0), jnp.all(b), jnp.any(b)),
      [B(3, 4)], [S + "reduce"]),
    C("reduce_with_init", lambda x: (jax.lax.reduce(x, F32(2.0), jax.lax.add, (0,)),
                                     jax.lax.reduce(x, F32(0.5), jax.lax.max, (1,))), [F(3, 4)], [S + "reduce"]),
    C("reduce_symbolic", lambda x: (jnp.sum(x, axis=0), jnp.max(x, axis=1)), [F("T", 4)], [S + "reduce"]),
    # ---- contractions ----
    C("einsum_batch", lambda x, y: jnp.einsum("bij,bjk->bik", x, y), [F(2, 3, 4), F(2, 4, 5)],
      [S + "dot_general"], nodes=("Einsum",)),
    C("einsum_batch_middle", lambda x, y: jnp.einsum("ibj,jbk->bik", x, y), [F(3, 2, 4), F(4, 2, 5)],
      [S + "dot_general"]),
    C("einsum_two_contractions", lambda x, y: jnp.einsum("abc,cbd->ad", x, y), [F(2, 3, 4), F(4, 3, 5)],
      [S + "dot_general"]),
    C("einsum_symbolic", lambda x, y: jnp.einsum("tk,nk->tn", x, y), [F("T", 4), F(6, 4)],
      [S + "dot_general"]),
    C("dot_bf16_preferred_f32", lambda x, y: jnp.einsum("ik,kj->ij", x.astype(BF16), y.astype(BF16),
                                                        preferred_element_type=F32),
      [F(3, 4), F(4, 5)], [S + "dot_general", S + "convert"]),
    C("matmul_weight", lambda p, x: linear(x, p["w"]), [F(2, "T", 4)], [S + "dot_general"],
      params={"w": W_NK}, nodes=("MatMul",)),
    C("matmul_weight_twice", lambda p, x, y: (linear(x, p["w"]), linear(jnp.tanh(y), p["w"])),
      [F("T", 4), F(2, 4)], [S + "dot_general"], params={"w": W_NK}, nodes=("MatMul",)),
    C("matmul_weight_bf16", lambda p, x: linear(x, p["w"].astype(F32)), [F("T", 4)], [S + "dot_general"],
      params={"w": W_NK.astype(BF16)}, nodes=("MatMul", "Cast")),
    C("matmul_weight_bf16_f32_accumulate", lambda p, x: jnp.einsum(
        "...k,nk->...n", x.astype(BF16), p["w"], preferred_element_type=F32), [F(1, "T", 4)],
      [S + "dot_general", S + "convert"], params={"w": W_NK.astype(BF16)}, nodes=("MatMul",)),
    C("gemm_tied_weight", lambda p, i, x: (jnp.take(p["w"], i, axis=0, mode="clip"), linear(x, p["w"])),
      [V([[0, 5, 9]]), F(1, "T", 4)], [S + "dot_general", S + "gather"], params={"w": W_NK}, nodes=("Gemm",)),
    C("gemm_tied_weight_2d", lambda p, i, x: (jnp.take(p["w"], i, axis=0, mode="clip"), linear(x, p["w"])),
      [V([1, 2]), F("T", 4)], [S + "dot_general", S + "gather"], params={"w": W_NK}, nodes=("Gemm",)),
    C("gemm_tied_weight_bf16", lambda p, i, x: (fused.embedding_lookup(p["w"], i).astype(F32),
                                                linear(x, p["w"].astype(F32))),
      [V([[0, 5, 9]]), F(1, "T", 4)], [S + "dot_general"], params={"w": W_NK.astype(BF16)},
      nodes=("Gemm", "Cast")),
    C("matmul_weight_and_einsum_lhs_contract0",
      lambda p, x, y: (linear(x, p["w"]), jnp.einsum("kb,nk->bn", y, p["w"])), [F(3, 4), F(4, 2)],
      [S + "dot_general"], params={"w": W_NK[:4].copy()},  # square: runs, silently wrong
      ),
    # ---- composites (models/fused.py) and their ONNX forms ----
    C("rms_norm", lambda x, g: fused.rms_norm(x, g, 1e-6), [F(1, "T", 8), F(8)],
      ["composite odml.rms_norm"], nodes=("RMSNormalization",)),
    C("rms_norm_weight_gain", lambda p, x: fused.rms_norm(x, 1.0 + p["g"], 1e-6), [F("T", 8)],
      ["composite odml.rms_norm"], params={"g": rng0.standard_normal(8).astype(F32)}, nodes=("RMSNormalization",)),
    C("embedding_lookup", lambda p, ids: fused.embedding_lookup(p["emb"], ids),
      [V([[3, 0, 12, -2, 9]])], ["composite odml.embedding_lookup"], params={"emb": EMB}, nodes=("Gather",)),
    C("embedding_lookup_symbolic", lambda p, ids: fused.embedding_lookup(p["emb"], ids),
      [I(1, "T", lo=-3, hi=14)], ["composite odml.embedding_lookup"], params={"emb": EMB}, nodes=("Gather",)),
    C("embedding_lookup_bf16", lambda p, ids: fused.embedding_lookup(p["emb"], ids).astype(F32),
      [I(1, "T", lo=-3, hi=14)], ["composite odml.embedding_lookup", S + "convert"],
      params={"emb": EMB.astype(BF16)}, nodes=("Gather", "Cast")),
    C("linear_recurrence", fused.linear_recurrence, [Unit(1, "T", 6), F(1, "T", 6), F(1, 6)],
      ["composite gemma_edge.linear_recurrence"], nodes=("LinearRecurrence", "Scan"), t_values=(5, 1)),
    C("linear_recurrence_decode", fused.linear_recurrence, [Unit(1, 1, 6), F(1, 1, 6), F(1, 6)],
      ["composite gemma_edge.linear_recurrence"], nodes=("LinearRecurrence", "Scan")),
]


def _constants(specs, seed):
    rng = np.random.default_rng(seed)
    return [s.gen(rng, s.shape) for s in specs]


def folded_case(id, entries, folds=()):
    """Each rule's export-time fold: the op applied to stablehlo.constant operands (jax traces
    ops on constants inside jit), plus an input so the model has one."""
    consts = [_constants(xs, i) for i, (_, _, xs, _) in enumerate(entries)]

    def fn(x):
        outs = [f(*map(jnp.asarray, c)) for (_, f, _, _), c in zip(entries, consts)]
        return tuple(jax.tree.leaves(outs)) + (x,)

    ops = sorted({S + o for *_, os in entries for o in os})
    return C(id, fn, [Spec((1,), F32, lambda r, s: np.zeros(s, F32))], ops, folds=folds)


INT_OPS = [
    ("div", jax.lax.div, [I(4, 5), NZ(4, 5)], ["divide"]),
    ("floordiv", jnp.floor_divide, [I(4, 5), NZ(4, 5)], ["divide", "select"]),
    ("fmod", jnp.fmod, [I(4, 5), NZ(4, 5)], ["remainder"]),
    ("mod", jnp.remainder, [I(4, 5), NZ(4, 5)], ["remainder"]),
    ("maxmin", lambda x, y: jnp.minimum(jnp.maximum(x, y), 3), [I(3, 4), I(3, 4)], ["maximum", "minimum"]),
    ("negabs", lambda x: jnp.sign(x) * -jnp.abs(x), [I(3, 4)], ["sign", "negate", "abs", "multiply"]),
    ("bits", lambda x, y: (x & y) | (x ^ ~y), [I(3, 4), I(3, 4)], ["and", "or", "xor", "not"]),
    ("bools", lambda x, y: (x & y) | (x ^ ~y), [B(3, 4), B(3, 4)], ["and", "or", "xor", "not"]),
    *[(f"cmp_{d}", f, [I(3, 4, lo=-2, hi=3), I(3, 4, lo=-2, hi=3)], ["compare"]) for d, f in CMP.items()],
    ("select", jnp.where, [B(3, 4), I(3, 4), I(3, 4)], ["select"]),
    ("convert", lambda x: (x.astype(I32), x.astype(BF16).astype(F32)), [F(3, 4)], ["convert"]),
    ("clamp", lambda x: jax.lax.clamp(F32(-1.0), x, F32(1.5)), [F(3, 4)], ["clamp"]),
    ("reduce", lambda x: (jnp.sum(x, 0), jnp.max(x, 1), jnp.min(x), jnp.prod(x, 1)), [I(3, 4, lo=-3, hi=4)],
     ["reduce"]),
    ("reduce_bool", lambda b: (jnp.all(b, 1), jnp.any(b, 0)), [B(3, 4)], ["reduce"]),
    ("shapes", lambda x: (x.reshape(4, 3), x.T, jnp.concatenate([x, x]), x[::2, 1:3],
                          jax.lax.broadcast_in_dim(x, (4, 2, 3), (2, 0))), [F(3, 4)],
     ["reshape", "transpose", "concatenate", "slice", "broadcast_in_dim"]),
    ("take", lambda x: jnp.take(x, jnp.array([2, -1, 7]), axis=1, mode="clip"), [F(3, 4)], ["gather"]),
]
CASES += [
    folded_case("folded_float", ELEMENTWISE, folds=("Sigmoid",)),  # logistic has no fold
    *[folded_case(f"folded_{e[0]}", [e], folds=None if e[0] == "take" else ()) for e in INT_OPS],
]


# ---- running a case ------------------------------------------------------------------------------
def concrete(shape, t):
    return tuple(t if isinstance(d, str) else d for d in shape)


def build(case: Case, symbolic: bool) -> tuple[Signature, dict]:
    params = case.params if case.params is not None else {}
    call = case.fn if case.params is not None else (lambda p, *xs: case.fn(*xs))

    def fn(p, *xs):
        out = call(p, *xs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    inputs = tuple(TensorSpec(f"x{i}", s.shape if symbolic else concrete(s.shape, T_VALUE), np.dtype(s.dtype))
                   for i, s in enumerate(case.inputs))
    constraints = CONSTRAINTS if symbolic else ()
    probe = Signature(case.id, 0, inputs, (), fn=fn, constraints=constraints)
    weights, specs = input_specs(probe, params)
    avals = jax.eval_shape(fn, weights, *specs)
    outputs = tuple(TensorSpec(f"y{i}", tuple(d if isinstance(d, int) else str(d) for d in a.shape),
                               np.dtype(a.dtype)) for i, a in enumerate(avals))
    return Signature(case.id, 0, inputs, outputs, fn=fn, constraints=constraints), params


def node_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node} | {n.op_type for f in model.functions for n in f.node}


def run_case(case: Case, symbolic: bool, tmp_path):
    import onnxruntime as ort

    sig, params = build(case, symbolic)
    lw = lower_to_graph(sig, params, op_set="default", max_len=16)
    model, weights = assemble(sig, lw, {})
    path = tmp_path / "model.onnx"
    save(model, weights, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    reference = jax.jit(sig.fn)
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    for t in case.t_values if symbolic else (T_VALUE,):
        xs = [s.gen(rng, concrete(s.shape, t)) for s in case.inputs]
        got = session.run(None, {f"x{i}": x for i, x in enumerate(xs)})
        want = [np.asarray(w) for w in reference(params, *xs)]
        assert len(got) == len(want)
        for j, (g, w) in enumerate(zip(got, want)):
            msg = f"{case.id} output {j} (T={t})"
            assert g.dtype == w.dtype and g.shape == w.shape, f"{msg}: {g.dtype}{g.shape} vs {w.dtype}{w.shape}"
            if w.dtype.kind == "f":
                np.testing.assert_allclose(g, w, rtol=case.tol, atol=case.tol, err_msg=msg)
            else:
                np.testing.assert_array_equal(g, w, err_msg=msg)
    expected = case.dyn_ops if symbolic and case.dyn_ops is not None else case.ops
    missing = [op for op in expected if op not in lw.ops_seen]
    assert not missing, f"{case.id}: {missing} not lowered (saw {sorted(lw.ops_seen)})"
    assert set(case.nodes) <= node_types(model), f"{case.id}: want {case.nodes}, have {node_types(model)}"
    if case.folds is not None:
        assert node_types(model) <= {"Constant", "Identity", *case.folds}, f"{case.id}: {node_types(model)}"
    return lw, model


def _params():
    out = []
    for case in CASES:
        for sym in (False, True) if case.symbolic else (False,):
            mode = "sym" if sym else "static"
            marks = [pytest.mark.xfail(reason=case.xfail, strict=True)] \
                if case.xfail and mode in case.xfail_modes else []
            out.append(pytest.param(case, sym, id=f"{case.id}-{mode}", marks=marks))
    return out


@pytest.mark.parametrize("case,symbolic", _params())
def test_rule(case, symbolic, tmp_path):
    run_case(case, symbolic, tmp_path)


# ---- table-wide checks ---------------------------------------------------------------------------
def test_every_rule_has_a_case():
    covered = {op for c in CASES for op in (*c.ops, *(c.dyn_ops or ()))}
    missing = sorted(set(RULES) - covered)
    assert not missing, f"rules without a case in CASES: {missing}"
    assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


def test_weightless_signature():
    assert weight_names({}) == []
    sig, params = build(CASES[0], False)
    lw = lower_to_graph(sig, params, op_set="default", max_len=4)
    assert lw.weight_names == [] and lw.initializers == {}


def test_matmul_weight_stored_transposed(tmp_path):
    """A weight used only as a matmul's [N, K] rhs is stored [K, N]; a tied one stays [N, K]."""
    case = next(c for c in CASES if c.id == "matmul_weight")
    _, model = run_case(case, True, tmp_path)
    assert [tuple(t.dims) for t in model.graph.initializer if t.name == "w"] == [W_NK.T.shape]
    case = next(c for c in CASES if c.id == "gemm_tied_weight")
    _, model = run_case(case, True, tmp_path)
    assert [tuple(t.dims) for t in model.graph.initializer if t.name == "w"] == [W_NK.shape]


def test_unsupported_op_names_model_line():
    """An op from models/ code is reported at its models/ source line."""
    from models.generate import GREEDY, sample

    sig, params = build(C("argmax", lambda x: sample(x, None, GREEDY), [F(2, 5)], []), False)
    with pytest.raises(UnsupportedOpError, match=r"reduce at models/generate\.py:\d+$"):
        lower_to_graph(sig, params, op_set="default", max_len=4)


@pytest.mark.parametrize("fn,op", [(jnp.sort, "stablehlo.sort"), (jax.lax.cumsum, "stablehlo.reduce_window")],
                         ids=["sort", "cumsum"])
def test_unsupported_op(fn, op):
    sig, params = build(C("unsupported", fn, [F(2, 5)], []), False)
    with pytest.raises(UnsupportedOpError) as info:
        lower_to_graph(sig, params, op_set="default", max_len=4)
    message = str(info.value)
    assert op in message and "\n" not in message
    assert op not in RULES
