"""Signature -> StableHLO: the one producer both targets lower from.

`jax.export` of fn(params, *inputs), weights kept as leading arguments (`keep_unused`, so unused
weights do not vanish and shift the indices) in the sorted-key order jit flattens the parameter
dict in (`weight_names`). A signature whose tensors have concrete shapes (the TFLite signatures)
gives a static module; one with string dimensions (the ONNX decoder: `sequence_length`,
`total_sequence_length`) gives symbolic ones, sharing a symbol per name, under the signature's
constraints. The attention form is the signature's own (models/fused.AttentionForm).

TFLite takes the module as a StableHLO portable artifact (versioned VHLO bytes: the MLIR builds of
jaxlib and of the converter need not match); the ONNX lowering walks it in jaxlib's own context.

The composite workaround lives here, once: jax 0.10's composite lowering forgets the
dimension-variable arguments that it gives the decomposition function under shape polymorphism
(the module then fails verification: "has 2 operand(s), but decomposition has 3").
`composites_with_dim_vars` swaps in a lowering that passes them as leading operands, for the
duration of an export only; the ONNX rules skip them (`Lowering.composite_operands`), and a static
export has none. tests/test_export_onnx.py notices when jax fixes this.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from models.signatures import Signature


def weight_names(params: dict) -> list[str]:
    """Parameter names in the order jit passes them (sorted keys of the flat dict)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [path[0].key for path, _ in flat]


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


def is_symbolic(sig: Signature) -> bool:
    return any(isinstance(d, str) for t in sig.inputs for d in t.shape)


def stablehlo(sig: Signature, params: dict, compute=None):
    """The signature as a StableHLO module (an `ir.Module` in jaxlib's MLIR context; weights are
    arguments, so it stays small). `compute` maps the stored params to the ones the model computes
    with (e.g. bf16 storage -> f32 compute: the casts become graph ops and the weights stay 16-bit
    in the artifact)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir

    weights, inputs = input_specs(sig, params)

    def fn(p, *args):
        return sig.fn(compute(p) if compute else p, *args)

    jitted = jax.jit(fn, keep_unused=True)
    if not is_symbolic(sig):
        return jitted.lower(weights, *inputs).compiler_ir("stablehlo")
    with composites_with_dim_vars():
        exported = jax.export.export(jitted, platforms=["cpu"])(weights, *inputs)
    return ir.Module.parse(exported.mlir_module(), context=jax_mlir.make_ir_context())


def portable_artifact(module) -> bytes:
    """A module as a StableHLO portable artifact (what the TFLite converter reads)."""
    from jax._src.lib.mlir.dialects import hlo

    target = hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.WEEK_12)
    return hlo.serialize_portable_artifact(module, target)
