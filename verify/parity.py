"""Parity of an artifact session against the JAX reference on the same token stream.

Both sessions see identical inputs: each prompt is prefilled with the artifact's own chunking
(every prefill call is compared), then `decode_steps` tokens are decoded, each step fed the
reference's greedy token (teacher forcing keeps the streams identical even after a mismatch).
Per step: max abs error and relative RMS error of the logits, top-1 agreement, KL(ref || art).
The greedy-match length counts the decode steps until the artifact's argmax first differs.

Prompts with images (a vision model): each session encodes the images with its own vision
encoder (their soft tokens are compared: `encoder`) and prefills its own splice, so the logits
after an image measure the encoder and the image prefill together.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from contract.prompt import soft_runs
from runtime_py.session import Session

# Two next tokens whose reference logits differ by less than this (1% in probability) are a tie:
# which of them an artifact picks is decided by rounding (the trained tiny models' corpus has many
# such exact alternatives). `top1_agreement_ties` counts picking either as agreement.
TIE_LOGIT = 0.01


@dataclasses.dataclass
class StepReport:
    prompt: int
    signature: str
    step: int  # prefill chunk index, or decode step
    position: int  # position of the last token fed
    max_abs: float
    rel_rms: float
    top1_match: bool
    kl: float
    top1_tie: bool = False  # the artifact's argmax is within TIE_LOGIT of the reference's max


@dataclasses.dataclass
class ParityReport:
    steps: list[StepReport]
    greedy_match: list[int]  # per prompt: decode steps before the first argmax mismatch
    decode_steps: int
    # per image: {"prompt", "image", "max_abs", "rel_rms"} of the vision encoder's soft tokens
    encoder: list[dict] = dataclasses.field(default_factory=list)

    @property
    def max_rel_rms(self) -> float:
        return max([s.rel_rms for s in self.steps] + [e["rel_rms"] for e in self.encoder])

    @property
    def max_abs(self) -> float:
        return max(s.max_abs for s in self.steps)

    @property
    def top1_agreement_ties(self) -> float:
        return float(np.mean([s.top1_match or s.top1_tie for s in self.steps]))

    @property
    def mean_rel_rms(self) -> float:
        return float(np.mean([s.rel_rms for s in self.steps]))

    @property
    def mean_kl(self) -> float:
        return float(np.mean([s.kl for s in self.steps]))

    @property
    def top1_agreement(self) -> float:
        return float(np.mean([s.top1_match for s in self.steps]))

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio of the logits, from the mean relative RMS error."""
        return float(-20 * np.log10(max(self.mean_rel_rms, 1e-30)))

    def worst(self) -> StepReport:
        return max(self.steps, key=lambda s: s.rel_rms)

    def to_json(self, **extra) -> str:
        body = {"max_abs": self.max_abs, "max_rel_rms": self.max_rel_rms, "mean_rel_rms": self.mean_rel_rms,
                "sqnr_db": self.sqnr_db, "top1_agreement": self.top1_agreement,
                "top1_agreement_ties": self.top1_agreement_ties, "tie_logit": TIE_LOGIT, "mean_kl": self.mean_kl,
                "greedy_match": self.greedy_match,
                "decode_steps": self.decode_steps, "encoder": self.encoder, **extra,
                "steps": [dataclasses.asdict(s) for s in self.steps]}
        return json.dumps(body, indent=1)


def compare_logits(ref: np.ndarray, art: np.ndarray) -> tuple[float, float, bool, float, bool]:
    ref, art = ref.astype(np.float64), art.astype(np.float64)
    max_abs = float(np.abs(ref - art).max())
    rel_rms = float(np.sqrt(np.mean((ref - art) ** 2) / max(np.mean(ref**2), 1e-30)))
    log_p = ref - ref.max() - np.log(np.exp(ref - ref.max()).sum())
    log_q = art - art.max() - np.log(np.exp(art - art.max()).sum())
    kl = float(np.sum(np.exp(log_p) * (log_p - log_q)))
    tie = bool(ref.max() - ref[art.argmax()] < TIE_LOGIT)
    return max_abs, rel_rms, bool(ref.argmax() == art.argmax()), kl, tie


def parity(reference: Session, artifact: Session, prompts: Sequence[Sequence[int]],
           decode_steps: int, images: Sequence[Sequence] | None = None, progress=None) -> ParityReport:
    """images: per prompt, None or the images its `<start_of_image>` tokens stand for;
    progress(i, n, label): called per prompt and per 8 decode steps."""
    steps, greedy, encoder = [], [], []
    total = len(prompts) * (decode_steps // 8 + 1)
    tick = 0
    for pi, prompt in enumerate(prompts):
        if progress:
            progress(tick, total, f"prompt {pi + 1}/{len(prompts)} prefill")
        reference.reset()
        artifact.reset()
        ref_emb = art_emb = None
        if images is not None and images[pi]:
            prompt, ref_emb = reference.image_inputs(prompt, images[pi])
            _, art_emb = artifact.image_inputs(prompt, images[pi])
            for k, (s, e) in enumerate(_runs(artifact, prompt)):
                a, r = art_emb[s:e], ref_emb[s:e]
                encoder.append({"prompt": pi, "image": k, "max_abs": float(np.abs(a - r).max()),
                                "rel_rms": float(np.sqrt(np.mean((a - r) ** 2) / max(np.mean(r ** 2), 1e-30)))})
        plan = artifact.chunks(len(prompt)) if ref_emb is None else artifact.image_chunks(prompt)
        done = 0
        for ci, (name, take) in enumerate(plan):
            chunk = list(prompt[done:done + take])
            if ref_emb is None:
                ref, art = reference.prefill(chunk), artifact.prefill(chunk)
            else:
                ref = reference.prefill(chunk, ref_emb[done:done + take])
                art = artifact.prefill(chunk, art_emb[done:done + take])
            done += take
            steps.append(StepReport(pi, name, ci, done - 1, *compare_logits(ref, art)))
        def step(d, tick=tick, pi=pi):
            if progress and d % 8 == 7:
                progress(tick + (d + 1) // 8, total, f"prompt {pi + 1}/{len(prompts)} decode {d + 1}")

        greedy.append(teacher_forced_decode(reference, artifact, ref, art, decode_steps, steps, pi, step))
        if ref_emb is None:
            verify_rows(reference, artifact, prompt, steps, pi)
        tick = (pi + 1) * (decode_steps // 8 + 1)
    if progress:
        progress(total, total, "checked")
    return ParityReport(steps, greedy, decode_steps, encoder)


def teacher_forced_decode(reference: Session, artifact: Session, ref: np.ndarray, art: np.ndarray, n: int,
                          out: list, prompt: int = 0, after_step=None) -> int:
    """Decode `n` steps in both sessions, each fed the reference's greedy token (starting from the
    logits `ref`, `art` of the last prefill); a StepReport per step is appended to `out`. Returns
    the steps before the artifact's argmax first differs (n when it never does)."""
    matched = None
    for d in range(n):
        token = int(ref.argmax())
        if matched is None and int(art.argmax()) != token:
            matched = d
        ref, art = reference.decode(token), artifact.decode(token)
        out.append(StepReport(prompt, "decode", d, reference.position - 1, *compare_logits(ref, art)))
        if after_step is not None:
            after_step(d)
    return n if matched is None else matched


def verify_tokens(session: Session, prompt: Sequence[int]) -> list[int]:
    """The tokens the gate checks the verify signature with (an artifact exported with
    --speculative): as many as it takes, from the prompt; [] when it has none or no room."""
    if not session.verify_lengths:
        return []
    k = session.verify_lengths[-1]
    if session.position + k > session.max_len or len(prompt) < k:
        return []
    return [int(t) for t in prompt[:k]]


def verify_rows(reference: Session, artifact: Session, prompt: Sequence[int], out: list, index: int = 0):
    """Speculative decoding's signatures, where the artifact has them: verify_{K} on K tokens in
    both sessions, each row compared (labelled verify_{K}); then both rewind to keep the first
    token only and decode the second again (labelled `decode after rewind`): the rows the
    rejected tokens left in the caches must not change it."""
    tokens = verify_tokens(artifact, prompt)
    if not tokens:
        return
    start = artifact.position
    ref_rows, art_rows = reference.verify(tokens), artifact.verify(tokens)
    name = f"verify_{artifact.verify_lengths[-1]}"
    for i, (r, a) in enumerate(zip(ref_rows, art_rows)):
        out.append(StepReport(index, name, i, start + i, *compare_logits(r, a)))
    reference.rewind(start + 1)
    artifact.rewind(start + 1)
    out.append(StepReport(index, "decode after rewind", 0, start + 1,
                          *compare_logits(reference.decode(tokens[1]), artifact.decode(tokens[1]))))


def _runs(session: Session, ids) -> list[tuple[int, int]]:
    return soft_runs(session.vision, ids)
