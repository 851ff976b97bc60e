"""A backend-agnostic session over exported signatures: state management, prompt chunking,
decode, generation.

A backend only has to run one signature: `run(name, inputs: dict[str, np.ndarray]) -> dict`.
The session owns the state tensors (KV caches, recurrent states), feeds each signature's outputs
back as the next call's inputs, chunks prompts over the prefill signatures (right-padding the
last chunk; pad entries of input_pos are -1, which ends the run of real tokens), and refuses to
run past the context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    name: str
    length: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @property
    def state_inputs(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.inputs if t.name not in ("tokens", "input_pos"))


class ContextFullError(ValueError):
    pass


class FeedBackend:
    """States held as numpy arrays and fed to a `run(name, feed) -> outputs` function."""

    def __init__(self, signatures: dict[str, SignatureInfo], run: Callable[[str, dict], dict]):
        self.signatures, self._run = signatures, run
        self._states: dict[str, np.ndarray] = {}

    def reset(self):
        decode = self.signatures["decode"]
        self._states = {t.name: np.zeros(t.shape, t.dtype) for t in decode.state_inputs}

    def states(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self._states.items()}

    def call(self, name: str, tokens: np.ndarray, input_pos: np.ndarray) -> np.ndarray:
        sig = self.signatures[name]
        feed = {"tokens": tokens, "input_pos": input_pos}
        feed.update({t.name: self._states[t.name] for t in sig.state_inputs})
        out = self._run(name, feed)
        for t in sig.state_inputs:
            self._states[t.name] = out[t.name]
        return np.asarray(out["logits"])[0, -1]


class Session:
    """Prefill/decode/generate over a backend's signatures (`decode` and `prefill_{T}`).

    A backend has `signatures`, `reset()` (zero every state), `states()` (copies, for inspection)
    and `call(name, tokens, input_pos) -> logits [V]`, carrying the states from call to call.
    """

    tokenizer_model: bytes | None = None  # the SentencePiece model a .litertlm bundle carries

    def __init__(self, backend, max_len: int, metadata: dict | None = None):
        signatures = backend.signatures
        if "decode" not in signatures:
            raise ValueError("artifact has no 'decode' signature")
        self.signatures = signatures
        self.backend = backend
        self.max_len = max_len
        self.metadata = metadata or {}
        self.prefill_lengths = sorted(s.length for n, s in signatures.items() if n != "decode")
        self.position = 0
        self.reset()

    def reset(self):
        """Forget the sequence: zero every state tensor."""
        self.backend.reset()
        self.position = 0

    @property
    def states(self) -> dict[str, np.ndarray]:
        return self.backend.states()

    def _call(self, name: str, tokens: np.ndarray, input_pos: np.ndarray) -> np.ndarray:
        return self.backend.call(name, tokens.astype(np.int32), input_pos.astype(np.int32))

    def _check_room(self, n: int):
        if self.position + n > self.max_len:
            raise ContextFullError(
                f"context full: position {self.position} + {n} tokens exceeds the context of "
                f"{self.max_len}; reset() or export with a larger --max-seq-len"
            )

    def chunks(self, n: int) -> list[tuple[str, int]]:
        """(signature, real tokens) covering n prompt tokens: the largest prefill signature while
        more remain, then the smallest that holds the rest; decode when there is no prefill."""
        plan = []
        while n > 0:
            fits = [t for t in self.prefill_lengths if t >= n]
            if fits:
                length = fits[0]
            elif self.prefill_lengths:
                length = self.prefill_lengths[-1]
            else:
                length = 1
            take = min(n, length)
            plan.append(("decode" if length == 1 else f"prefill_{length}", take))
            n -= take
        return plan

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed prompt tokens; returns the logits [V] after the last one."""
        tokens = np.asarray(tokens, np.int32)
        if tokens.size == 0:
            raise ValueError("prefill needs at least one token")
        self._check_room(tokens.size)
        logits, done = None, 0
        for name, take in self.chunks(tokens.size):
            length = self.signatures[name].length
            chunk = np.zeros((1, length), np.int32)
            chunk[0, :take] = tokens[done:done + take]
            pos = np.full((length,), -1, np.int32)
            pos[:take] = self.position + np.arange(take)
            logits = self._call(name, chunk, pos)
            self.position += take
            done += take
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Feed one token; returns the logits [V] after it."""
        self._check_room(1)
        logits = self._call("decode", np.array([[token]], np.int32), np.array([self.position], np.int32))
        self.position += 1
        return logits

    def generate_stream(self, prompt: Sequence[int], max_new_tokens: int, *, sampling=None,
                        stop_tokens: Sequence[int] = ()) -> Iterator[int]:
        """Yield generated token ids (the stop token is not yielded). Starts a new sequence."""
        from runtime_py.sampling import sample_numpy

        self.reset()
        if len(prompt) + max_new_tokens > self.max_len:
            raise ContextFullError(
                f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the context "
                f"of {self.max_len}; shorten the prompt, lower max_new_tokens or re-export with a "
                "larger --max-seq-len"
            )
        rng = np.random.default_rng(getattr(sampling, "seed", 0))
        logits = self.prefill(prompt)
        stop = set(stop_tokens)
        limit = self.metadata.get("sample_vocab_size")
        for step in range(max_new_tokens):
            token = sample_numpy(logits, sampling, rng, limit)
            if token in stop:
                return
            yield token
            if step < max_new_tokens - 1:
                logits = self.decode(token)

    def generate(self, prompt: Sequence[int], max_new_tokens: int, **kw) -> list[int]:
        return list(self.generate_stream(prompt, max_new_tokens, **kw))
