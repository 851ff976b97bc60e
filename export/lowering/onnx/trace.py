"""Signature -> StableHLO with symbolic dimensions, for the ONNX lowering.

ONNX graphs (and onnxruntime-genai) run one graph for every chunk length, so the signature is
exported with `jax.export` and symbolic dimensions (`sequence_length`, `total_sequence_length`)
instead of one module per length. Weights stay leading arguments (they become initializers).

jax 0.10's composite lowering forgets the dimension-variable arguments that it gives the
decomposition function under shape polymorphism (the module then fails verification: "has 2
operand(s), but decomposition has 3"). `composites_with_dim_vars` swaps in a lowering that passes
them as leading operands, for the duration of an export only; the ONNX rules skip them
(`Lowering.composite_operands`). tests/test_onnx_export.py notices when jax fixes this.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from export.signatures import Signature


@contextlib.contextmanager
def composites_with_dim_vars():
    from jax._src import core, util
    from jax._src.interpreters import mlir
    from jax._src.lax import lax as lax_internal
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import hlo

    def lowering(ctx, *args, name, attributes, version, jaxpr):
        consts = core.jaxpr_const_args(jaxpr.jaxpr)
        _, const_avals = util.unzip2(consts)
        const_values = tuple(mlir.ir_constants(c, const_lowering=ctx.const_lowering, aval=aval)
                             for c, aval in consts)
        func_op, _, _ = mlir.lower_called_computation(
            name, jaxpr, ctx.module_context, len(consts), (*const_avals, *ctx.avals_in),
            ctx.avals_out, ctx.tokens_in)
        attrs = {}
        for key, leaves, treedef in attributes:
            value = treedef.unflatten(leaves)
            if value is not None:
                attrs[key] = mlir.ir_attribute(value)
        operands, _ = mlir.ir_tree_registry.flatten(tuple(ctx.dim_var_values) + const_values + args)
        return hlo.CompositeOp(func_op.type.results, operands, name=ir.StringAttr.get(name),
                               decomposition=ir.FlatSymbolRefAttr.get(func_op.name.value),
                               composite_attributes=ir.DictAttr.get(attrs),
                               version=mlir.i32_attr(version)).results

    previous = mlir._lowerings[lax_internal.composite_p]
    mlir.register_lowering(lax_internal.composite_p, lowering)
    try:
        yield
    finally:
        mlir._lowerings[lax_internal.composite_p] = previous


def input_specs(sig: Signature, params: dict):
    """ShapeDtypeStructs for (params, *inputs); string dimensions become shared symbols."""
    symbols = sorted({d for t in sig.inputs for d in t.shape if isinstance(d, str)})
    scope = jax.export.SymbolicScope(sig.constraints)
    dims = dict(zip(symbols, jax.export.symbolic_shape(",".join(symbols), scope=scope))) if symbols else {}
    weights = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in params.items()}
    inputs = [jax.ShapeDtypeStruct(tuple(dims.get(d, d) for d in t.shape), t.dtype) for t in sig.inputs]
    return weights, inputs


def export_stablehlo(sig: Signature, params: dict, compute=None) -> str:
    """The signature as StableHLO text (weights are arguments, so the text stays small)."""
    from models.fused import cache_owning_attention

    weights, inputs = input_specs(sig, params)

    def fn(p, *args):
        return sig.fn(compute(p) if compute else p, *args)

    with composites_with_dim_vars(), cache_owning_attention():
        exported = jax.export.export(jax.jit(fn, keep_unused=True), platforms=["cpu"])(weights, *inputs)
    return exported.mlir_module()
