"""Will this export fit in memory? An estimate from the config alone, checked before any weights load.

The CLI streams the weights (models/lazy.py): each tensor is read from the checkpoint (or drawn
from its own seed) when the export writes it. What stays in memory depends on the target:

  ONNX      our own writer quantizes and writes tensor by tensor; the packed weights wait in a
            scratch file (export/quantize/onnx.Spill) until model.onnx.data is written, so
            an integer recipe holds the largest f32 tensor (the embedding table) being
            quantized and the graph: 1.2 T_max + 0.5 GiB; float weights are written from the
            checkpoint (A + 1.2 T_max + 0.5 GiB, not re-measured since the spill)
  TFLite    the converter lowers the graph without the matmul weights (a skeleton), then the
            streamed writer reads, quantizes and writes one weight at a time to disk:
            the small inlined weights + 1.3 T_max + 1 GiB of converter (gemma3-1b int4-b32:
            2.1 GiB measured; it was 1.5 W, 5.6 GB, while the converter held the f32 model)

and on the parity gate's mode (verify/gate.py):

  memory    the f32 JAX model beside the artifact's runtime, in lock step: 1.5 W (weights and
            compiled programs' buffers) + the runtime's resident size of the artifact (TFLite,
            f32 4 A, 16-bit weights 10.5 A, integer recipes 2 A (CompiledModel, one weight cache);
            ONNX: f32 1.3 A, fp16 2.6 A, integer 1.6 A) + 1.5 GiB
  streamed  the artifact first, then the JAX model one layer at a time: the larger of the
            runtime's size and the larger of the largest f32 layer and the f32 table (with a
            slice of it copied for the head) + 1 GiB; a .litertlm also keeps its session for
            LiteRT-LM's check

`gate_mode` picks `memory` when it needs at most 60% of the machine (it is faster: one pass, no
re-reading of the checkpoint), else `streamed`. The estimates are meant to refuse only what cannot
work: the check compares against the machine's total memory (not what is free now), and
`--skip-memory-check` tries anyway.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

GiB = 2**30
GATE_OVERHEAD = 1.5 * GiB
MEMORY_GATE_SHARE = 0.6  # auto: the in-memory gate when it needs at most this share of the machine


def _runtime_factor(target: str, quant: str | None) -> float:
    """The runtime's resident memory per artifact byte: `quant` None is f32 weights, "fp16" any
    16-bit weights (TFLite turns their DEQUANTIZE into persistent f32 tensors, then packs them)."""
    if target == "onnx":
        return {None: 1.3, "fp16": 2.6}.get(quant, 1.6)
    # integer recipes: LiteRT's CompiledModel with the XNNPACK weight cache (runtime_py's default):
    # 1.3x (dynamic-int8) to 1.6x (int4-b32) measured on gemma3-1b, 2.6x on the 270M (its fixed
    # overhead weighs more); float storage: the Interpreter-era figures, not re-measured
    return {None: 4.0, "fp16": 10.5}.get(quant, 2.0)


@dataclasses.dataclass(frozen=True)
class Estimate:
    params: int
    f32_bytes: int
    artifact_bytes: int
    export_bytes: int
    gate_bytes: int  # 0 without the gate; the mode `gate_mode` picks
    gate: str | None = None  # memory | streamed
    memory_gate_bytes: int = 0
    streamed_gate_bytes: int = 0

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


def _layer_bytes(shapes: dict) -> dict[str, int]:
    """f32 bytes of each layer's weights ("layers.{i}." entries), by layer index."""
    layers: dict[str, int] = {}
    for k, s in shapes.items():
        if k.startswith("layers."):
            i = k.split(".")[1]
            layers[i] = layers.get(i, 0) + 4 * math.prod(s)
    return layers


def gptq_bytes(shapes: dict) -> int:
    """GPTQ's calibration (export/quantize/gptq.py): a layer's f32 weights twice (as read and
    dequantized), the widest matmul input's K x K statistic four times (H, its damped copy, the
    inverse, the factor), the f32 table (a random init's or a GGUF's is read whole for the
    calibration tokens' embeddings) and a GiB for the activations and the runtime (gemma3-1b:
    2.8 GiB measured, 3.0 estimated)."""
    layers = _layer_bytes(shapes)
    widest = max((s[1] for k, s in shapes.items() if k.startswith("layers.") and len(s) == 2), default=0)
    square = (8 if widest <= 4096 else 4) * widest ** 2  # algorithms.gptq: f64 algebra up to K = 4096, then f32
    table = 4 * math.prod(shapes["embed"])  # the lookup of the calibration tokens may read it whole
    return int(2 * max(layers.values(), default=0) + 4 * square + table + GiB)


def smooth_bytes(shapes: dict) -> int:
    """TFLite dynamic-int8's smoothing calibration (export/quantize/smooth.py): a layer's f32
    weights twice (as read and on the device), the f32 table (read whole for the calibration
    tokens' embeddings where the source cannot read rows) and a GiB for the activations and the
    runtime (gemma3-1b from a bf16 safetensors: 1.17 GiB measured, 2.5 estimated)."""
    return int(2 * max(_layer_bytes(shapes).values(), default=0) + 4 * math.prod(shapes["embed"]) + GiB)


def estimate(cfg, target: str, quant: str | None, dtype: str = "f32", verify: bool = True,
             vision: bool = True, gate: str = "auto", available: int | None = None, gptq: bool = False,
             smooth: bool = False, extra_artifact: int = 0) -> Estimate:
    """The pipeline's peak resident memory for this export, from the config's parameter shapes
    (`gptq`: --int4-method gptq's calibration, `smooth`: TFLite dynamic-int8's smoothing
    calibration; both run before the weights are written). `extra_artifact`: bytes a checkpoint's
    own blocks add to the recipe's artifact (a GGUF's 8-bit layers and block offsets:
    export/cli.Request.source_extra_bytes), which the gate's runtime holds too; they are streamed
    like the weights, so the export's own peak does not grow."""
    shapes = param_shapes_with_vision(cfg, vision)
    n = sum(math.prod(s) for s in shapes.values())
    f32 = 4 * n
    if quant is not None:
        from export.quantize.sizes import ideal_bytes

        fake = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
        artifact = ideal_bytes(fake, quant, "onnx" if target == "onnx" else "tflite")
    else:
        artifact = n * (4 if dtype == "f32" else 2)
    artifact += extra_artifact
    largest = 4 * max(math.prod(s) for s in shapes.values())
    layers = _layer_bytes(shapes)
    tower = 4 * sum(math.prod(s) for k, s in shapes.items() if k.startswith(("vision.", "mm.")))
    if target == "onnx":
        integer = quant is not None and quant != "fp16"
        export = int((0 if integer else artifact) + 1.2 * largest + 0.5 * GiB)
    else:
        from export.quantize.sizes import is_quantized_weight

        inlined = 4 * sum(math.prod(s) for k, s in shapes.items() if not is_quantized_weight(k, s))
        export = int(inlined + 1.3 * largest + GiB)
    if gptq:
        export = max(export, gptq_bytes(shapes))
    if smooth:
        export = max(export, smooth_bytes(shapes))
    runtime = _runtime_factor(target, quant if quant else (None if dtype == "f32" else "fp16")) * artifact
    in_memory = int(1.5 * f32 + runtime + GATE_OVERHEAD)
    table = 4 * math.prod(shapes["embed"])
    reference = max(max(layers.values(), default=0), 1.15 * table) + tower  # a layer, or the table and a head slice
    streamed = int(max(runtime, reference) + (runtime if target == "litertlm" else 0) + GiB)
    if not verify:
        return Estimate(n, f32, artifact, export, 0, None, in_memory, streamed)
    if gate == "auto":
        gate = "memory" if in_memory <= MEMORY_GATE_SHARE * (total_memory() if available is None else available) \
            else "streamed"
    return Estimate(n, f32, artifact, export, in_memory if gate == "memory" else streamed, gate, in_memory, streamed)


def gate_mode(cfg, target: str, quant: str | None, dtype: str = "f32", available: int | None = None) -> str:
    """`memory` when the in-memory gate needs at most MEMORY_GATE_SHARE of the machine, else `streamed`."""
    return estimate(cfg, target, quant, dtype, True, cfg.vision is not None, "auto", available).gate


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
               vision: bool = True, available: int | None = None, gate: str = "auto", gptq: bool = False,
               smooth: bool = False, extra_artifact: int = 0) -> Estimate:
    """ValueError (one line: the memory needed, the machine's, and what would fit) when the export
    cannot fit; the estimate otherwise."""
    available = total_memory() if available is None else available
    est = estimate(cfg, target, quant, dtype, verify, vision, gate, available, gptq, smooth, extra_artifact)
    if est.peak <= available:
        return est
    stage = f"its parity gate ({est.gate})" if est.gate_bytes > est.export_bytes else "the export"
    hints = []
    if verify and est.gate == "memory" and max(est.export_bytes, est.streamed_gate_bytes) <= available:
        hints.append("--gate streamed")
    if verify and est.export_bytes <= available:
        hints.append("--no-verify (no parity gate)")
    if smooth and estimate(cfg, target, quant, dtype, verify, vision, gate, available, gptq,
                           extra_artifact=extra_artifact).peak <= available:
        hints.append("--no-smoothing")
    if target != "onnx":
        other = estimate(cfg, "onnx", quant, dtype, verify, vision, gate, available, gptq)
        if other.peak <= available:
            hints.append("--target onnx")
    hint = ("; " + " or ".join(hints) + " would fit") if hints else \
        "; neither --no-verify nor another target fits (docs/memory.md)"
    raise ValueError(
        f"{cfg.name} ({est.params / 1e9:.2f}B parameters, {est.f32_bytes / GiB:.1f} GiB in f32) needs about "
        f"{est.peak / GiB:.0f} GiB of memory for {stage} ({target}, {quant or dtype}) and this machine has "
        f"{available / GiB:.0f} GiB{hint}; pass --skip-memory-check to try anyway")


# ---- measuring ------------------------------------------------------------------------------------
def peak_rss() -> int | None:
    """This process's peak resident set (bytes) since the last `reset_peak` (Linux VmHWM), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_HELPER_PEAKS: list[int] = []


def record_helper_peak(nbytes: int | None):
    """A helper process's peak resident set (the TFLite converter's, export/lowering/tflite/worker.py):
    the export's stages report their peak as their own plus the helpers' they ran, an upper bound
    of what the two held together."""
    if nbytes:
        _HELPER_PEAKS.append(int(nbytes))


def helper_peaks(since: int = 0) -> tuple[int, int]:
    """(how many helper peaks were recorded, the largest from the `since`-th on)."""
    return len(_HELPER_PEAKS), max(_HELPER_PEAKS[since:], default=0)


def reset_peak() -> bool:
    """Restart the peak-RSS count at the current RSS (Linux /proc/self/clear_refs "5")."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


__all__ = ["Estimate", "check_fits", "estimate", "gate_mode", "helper_peaks", "peak_rss", "record_helper_peak",
           "reset_peak", "total_memory"]
