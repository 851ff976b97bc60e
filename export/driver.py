"""The export driver: one `export(cfg, params, target, options)` for every target.

  resolve   options + the model's config -> a Plan (context, prefill lengths, op set, recipe,
            tokenizer, output path), with the target's preflight; nothing heavy has run yet
  storage   the weights as stored (f32, bf16/f16 with f32 compute, or f32 for an integer recipe
            that quantizes the lowered artifact), and the f32 weights of the parity reference
  signatures the target's signatures (models/signatures.py), in its attention form
  write     the target module writes the artifact under a temporary name (`atomic_output`), which
            is renamed into place only when the write finished
  gate      verify.run_gate: the artifact against the JAX model, judged by the gate table

A target is a small module (export/targets/): preflight, signatures, write, describe.
`Timer` times each stage and, when asked, prints `[stage] ... done in N s` and progress.

Weight storage: `f32`, or `bf16` / `f16` with f32 compute (the casts are graph ops; 16-bit compute
does not legalize and f16 activations overflow in Gemma). The embedding table stays f32 unless the
target's lookup takes 16-bit tables (ONNX) or the recipe is fp16 (TFLite: its casts become
DEQUANTIZE ops, run once at load). The parity reference of float storage is the source model
with the stored weights (rounded to the stored dtype, computing in f32), so the gate measures the
lowering; for a recipe it is the f32 source, so the gate measures the quantization too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

from contract.layout import StateLayout
from contract.metadata import ArtifactMetadata
from export.options import DEFAULT_PREFILL_LENS, ExportOptions, check_prefill_lens
from export.quantize.recipes import Recipe
from models.config import ModelConfig
from models.signatures import Signature, artifact_metadata, image_prefill_lengths

STORED = {"f32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16), "f16": np.dtype(np.float16)}


# ---- timing and progress ------------------------------------------------------------------------------
class Timer:
    """Seconds per stage; with `verbose`, `[stage] ...` / `[stage] done in N s` lines and a
    progress line per step."""

    def __init__(self, verbose: bool = False, stage_peaks: bool = False):
        self.verbose = verbose
        # restart the peak-RSS count at each stage, so each reports its own; an outside tool
        # measuring the whole run (getrusage, /usr/bin/time) then sees only the last stage's
        self.stage_peaks = stage_peaks
        self.seconds: dict[str, float] = {}
        self._open: list[int] = []  # the peaks seen by the enclosing stages' finished children
        self._bar: tuple[int, float, int] | None = None  # the current loop: (n, start time, start i)

    @contextlib.contextmanager
    def stage(self, name: str, record: str | bool = True):
        """Time a block under `record` (True: its name; False: print only), and measure its peak
        resident memory: the process's peak so far, or with `stage_peaks` its own (the count
        restarts at each stage; an enclosing stage's peak is the largest of its children's and
        its own)."""
        from export.memory import peak_rss, reset_peak

        t0 = time.perf_counter()
        if self.verbose:
            print(f"[{name}] ...", flush=True)
        if self.stage_peaks:
            reset_peak()
        self._open.append(0)
        try:
            yield self
        finally:
            children = self._open.pop()
        took = time.perf_counter() - t0
        peak = max(peak_rss() or 0, children)
        if self.stage_peaks:
            reset_peak()
        if self._open:
            self._open[-1] = max(self._open[-1], peak)
        if record:
            key = name if record is True else record
            self.seconds[key] = self.seconds.get(key, 0.0) + took
        if self.verbose:
            mem = f", peak RSS {peak / 2**30:.2f} GiB" if peak else ""
            print(f"[{name}] done in {took:.1f} s{mem}", flush=True)

    def progress(self, i: int, n: int, label: str):
        """A progress bar with the time left (ETA) of the current loop, from its rate so far."""
        if not self.verbose:
            return
        now = time.perf_counter()
        if i == 0 or self._bar is None or self._bar[0] != n:  # a new loop
            self._bar = (n, now, i)
        _, t0, i0 = self._bar
        eta = ""
        if i > i0 and i < n:
            left = (now - t0) / (i - i0) * (n - i)
            eta = f" ETA {left:4.0f} s"
        elif i == n:
            eta = f" in {now - t0:.1f} s"
        width = 24
        filled = int(width * i / n)
        end = "\n" if i == n else ""
        print(f"\r  [{'#' * filled}{'.' * (width - filled)}] {i}/{n} {label:<28}{eta}   ", end=end, flush=True)


# ---- atomic output ------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(final: Path, directory: bool = False):
    """Yield a temporary path beside `final` (same suffix, so runtimes recognise it; a folder when
    `directory`); on success it replaces `final`, on any error it is removed. A failed or
    interrupted export never leaves a partial artifact under its final name."""
    final = Path(final)
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
    _remove(tmp)
    if directory:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    finally:
        _remove(tmp)


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


# ---- the plan -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything an export needs to know, fixed before any work: the final config, the target and
    the options, and what follows from them."""

    cfg: ModelConfig
    target: object  # export.targets.Target
    options: ExportOptions
    max_len: int
    lens: tuple[int, ...]
    path: Path  # the final artifact
    recipe: Recipe | None = None
    op_set: str | None = None  # onnx
    tokenizer: Path | None = None  # the tokenizer source the target writes or bundles

    @property
    def quant(self) -> str | None:
        return self.options.quant

    @property
    def storage(self) -> str:
        """The stored float dtype: the --dtype, f16 for the fp16 recipe, f32 for integer recipes."""
        if self.recipe is None:
            return self.options.dtype
        return "f16" if self.recipe.bits == 16 else "f32"

    def metadata(self, layout: StateLayout, **fields) -> ArtifactMetadata:
        return artifact_metadata(self.cfg, self.max_len, layout, prefill_lengths=self.lens,
                                 weight_dtype=self.storage, quantization=self.quant,
                                 attention=self.target.attention, **fields)


def resolve(cfg: ModelConfig, target: str, options: ExportOptions) -> Plan:
    """The plan for exporting `cfg` (final: cfg.vision is None for a text-only export) to
    `target`; every check that needs the model, before any work. ValueError (one line) otherwise."""
    from export.quantize import check
    from export.targets import TARGETS

    tgt = TARGETS[target]
    max_len = options.context(cfg.max_seq_len)
    if max_len < 2:
        raise ValueError(f"--max-seq-len {max_len} is too small")
    if options.prefill_lens is None:
        lens = tgt.default_prefill_lens(max_len)
    else:
        lens = check_prefill_lens(options.prefill_lens, max_len)
    if cfg.vision is not None:
        n = cfg.vision.tokens_per_image
        if options.prefill_lens is None and max(lens) < n <= max_len:  # the default lengths hold no image
            lens.append(min(1 << (n - 1).bit_length(), max_len))
        image_prefill_lengths(cfg, lens)
    plan = Plan(cfg, tgt, options, max_len, tuple(lens), Path(options.out_dir) / "pending")
    plan = tgt.preflight(plan)
    recipe = None if options.quant is None else check(tgt.quant_table, options.quant, plan.op_set, cfg, options.dtype)
    plan = dataclasses.replace(plan, recipe=recipe)
    return dataclasses.replace(plan, path=Path(options.out_dir) / (options.name or tgt.artifact_name(plan)))


def default_prefill_lens(max_len: int) -> list[int]:
    return check_prefill_lens(DEFAULT_PREFILL_LENS, max_len)


# ---- weights ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Weights:
    # Values are arrays, or models.lazy.LazyTensor for a streamed export (read when written)
    stored: dict  # as the artifact stores them (before an integer recipe quantizes the artifact)
    compute: Callable | None  # stored -> f32 compute weights, traced into the graph (16-bit storage)
    reference: dict  # f32 weights of the parity reference
    # name -> export.quantize.blocks.BlockQuantized: the exact codes and scales the targets write
    # (int4 recipes: every matmul weight; 8-bit: the checkpoint's Q8_0 blocks where ONNX holds them)
    blocks: dict | None = None


def stored_params(params: dict, dtype: str, embed_16bit: bool = False) -> dict:
    """The weights as stored; the embedding table stays f32 unless `embed_16bit`."""
    from models.lazy import cast

    target = STORED[dtype]
    return {k: cast(v, v.dtype if (k == "embed" and not embed_16bit) or target == np.float32 else target)
            for k, v in params.items()}


def storage(plan: Plan, params: dict, carried: dict | None = None) -> Weights:
    """The weights as stored, computed with, and checked against; `carried` (name ->
    BlockQuantized) holds a checkpoint's own quantized blocks (GGUF Q4_0 / Q8_0), written into the
    artifact exactly where the recipe's format holds them."""
    recipe = plan.recipe
    if recipe is not None and recipe.bits == 16:
        stored = stored_params(params, "f16", embed_16bit=True)
    elif recipe is not None:
        padded = params
        if recipe.block and plan.cfg.vision is not None and "vision.patch_embed.w" in params:
            from models.vision import pad_for_blocks  # the tower's odd widths (588, 4304), exactly

            padded = pad_for_blocks(params, plan.cfg.vision, recipe.block)
        stored = stored_params(padded, "f32")
    else:
        stored = stored_params(params, plan.storage, embed_16bit=plan.target.embed_16bit)
    compute = None if plan.storage == "f32" else upcast
    source = stored if recipe is None else params
    blocks = quantized_blocks(plan, stored, carried)
    from models.lazy import cast

    return Weights(stored, compute, {k: cast(v, np.float32) for k, v in source.items()}, blocks)


def quantized_blocks(plan: Plan, stored: dict, carried: dict | None) -> dict | None:
    """The block-quantized weights an integer recipe writes exactly (export/quantize/blocks.py):
    for int4, every matmul weight (a checkpoint's own Q4_0 blocks where they match the recipe,
    else the per-block error search, asymmetric on ONNX; the table at the recipe's table_bits);
    for 8-bit recipes on ONNX, a checkpoint's Q8_0 blocks (8-bit MatMulNBits in blocks of 32),
    the rest left to onnxruntime's quantizer. None otherwise."""
    from export.quantize.blocks import mse, mse_asymmetric, plan_blocks

    recipe = plan.recipe
    if recipe is None or recipe.bits == 16:
        return None
    if recipe.block:  # zero points where the kernel takes them: ONNX's MatMulNBits, not XNNPACK
        quantize = mse_asymmetric if plan.target.quant_table == "onnx" else mse
        return plan_blocks(stored, recipe.bits, recipe.block, carried, quantize=quantize, table_bits=recipe.table_bits)
    if carried and plan.target.quant_table == "onnx":
        return {n: b for n, b in carried.items()
                if b.bits == recipe.bits and n in stored and b.shape == np.shape(stored[n])}
    return None


def upcast(params: dict) -> dict:
    import jax.numpy as jnp

    return {k: v.astype(jnp.float32) for k, v in params.items()}


# ---- the result ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class ExportResult:
    path: Path
    plan: Plan
    signatures: list[Signature]
    metadata: ArtifactMetadata
    seconds: dict
    stored_params: dict | None
    reference_params: dict | None
    info: dict = dataclasses.field(default_factory=dict)  # what the target reports (ops met, files)
    gate: object | None = None  # verify.gate.GateResult

    @property
    def cfg(self) -> ModelConfig:
        return self.plan.cfg

    @property
    def quant(self) -> str | None:
        return self.plan.quant

    @property
    def max_len(self) -> int:
        return self.plan.max_len

    def size_line(self, file_bytes: int) -> str:
        stored = self.stored_params or {}
        if self.quant is None:
            weights = sum(v.nbytes for v in stored.values())
            return (f"  size {file_bytes / 2**20:.1f} MiB, stored weights {weights / 2**20:.1f} MiB "
                    f"({self.plan.storage}; ratio {file_bytes / weights:.3f})")
        from export.quantize.sizes import ideal_bytes

        ideal = ideal_bytes(stored, self.quant, self.plan.target.quant_table)
        f32 = sum(v.size for v in stored.values()) * 4
        return (f"  size {file_bytes / 2**20:.1f} MiB ({self.quant}; {f32 / file_bytes:.2f}x smaller than f32, "
                f"{file_bytes / ideal:.3f}x the ideal {ideal / 2**20:.1f} MiB of parameters x bits + scales)")

    def summary(self) -> str:
        lines = self.plan.target.describe(self)
        states = self.metadata.states.bytes_by_layer_kind()
        lines.append("  state bytes by layer kind (context %d): %s" % (self.max_len, ", ".join(
            f"{k} {v / 2**20:.2f} MiB" for k, v in states.items())))
        lines.append("  times: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


# ---- the driver ---------------------------------------------------------------------------------------
def export(cfg: ModelConfig, params: dict, target: str, options: ExportOptions = ExportOptions(),
           timer: Timer | None = None, carried: dict | None = None) -> ExportResult:
    """Export `cfg` with `params` to `target` (tflite | litertlm | onnx): resolve, storage,
    signatures, write, and (unless options.verify is False) the parity gate, whose result is
    `result.gate`. `carried`: a checkpoint's own quantized blocks (`storage`). Raises ValueError
    for bad input before any work."""
    options.validate(target)
    plan = resolve(cfg, target, options)
    return run(plan, params, timer or Timer(options.verbose), carried=carried)


def run(plan: Plan, params: dict, timer: Timer, consume: bool = False, carried: dict | None = None) -> ExportResult:
    """Storage, signatures, write, gate for a resolved plan. With `consume`, `params` is emptied
    once the stored weights hold what they need, so that the gate can free the host copies
    (the CLI, which has no further use for them, passes it)."""
    weights = storage(plan, params, carried)
    if consume:
        params.clear()
    params = None
    tgt = plan.target
    signatures = tgt.signatures(plan)
    directory = tgt.writes_folder
    with atomic_output(plan.path, directory=directory) as tmp:
        metadata, info = tgt.write(plan, weights, signatures, tmp, timer)
    weights.blocks = None  # written: the artifact holds them now
    result = ExportResult(plan.path, plan, signatures, metadata, timer.seconds, weights.stored, weights.reference,
                          info)
    if plan.options.verbose:
        print(result.summary(), flush=True)
    if plan.options.verify:
        from verify.gate import run_gate

        def drop():
            result.stored_params = result.reference_params = weights.stored = weights.reference = None

        mode = plan.options.gate
        if mode == "auto":
            from export.memory import gate_mode

            mode = gate_mode(plan.cfg, tgt.name, plan.quant, plan.options.dtype)
        with timer.stage(f"verify ({mode})", record="verify"):
            result.gate = run_gate(plan.path, plan.cfg, weights.reference, target=tgt.name, max_len=plan.max_len,
                                   lens=list(plan.lens), quant=plan.quant, attention=tgt.attention,
                                   steps=plan.options.verify_steps, tokenizer=plan.tokenizer,
                                   engine_check=tgt.engine_check and plan.options.engine_check,
                                   stage=timer.stage, drop=drop, mode=mode, progress=timer.progress)
    return result


def scratch_dir(out_dir: Path, stem: str):
    """A scratch folder beside the output (same filesystem: renames stay cheap)."""
    return tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{stem}-")


__all__ = ["ExportResult", "Plan", "Timer", "Weights", "atomic_output", "export", "resolve", "run", "storage",
           "stored_params"]
