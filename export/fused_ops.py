"""The fused ops in one table: for each StableHLO composite the model emits, its JAX reference
(models/fused.py), the attention forms that trace it, what each target makes of it, and the tiny
families whose exports must show it (the test table: tests/test_export_tflite.py and
tests/test_export_onnx.py assert every row against real artifacts).

  composite                         reference (models/fused.py)     TFLite                       ONNX default / standard
  odml.embedding_lookup             embedding_lookup                EMBEDDING_LOOKUP             Gather / Gather
  odml.rms_norm                     rms_norm                        kept (STABLEHLO_COMPOSITE)   RMSNormalization
  odml.scaled_dot_product_attention scaled_dot_product_attention    kept (SDPA form only)        inside the attention
                                                                                                 functions' bodies
  gemma_edge.linear_recurrence      linear_recurrence               kept                         gemma_edge::LinearRecurrence
  gemma_edge.global_attention       cached_attention(_global_core)  not traced (SDPA form)       GroupQueryAttention /
                                                                                                 gemma_edge::GlobalAttention
  gemma_edge.local_attention        cached_attention(_local_core)   not traced (SDPA form)       GroupQueryAttention /
                                                                                                 gemma_edge::LocalAttention

The ONNX rules themselves are in export/lowering/onnx/fused.py (registered per op set in OP_SETS).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from models import attention, fused
from models.fused import AttentionForm

BOTH = (AttentionForm.SDPA, AttentionForm.CACHE_OWNING)
ALL_FAMILIES = ("gemma2", "gemma3", "recurrentgemma")


@dataclasses.dataclass(frozen=True)
class FusedOp:
    name: str  # the composite's name
    reference: Callable  # its JAX reference (the decomposition every runtime can run)
    forms: tuple[AttentionForm, ...]  # the attention forms whose graphs hold it
    # what a TFLite artifact holds for it: ("composite", name) kept as STABLEHLO_COMPOSITE,
    # ("op", BUILTIN) converted to a builtin op, or None (the TFLite form never traces it)
    tflite: tuple[str, str] | None
    # op set -> the node it lowers to ("domain::Op" for non-default domains; a function's name
    # for model-local functions), or None where it only occurs inside a lowered decomposition
    onnx: dict[str, str | None]
    families: tuple[str, ...]  # tiny families whose exports must show it


FUSED_OPS: dict[str, FusedOp] = {op.name: op for op in [
    FusedOp("odml.embedding_lookup", fused.embedding_lookup, BOTH, ("op", "EMBEDDING_LOOKUP"),
            {"default": "Gather", "standard": "Gather"}, ALL_FAMILIES),
    FusedOp("odml.rms_norm", fused.rms_norm, BOTH, ("composite", "odml.rms_norm"),
            {"default": "RMSNormalization", "standard": "RMSNormalization"}, ALL_FAMILIES),
    FusedOp("odml.scaled_dot_product_attention", fused.scaled_dot_product_attention, BOTH,
            ("composite", "odml.scaled_dot_product_attention"), {"default": None, "standard": None}, ALL_FAMILIES),
    FusedOp("gemma_edge.linear_recurrence", fused.linear_recurrence, BOTH, ("composite", "gemma_edge.linear_recurrence"),
            {"default": "gemma_edge::LinearRecurrence", "standard": "gemma_edge::LinearRecurrence"},
            ("recurrentgemma",)),
    FusedOp("gemma_edge.global_attention", attention._global_core, (AttentionForm.CACHE_OWNING,), None,
            {"default": "com.microsoft::GroupQueryAttention", "standard": "gemma_edge::GlobalAttention"},
            ("gemma2", "gemma3")),
    FusedOp("gemma_edge.local_attention", attention._local_core, (AttentionForm.CACHE_OWNING,), None,
            {"default": "com.microsoft::GroupQueryAttention", "standard": "gemma_edge::LocalAttention"},
            ALL_FAMILIES),
]}
