"""Speculative decoding: a small draft model proposes tokens, the target checks them in one call.

Each step, with the target's caches holding every accepted token but the last (`x`):

  1. the draft (e.g. Gemma 3 270M for a larger Gemma 3: one tokenizer) catches up on the accepted
     tokens it has not read and proposes g tokens d1..dg, one decode each;
  2. the target runs verify_{K} on [x, d1, ..., dg] (one call, logits after every token);
  3. greedy: d_i is kept while it is the target's argmax after the tokens before it; the first
     mismatch is replaced by the target's argmax there, and when all g are kept the target's
     argmax after dg comes free. The output is greedy decoding on verify's logits: plain greedy
     decoding's token for token on float artifacts; with int8 activations the two paths round
     differently and can part at a near choice (docs/decode.md).
     Sampling: the standard rejection rule (Leviathan et al., Chen et al. 2023): keep d_i with
     probability min(1, p(d_i) / q(d_i)), else draw from max(p - q, 0) renormalized, where p and q
     are the target's and the draft's sampling distributions (temperature, top-k, top-p applied);
     the output follows the target's distribution exactly;
  4. both sessions rewind past the rejected tokens (`Session.rewind`): their rows stay in the
     caches but no later query sees them (artifacts exported with --speculative K keep K extra
     rows in every local ring for this).

A step emits 1 to g + 1 tokens for one target call and g draft calls; `SpeculativeStats` counts
them. Recurrent models (RecurrentGemma) cannot rewind their state and are refused at export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from contract.sampling import probabilities
from runtime_py.session import ContextFullError, Session


@dataclasses.dataclass
class SpeculativeStats:
    steps: int = 0  # target verify (or decode) calls after the prefill
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    emitted: int = 0  # tokens produced (the first, from the prefill, included)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per target call after the prefill (plain decoding: 1)."""
        return (self.emitted - 1) / self.steps if self.steps else 0.0

    def __str__(self) -> str:
        return (f"speculative: {self.drafted} drafted, {self.accepted} accepted ({self.acceptance_rate:.1%}), "
                f"{self.tokens_per_step:.2f} tokens per target call")


def check_pair(target: Session, draft: Session, draft_tokens: int | None = None) -> int:
    """The draft tokens per step for this target and draft (default: all the target's verify
    signature checks); ValueError naming the problem and the fix otherwise."""
    if draft is target:
        raise ValueError("the draft must be a session of its own (load the artifact a second time)")
    if not target.verify_lengths:
        raise ValueError("the target has no verify signature; export it with --speculative K (TFLite or .litertlm)")
    most = target.verify_lengths[-1] - 1
    g = most if draft_tokens is None else int(draft_tokens)
    if not 1 <= g <= most:
        raise ValueError(f"--draft-tokens {g}: the target's verify_{most + 1} checks 1 to {most} draft tokens")
    if g > target.max_rewind:
        raise ValueError(f"the target's caches can rewind {target.max_rewind} positions, fewer than {g} draft tokens; "
                         f"re-export it with --speculative {g}")
    if g - 1 > draft.max_rewind:
        raise ValueError(f"the draft's caches can rewind {draft.max_rewind} positions, fewer than the {g - 1} a step "
                         f"may reject; export the draft with --speculative {g} too")
    t, d = target.metadata, draft.metadata
    t_vocab, d_vocab = t.sample_vocab_size or t.vocab_size, d.sample_vocab_size or d.vocab_size
    if t_vocab != d_vocab or (t.bos, t.eos) != (d.bos, d.eos):
        raise ValueError(f"the draft ({d.model}: {d_vocab} tokens) does not share the target's tokenizer ({t.model}: "
                         f"{t_vocab} tokens); pick a draft of the same family (gemma3-270m for Gemma 3)")
    return g


def accept_or_replace(p: np.ndarray, q: np.ndarray, token: int, rng: np.random.Generator) -> int | None:
    """The rejection rule for a draft `token` drawn from q, the target's distribution being p:
    None when it is kept (probability min(1, p / q)), else a replacement drawn from
    max(p - q, 0) renormalized. Kept or replaced, the result is distributed as p."""
    if rng.random() < min(1.0, p[token] / q[token]):
        return None
    rest = np.maximum(p - q, 0.0)
    if rest.sum() <= 0.0:  # p == q up to rounding: nothing to correct towards
        return None
    return int(rng.choice(rest.size, p=rest / rest.sum()))


def _catch_up(draft: Session, tokens: Sequence[int]) -> np.ndarray:
    """Feed the draft the accepted tokens it has not read; the logits after the last."""
    if len(tokens) > 4:
        return draft.prefill(tokens)
    logits = None
    for token in tokens:
        logits = draft.decode(int(token))
    return logits


def generate_stream(target: Session, draft: Session, prompt: Sequence[int], max_new_tokens: int, *,
                    draft_tokens: int | None = None, sampling=None, stop_tokens: Sequence[int] = (),
                    stats: SpeculativeStats | None = None, progress=None) -> Iterator[int]:
    """Yield generated ids as `Session.generate_stream` does (the same tokens for greedy), the
    target checking `draft_tokens` draft tokens per call. Starts a new sequence in both sessions.
    `stats` (a SpeculativeStats) is filled in as tokens are produced."""
    g_max = check_pair(target, draft, draft_tokens)
    prompt = [int(t) for t in prompt]
    need = len(prompt) + max_new_tokens
    for who, session in (("target", target), ("draft", draft)):
        if need > session.max_len:
            raise ContextFullError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the {who}'s "
                                   f"context of {session.max_len}; shorten the prompt or lower max_new_tokens")
    stats = SpeculativeStats() if stats is None else stats
    greedy = sampling is None or sampling.temperature == 0.0
    rng = np.random.default_rng(getattr(sampling, "seed", 0))
    limit = target.metadata.sample_vocab_size

    def dist(logits):
        return probabilities(logits, sampling, limit)

    def pick(logits) -> int:
        if greedy:
            return int(np.argmax(np.asarray(logits)[:limit] if limit else logits))
        p = dist(logits)
        return int(rng.choice(p.size, p=p))

    target.reset()
    draft.reset()
    stop = set(int(t) for t in stop_tokens)
    # emitted but not yet read by the target: all but the last are in its caches already
    pending = [pick(target.prefill(prompt, progress=progress))]
    seq = list(prompt)
    emitted = 0
    while True:
        for token in pending:
            if token in stop:
                return
            yield token
            seq.append(token)
            emitted += 1
            stats.emitted += 1
            if emitted == max_new_tokens:
                return
        x = seq[-1]  # the target holds seq[:-1]; draft as many as can still be emitted
        g = min(g_max, max_new_tokens - emitted - 1, target.max_len - target.position - 1)
        stats.steps += 1
        if g < 1:
            pending = [pick(target.decode(x))]
            continue
        base = target.position  # x goes here
        q_logits = _catch_up(draft, seq[draft.position:])
        drafted, qs = [], []
        for i in range(g):
            if i:
                q_logits = draft.decode(drafted[-1])
            qs.append(None if greedy else dist(q_logits))
            drafted.append(pick(q_logits) if greedy else int(rng.choice(qs[-1].size, p=qs[-1])))
        rows = target.verify([x, *drafted])
        stats.drafted += g
        accepted, nxt = 0, None
        for i, d in enumerate(drafted):
            if greedy:
                best = pick(rows[i])
                nxt = None if best == d else best
            else:
                nxt = accept_or_replace(dist(rows[i]), qs[i], d, rng)
            if nxt is not None:
                break
            accepted += 1
        if nxt is None:  # every draft token kept: the target's token after the last is free
            nxt = pick(rows[g])
        stats.accepted += accepted
        target.rewind(base + accepted + 1)  # x and the kept draft tokens stay
        draft.rewind(min(draft.position, base + accepted + 1))
        pending = [*drafted[:accepted], nxt]


def generate(target: Session, draft: Session, prompt: Sequence[int], max_new_tokens: int, **kw) -> list[int]:
    """Generated ids; keywords as `generate_stream`."""
    return list(generate_stream(target, draft, prompt, max_new_tokens, **kw))
