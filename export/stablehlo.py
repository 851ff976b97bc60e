"""Signature -> StableHLO: `jax.jit(fn, keep_unused=True).lower(...)`, weights kept as arguments.

The module travels as a StableHLO portable artifact (versioned VHLO bytes), so the MLIR build of
jaxlib and that of a converter need not match. Weight arguments come first, in the sorted-key
order jit flattens the parameter dict in; `weight_names` gives that order.
"""

from __future__ import annotations

import jax
import numpy as np

from export.signatures import Signature


def weight_names(params: dict) -> list[str]:
    """Parameter names in the order jit passes them (sorted keys of the flat dict)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [path[0].key for path, _ in flat]


def lower(sig: Signature, params: dict, compute=None):
    """Lower a signature with params as leading arguments. `compute` maps the stored params to
    the ones the model computes with (e.g. bf16 storage -> f32 compute: the casts become graph
    ops and the weights stay 16-bit in the artifact)."""
    specs = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in params.items()}
    inputs = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in sig.inputs]

    def fn(p, *args):
        return sig.fn(compute(p) if compute else p, *args)

    return jax.jit(fn, keep_unused=True).lower(specs, *inputs)


def portable_artifact(lowered) -> bytes:
    from jax._src.lib.mlir.dialects import hlo

    target = hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.WEEK_12)
    return hlo.serialize_portable_artifact(lowered.compiler_ir("stablehlo"), target)
