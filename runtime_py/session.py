"""A backend-agnostic session over exported signatures: state management, prompt chunking,
decode, generation.

A backend only has to run one signature: `run(name, inputs: dict[str, np.ndarray]) -> dict`.
The session owns the state tensors (KV caches, recurrent states), feeds each signature's outputs
back as the next call's inputs, chunks prompts over the prefill signatures (right-padding the
last chunk; pad entries of input_pos are -1, which ends the run of real tokens), and refuses to
run past the context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from contract.metadata import ArtifactMetadata
from contract.prompt import chunk_bounds, image_inputs
from contract.sampling import sample_numpy
from contract.signatures import (
    EMBEDDINGS, IMAGE, INPUT_POS, LOGITS, SOFT_TOKENS, TOKENS, SignatureKind, SignatureSpec, bucket_name,
    parse_signature, signature_name, split_bucket,
)


class ContextFullError(ValueError):
    pass


class FeedBackend:
    """States held as numpy arrays and fed to a `run(name, feed) -> outputs` function."""

    def __init__(self, signatures: dict[str, SignatureSpec], run: Callable[[str, dict], dict]):
        self.signatures, self._run = signatures, run
        self._states: dict[str, np.ndarray] = {}

    def reset(self):
        decode = self.signatures["decode"]
        self._states = {t.name: np.zeros(t.shape, t.dtype) for t in decode.state_inputs}

    def states(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self._states.items()}

    def call(self, name: str, tokens: np.ndarray, input_pos: np.ndarray, embeddings=None,
             rows: bool = False) -> np.ndarray:
        sig = self.signatures[name]
        feed = {TOKENS: tokens, INPUT_POS: input_pos}
        if embeddings is not None:
            feed[EMBEDDINGS] = embeddings
        feed.update({t.name: self._states[t.name] for t in sig.state_inputs})
        out = self._run(name, feed)
        for t in sig.state_inputs:
            self._states[t.name] = out[t.name]
        return np.asarray(out[LOGITS])[0] if rows else np.asarray(out[LOGITS])[0, -1]

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(signature_name(SignatureKind.VISION_ENCODER), {IMAGE: image})[SOFT_TOKENS])


class Session:
    """Prefill/decode/generate over a backend's signatures (`decode` and `prefill_{T}`; for a
    model with vision also `vision_encoder` and `image_prefill_{T}`).

    A backend has `signatures`, `reset()` (zero every state), `states()` (copies, for inspection)
    and `call(name, tokens, input_pos, embeddings=None, rows=False) -> logits [V]` (with `rows`,
    every row the signature returns: [T, V]), carrying the states from call to call; with vision,
    `encode_image(image [1, S, S, 3]) -> soft tokens [1, N, E]`.

    Speculative decoding (an artifact exported with --speculative K: runtime_py/speculative.py):
    `verify(tokens)` feeds up to K tokens in one call and returns the logits after each, and
    `rewind(position)` forgets the tokens from `position` on (up to `max_rewind` of them).

    Context buckets (ctx{L}_prefill_{T}, ctx{L}_decode: contract/signatures.py): each text call
    runs the smallest bucket whose L holds the call's last real position (`signature_for`), so a
    long-context artifact pays for the context in use; image prefills and positions past every
    bucket run the full-length signatures. `use_buckets = False` runs only those.
    """

    tokenizer_model: bytes | None = None  # the SentencePiece model a .litertlm bundle carries
    path = None  # the artifact it was loaded from (runtime_py.load)

    def __init__(self, backend, metadata: ArtifactMetadata):
        signatures = backend.signatures
        if "decode" not in signatures:
            raise ValueError("artifact has no 'decode' signature")
        self.signatures = signatures
        self.backend = backend
        self.metadata = metadata
        self.max_len = metadata.max_seq_len
        kinds = {name: parse_signature(name) for name in signatures if split_bucket(name)[1] is None}
        # context buckets (TFLite): ctx{L}_* variants of prefill/decode attending over L global rows
        self.buckets = sorted({span for name in signatures if (span := split_bucket(name)[1]) is not None})
        self.use_buckets = True
        self.prefill_lengths = sorted(n for k, n in kinds.values() if k is SignatureKind.PREFILL)
        self.image_prefill_lengths = sorted(n for k, n in kinds.values() if k is SignatureKind.IMAGE_PREFILL)
        self.verify_lengths = sorted(n for k, n in kinds.values() if k is SignatureKind.VERIFY)
        # how many positions `rewind` may go back: what every local ring holds past its window
        # (an export with --speculative K: K), unbounded for rings as long as the context (they
        # never wrap) and models with global layers only, 0 with a recurrent state
        self.max_rewind = self._rewindable()
        self.vision = None
        if any(k is SignatureKind.VISION_ENCODER for k, _ in kinds.values()):
            if metadata.image is None:
                raise ValueError("the artifact has a vision_encoder but its metadata has no image layout "
                                 "(re-export it with this toolchain)")
            self.vision = metadata.image
        self.position = 0
        self.reset()

    def __repr__(self) -> str:
        m = self.metadata
        where = f" from {self.path}" if self.path is not None else ""
        return (f"<Session {m.model} ({m.quantization or m.weight_dtype}), context {self.max_len}, "
                f"position {self.position}, signatures {sorted(self.signatures)}{where}>")

    def reset(self):
        """Forget the sequence: zero every state tensor."""
        self.backend.reset()
        self.position = 0

    @property
    def states(self) -> dict[str, np.ndarray]:
        return self.backend.states()

    def _call(self, name: str, tokens: np.ndarray, input_pos: np.ndarray, embeddings=None, rows=False) -> np.ndarray:
        if rows:
            return self.backend.call(name, tokens.astype(np.int32), input_pos.astype(np.int32), rows=True)
        if embeddings is None:
            return self.backend.call(name, tokens.astype(np.int32), input_pos.astype(np.int32))
        return self.backend.call(name, tokens.astype(np.int32), input_pos.astype(np.int32),
                                 embeddings.astype(np.float32))

    def _check_room(self, n: int):
        if self.position + n > self.max_len:
            raise ContextFullError(
                f"context full: position {self.position} + {n} tokens exceeds the context of "
                f"{self.max_len}; reset() or export with a larger --max-seq-len"
            )

    def _padded(self, tokens: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [1, length], input_pos [length]) for a call of `length` tokens whose real ones
        start at the current position: right-padded, pad positions -1 (the end of the real run)."""
        chunk = np.zeros((1, length), np.int32)
        chunk[0, :len(tokens)] = tokens
        pos = np.full((length,), -1, np.int32)
        pos[:len(tokens)] = self.position + np.arange(len(tokens))
        return chunk, pos

    def signature_for(self, name: str, end: int) -> str:
        """The signature that runs `name` (prefill_{T} or decode) for a call whose real tokens end
        before position `end`: its smallest context bucket holding them, else itself."""
        if self.use_buckets:
            for span in self.buckets:
                if end <= span and bucket_name(name, span) in self.signatures:
                    return bucket_name(name, span)
        return name

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
            plan.append((signature_name(SignatureKind.DECODE if length == 1 else SignatureKind.PREFILL, length), take))
            n -= take
        return plan

    def image_chunks(self, tokens: Sequence[int]) -> list[tuple[str, int]]:
        """(signature, real tokens) for a prompt holding images: chunks never split an image's soft
        tokens (contract/prompt.chunk_bounds); those holding soft tokens run image_prefill_{T}."""
        tokens = np.asarray(tokens)
        lengths = self.image_prefill_lengths
        plan, done = [], 0
        for take in chunk_bounds(self.vision, tokens.tolist(), lengths):
            has_image = bool(np.any(tokens[done:done + take] == self.vision.soft_token))
            pool = lengths if has_image or not self.prefill_lengths else self.prefill_lengths
            fits = [t for t in pool if t >= take]
            if not fits:  # a text chunk longer than every text prefill: split it the usual way
                plan += self.chunks(take)
            else:
                kind = (SignatureKind.IMAGE_PREFILL if has_image else SignatureKind.DECODE if fits[0] == 1
                        else SignatureKind.PREFILL)
                plan.append((signature_name(kind, fits[0]), take))
            done += take
        return plan

    def prefill(self, tokens: Sequence[int], embeddings: np.ndarray | None = None, progress=None) -> np.ndarray:
        """Feed prompt tokens; returns the logits [V] after the last one. With `embeddings`
        ([len(tokens), E], the images' soft tokens spliced at their positions: `image_inputs`),
        chunks holding soft tokens run the image prefill. `progress(done, total)` is called after
        each chunk (a long prompt is many)."""
        tokens = np.asarray(tokens, np.int32)
        if tokens.size == 0:
            raise ValueError("prefill needs at least one token")
        self._check_room(tokens.size)
        if embeddings is not None and self.vision is None:
            raise ValueError("this artifact has no vision encoder: it takes no images (export a Gemma 3 "
                             "model with a vision tower, without --no-vision)")
        plan = self.chunks(tokens.size) if embeddings is None else self.image_chunks(tokens)
        logits, done = None, 0
        for name, take in plan:
            length = self.signatures[name].length
            chunk, pos = self._padded(tokens[done:done + take], length)
            embeds = None
            if parse_signature(name)[0] is SignatureKind.IMAGE_PREFILL:
                embeds = np.zeros((1, length, embeddings.shape[-1]), np.float32)
                embeds[0, :take] = embeddings[done:done + take]
            run = name if embeds is not None else self.signature_for(name, self.position + take)
            logits = self._call(run, chunk, pos, embeds)
            self.position += take
            done += take
            if progress is not None:
                progress(done, tokens.size)
        return logits

    def encode_image(self, image) -> np.ndarray:
        """An image (a path, PIL image, uint8 array, or an already preprocessed float32
        [1, S, S, 3] / [S, S, 3] array) -> its soft tokens [N, E], by the vision_encoder."""
        if self.vision is None:
            raise ValueError("this artifact has no vision encoder: it takes no images (export a Gemma 3 "
                             "model with a vision tower, without --no-vision)")
        s = self.vision.image_size
        if isinstance(image, np.ndarray) and image.dtype == np.float32 and image.shape in ((1, s, s, 3), (s, s, 3)):
            pixels = image.reshape(1, s, s, 3)
        else:
            from runtime_py.image import preprocess

            pixels = preprocess(image, s)
        return np.asarray(self.backend.encode_image(pixels))[0]

    def image_inputs(self, prompt: Sequence[int], images: Sequence) -> tuple[list[int], np.ndarray]:
        """(expanded prompt, embeddings [T, E]) for a prompt with one `<start_of_image>` token per
        image (contract/prompt.py): the images are encoded by the artifact's vision encoder."""
        if self.vision is None:
            self.encode_image(None)  # raises the no-vision error
        dim = self.signatures[signature_name(SignatureKind.VISION_ENCODER)].output(SOFT_TOKENS).shape[-1]
        return image_inputs(self.vision, prompt, images, self.encode_image, dim)

    def decode(self, token: int) -> np.ndarray:
        """Feed one token; returns the logits [V] after it."""
        self._check_room(1)
        logits = self._call(self.signature_for("decode", self.position + 1), np.array([[token]], np.int32),
                            np.array([self.position], np.int32))
        self.position += 1
        return logits

    def _rewindable(self) -> int:
        """`max_rewind`, from the state layout (computed once)."""
        from contract.layout import LayerKind

        limit = self.max_len
        for spec in self.metadata.states:
            if spec.layer_kind is LayerKind.RECURRENT:
                return 0
            if spec.layer_kind is LayerKind.LOCAL and spec.rows < self.max_len:
                limit = min(limit, spec.rows - self.metadata.sliding_window)
        return max(limit, 0)

    def rewind(self, position: int):
        """Forget the tokens from `position` on: the next call writes there. Their cache rows stay
        until overwritten, but no later query attends to them (global rows past the position are
        masked; local rings hold `max_rewind` rows past the window)."""
        back = self.position - int(position)
        if back < 0 or position < 0:
            raise ValueError(f"cannot rewind from position {self.position} to {position}")
        if back > self.max_rewind:
            raise ValueError(f"cannot rewind {back} positions: this artifact's caches keep {self.max_rewind} (export "
                             f"it with --speculative {back} or more)")
        self.position = int(position)

    def verify(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed up to K tokens in one call of verify_{K} (speculative decoding's check); returns
        the logits after each [len(tokens), V]."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if not self.verify_lengths:
            raise ValueError("this artifact has no verify signature; export it with --speculative K (TFLite or "
                             ".litertlm) to check draft tokens in one call")
        fits = [k for k in self.verify_lengths if k >= tokens.size]
        if not fits or tokens.size == 0:
            raise ValueError(f"verify takes 1 to {self.verify_lengths[-1]} tokens, not {tokens.size}")
        self._check_room(tokens.size)
        k = fits[0]
        chunk, pos = self._padded(tokens, k)
        name = self.signature_for(signature_name(SignatureKind.VERIFY, k), self.position + tokens.size)
        logits = self._call(name, chunk, pos, rows=True)[:tokens.size]
        self.position += tokens.size
        return logits

    def generate_stream(self, prompt: Sequence[int], max_new_tokens: int, *, sampling=None,
                        stop_tokens: Sequence[int] = (), images: Sequence | None = None,
                        progress=None) -> Iterator[int]:
        """Yield generated token ids (the stop token is not yielded). Starts a new sequence.
        images: one per `<start_of_image>` token of the prompt (see `encode_image` for the forms);
        progress: the prefill's (`prefill`)."""
        embeddings = None
        if images:
            prompt, embeddings = self.image_inputs(prompt, images)
        self.reset()
        if len(prompt) + max_new_tokens > self.max_len:
            raise ContextFullError(
                f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the context "
                f"of {self.max_len}; shorten the prompt, lower max_new_tokens or re-export with a "
                "larger --max-seq-len"
            )
        rng = np.random.default_rng(getattr(sampling, "seed", 0))
        logits = self.prefill(prompt, embeddings, progress)
        stop = set(stop_tokens)
        limit = self.metadata.sample_vocab_size
        for step in range(max_new_tokens):
            token = sample_numpy(logits, sampling, rng, limit)
            if token in stop:
                return
            yield token
            if step < max_new_tokens - 1:
                logits = self.decode(token)

    def generate(self, prompt: Sequence[int], max_new_tokens: int, **kw) -> list[int]:
        """Generated ids after `prompt`; keywords as `generate_stream` (sampling, stop_tokens, images)."""
        return list(self.generate_stream(prompt, max_new_tokens, **kw))

