"""The parity report as a picture (NAME.parity.png beside NAME.parity.json) and as a short table
(`python -m export inspect ARTIFACT --report`).

The picture: per checked call, the relative RMS error of the logits and the KL divergence from the
reference (log scales), against the position of the call's last token, one colour per prompt;
prefill chunks drawn as squares, decode steps as dots; the sliding window's multiples (where the
local rings wrap: every local layer's ring holds the last W positions) as dashed lines, the
float tolerance or the recipe's thresholds as a horizontal line. 1200 x 700 pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

WIDTH, HEIGHT, DPI = 12, 7, 100  # inches and dots per inch: 1200 x 700 pixels


def write_png(report_path: Path, png_path: Path, window: int | None = None) -> Path:
    """Draw the report at `report_path` (a parity JSON) into `png_path` (written to a temporary
    name, then renamed)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    data = json.loads(Path(report_path).read_text())
    steps = data.get("steps") or []
    gate = data.get("gate") or {}
    fig, (ax_rms, ax_kl) = plt.subplots(2, 1, figsize=(WIDTH, HEIGHT), dpi=DPI, sharex=True)
    prompts = sorted({s["prompt"] for s in steps})
    for p in prompts:
        mine = [s for s in steps if s["prompt"] == p]
        color = f"C{p % 10}"
        for kind, marker in (("prefill", "s"), ("decode", ".")):
            sel = [s for s in mine if (s["signature"] == "decode") == (kind == "decode")]
            if not sel:
                continue
            x = [s["position"] for s in sel]
            ax_rms.scatter(x, [max(s["rel_rms"], 1e-12) for s in sel], s=18 if kind == "prefill" else 6,
                           marker=marker, color=color, label=f"prompt {p} {kind}")
            ax_kl.scatter(x, [max(s["kl"], 1e-14) for s in sel], s=18 if kind == "prefill" else 6, marker=marker,
                          color=color)
    last = max((s["position"] for s in steps), default=0)
    if window:
        for w in range(window, last + 1, window):
            for ax in (ax_rms, ax_kl):
                ax.axvline(w, color="grey", linestyle="--", linewidth=0.8)
    limit = gate.get("max_rel_rms") or gate.get("mean_rel_rms")
    if limit:
        ax_rms.axhline(limit, color="red", linewidth=0.8, label="threshold")
    if gate.get("mean_kl"):
        ax_kl.axhline(gate["mean_kl"], color="red", linewidth=0.8)
    ax_rms.set_yscale("log")
    ax_kl.set_yscale("log")
    ax_rms.set_ylabel("relative RMS of the logits")
    ax_kl.set_ylabel("KL(reference || artifact)")
    ax_kl.set_xlabel("position" + (f" (dashed: multiples of the {window}-token window, where the rings wrap)"
                                   if window else ""))
    verdict = "PASSED" if data.get("passed") else "FAILED"
    method = f" ({gate['quant_method']})" if gate.get("quant_method") else ""
    what = f"{gate['quantization']}{method} vs the f32 model" if gate.get("quantization") else "float"
    ax_rms.set_title(f"{data.get('artifact', '')}: parity {verdict} ({what}), greedy match "
                     f"{data.get('greedy_match')} of {data.get('decode_steps')}")
    ax_rms.legend(loc="upper left", fontsize=7, ncol=4)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def table(report_path: Path) -> str:
    """The report as a short text table: one row per prompt (its calls, worst and mean relative
    RMS, mean KL, top-1 agreement, greedy match), and the verdict."""
    data = json.loads(Path(report_path).read_text())
    steps = data.get("steps") or []
    greedy = data.get("greedy_match") or []
    head = f"{'prompt':>6} {'calls':>6} {'max rel RMS':>12} {'mean rel RMS':>13} {'mean KL':>10} {'top-1':>6} {'greedy':>7}"
    lines = [head]
    for p in sorted({s["prompt"] for s in steps}):
        mine = [s for s in steps if s["prompt"] == p]
        rms = [s["rel_rms"] for s in mine]
        kl = [s["kl"] for s in mine]
        top1 = sum(bool(s["top1_match"]) for s in mine) / len(mine)
        g = greedy[p] if p < len(greedy) else "-"
        lines.append(f"{p:>6} {len(mine):>6} {max(rms):>12.2e} {sum(rms) / len(rms):>13.2e} "
                     f"{sum(kl) / len(kl):>10.2e} {top1:>6.3f} {g!s:>7}")
    if not data.get("verified", True):
        lines.append("not verified (--no-verify)")
    else:
        lines.append(f"verdict: {'PASSED' if data.get('passed') else 'FAILED'} (decode steps {data.get('decode_steps')})")
    return "\n".join(lines)
