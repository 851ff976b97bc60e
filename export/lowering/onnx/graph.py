"""The StableHLO -> ONNX walker: one pass over the module, each op handed to the rule registered
for its name (export/lowering/onnx/rules_*.py), composites to the rule of the active op set.

  module (jax.export, symbolic dims)        ONNX graph
  main(weights..., inputs...)         ->    initializers (weights) + graph inputs
    func.call @f(args)                ->    f's body, inlined (values mapped through)
    stablehlo.composite "name"        ->    the op set's rule for "name", else its decomposition
    stablehlo.custom_call @shape_assertion -> nothing (shapes are checked by ONNX Runtime)
    any other op                      ->    RULES[op.name](lowering, op) -> ONNX value names

An op without a rule is an `UnsupportedOpError` naming the op and the model source line it came
from. Rules build nodes through `Lowering.node`; constants known at export time are tracked
(`Lowering.constant_value`) so rules can fold shapes and offsets instead of emitting ops.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DYNAMIC = -9223372036854775808  # MLIR's dynamic dimension marker

ELEMENT_TYPES = {  # MLIR element type -> (ONNX type, numpy dtype)
    "f32": (TensorProto.FLOAT, np.dtype(np.float32)),
    "f16": (TensorProto.FLOAT16, np.dtype(np.float16)),
    "bf16": (TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16)),
    "f64": (TensorProto.DOUBLE, np.dtype(np.float64)),
    "i1": (TensorProto.BOOL, np.dtype(np.bool_)),
    "i8": (TensorProto.INT8, np.dtype(np.int8)),
    "i16": (TensorProto.INT16, np.dtype(np.int16)),
    "i32": (TensorProto.INT32, np.dtype(np.int32)),
    "i64": (TensorProto.INT64, np.dtype(np.int64)),
    "ui8": (TensorProto.UINT8, np.dtype(np.uint8)),
    "ui32": (TensorProto.UINT32, np.dtype(np.uint32)),
}
NUMPY_TO_ONNX = {np_dtype: onnx_type for onnx_type, np_dtype in ELEMENT_TYPES.values()}

Rule = Callable[["Lowering", object], list[str]]
RULES: dict[str, Rule] = {}


def rule(*op_names: str):
    """Register a rule for StableHLO op names: fn(lowering, op) -> one ONNX name per result."""

    def register(fn: Rule) -> Rule:
        for name in op_names:
            if name in RULES:
                raise ValueError(f"two rules for {name}")
            RULES[name] = fn
        return fn

    return register


class UnsupportedOpError(ValueError):
    """An op no rule lowers; the message names the op and the model source line."""


_SOURCE = re.compile(r'"([^"]+\.py)":(\d+)')
_INTERNAL = ("/site-packages/", "/export/lowering/", "/export/signatures.py", "<frozen")


def op_name(op) -> str:
    """The op's registered name (an OpView's `name` may be an attribute, as on composites)."""
    return op.operation.name


def source_location(op) -> str:
    """The innermost source line of an op outside the exporter and jax (`models/layers.py:39`),
    else the raw location text."""
    text = str(op.location)
    for path, line in _SOURCE.findall(text):
        if not any(part in path for part in _INTERNAL):
            short = re.search(r"((?:models|export|tests|tools)/.+)$", path)
            return f"{short.group(1) if short else path}:{line}"
    return text[:160]


def tensor_type(value) -> tuple[list[int | None], np.dtype]:
    """(shape with None for dynamic dims, numpy dtype) of an MLIR tensor value."""
    from jax._src.lib.mlir import ir

    t = ir.RankedTensorType(value.type)
    element = str(t.element_type)
    if element not in ELEMENT_TYPES:
        raise UnsupportedOpError(f"unsupported element type {element}")
    return [None if d == DYNAMIC else d for d in t.shape], ELEMENT_TYPES[element][1]


class Lowering:
    """State of one lowering: the nodes, initializers and functions of the ONNX model being built,
    and the map from MLIR values to ONNX names (with the export-time constants among them)."""

    def __init__(self, module, composite_rules: dict[str, Rule], weights: dict[str, np.ndarray]):
        self.module = module
        self.composite_rules = composite_rules
        self.weights = weights  # name -> array, for initializers
        self.weight_names = list(weights)
        self.funcs = {op.attributes["sym_name"].value: op for op in module.body.operations}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.functions: dict[tuple[str, str], onnx.FunctionProto] = {}
        self.opset_imports: dict[str, int] = {}
        self.shape_overrides: dict[str, tuple] = {}  # graph input/output name -> declared shape
        self.ops_seen: dict[str, int] = {}
        self._names: dict = {}  # MLIR Value -> ONNX name
        self._constants: dict[str, np.ndarray] = {}  # ONNX name -> value known at export time
        self._counter = 0
        self._const_cache: dict[tuple, str] = {}
        self._cast_source: dict[str, str] = {}  # Cast output -> the weight it converts
        self.matmul_only: set[str] = set()  # weights every use of which is a matmul's [N, K] rhs
        self._matmul_weights: dict[str, str] = {}  # weight -> its [K, N] (or Gemm) ONNX name
        self.options: dict = {}
        # broadcast result -> its source when every source dim is 1: elementwise ops take the
        # source instead (ONNX broadcasts implicitly), and the Expand becomes dead code
        self.broadcast_source: dict[str, str] = {}
        self.results: list[str] = []  # the lowered main function's results
        # state tensor name -> (rows a fused op needs, symbolic name of that dimension in the graph)
        self.state_rows: dict[str, tuple[int, str | None]] = {}
        self._function_bodies: dict[bytes, str] = {}

    # -- names and values ---------------------------------------------------------------------
    def fresh(self, hint: str = "v") -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def name(self, value) -> str:
        return self._names[value]

    def operand(self, op, i: int) -> str:
        return self._names[op.operands[i]]

    def elementwise_operands(self, names: list[str], op=None) -> list[str]:
        """Operands of a StableHLO elementwise op `op` (names in operand order) for an ONNX op that
        broadcasts: explicit broadcasts are replaced by their rank-matched sources (dims of 1 or
        the full size), as long as one operand that is not replaced has the result's full shape
        (select's predicate and clamp's bounds may be scalars)."""
        full = None if op is None else tensor_type(op.results[0])[0]

        def keeps_full_shape(i: int, name: str) -> bool:
            return name not in self.broadcast_source and (op is None or tensor_type(op.operands[i])[0] == full)

        if not any(keeps_full_shape(i, n) for i, n in enumerate(names)):
            return names
        return [self.broadcast_source.get(n, n) for n in names]

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of an ONNX name if it is known at export time (a constant), else None."""
        return self._constants.get(name)

    def const(self, value, dtype=None) -> str:
        """A constant tensor (deduplicated): small ones as Constant nodes."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._const_cache:
            return self._const_cache[key]
        name = self.fresh("const")
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name)))
        self._constants[name] = arr
        self._const_cache[key] = name
        return name

    def node(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", hint: str | None = None,
             **attrs) -> list[str]:
        outputs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        kwargs = {"domain": domain} if domain else {}
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **kwargs, **attrs))
        if domain:
            self.opset_imports.setdefault(domain, 1)
        return outputs

    def node1(self, op_type: str, inputs: list[str], **kw) -> str:
        return self.node(op_type, inputs, **kw)[0]

    # -- functions and states ------------------------------------------------------------------
    def add_function(self, function: onnx.FunctionProto):
        self.functions.setdefault((function.domain, function.name), function)
        self.opset_imports.setdefault(function.domain, 1)

    def declare_state_rows(self, name: str, rows: int, symbol: str | None = None):
        """A fused op needs this state tensor (a graph input or output) to have `rows` rows in
        dimension 2, whatever the traced shape said (ONNX Runtime's attention owns the cache).
        With `symbol`, the graph declares that dimension symbolic: the runtime sizes the buffer
        (onnxruntime-genai: max_length for global layers, window + slack for local ones) and
        `rows` is the size runtime_py allocates."""
        self.state_rows[name] = (rows, symbol)

    def call_as_function(self, op, base_name: str, domain: str) -> list[str]:
        """Lower a composite's decomposition into a model-local function and call it. Identical
        bodies share one function; different ones (other cache sizes) get numbered names."""
        sub = Lowering(self.module, self.composite_rules, {})
        sub.funcs, sub.options = self.funcs, self.options
        inputs = [f"in_{i}" for i in range(len(op.operands))]
        results = sub.lower_function(op.attributes["decomposition"].value, inputs)
        outputs = [f"out_{i}" for i in range(len(results))]
        nodes = list(sub.nodes) + [helper.make_node("Identity", [r], [o]) for r, o in zip(results, outputs)]
        for function in sub.functions.values():
            self.add_function(function)
        imports = [helper.make_opsetid("", self.options.get("opset", 23))] + [
            helper.make_opsetid(d, v) for d, v in sorted(sub.opset_imports.items())]
        body = helper.make_function(domain, "_", inputs, outputs, nodes, imports)
        key = body.SerializeToString()
        if key not in self._function_bodies:
            taken = sum(1 for (d, n) in self.functions if d == domain and n.startswith(base_name))
            body.name = base_name if taken == 0 else f"{base_name}_{taken}"
            self._function_bodies[key] = body.name
            self.add_function(body)
        return self.node(self._function_bodies[key], [self.name(v) for v in op.operands],
                         n_out=len(results), domain=domain, hint=base_name.lower())

    # -- weights ------------------------------------------------------------------------------------
    def note_cast(self, out: str, src: str):
        root = self.weight_source(src)
        if root is not None:
            self._cast_source[out] = root

    def weight_source(self, name: str) -> str | None:
        """The weight an ONNX name holds (directly or through a Cast), else None."""
        if name in self.weights:
            return name
        return self._cast_source.get(name)

    def weight_matmul(self, lhs: str, weight: str, l_shape, out_shape, out_dtype) -> str:
        """lhs [..., K] times the weight [N, K] transposed -> [..., N].

        A weight used only by such matmuls is stored [K, N] (MatMul, no run-time transpose); one
        used elsewhere too (the tied embedding, also a Gather table) is stored once, [N, K], and
        multiplied by Gemm(transB=1) on lhs flattened to 2-D."""
        stored = self.weights[weight]
        cast = None if stored.dtype == out_dtype else NUMPY_TO_ONNX[np.dtype(out_dtype)]
        if weight in self.matmul_only:
            if weight not in self._matmul_weights:
                self.initializers[weight] = stored.T  # a view: written out transposed, block by block
                name = weight if cast is None else self.node1("Cast", [weight], to=cast)
                self._matmul_weights[weight] = name
            return self.node1("MatMul", [lhs, self._matmul_weights[weight]])
        if weight not in self._matmul_weights:  # stored as is (convert.assemble attaches used weights)
            self._matmul_weights[weight] = weight if cast is None else self.node1("Cast", [weight], to=cast)
        k = l_shape[-1]
        flat = self.node1("Reshape", [lhs, self.const(np.array([-1, k], np.int64))])
        out = self.node1("Gemm", [flat, self._matmul_weights[weight]], transB=1)
        if len(out_shape) == 2 and out_shape[0] is None:
            return out
        if all(d is not None for d in out_shape):
            shape = self.const(np.array(out_shape, np.int64))
        else:
            lead = self.node1("Shape", [lhs], start=0, end=len(l_shape) - 1)
            shape = self.node1("Concat", [lead, self.const(np.array([out_shape[-1]], np.int64))], axis=0)
        return self.node1("Reshape", [out, shape])

    def analyze_weight_uses(self, main, n_weights: int):
        """Find the weights whose every use is the [N, K] rhs of a matmul contracting K (through
        func.call arguments and converts), so they can be stored transposed."""
        block = main.regions[0].blocks[0]
        pending = [(block.arguments[i], self.weight_names[i]) for i in range(n_weights)]
        ok = {name: True for name in self.weight_names[:n_weights]}
        seen = set()
        while pending:
            value, root = pending.pop()
            for use in value.uses:
                owner = use.owner
                kind = op_name(owner)
                key = (id(owner), use.operand_number, root)
                if key in seen:
                    continue
                seen.add(key)
                if kind == "func.call":
                    callee = self.funcs[owner.attributes["callee"].value]
                    pending.append((callee.regions[0].blocks[0].arguments[use.operand_number], root))
                elif kind == "stablehlo.convert":
                    pending.append((owner.results[0], root))
                elif kind == "stablehlo.dot_general" and use.operand_number == 1:
                    from jax._src.lib.mlir.dialects import hlo

                    dn = hlo.DotDimensionNumbers(owner.attributes["dot_dimension_numbers"])
                    lhs_rank = len(tensor_type(owner.operands[0])[0])
                    # the form lower_dot_general turns into MatMul: lhs [..., K] . w[N, K]
                    if list(dn.rhs_batching_dimensions) or list(dn.rhs_contracting_dimensions) != [1] \
                            or list(dn.lhs_contracting_dimensions) != [lhs_rank - 1]:
                        ok[root] = False
                else:
                    ok[root] = False
        self.matmul_only = {name for name, good in ok.items() if good}

    # -- walking --------------------------------------------------------------------------------
    def lower_function(self, func_name: str, arg_names: list[str]) -> list[str]:
        """Lower a function's body with its arguments bound to ONNX names; returns the results."""
        func = self.funcs[func_name]
        block = func.regions[0].blocks[0]
        for arg, name in zip(block.arguments, arg_names):
            self._names[arg] = name
        for op in block.operations:
            if op_name(op) in ("func.return", "stablehlo.return"):
                return [self.name(v) for v in op.operands]
            self.lower_op(op)
        raise ValueError(f"function {func_name} has no return")

    def lower_op(self, op):
        name = op_name(op)
        if name == "func.call":
            outs = self.lower_function(op.attributes["callee"].value, [self.name(v) for v in op.operands])
        elif name == "stablehlo.composite":
            outs = self.lower_composite(op)
        elif name == "stablehlo.custom_call" and op.attributes["call_target_name"].value == "shape_assertion":
            outs = []
        else:
            fn = RULES.get(name)
            if fn is None:
                raise UnsupportedOpError(
                    f"unsupported op {name} at {source_location(op)}: no ONNX rule lowers it "
                    "(see python -m export --list-onnx-ops)")
            self.ops_seen[name] = self.ops_seen.get(name, 0) + 1
            outs = fn(self, op)
        results = list(op.results)
        if len(outs) != len(results):
            raise AssertionError(f"rule for {name} returned {len(outs)} values for {len(results)} results")
        for value, out in zip(results, outs):
            self._names[value] = out

    # -- composites -------------------------------------------------------------------------------
    def composite_name(self, op) -> str:
        return op.attributes["name"].value

    def composite_attributes(self, op) -> dict:
        attrs = {}
        for named in op.attributes["composite_attributes"]:
            attrs[named.name] = attribute_value(named.attr)
        return attrs

    def composite_operand_values(self, op) -> list:
        """The composite's own operands (MLIR values): without the dimension variables that the
        export passes first (export/lowering/onnx/trace.py)."""
        decomposition = self.funcs[op.attributes["decomposition"].value]
        n_args = len(decomposition.regions[0].blocks[0].arguments)
        n_dim_vars = sum(1 for i in range(n_args) if _is_dim_var(decomposition, i))
        return list(op.operands)[n_dim_vars:]

    def composite_operands(self, op) -> list[str]:
        """The composite's own operands as ONNX names."""
        return [self.name(v) for v in self.composite_operand_values(op)]

    def lower_composite(self, op) -> list[str]:
        name = self.composite_name(op)
        fn = self.composite_rules.get(name)
        self.ops_seen[f"composite {name}"] = self.ops_seen.get(f"composite {name}", 0) + 1
        if fn is not None:
            return fn(self, op)
        return self.inline_decomposition(op)

    def inline_decomposition(self, op) -> list[str]:
        return self.lower_function(op.attributes["decomposition"].value, [self.name(v) for v in op.operands])


def _is_dim_var(func, i: int) -> bool:
    arg_attrs = func.attributes["arg_attrs"] if "arg_attrs" in func.attributes else None
    if arg_attrs is None:
        return False
    return "jax.global_constant" in str(arg_attrs[i])


def attribute_value(attr):
    """A composite attribute as a Python value (floats, ints, strings, bools, arrays)."""
    from jax._src.lib.mlir import ir

    attr = attr.maybe_downcast()
    if isinstance(attr, (ir.FloatAttr, ir.IntegerAttr, ir.StringAttr, ir.BoolAttr)):
        return attr.value
    if isinstance(attr, ir.DenseElementsAttr):
        return np.array(attr)
    return str(attr)


def dense_attr_to_numpy(attr, dtype: np.dtype, shape) -> np.ndarray:
    """A DenseElementsAttr (a stablehlo.constant's value) as a numpy array."""
    from jax._src.lib.mlir import ir

    attr = attr.maybe_downcast()
    if not isinstance(attr, ir.DenseElementsAttr):
        raise UnsupportedOpError(f"unsupported constant attribute {type(attr).__name__}")
    if attr.is_splat:
        value = attr.get_splat_value().maybe_downcast()
        return np.full(shape, value.value, dtype)
    if dtype == np.bool_:
        return np.array(attr).astype(np.bool_).reshape(shape)
    if dtype == ml_dtypes.bfloat16:  # the bindings' buffer protocol does not know bf16: read the text
        text = str(attr)
        hexdata = re.search(r'"0x([0-9A-Fa-f]+)"', text)
        if hexdata:
            return np.frombuffer(bytes.fromhex(hexdata.group(1)), np.uint16).view(dtype).reshape(shape)
        body = text[text.index("<") + 1:text.rindex(">")].rsplit(":", 1)[0]
        numbers = re.findall(r"[-+]?(?:inf|nan|\d+\.?\d*(?:[eE][-+]?\d+)?)", body)
        return np.array([float(v) for v in numbers], np.float32).astype(dtype).reshape(shape)
    return np.array(attr).astype(dtype).reshape(shape)
