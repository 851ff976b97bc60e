"""Verification: the JAX reference as a session (`reference_session`), parity of an artifact
against it (`parity` -> ParityReport), the gate table keyed by (target, recipe) (`gate_for`,
`GATES`), the gate's prompts, the LiteRT-LM engine check, and `run_gate`, which the export driver
calls after writing an artifact.

Sits above models/ and runtime_py/ (it runs both) and below export/.

  report = verify.parity(verify.reference_session(cfg, params, [32, 128], 4096),
                         runtime_py.load("artifacts/gemma3-270m_f32_ctx4096.tflite"), prompts, decode_steps=64)
  verify.gate_for("tflite", None).failures(report)   # [] when it passes
"""

from verify.gates import GATES, Gate, gate_for
from verify.parity import ParityReport, parity
from verify.reference import reference_session

__all__ = ["GATES", "Gate", "ParityReport", "gate_for", "parity", "reference_session"]
