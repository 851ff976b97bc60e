"""Activation smoothing for TFLite's dynamic-int8 recipe: per-channel factors folded into the
weights, so that the matmul kernel's run-time int8 activations lose less (the SmoothQuant idea:
move the activations' outlier channels into the weights, which are quantized per output channel
and absorb them better).

Why TFLite only: XNNPACK's dynamic int8 FULLY_CONNECTED quantizes each row of its input (one token)
with one scale and zero point over all of its channels, so a handful of channels that the norms'
gains make 10-100x larger than the rest cost every other channel its resolution. ONNX Runtime's
MatMulNBits quantizes the input per block of 128 (accuracy level 4) and does not need this
(measured: docs/quantization.md#smoothing-tflite-dynamic-int8).

What is folded (exactly: the f32 model computes the same function, up to float rounding):

  norm -> readers   y = rms(x) * (1 + g) read by W (q/k/v; gate/up; Griffin's linear_x/y):
                    (1 + g) / s and W * s per input channel.
  up -> down        down reads gelu(gate) * up: up's rows (and bias) / s, down's columns * s.
  final norm -> head the tied table's columns * s and the final norm's gain / s; the lookup reads
                    the same table, so its rows are multiplied by 1 / s after it
                    (models.model.EMBED_CHANNEL_SCALE, an [E] vector: one MUL in the graph).

Per channel j: s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), with max|x_j| over the calibration
tokens and max|W_j| over the readers' column j. Per fold, alpha is chosen among `ALPHAS`, or no
fold at all, by the error it gives the readers' outputs as the kernel computes them (input int8
per row, asymmetric; weights int8 per output channel, symmetric) on calibration tokens; a fold is
made only where it takes at least 1 - WORTH of that error away: a model whose activations have no
outlier channels keeps its weights. Not folded: the attention output projection (measured: no gain; its input is already well spread),
the recurrent block's output projection (the RG-LRU is not linear in its input), the
vision tower.

Calibration: export/quantize/calibration.txt (or --calibration-text) with the model's tokenizer, at
most SMOOTH_WINDOWS windows; the f32 layers run one at a time (export/quantize/gptq.py's
runner), so memory is one layer's weights. The result is applied lazily to a streamed export's
weights (a LazyTensor stays one: read rows scaled as they are read).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from export.quantize.sizes import TABLE

ALPHAS = (0.5, 0.7)  # the migration strengths tried per fold (docs/quantization.md#smoothing-tflite-dynamic-int8)
# a fold is made only where it leaves at most this share of the readers' output error (measured: the
# real Gemma 3 270M's folds leave 0.07-0.6 of it, the trained tiny fixtures' 0.7-1.0; those made
# the exported tiny model's KL to f32 worse, 4.0e-4 -> 8.3e-4: the sample cannot tell small gains)
WORTH = 0.6
SMOOTH_WINDOWS = 2  # calibration windows of up to 1024 tokens (the first of the text's)
FLOOR = 1e-5  # of max|x_j| and max|W_j|: a dead channel gets a finite factor

# norm -> the weights that read its output, per layer (the names each family uses)
NORM_READERS = {
    "pre_attn_norm": ("attn.q", "attn.k", "attn.v"),
    "pre_ffw_norm": ("mlp.gate", "mlp.up"),
    "temporal_pre_norm": ("attn.q", "attn.k", "attn.v", "rec.linear_x", "rec.linear_y"),
    "channel_pre_norm": ("mlp.gate", "mlp.up"),
}


@dataclasses.dataclass(frozen=True)
class Group:
    """One fold: `producer` is a norm's scale (kind "norm"; "head": the final norm, read by the
    tied table) or the weight whose output rows feed `readers` (kind "down"); `tap` is the reader
    the calibration statistic is recorded under."""
    kind: str  # "norm", "down" or "head"
    producer: str
    readers: tuple[str, ...]

    @property
    def tap(self) -> str:
        return self.readers[0]


def groups(names, cfg) -> list[Group]:
    """The folds of every text layer whose weights are in `names`."""
    out = []
    names = set(names)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for norm, readers in NORM_READERS.items():
            present = tuple(p + r for r in readers if p + r in names)
            if p + norm in names and present:
                out.append(Group("norm", p + norm, present))
        if p + "mlp.up" in names and p + "mlp.down" in names:
            out.append(Group("down", p + "mlp.up", (p + "mlp.down",)))
    if "final_norm" in names and TABLE in names:
        out.append(Group("head", "final_norm", (TABLE,)))
    return out


def calibrate(params: dict, cfg, tokenizer=None, seed: int = 0, max_len: int | None = None, text=None,
              windows: int = SMOOTH_WINDOWS, progress=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per matmul input (keyed by the first weight that reads it): (max |x_j| over the calibration
    tokens [K], a sample of those tokens' inputs [R, K]) f32, from the f32 model run one layer at a
    time. params: arrays or LazyTensors."""
    import jax.numpy as jnp

    from export.quantize.gptq import _embed, _LayerRunner, calibration_ids

    ids = calibration_ids(cfg, tokenizer, seed, max_len, text)[:windows]
    x = _embed(params, cfg, ids)
    runner = _LayerRunner(cfg, *ids.shape, stat="absmax")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    n = len(cfg.layer_kinds)
    for i in range(n):
        prefix = f"layers.{i}."
        weights = {k: jnp.asarray(np.asarray(v, np.float32)) for k, v in params.items() if k.startswith(prefix)}
        x, stats, _ = runner(i, weights, x, stats=True)
        out.update({k: (v[0], v[1:]) for k, v in stats.items()})
        del weights
        if progress is not None:
            progress(i + 1, n, f"smoothing statistics, layer {i + 1}/{n}")
    if "final_norm" in params:  # the LM head's input
        from models.model import head_input

        h = head_input({"final_norm": jnp.asarray(np.asarray(params["final_norm"], np.float32))}, cfg, x)
        h = np.asarray(h, np.float32).reshape(-1, h.shape[-1])
        out[TABLE] = (np.abs(h).max(0), h[_LayerRunner.sample_rows(len(h))])
    return out


def _rows_int8(x: np.ndarray) -> np.ndarray:
    """x as the dynamic int8 kernel reads it: each row quantized to int8 with its own scale and
    zero point over [min(row, 0), max(row, 0)]."""
    lo = np.minimum(x.min(-1, keepdims=True), 0)
    hi = np.maximum(x.max(-1, keepdims=True), 0)
    scale = np.maximum(hi - lo, 1e-30) / 255
    zero = np.round(-lo / scale) - 128
    return ((np.clip(np.round(x / scale) + zero, -128, 127) - zero) * scale).astype(np.float32)


def _channels_int8(w: np.ndarray) -> np.ndarray:
    """w [N, K] as the TFLite writer stores it: int8 per row, symmetric (quantize/tflite.py)."""
    from export.quantize.tflite import channel_int8

    codes, scale = channel_int8(w)
    return codes.astype(np.float32) * scale[:, None]


def choose(readers: list, absmax: np.ndarray, sample: np.ndarray, alphas=ALPHAS) -> tuple[float | None, np.ndarray | None]:
    """The fold of one input (its readers' weights, arrays or LazyTensors, [N_i, K]) with the least
    squared error of the readers' outputs on `sample` [R, K] under dynamic int8, among no fold
    (None, None) and s for each alpha: (alpha, s). The weights are read a row chunk at a time."""
    from models.lazy import row_chunks

    x = np.asarray(sample, np.float32)
    wmax = np.zeros(x.shape[1], np.float32)
    for w in readers:
        for _, rows in row_chunks(w):
            np.maximum(wmax, np.abs(np.asarray(rows, np.float32)).max(0), out=wmax)
    cands: list[tuple[float | None, np.ndarray | None]] = [(None, None)]
    for a in alphas:
        s = np.maximum(absmax, FLOOR) ** a / np.maximum(wmax, FLOOR) ** (1 - a)
        cands.append((a, s.astype(np.float32)))
    xs = [_rows_int8(x if s is None else x / s) for _, s in cands]
    err = np.zeros(len(cands))
    for w in readers:
        for _, rows in row_chunks(w):
            rows = np.asarray(rows, np.float32)
            want = x @ rows.T
            for c, ((_, s), xq) in enumerate(zip(cands, xs)):
                got = xq @ _channels_int8(rows if s is None else rows * s).T
                err[c] += float(np.square(got - want).sum())
    best = int(np.argmin(err))
    return cands[best] if err[best] <= WORTH * err[0] else cands[0]


def factors(params: dict, cfg, stats: dict, alphas=ALPHAS) -> dict[Group, np.ndarray]:
    """s per fold that smoothing helps (see the module doc), from the calibration statistics."""
    out = {}
    for g in groups(params, cfg):
        if g.tap not in stats:
            continue
        absmax, sample = stats[g.tap]
        _a, s = choose([params[r] for r in g.readers], np.asarray(absmax, np.float32), sample, alphas)
        if s is not None:
            out[g] = s
    return out


def _scaled(value, cols: np.ndarray | None = None, rows: np.ndarray | None = None):
    """value [N, K] f32 with column j times cols[j] and row i divided by rows[i]; a LazyTensor
    stays lazy (and keeps reading row slices alone where its source can)."""
    from models.lazy import map_rows

    def apply(a: np.ndarray, start: int = 0) -> np.ndarray:
        a = np.array(a, np.float32)  # a fresh f32 copy: the source is never written
        if cols is not None:
            a *= cols[None, :]
        if rows is not None:
            a /= rows[start:start + len(a), None]
        return a

    return map_rows(value, apply)


def fold(params: dict, folds: dict[Group, np.ndarray]) -> dict:
    """params with every fold applied (a new dict; the values not folded are the same objects)."""
    from models.model import EMBED_CHANNEL_SCALE

    cols: dict[str, np.ndarray] = {}
    rows: dict[str, np.ndarray] = {}
    biases: dict[str, np.ndarray] = {}
    out = dict(params)
    for g, s in folds.items():
        for r in g.readers:
            cols[r] = cols[r] * s if r in cols else s
        if g.kind in ("norm", "head"):
            gain = 1.0 + np.asarray(params[g.producer], np.float32)
            out[g.producer] = (gain / s - 1.0).astype(np.float32)
            if g.kind == "head":  # the lookup reads the same table: undo the columns' scale after it
                before = np.asarray(params.get(EMBED_CHANNEL_SCALE, 1.0), np.float32)
                out[EMBED_CHANNEL_SCALE] = (before / s).astype(np.float32)
        else:
            rows[g.producer] = s
            bias = g.producer + "_bias"
            if bias in params:
                biases[bias] = s
    for name in set(cols) | set(rows):
        out[name] = _scaled(params[name], cols.get(name), rows.get(name))
    for name, s in biases.items():
        out[name] = (np.asarray(params[name], np.float32) / s).astype(np.float32)
    return out


def wanted(quant: str | None, quant_table: str, enabled: bool = True) -> bool:
    """Whether an export smooths: TFLite's dynamic-int8 (run-time int8 activations per row, int8
    weights per channel), unless --no-smoothing (`enabled`). The one rule the options' check,
    the memory check and the plan use."""
    from export.quantize.recipes import RECIPES

    r = RECIPES.get(quant) if quant else None
    return bool(enabled and r is not None and r.dynamic and r.bits == 8 and r.block is None
                and quant_table == "tflite")


def applies(plan) -> bool:
    return wanted(plan.quant, plan.target.quant_table, plan.options.smoothing)
