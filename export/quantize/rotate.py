"""Hadamard rotations of the matmul inputs, for TFLite's dynamic-int8 and the int4 recipes.

XNNPACK's dynamic int8 FULLY_CONNECTED quantizes each input row (one token) with one scale over
all of its channels. The down projection's input, gelu(gate) * up, has per-token spikes: a few
channels of a few tokens 10-100x the rest, which set that token's scale and leave every other
channel a handful of levels. Smoothing (export/quantize/smooth.py) divides channels by a fixed
factor and cannot flatten a spike that moves from token to token; it left `down` the largest
share of the recipe's error on the real Gemma 3 270M (docs/quantization.md).

An orthonormal rotation spreads a spike over many channels: with H the Sylvester-Hadamard matrix
of order b (entries +-1/sqrt(b), H = H^T = H^-1), the export stores down's weight as W' = W H per
block of b input channels and the graph multiplies the input by H per block before it, so
x W^T = (x H)(W H)^T exactly in real arithmetic. One spike becomes b values 1/sqrt(b) its size.
Emulated on the real 270M's calibration tokens (64 per layer, rows int8 asymmetric, weights int8
per channel), the relative squared error of down's output fell 11x at b = 128 (0.00124 ->
0.00011; b = 64: 0.00013, b = 256: 0.00010).

The same holds for every other matmul input, less strongly: per-row int8 error of the readers'
outputs on those tokens, plain / smoothed / rotated / smoothed then rotated (x 1e-6): q/k/v 655 /
107 / 102 / 46; gate/up 519 / 121 / 102 / 61; o 166 / - / 79 / 64 (smoothing does not fold o);
down 1237 / 420 / 109 / 65; the LM head 270 / 99 / 37 / 22. So every input is rotated, after
smoothing has folded its factors (smoothing decides on the unrotated inputs; the rotation then
acts on x / s and W s): `groups` lists them.

The int4 recipes rotate the same inputs for the weights' sake. TFLite: XNNPACK's blockwise int4
takes symmetric blocks without a zero point, where one outlier weight sets its block's scale; W H
spreads it over the block (real Gemma 3 270M int4-b32: perplexity ratio 1.70 -> 1.49, with GPTQ
1.29 -> 1.10; docs/quantization.md); every input is rotated (its int8 activations gain too).
ONNX: MatMulNBits' zero points already follow a block's offset, and a checkpoint that held a
weight on an int4-like grid (a GGUF's Q4_K) loses that grid when it is rotated, so an input is
rotated only where its readers' int4 weights lose at least 5% less squared error rotated
(`chooser`, `lowers_error`, on sampled rows); its rotations are f32 MatMuls. The rotation comes
before the codes are chosen (GPTQ rounds the rotated weights on the rotated inputs' statistic).

A rotation is a parameter `<name>_rotation` [b, b] (f32, never quantized:
export.quantize.sizes.is_quantized_weight) that the model code applies to the input when present
(models.layers.rotated: the pre-norms' outputs, the attention output, down's input, the
recurrent output projection's input; `final_norm_rotation` for the LM head, whose rows the
lookup rotates back, models.model.HEAD_ROTATION); a checkpoint never holds one, and the parity
reference keeps the checkpoint's weights. Its cost in the graph: one f32 [C/b x b] @ [b x b]
matmul per rotated input of C channels, b multiply-adds per channel on 64 KiB of weights that
stay in cache (at gemma3-270m ~10% more multiply-adds per token than the layer's matmuls, in
f32). b = 128, or the largest power of two up to it that divides the width (at least 16); a
width with none is left alone.
"""

from __future__ import annotations

import numpy as np

SUFFIX = "mlp.down_rotation"
BLOCK = 128
MIN_BLOCK = 16


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester-Hadamard matrix of order n (a power of two), f32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard order must be a power of two, not {n}")
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def block_for(width: int) -> int | None:
    """The rotation's order for an input of `width` channels (None: no power of two from
    MIN_BLOCK to BLOCK divides it)."""
    b = BLOCK
    while b >= MIN_BLOCK:
        if width % b == 0:
            return b
        b //= 2
    return None


def _rotate_rows(a, h: np.ndarray) -> np.ndarray:
    """Rows of a weight [.., F] -> times H per block of b columns: one GEMM (a [rows, C/b, b]
    stack is one per row), on one BLAS thread (export/quantize/blas.py: the same rounding
    whichever path or thread runs it)."""
    from export.quantize.blas import single_thread

    a = np.asarray(a, np.float32)
    with single_thread():
        return (a.reshape(-1, h.shape[0]) @ h).reshape(a.shape)


def _rotated_weight(value, h: np.ndarray):
    """W [N, F] -> W H per block of b columns (a LazyTensor stays lazy, read by row chunks)."""
    from models.lazy import map_rows

    return map_rows(value, lambda a, start=0: _rotate_rows(a, h))


def groups(names, cfg) -> list[tuple[str, tuple[str, ...]]]:
    """(rotation parameter, the weights that read the rotated input) of every matmul input of
    the text model whose weights are in `names`: each layer's pre-norms' outputs (their readers as
    smoothing groups them, export/quantize/smooth.NORM_READERS), the attention output (o), the MLP
    down projection's input, the recurrent block's output projection's input, and the LM head's
    input (the tied table, which the lookup also reads: models.model.HEAD_ROTATION)."""
    from export.quantize.smooth import NORM_READERS
    from models.model import HEAD_ROTATION

    names = set(names)
    out = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for norm, readers in NORM_READERS.items():
            present = tuple(p + r for r in readers if p + r in names)
            if any(r.startswith(p + "rec.") for r in present):
                # RecurrentGemma's recurrent block: with its input rotated, XNNPACK refuses the
                # graph at allocation ("XNNPack delegate failed to reshape runtime", LiteRT 2.3):
                # left unrotated (its output projection's input is rotated)
                continue
            if p + norm in names and present:
                out.append((p + norm + "_rotation", present))
        for reader in ("attn.o", "mlp.down", "rec.linear_out"):
            if p + reader in names:
                out.append((p + reader + "_rotation", (p + reader,)))
    if "final_norm" in names and "embed" in names:
        out.append((HEAD_ROTATION, ("embed",)))
    return out


PAYS = 0.95  # `lowers_error` rotates where the weights' error falls by 5% or more
SAMPLE_VALUES = 1 << 18  # per weight, what `lowers_error` quantizes both ways (~8,000 blocks of 32)


def sample_rows(value, values: int = SAMPLE_VALUES) -> np.ndarray:
    """About `values` of a 2-D weight's values, f32: four runs of whole rows spread over it (a lazy
    weight reads just those rows), or the whole weight when it is that small."""
    from models.lazy import is_lazy, load

    n, k = value.shape
    rows = max(1, values // k)
    if rows * 4 >= n:
        return np.asarray(load(value), np.float32)
    run = -(-rows // 4)
    starts = [i * (n - run) // 3 for i in range(4)]
    read = value.read_rows if is_lazy(value) and value.reads_rows else (lambda a, b: np.asarray(load(value))[a:b])
    return np.concatenate([np.asarray(read(a, a + run), np.float32) for a in starts])


def lowers_error(quantize):
    """A `choose` for `rotated`: rotate an input where its readers' weights, quantized as the
    export will (`quantize(name, w)` -> BlockQuantized: export.quantize.blocks.quantizer; the
    table's scheme differs from the linear layers'), lose at least 5% less (PAYS) in the rotated
    basis than as they are: the sum of squared weight errors over sampled rows (`sample_rows`;
    the rotation is orthonormal, so the errors compare directly). A rotation costs an f32 matmul
    per step, so it has to pay clearly. For ONNX's int4 recipes: their zero points already follow
    a block's offset, and a weight whose checkpoint held it on an int4-like grid (a GGUF's Q4_K)
    loses that grid when rotated (docs/quantization.md)."""

    def error(name: str, w: np.ndarray) -> float:
        b = quantize(name, w)
        return float(np.square(b.dequantize() - w, dtype=np.float64).sum())

    def choose(readers: dict, h: np.ndarray) -> bool:
        plain = rotated = 0.0
        for name in sorted(readers):
            rows = sample_rows(readers[name])  # read once; its rotation is rows-wise
            plain += error(name, rows)
            rotated += error(name, _rotate_rows(rows, h))
        return rotated < PAYS * plain

    return choose


def rotated(params: dict, cfg, choose=None, keep=()) -> tuple[dict, int]:
    """(params with every matmul input of `groups` rotated: its readers' weights rotated and the
    rotation added; how many inputs were rotated). The values not rotated are the same objects.
    Apply after smoothing (export/quantize/smooth.py): its factors are the unrotated inputs'.
    `choose(readers, h)` (the weights the rotation would change, name -> value, and the matrix
    H their columns would be multiplied by per block) decides each input; None rotates every one.
    An input read by any of `keep` (weights written exactly as a checkpoint holds them: its own
    int4 blocks) is never rotated."""
    out = dict(params)
    n = 0
    cache: dict[int, np.ndarray] = {}
    for name, readers in groups(params, cfg):
        b = block_for(int(np.shape(params[readers[0]])[1]))
        if b is None or any(r in keep for r in readers):
            continue
        h = cache.setdefault(b, hadamard(b))
        if choose is None or choose({r: params[r] for r in readers}, h):
            out.update({r: _rotated_weight(params[r], h) for r in readers})
            out[name] = h.T.copy()  # as models.layers.rotate_blocks reads it ([out, in]); H is symmetric anyway
            n += 1
    return out, n


def wanted(quant: str | None, quant_table: str, enabled: bool = True) -> bool:
    """Whether an export rotates: TFLite's dynamic-int8 (the recipe smoothing serves too) and the
    int4 block recipes on both targets (a rotated input spreads the weights' outliers over the
    block as well; ONNX per input, where it pays: `chooser`), unless --no-rotation (`enabled`). The
    inputs of a checkpoint's carried int4 blocks (Q4_0, Q4_K) are left as they are (`rotated`'s
    `keep`): those blocks are written exactly, unrotated."""
    from export.quantize.recipes import RECIPES
    from export.quantize.smooth import wanted as smoothing_wanted

    r = RECIPES.get(quant) if quant else None
    int4 = r is not None and r.dynamic and r.bits == 4 and bool(r.block)
    return smoothing_wanted(quant, quant_table, enabled) or bool(enabled and int4)


def applies(plan) -> bool:
    return wanted(plan.quant, plan.target.quant_table, plan.options.rotation)


def chooser(plan):
    """The `choose` of `rotated` for an export: ONNX's int4 recipes rotate an input only where its
    readers' int4 weights lose less rotated (`lowers_error`, with the recipe's own schemes:
    asymmetric blocks, the table's at its bits); everything else rotates every input (TFLite's
    int8 activations are quantized per row of the whole input, which the rotation evens out
    whatever it does to the weights)."""
    from export.quantize.blocks import mse_asymmetric, quantizer

    r = plan.recipe
    if plan.target.quant_table != "onnx" or r is None or r.bits != 4 or not r.block:
        return None
    return lowers_error(quantizer(r.bits, r.block, mse_asymmetric, r.table_bits))
