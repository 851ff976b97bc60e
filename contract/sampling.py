"""Token sampling: the settings (`Sampling`, shared by the JAX reference and the runtimes) and the
numpy sampler artifact sessions use: greedy, temperature, top-k, top-p.

Same semantics as `models.generate.sample` (the JAX reference); the random streams differ, so
seeded non-greedy outputs are reproducible per backend, not across backends.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")


GREEDY = Sampling()


def probabilities(logits: np.ndarray, sampling, vocab_limit: int | None = None) -> np.ndarray:
    """logits [V] -> the distribution `sample_numpy` draws from (float64 [V'], V' = vocab_limit or
    V) after temperature, top-k and top-p; one-hot at the argmax for greedy (None or temperature 0)."""
    logits = np.asarray(logits, np.float64)
    if vocab_limit is not None:
        logits = logits[:vocab_limit]
    if sampling is None or sampling.temperature == 0.0:
        probs = np.zeros_like(logits)
        probs[int(np.argmax(logits))] = 1.0
        return probs
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
    return probs


def sample_numpy(logits: np.ndarray, sampling, rng: np.random.Generator, vocab_limit: int | None = None) -> int:
    """logits [V] -> a token id. `sampling` is a Sampling (None = greedy)."""
    if sampling is None or sampling.temperature == 0.0:
        logits = np.asarray(logits)
        return int(np.argmax(logits if vocab_limit is None else logits[:vocab_limit]))
    probs = probabilities(logits, sampling, vocab_limit)
    return int(rng.choice(probs.size, p=probs))
