"""Will this export fit in memory? An estimate from the config alone, checked before any weights load.

The export pipeline today holds the model's weights in f32 (the loader dequantizes / upcasts every
tensor), converts the whole graph with them, then runs the parity gate with the f32 JAX model and
the artifact's runtime in memory together. Its peak is therefore set by the parameter count, not
the artifact: a 27B model needs ~100 GiB for its f32 weights alone, whatever the recipe. Rather
than failing after an hour of loading (or being killed by the OOM killer mid-write), the CLI
refuses such an export up front, with the memory it needs and what would fit.

The factors are measured peaks of this pipeline (docs/quantization.md, "Size, export cost and
speed on gemma3-1b"; gemma3-4b ONNX int4-b32 17.7 GB for 15.5 GB of f32 weights), per byte of f32
weights (W) and of artifact (A):

  export (convert + quantize + write)   TFLite 1.9 W        ONNX 1.25 W
  parity gate                           1.5 W (the f32 JAX reference: its weights and its compiled
                                        programs' buffers) + the runtime's resident size of the artifact
                                        (TFLite, XNNPACK packing per signature: f32 4 A, 16-bit
                                        weights 10.5 A, integer recipes 5 A; ONNX: f32 1.3 A,
                                        fp16 2.6 A, integer 1.6 A)
                                        + 1.5 GiB of activations, logits and interpreter buffers

They overestimate small models a little (fixed costs are in the 1.5 GiB) and are meant to refuse
only what cannot work: the check compares against the machine's total memory (not what is free
now), and `--skip-memory-check` tries anyway.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

GiB = 2**30
EXPORT_FACTOR = {"tflite": 1.9, "litertlm": 1.9, "onnx": 1.25}
GATE_OVERHEAD = 1.5 * GiB


def _runtime_factor(target: str, quant: str | None) -> float:
    """The runtime's resident memory per artifact byte: `quant` None is f32 weights, "fp16" any
    16-bit weights (TFLite turns their DEQUANTIZE into persistent f32 tensors, then packs them)."""
    if target == "onnx":
        return {None: 1.3, "fp16": 2.6}.get(quant, 1.6)
    return {None: 4.0, "fp16": 10.5}.get(quant, 5.0)


@dataclasses.dataclass(frozen=True)
class Estimate:
    params: int
    f32_bytes: int
    artifact_bytes: int
    export_bytes: int
    gate_bytes: int  # 0 without the gate

    @property
    def peak(self) -> int:
        return max(self.export_bytes, self.gate_bytes)


def param_shapes_with_vision(cfg, vision: bool) -> dict[str, tuple[int, ...]]:
    from models.params import param_shapes

    shapes = dict(param_shapes(cfg))
    if vision and getattr(cfg, "vision", None) is not None:
        from models.vision import vision_param_shapes

        shapes.update({f"vision.{k}": s for k, s in vision_param_shapes(cfg.vision, cfg.embed_dim).items()})
    return shapes


def estimate(cfg, target: str, quant: str | None, dtype: str = "f32", verify: bool = True,
             vision: bool = True) -> Estimate:
    """The pipeline's peak resident memory for this export, from the config's parameter shapes."""
    shapes = param_shapes_with_vision(cfg, vision)
    n = sum(math.prod(s) for s in shapes.values())
    f32 = 4 * n
    if quant is not None:
        from export.quantize.sizes import ideal_bytes

        fake = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
        artifact = ideal_bytes(fake, quant, "onnx" if target == "onnx" else "tflite")
    else:
        artifact = n * (4 if dtype == "f32" else 2)
    export = int(EXPORT_FACTOR[target] * f32)
    gate = int(1.5 * f32 + _runtime_factor(target, quant if quant else (None if dtype == "f32" else "fp16"))
               * artifact + GATE_OVERHEAD) if verify else 0
    return Estimate(n, f32, artifact, export, gate)


def total_memory() -> int:
    """This machine's physical memory in bytes (the cgroup limit when one is lower)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def check_fits(cfg, target: str, quant: str | None, dtype: str = "f32", verify: bool = True,
               vision: bool = True, available: int | None = None) -> Estimate:
    """ValueError (one line: the memory needed, the machine's, and what would fit) when the export
    cannot fit; the estimate otherwise."""
    available = total_memory() if available is None else available
    est = estimate(cfg, target, quant, dtype, verify, vision)
    if est.peak <= available:
        return est
    stage = "its parity gate" if est.gate_bytes > est.export_bytes else "the export"
    hints = []
    if verify and est.export_bytes <= available:
        hints.append("--no-verify (no parity gate)")
    if target != "onnx":
        other = estimate(cfg, "onnx", quant, dtype, verify, vision)
        if other.peak <= available:
            hints.append("--target onnx")
    hint = ("; " + " or ".join(hints) + " would fit") if hints else \
        "; neither --no-verify nor another target fits: the exporter holds every weight in f32 (docs/memory.md)"
    raise ValueError(
        f"{cfg.name} ({est.params / 1e9:.2f}B parameters, {est.f32_bytes / GiB:.1f} GiB in f32) needs about "
        f"{est.peak / GiB:.0f} GiB of memory for {stage} ({target}, {quant or dtype}) and this machine has "
        f"{available / GiB:.0f} GiB{hint}; pass --skip-memory-check to try anyway")


__all__ = ["Estimate", "check_fits", "estimate", "total_memory"]
