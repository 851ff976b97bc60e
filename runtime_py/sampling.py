"""Token sampling in numpy for artifact sessions: greedy, temperature, top-k, top-p.

Same semantics as `models.generate.sample` (the JAX reference); the random streams differ, so
seeded non-greedy outputs are reproducible per backend, not across backends.
"""

from __future__ import annotations

import numpy as np


def sample_numpy(logits: np.ndarray, sampling, rng: np.random.Generator, vocab_limit: int | None = None) -> int:
    """logits [V] -> a token id. `sampling` is a models.Sampling (None = greedy)."""
    logits = np.asarray(logits, np.float64)
    if vocab_limit is not None:
        logits = logits[:vocab_limit]
    if sampling is None or sampling.temperature == 0.0:
        return int(np.argmax(logits))
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.size:
        kth = np.partition(logits, -sampling.top_k)[-sampling.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if sampling.top_p is not None and sampling.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        keep = np.zeros_like(probs, bool)
        keep[order[before < sampling.top_p]] = True
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
