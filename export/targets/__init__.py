"""Export targets: one module each, behind one small interface, and the table that drives the
driver and the CLI (`--target` choices and their help).

  check_options(options)       target checks that need no model, before the weights load
  preflight(plan) -> plan      target checks and choices with the model, before any work
  signatures(plan) -> [Signature]   what the artifact exports, in the target's attention form
  write(plan, weights, signatures, tmp, timer) -> (metadata, info)
                               write the artifact at `tmp` (renamed into place by the driver)
  describe(result) -> [lines]  the export summary's target-specific lines

Class attributes: name, help, quant_table (the quantization support table it uses), attention
(models.fused.AttentionForm), writes_folder, embed_16bit (16-bit storage of the embedding table),
engine_check (the gate may run the artifact in its own runtime), context_buckets (it exports
ctx{L}_* signatures for long contexts), speculative (it exports verify_{K} signatures: --speculative), inline_composites (it can trace
rms_norm and attention as plain ops: --inline-composites).
"""

from __future__ import annotations

from export.options import DEFAULT_PREFILL_LENS, check_prefill_lens
from models.fused import AttentionForm


class Target:
    name = ""
    help = ""
    quant_table = ""
    # contraction widths a per-channel integer recipe needs a multiple of (None: any); the vision
    # tower's odd ones are zero-padded to it (models.vision.pad_for_blocks)
    integer_block: int | None = None
    attention = AttentionForm.SDPA
    writes_folder = False
    embed_16bit = False
    engine_check = False
    context_buckets = False
    speculative = False
    inline_composites = False

    def default_prefill_lens(self, max_len: int) -> list[int]:
        return check_prefill_lens(DEFAULT_PREFILL_LENS, max_len)

    def check_options(self, options):
        """Checks that need no model (run before the weights load)."""

    def preflight(self, plan):
        return plan

    def quant_column(self, plan) -> str | None:
        """The column of the quantization support table the plan's recipe is checked against."""
        return plan.op_set

    def artifact_name(self, plan) -> str:
        raise NotImplementedError

    def signatures(self, plan):
        raise NotImplementedError

    def write(self, plan, weights, signatures, tmp, timer):
        raise NotImplementedError

    def describe(self, result) -> list[str]:
        raise NotImplementedError


def _table() -> dict[str, Target]:
    from export.targets.litertlm import LitertlmTarget
    from export.targets.onnx import OnnxTarget
    from export.targets.tflite import TFLiteTarget

    return {t.name: t for t in (TFLiteTarget(), LitertlmTarget(), OnnxTarget())}


TARGETS: dict[str, Target] = _table()

__all__ = ["TARGETS", "Target"]
