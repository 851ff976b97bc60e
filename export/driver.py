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
import sys
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
from models.config import Family, ModelConfig
from models.signatures import Signature, artifact_metadata, image_prefill_lengths

STORED = {"f32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16), "f16": np.dtype(np.float16)}


# ---- timing and progress ------------------------------------------------------------------------------
HEARTBEAT_S = 20.0  # a stage that has printed nothing for this long says it is still running


class Timer:
    """Seconds per stage; with `verbose`, `[stage] ...` / `[stage] done in N s` lines, a progress
    bar per loop (tqdm on a terminal; plain lines, one per tenth or per HEARTBEAT_S, when the output
    is a log file) and, for a stage that reports no steps (the converter's passes), an
    `[stage] still running, N s` line every HEARTBEAT_S."""

    def __init__(self, verbose: bool = False, stage_peaks: bool = False, interactive: bool | None = None):
        self.verbose = verbose
        # restart the peak-RSS count at each stage, so each reports its own; an outside tool
        # measuring the whole run (getrusage, /usr/bin/time) then sees only the last stage's
        self.stage_peaks = stage_peaks
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.seconds: dict[str, float] = {}
        self._open: list[int] = []  # the peaks seen by the enclosing stages' finished children
        self._loop = None  # the current loop: _Loop
        self._last_print = time.perf_counter()
        self._stages: list[tuple[str, float]] = []

    def _print(self, text: str):
        print(text, flush=True)
        self._last_print = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str, record: str | bool = True):
        """Time a block under `record` (True: its name; False: print only), and measure its peak
        resident memory: the process's peak so far, or with `stage_peaks` its own (the count
        restarts at each stage; an enclosing stage's peak is the largest of its children's and
        its own)."""
        from export.memory import helper_peaks, peak_rss, reset_peak

        t0 = time.perf_counter()
        helpers_before = helper_peaks()[0]
        if self.verbose:
            self._print(f"[{name}] ...")
        if self.stage_peaks:
            reset_peak()
        self._open.append(0)
        self._stages.append((name, t0))
        beat = self._heartbeat() if self.verbose and len(self._stages) == 1 else contextlib.nullcontext()
        try:
            with beat:
                yield self
        finally:
            children = self._open.pop()
            self._stages.pop()
        took = time.perf_counter() - t0
        # with the peak of a helper process it ran (the TFLite converter's), added: an upper bound
        peak = max(peak_rss() or 0, children) + helper_peaks(helpers_before)[1]
        if self.stage_peaks:
            reset_peak()
        if self._open:
            self._open[-1] = max(self._open[-1], peak)
        if record:
            key = name if record is True else record
            self.seconds[key] = self.seconds.get(key, 0.0) + took
        if self.verbose:
            self._close_loop()
            mem = f", peak RSS {peak / 2**30:.2f} GiB" if peak else ""
            self._print(f"[{name}] done in {took:.1f} s{mem}")

    @contextlib.contextmanager
    def _heartbeat(self):
        """A daemon thread that prints `[innermost stage] still running, N s` whenever nothing was
        printed for HEARTBEAT_S (no progress bar is open then)."""
        import threading

        stop = threading.Event()

        def beat():
            while not stop.wait(1.0):
                quiet = time.perf_counter() - self._last_print
                if quiet >= HEARTBEAT_S and self._loop is None and self._stages:
                    name, t0 = self._stages[-1]
                    self._print(f"[{name}] still running, {time.perf_counter() - t0:.0f} s")

        thread = threading.Thread(target=beat, daemon=True, name="export-heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=2.0)

    def progress(self, i: int, n: int, label: str):
        """Step i of n of the current loop (i == n: done): a bar with the rate and the time left."""
        if not self.verbose:
            return
        loop = self._loop
        if loop is None or loop.n != n or i < loop.i:  # a new loop
            self._close_loop()
            loop = self._loop = _Loop(n, i, self.interactive)
        loop.update(i, label, self)
        if i >= n:
            self._close_loop()

    def _close_loop(self):
        if self._loop is not None:
            self._loop.close()
            self._loop = None
            self._last_print = time.perf_counter()


class _Loop:
    """One loop's progress display: tqdm on a terminal, else a plain line per tenth of the loop
    (or per HEARTBEAT_S) with the ETA."""

    def __init__(self, n: int, i: int, interactive: bool):
        self.n, self.i, self.t0, self.i0 = n, i, time.perf_counter(), i
        self.bar = None
        self.next_line = 0
        if interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=n, initial=i, leave=False, dynamic_ncols=True, file=sys.stdout,
                            bar_format="  {bar:24} {n_fmt}/{total_fmt} {desc} [{elapsed}<{remaining}]")

    def update(self, i: int, label: str, timer: Timer):
        if self.bar is not None:
            self.bar.set_description_str(label[:32], refresh=False)
            self.bar.update(i - self.i)
            self.i = i
            return
        self.i = i
        now = time.perf_counter()
        tenth = max(1, self.n // 10)
        if i < self.n and i < self.next_line and now - timer._last_print < HEARTBEAT_S:
            return
        self.next_line = (i // tenth + 1) * tenth
        if i >= self.n:
            eta = f"in {now - self.t0:.1f} s"
        elif i > self.i0:
            eta = f"ETA {(now - self.t0) / (i - self.i0) * (self.n - i):.0f} s"
        else:
            eta = ""
        timer._print(f"  {i}/{self.n} {label} {eta}".rstrip())

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
    buckets: tuple[int, ...] = ()  # TFLite context buckets (models/signatures.context_buckets)
    smoothing: bool = False  # activation smoothing folded into the weights (export/quantize/smooth.py)
    rotation: bool = False  # matmul inputs rotated per block (export/quantize/rotate.py)

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
        int4 = self.options.int4_method if self.recipe is not None and self.recipe.block else None
        method = "+".join(m for m, on in ((int4, bool(int4)), ("smoothed", self.smoothing), ("rotated", self.rotation))
                          if on) or None
        return artifact_metadata(self.cfg, self.max_len, layout, prefill_lengths=self.lens,
                                 context_buckets=self.buckets,
                                 weight_dtype=self.storage, quantization=self.quant, quant_method=method,
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
    # RecurrentGemma's state does not grow with the context (its attention is local): any length runs
    if max_len > cfg.max_seq_len and cfg.family != Family.RECURRENTGEMMA and not options.untrained_context:
        raise ValueError(f"--max-seq-len {max_len} is beyond {cfg.name}'s trained context of {cfg.max_seq_len} "
                         f"tokens (past it the model's output is not what it was trained for); pass "
                         f"--max-seq-len {cfg.max_seq_len} or less, or --untrained-context to export it anyway")
    if options.speculative:
        if cfg.recurrent is not None:
            raise ValueError(f"--speculative: {cfg.name}'s recurrent state cannot be rewound past rejected draft "
                             "tokens (only attention caches can); drop --speculative")
        if options.speculative + 1 > max_len:
            raise ValueError(f"--speculative {options.speculative} needs a context of at least "
                             f"{options.speculative + 1} tokens; lower it or raise --max-seq-len")
        cfg = dataclasses.replace(cfg, rewind=options.speculative)
    if options.verify_long and options.verify_long + 1 > max_len:
        raise ValueError(f"--verify-long {options.verify_long} needs a context of at least {options.verify_long + 1} "
                         f"tokens (the prompt, then decode); pass --verify-long {max_len - 1} or less, or a larger "
                         "--max-seq-len")
    if options.prefill_lens is None:
        lens = tgt.default_prefill_lens(max_len)
    else:
        lens = check_prefill_lens(options.prefill_lens, max_len)
    if cfg.vision is not None:
        n = cfg.vision.tokens_per_image
        if options.prefill_lens is None and max(lens) < n <= max_len:  # the default lengths hold no image
            lens.append(min(1 << (n - 1).bit_length(), max_len))
        image_prefill_lengths(cfg, lens)
    buckets = ()
    if tgt.context_buckets:
        from models.signatures import context_buckets

        buckets = tuple(context_buckets(cfg, max_len, options.context_buckets))
    elif options.context_buckets:
        raise ValueError(f"--context-buckets are TFLite's (--target {target} attends over the valid length "
                         "already); drop --context-buckets")
    plan = Plan(cfg, tgt, options, max_len, tuple(lens), Path(options.out_dir) / "pending", buckets=buckets)
    plan = tgt.preflight(plan)
    recipe = None if options.quant is None else check(tgt.quant_table, options.quant, tgt.quant_column(plan), cfg,
                                                        options.dtype)
    plan = dataclasses.replace(plan, recipe=recipe)
    if options.int4_method == "gptq":
        calibration_tokenizer(plan)  # a missing or unreadable tokenizer fails here, before any work
    from export.quantize import rotate
    from export.quantize.smooth import applies

    if rotate.applies(plan):
        plan = dataclasses.replace(plan, rotation=True)
    if applies(plan):
        try:
            calibration_tokenizer(plan)
            plan = dataclasses.replace(plan, smoothing=True)
        except ValueError:
            if options.verbose:
                print("note: no tokenizer for the calibration text: dynamic-int8 without activation smoothing "
                      "(less accurate; pass --tokenizer PATH)", flush=True)
    return dataclasses.replace(plan, path=Path(options.out_dir) / (options.name or tgt.artifact_name(plan)))


def calibration_tokenizer(plan: Plan):
    """The tokenizer the calibration text is read with (GPTQ, export/quantize/gptq.py; smoothing,
    export/quantize/smooth.py): the target's or --tokenizer's. None for a random-weight dry run
    without one (seeded random ids); otherwise a missing tokenizer is a one-line ValueError."""
    from contract.tokenizer import Tokenizer

    source = plan.tokenizer or plan.options.tokenizer
    try:
        if source is None:
            raise FileNotFoundError("no tokenizer")
        return Tokenizer(source)
    except (FileNotFoundError, ValueError) as e:
        if plan.options.random_weights:
            return None
        raise ValueError(f"--int4-method gptq calibrates on text and needs the model's tokenizer ({e}): pass "
                         "--tokenizer PATH (a tokenizer.model or the folder holding it)") from None


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
    scratch: object = None  # a TemporaryDirectory the blocks are read from (GPTQ), removed once written
    folds: int = 0  # matmul inputs smoothed (export/quantize/smooth.py)
    rotations: int = 0  # matmul inputs rotated (export/quantize/rotate.py)

    def written(self):
        """The artifact holds the blocks now: drop them and their scratch files."""
        self.blocks = None
        if self.scratch is not None:
            self.scratch.cleanup()
            self.scratch = None


def stored_params(params: dict, dtype: str, embed_16bit: bool = False) -> dict:
    """The weights as stored; the embedding table stays f32 unless `embed_16bit`."""
    from models.lazy import cast

    target = STORED[dtype]
    return {k: cast(v, v.dtype if (k == "embed" and not embed_16bit) or target == np.float32 else target)
            for k, v in params.items()}


def storage(plan: Plan, params: dict, carried: dict | None = None, timer: Timer | None = None,
            kept=()) -> Weights:
    """The weights as stored, computed with, and checked against; `carried` (name ->
    BlockQuantized) holds a checkpoint's own quantized blocks (GGUF Q4_0 / Q8_0 / Q4_K / Q6_K),
    written into the artifact exactly where the target's format holds them (`usable_carried`)
    and the weight is not rotated (an input whose readers include such blocks is not rotated);
    `kept`: the layers a mixed-precision source holds wider (models.loaders.gguf.mix_kept),
    written at 8 bits by the int4 recipes (ONNX: 8-bit MatMulNBits; TFLite: int8 per channel).
    With --int4-method gptq the calibration runs here (a `timer` stage)."""
    recipe = plan.recipe
    carried = usable_carried(plan, carried)
    kept = frozenset(kept) if recipe is not None and recipe.block else frozenset()
    if recipe is not None and recipe.bits == 16:
        stored = stored_params(params, "f16", embed_16bit=True)
    elif recipe is not None:
        padded = params
        multiple = recipe.block or plan.target.integer_block
        if multiple and plan.cfg.vision is not None and "vision.patch_embed.w" in params:
            from models.vision import pad_for_blocks  # the tower's odd widths (588, 4304), exactly

            padded = pad_for_blocks(params, plan.cfg.vision, multiple)
        stored = stored_params(padded, "f32")
    else:
        stored = stored_params(params, plan.storage, embed_16bit=plan.target.embed_16bit)
    compute = None if plan.storage == "f32" else upcast
    source = stored if recipe is None else params
    folds = rotations = 0
    if plan.smoothing:
        with (timer or Timer()).stage("calibrate (smoothing)", record="calibrate") as t:
            stored, folds = smoothed(plan, stored, t.progress)
    if plan.rotation:  # after smoothing, whose factors are the unrotated inputs'; before GPTQ, which
        # rounds the weights as the graph reads them (rotated)
        from export.quantize.rotate import chooser, groups, rotated

        exact = {n for n, b in (carried or {}).items() if n not in kept and b.bits == recipe.bits
                 and b.block == recipe.block}  # written as the file holds them: their inputs stay as they are
        before = stored
        stored, rotations = rotated(stored, plan.cfg, chooser(plan), keep=exact)
        carried = {n: b for n, b in (carried or {}).items() if stored.get(n) is before.get(n)}
        if plan.options.verbose:
            held = f"; inputs of the checkpoint's own {recipe.bits}-bit blocks left as they are" if exact else ""
            print(f"rotation: {rotations} of {len(groups(stored, plan.cfg))} matmul inputs rotated (Hadamard per block "
                  f"of up to 128 channels{held})", flush=True)
    scratch = None
    if recipe is not None and recipe.block and plan.options.int4_method == "gptq":
        scratch = tempfile.TemporaryDirectory(dir=plan.path.parent, prefix=f".{plan.path.name}.gptq-")
        try:
            with (timer or Timer()).stage("calibrate (gptq)", record="calibrate") as t:
                carried = dict(carried or {}, **gptq(plan, stored, carried, Path(scratch.name), t.progress, kept))
        except BaseException:
            scratch.cleanup()
            raise
    blocks = quantized_blocks(plan, stored, carried, kept)
    if blocks and plan.target.quant_table == "tflite":
        blocks, stored = offsets_apart(blocks, stored)
    from models.lazy import cast

    return Weights(stored, compute, {k: cast(v, np.float32) for k, v in source.items()}, blocks, scratch, folds,
                   rotations)


def smoothed(plan: Plan, stored: dict, progress=None) -> tuple[dict, int]:
    """(the stored weights with TFLite dynamic-int8's activation smoothing folded in, how many
    matmul inputs were folded) (export/quantize/smooth.py); the parity reference keeps the
    checkpoint's weights."""
    from export.quantize import smooth

    stats = smooth.calibrate(stored, plan.cfg, calibration_tokenizer(plan),
                             text=plan.options.calibration_text, progress=progress)
    folds = smooth.factors(stored, plan.cfg, stats)
    if plan.options.verbose:
        print(f"smoothing: {len(folds)} of {len(smooth.groups(stored, plan.cfg))} matmul inputs folded "
              "(the others gain too little)", flush=True)
    return smooth.fold(stored, folds), len(folds)


def gptq(plan: Plan, stored: dict, carried: dict | None, scratch: Path, progress, kept=()) -> dict:
    """GPTQ blocks (export/quantize/gptq.py) of every layer matmul the checkpoint does not carry
    in the recipe's form and that is not `kept` at 8 bits, spilled to `scratch`; they then take
    the place of carried blocks."""
    from export.quantize.gptq import gptq_blocks

    recipe = plan.recipe
    same = {n: b for n, b in (carried or {}).items()
            if n in stored and b.bits == recipe.bits and b.block == recipe.block and b.shape == np.shape(stored[n])}
    return gptq_blocks(stored, plan.cfg, recipe.bits, recipe.block, asymmetric=plan.target.quant_table == "onnx",
                       scratch=scratch, tokenizer=calibration_tokenizer(plan), carried=same,
                       text=plan.options.calibration_text, table=not recipe.table_bits, progress=progress,
                       skip=kept, damp=plan.options.gptq_damp)


def usable_carried(plan: Plan, carried: dict | None) -> dict | None:
    """The carried blocks the target's format holds exactly: Q4_K (offsets, float32 scales) in
    ONNX, and in TFLite as symmetric int4 plus the offsets' small matmul (`offsets_apart`);
    Q6_K (float32 scales, blocks of 16) only in ONNX (TFLite's int8 is per channel); a Q4_K
    table only in TFLite (ONNX's GatherBlockQuantized reads the table, which takes no offsets:
    there a table's k-quant is re-quantized by the recipe)."""
    if not carried:
        return carried
    onnx = plan.target.quant_table == "onnx"
    from export.quantize.sizes import TABLE

    return {n: b for n, b in carried.items()
            if not b.onnx_only or (n != TABLE if onnx else b.bits == 4)}


def offsets_apart(blocks: dict, stored: dict) -> tuple[dict, dict]:
    """TFLite: every weight carried from the checkpoint at 4 bits (a GGUF's Q4_K, whose
    blocks have offsets; its Q4_0, whose blocks have negative scales: blocks.needs_offsets) as
    symmetric, positive-scale int4 blocks plus `<name>_offsets`, f32 [N, K / 32], the constant
    models.layers.dense adds per block (`BlockQuantized.split_offsets`): the file's weight
    exactly, where XNNPACK's kernel alone would move a code per negative-scale block
    (`BlockQuantized.positive`) or re-quantize a Q4_K. Its stored weight becomes the symmetric
    part. The table likewise (models.model.TABLE_OFFSETS: the lookup adds its offsets' row, the LM
    head their block-sum matmul). Pending blocks stay pending: the first of a weight's two holes
    the writer takes decodes and splits it once, and the other part waits for its hole (`_parts`).
    The rest as they are."""
    from export.quantize.blocks import PendingBlocks, needs_offsets
    from models.layers import OFFSETS
    from models.lazy import LazyTensor

    split = [n for n, b in blocks.items() if needs_offsets(b)]
    if not split:
        return blocks, stored
    blocks, stored = dict(blocks), dict(stored)
    for name in split:
        b = blocks[name]
        n, k = b.shape
        part = _parts(b)
        blocks[name] = PendingBlocks(b.shape, b.bits, b.block, lambda part=part: part(0), f"{b.origin} (offsets apart)")
        stored[name] = LazyTensor((n, k), np.float32, lambda part=part: part(0).dequantize(), name)
        stored[name + OFFSETS] = LazyTensor((n, k // b.block), np.float32, lambda part=part: part(1), name + OFFSETS)
    return blocks, stored


def _parts(b):
    """part(i): `BlockQuantized.split_offsets()[i]` of the blocks b (pending: decoded when first
    asked), computed once for both parts; each part is dropped when taken, so nothing of the
    weight stays once the writer has both (a part asked for again is computed again)."""
    import threading

    from export.quantize.blocks import resolved

    held, lock = {}, threading.Lock()  # the INT4 part may be taken by export.quantize.ahead's threads

    def part(i):
        with lock:
            if i not in held:
                held.update(enumerate(resolved(b).split_offsets()))
            return held.pop(i)

    return part


def quantized_blocks(plan: Plan, stored: dict, carried: dict | None, kept=()) -> dict | None:
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
        return plan_blocks(stored, recipe.bits, recipe.block, carried, quantize=quantize, table_bits=recipe.table_bits,
                           kept=kept)
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
        from export.inspect import method_text

        m = self.metadata.quant_method
        method = "" if m in (None, "mse") else f", {method_text(m)}"
        return (f"  size {file_bytes / 2**20:.1f} MiB ({self.quant}{method}; {f32 / file_bytes:.2f}x smaller than f32, "
                f"{file_bytes / ideal:.3f}x the ideal {ideal / 2**20:.1f} MiB of parameters x bits + scales)")

    def summary(self) -> str:
        lines = self.plan.target.describe(self)
        if self.path != self.plan.path and lines and lines[0].startswith("artifact: "):
            lines[0] = f"artifact: {self.plan.path} (written as {self.path.name} until its parity gate passes)"
        states = self.metadata.states.bytes_by_layer_kind()
        lines.append("  state bytes by layer kind (context %d): %s" % (self.max_len, ", ".join(
            f"{k} {v / 2**20:.2f} MiB" for k, v in states.items())))
        per_token = self.metadata.states.kv_bytes_per_token()
        if per_token:
            buckets = self.metadata.context_buckets
            lines.append(f"  KV bytes per token: {per_token / 1024:.1f} KiB (global layers, "
                         f"{self.metadata.states.states[0].dtype.name}); context buckets: "
                         + (", ".join(map(str, buckets)) if buckets else "none"))
        lines.append("  times: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


# ---- the driver ---------------------------------------------------------------------------------------
def export(cfg: ModelConfig, params: dict, target: str, options: ExportOptions = ExportOptions(),
           timer: Timer | None = None, carried: dict | None = None, kept=()) -> ExportResult:
    """Export `cfg` with `params` to `target` (tflite | litertlm | onnx): resolve, storage,
    signatures, write, and (unless options.verify is False) the parity gate, whose result is
    `result.gate`. `carried`, `kept`: a checkpoint's own quantized blocks and the layers its
    mix keeps wide (`storage`). Raises ValueError for bad input before any work."""
    options.validate(target)
    plan = resolve(cfg, target, options)
    return run(plan, params, timer or Timer(options.verbose), carried=carried, kept=kept)


def run(plan: Plan, params: dict, timer: Timer, consume: bool = False, carried: dict | None = None,
        kept=()) -> ExportResult:
    """Storage, signatures, write, gate for a resolved plan. With `consume`, `params` is emptied
    once the stored weights hold what they need, so that the gate can free the host copies
    (the CLI, which has no further use for them, passes it)."""
    weights = storage(plan, params, carried, timer, kept)
    if plan.smoothing and not weights.folds:  # nothing was worth folding: the plain recipe's weights
        plan = dataclasses.replace(plan, smoothing=False)
    if plan.rotation and not weights.rotations:  # no input was worth rotating (rotate.chooser)
        plan = dataclasses.replace(plan, rotation=False)
    if consume:
        params.clear()
    params = None
    tgt = plan.target
    signatures = tgt.signatures(plan)
    directory = tgt.writes_folder
    verify = plan.options.verify
    # a verified export is written under a pending name and takes its final name only once the gate
    # has passed: an interrupted or failed gate never leaves an artifact that looks finished
    written = pending_path(plan.path) if verify else plan.path
    _remove(parity_path(plan.path))  # a report of an earlier export under this name no longer applies
    _remove(parity_path(plan.path).with_suffix(".png"))
    try:
        with atomic_output(written, directory=directory) as tmp:
            metadata, info = tgt.write(plan, weights, signatures, tmp, timer)
    finally:
        weights.written()
    result = ExportResult(written, plan, signatures, metadata, timer.seconds, weights.stored, weights.reference,
                          info)
    if plan.options.verbose:
        print(result.summary(), flush=True)
    if not verify:
        write_unverified(plan.path)
        return result
    from verify.gate import run_gate

    def drop():
        result.stored_params = result.reference_params = weights.stored = weights.reference = None

    mode = plan.options.gate
    if mode == "auto":
        from export.memory import gate_mode

        mode = gate_mode(plan.cfg, tgt.name, plan.quant, plan.options.dtype)
        if plan.options.verify_long and mode != "memory":
            print(f"note: the in-memory gate may not fit {plan.cfg.name} beside the artifact, but --verify-long "
                  "needs it: running it in memory", flush=True)
            mode = "memory"
    try:
        with timer.stage(f"verify ({mode})", record="verify"):
            result.gate = run_gate(written, plan.cfg, weights.reference, target=tgt.name, max_len=plan.max_len,
                                   lens=list(plan.lens), quant=plan.quant, attention=tgt.attention,
                                   steps=plan.options.verify_steps, tokenizer=plan.tokenizer,
                                   engine_check=tgt.engine_check and plan.options.engine_check,
                                   stage=timer.stage, drop=drop, mode=mode, progress=timer.progress,
                                   method=metadata.quant_method, long=plan.options.verify_long,
                                   kv=plan.options.kv_cache)
    except BaseException:  # an error or Ctrl-C during the gate: nothing is left
        _remove_weight_cache(written)
        _remove(written)
        _remove(parity_path(written))
        raise
    # random weights: quantized gates (a recipe, an int8 KV cache) only warn
    advisory = plan.options.random_weights and (plan.quant is not None or plan.options.kv_cache != "f32")
    ok = (result.gate.passed or advisory) and not result.gate.engine_failed
    final = plan.path if ok else failed_path(plan.path)
    result.path = _settle(written, final)
    result.gate.path = parity_path(result.path)
    from verify.plot import write_png

    # the picture of the report, beside it (verify/plot.py)
    write_png(result.gate.path, result.gate.path.with_suffix(".png"), plan.cfg.sliding_window)
    return result


def pending_path(final: Path) -> Path:
    """Where a verified export waits for its gate: beside the final name, hidden, the suffix kept
    (runtimes recognise the file)."""
    final = Path(final)
    return final.with_name(f".{final.stem}.unverified{final.suffix}")


def failed_path(final: Path) -> Path:
    """Where an artifact that failed its gate is left for inspection: NAME.FAILED.tflite,
    NAME_onnx.FAILED (an ONNX folder), never the final name."""
    final = Path(final)
    return final.with_name(f"{final.stem}.FAILED{final.suffix}")


def parity_path(artifact: Path) -> Path:
    from verify.gate import parity_path as path

    return path(artifact)


def write_unverified(final: Path):
    """The parity record of an export run with --no-verify: it says so (`inspect` reads it)."""
    import json

    final = Path(final)
    record = {"artifact": final.name, "verified": False, "passed": None,
              "artifact_bytes": artifact_bytes(final)}
    path = parity_path(final)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def artifact_bytes(path: Path) -> int:
    """A file's size, or a folder's files' total (its parity.json excluded)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "parity.json")


def _remove_weight_cache(artifact: Path):
    """Remove the XNNPACK weight cache file the gate built for `artifact` (if any)."""
    artifact = Path(artifact)
    if artifact.suffix in (".tflite", ".litertlm") and artifact.exists():
        from runtime_py.tflite_backend import weight_cache_path

        cache = weight_cache_path(artifact)
        if cache is not None and cache.exists():
            cache.unlink()


def _settle(written: Path, final: Path) -> Path:
    """Move a verified artifact (and its parity report, and its XNNPACK weight cache, which the
    gate built and the first run can reuse) from its pending name to `final`."""
    import json

    old_cache = new_cache = None
    if written.suffix in (".tflite", ".litertlm"):
        from runtime_py.tflite_backend import weight_cache_path

        old_cache = weight_cache_path(written)
    report = parity_path(written)
    if final.exists():
        _remove(final)
    os.replace(written, final)
    if report.exists():  # a file's report sits beside it (a folder's moved with the folder)
        os.replace(report, parity_path(final))
    report = parity_path(final)
    data = json.loads(report.read_text())
    data.update(artifact=final.name, artifact_bytes=artifact_bytes(final))
    report.write_text(json.dumps(data, indent=1))
    if old_cache is not None and old_cache.exists():
        from runtime_py.tflite_backend import weight_cache_path

        new_cache = weight_cache_path(final)
        if new_cache is not None:
            os.replace(old_cache, new_cache)
        else:
            old_cache.unlink()
    return final


def scratch_dir(out_dir: Path, stem: str):
    """A scratch folder beside the output (same filesystem: renames stay cheap)."""
    return tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{stem}-")


__all__ = ["ExportResult", "Plan", "Timer", "Weights", "atomic_output", "export", "resolve", "run", "storage",
           "stored_params"]
