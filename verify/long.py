"""Parity far past the window: one long prompt, prefilled in chunks, then decoded, compared with
the JAX model at the positions where long-context bugs live (`--verify-long N`, tools/bench_long.py).

The gate's own prompts (verify/prompts.py) cross the sliding window once and wrap the local rings
once. Bugs that show only later, in the second wrap of a ring, far into a global cache, at a
chunk boundary deep in the prompt, or at the last position of the context, need a prompt that
reaches there. Prefill returns the logits of a chunk's last token only, so the prompt is fed in
segments that end at each probed position: the artifact chunks each segment as it always does
(its largest prefill signature, then the smallest that holds the rest), so chunks start and end
at many different offsets, and the logits at every probe are compared. Probes: around every
boundary of the sliding window (the ring wraps there: positions b - 1, b, b + 1 for every
multiple b of the window) and of the largest prefill chunk, each kind evenly thinned to half of
`max_probes` boundaries (keeping its first two and its last), of every context bucket (where the runtime
moves to a larger ctx{L}_* signature), and the prompt's last token. Then decode steps
teacher-forced with the reference's greedy token, up to the last position of the context when
the prompt leaves fewer than `decode_steps` positions (N = max_seq_len - decode steps reaches the
context's last position).

Both sessions run the same calls, so a report is the gate's ParityReport (verify/parity.py) and is
judged by the same gate row (verify/gates.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from verify.parity import ParityReport, StepReport, compare_logits, teacher_forced_decode

MAX_PROBES = 48  # boundaries probed (three positions each), half of them the window's


def probe_positions(n: int, window: int, chunk: int, max_probes: int = MAX_PROBES, buckets=()) -> list[int]:
    """Positions (0-based, < n) whose logits a long check compares: b - 1, b, b + 1 for the
    multiples b of the window and of the largest chunk, each kind thinned evenly to half of
    `max_probes` boundaries (keeping its first two and its last), for every context bucket b
    (where the runtime switches signatures), and n - 1."""
    bounds = set(buckets)
    for step in {window, chunk}:
        if step and step > 1:
            bounds |= set(_thin(list(range(step, n, step)), max(3, max_probes // 2)))
    probes = {p for b in bounds for p in (b - 1, b, b + 1) if 0 <= p < n}
    probes.add(n - 1)
    return sorted(probes)


def _thin(bounds: list[int], k: int) -> list[int]:
    if len(bounds) <= k:
        return bounds
    keep = np.unique(np.linspace(2, len(bounds) - 1, k - 2).round().astype(int))
    return bounds[:2] + [bounds[i] for i in keep]


def long_prompt(cfg, n: int, seed: int = 7) -> list[int]:
    """n token ids: BOS, then ids drawn from the vocabulary (as the gate's prompts)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, n).tolist()
    ids[0] = cfg.tokens.bos
    return ids


def long_parity(reference, artifact, prompt: Sequence[int], decode_steps: int, window: int,
                max_probes: int = MAX_PROBES, progress=None) -> ParityReport:
    """The long check of `artifact` against `reference` (runtime_py Sessions) on `prompt`; one
    ParityReport whose prefill steps are labelled `prefill@P` (P the probed position)."""
    n = len(prompt)
    if n + 1 > artifact.max_len:
        raise ValueError(f"a long check of {n} tokens needs a context of at least {n + 1}; the artifact holds "
                         f"{artifact.max_len}: pass a smaller --verify-long")
    chunk = max(artifact.prefill_lengths or [1])
    probes = probe_positions(n, window, chunk, max_probes, getattr(artifact, "buckets", ()))
    steps = min(decode_steps, artifact.max_len - n)
    reference.reset()
    artifact.reset()
    out, start = [], 0
    total = len(probes) + steps
    for i, p in enumerate(probes):
        segment = list(prompt[start:p + 1])
        ref, art = reference.prefill(segment), artifact.prefill(segment)
        out.append(StepReport(0, f"prefill@{p}", i, p, *compare_logits(ref, art)))
        start = p + 1
        if progress:
            progress(i + 1, total, f"long check: position {p + 1} of {n}")
    def step(d):
        if progress and (d % 8 == 7 or d == steps - 1):
            progress(len(probes) + d + 1, total, f"long check: decode {d + 1}")

    greedy = teacher_forced_decode(reference, artifact, ref, art, steps, out, 0, step)
    return ParityReport(out, [greedy], steps)


def summary(report: ParityReport, n: int, failures: list[str]) -> dict:
    """The long check as parity.json's `long` record."""
    worst = report.worst()
    return {"tokens": n, "passed": not failures, "failures": failures, "probes": sum(
        1 for s in report.steps if s.signature != "decode"), "decode_steps": report.decode_steps,
        "max_rel_rms": report.max_rel_rms, "mean_rel_rms": report.mean_rel_rms, "max_abs": report.max_abs,
        "top1_agreement": report.top1_agreement, "top1_agreement_ties": report.top1_agreement_ties,
        "mean_kl": report.mean_kl, "greedy_match": report.greedy_match[0],
        "worst": {"signature": worst.signature, "position": worst.position, "rel_rms": worst.rel_rms},
        "steps": [{"signature": s.signature, "position": s.position, "rel_rms": s.rel_rms, "max_abs": s.max_abs,
                   "top1_match": s.top1_match, "kl": s.kl} for s in report.steps]}
