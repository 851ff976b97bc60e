"""A multi-turn conversation over one session: `python -m runtime_py chat`.

Each turn prefills only what is new, at the position where the conversation stands: the caches
(KV rows, local rings, recurrent states) hold everything before it, as LiteRT-LM's and
onnxruntime-genai's chat loops keep theirs. A turn's tokens are the previous reply's closing
`<end_of_turn>` (the sampled stop token is not fed back, so the next turn feeds it, and a reply cut
at the token limit gets it too) and the user's turn in the model's chat template, ending with the
opening of the model's turn. The conversation is exactly what one prompt of the same tokens would
be: `fed` holds every id given to the model so far, in order (an image as its `<start_of_image>`
token), `images` the images, and a fresh `generate(fed, images=images)` continues as the
conversation did (tests/test_chat.py). Images (Gemma 3 with vision) may come with any turn: the
artifact's vision encoder turns each into its soft tokens, prefilled at the conversation's
position.

When a turn and its reply limit no longer fit the context, `say` raises ContextFullError before
touching the caches: the caller starts over (`reset`) or stops; the CLI says so in one line and
starts over with that turn."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from contract.prompt import BOI_TEXT, encode_with_images
from contract.sampling import sample_numpy
from contract.tokenizer import END_OF_TURN
from runtime_py.session import ContextFullError
from runtime_py.text import stop_ids


class Conversation:
    """Turns of a chat with an instruction-tuned artifact: `say(text)` yields the reply's ids."""

    def __init__(self, session, tok, *, system: str | None = None, sampling=None, max_new_tokens: int = 256):
        meta = session.metadata
        if not meta.instruction_tuned:
            raise ValueError(f"{meta.model} is not instruction-tuned (its artifact has no chat format): chat with an "
                             "-it model, or continue text with python -m runtime_py generate")
        if tok.start_of_turn_id is None or tok.end_of_turn_id is None:
            raise ValueError(f"the tokenizer has no {END_OF_TURN} piece: it cannot encode Gemma chat turns")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        self.session, self.tok, self.system = session, tok, system
        self.sampling, self.max_new_tokens = sampling, int(max_new_tokens)
        self.stop = set(stop_ids(session, tok))
        self._rng = np.random.default_rng(getattr(sampling, "seed", 0))
        if system is not None:  # Gemma 2 and RecurrentGemma have no system turn: refused here, not mid-chat
            tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": "."}],
                                    family=meta.family)
        self.reset()

    def reset(self):
        """Forget the conversation (the system message stays)."""
        self.session.reset()
        self.fed: list[int] = []  # every id given to the model, in order; an image as its <start_of_image> token
        self.images: list = []  # the images given, in order
        self._unfed: list[int] = []  # a reply token sampled but not yet fed (the reply was cut after it)
        self._at = 0  # the session's position once everything in `fed` is in its caches

    def turn_ids(self, text: str, n_images: int = 0) -> list[int]:
        """The ids a user turn adds: BOS, the system message and the turn for the first one; the
        previous reply's end and the turn after that. With images (Gemma 3 with vision), each
        `<start_of_image>` in the text becomes the image token; images without markers open the
        turn's content, as Hugging Face's chat template places them."""
        family = self.session.metadata.family
        layout = self.session.vision
        if n_images and layout is None:
            raise ValueError("this artifact has no vision encoder: it takes no images (export a Gemma 3 4B+ model "
                             "without --no-vision)")
        if layout is not None and n_images != text.count(BOI_TEXT):
            if BOI_TEXT in text:
                raise ValueError(f"the turn has {text.count(BOI_TEXT)} {BOI_TEXT} markers for {n_images} images: "
                                 "pass one image for each")
            text = BOI_TEXT * n_images + text
        user = {"role": "user", "content": text}
        if not self.fed:
            first = [{"role": "system", "content": self.system}] if self.system is not None else []
            rendered, bos = self.tok.apply_chat_template(first + [user], family=family), True
        else:
            rendered, bos = END_OF_TURN + "\n" + self.tok.apply_chat_template([user], family=family), False
        if layout is None:
            return self.tok.encode(rendered, add_bos=bos, add_eos=False)
        ids = encode_with_images(self.tok, rendered, layout)
        return ids if bos else ids[1:]  # encode_with_images opens with BOS

    def say(self, text: str, images=(), progress=None) -> Iterator[int]:
        """Yield the reply to `text` (and `images`, one per `<start_of_image>` of the text, or
        leading it), token by token (a stop token ends it and is not yielded). Raises
        ContextFullError, with the caches untouched, when the turn and `max_new_tokens` do not fit
        what is left of the context."""
        images = list(images)
        self._settle()
        new = self._unfed + self.turn_ids(text, len(images))
        fed, embeddings = new, None
        if images:  # each image token becomes the image's run of soft tokens, encoded here
            fed, embeddings = self.session.image_inputs(new, images)
        left = self.session.max_len - self.session.position
        if len(fed) + self.max_new_tokens > left:
            raise ContextFullError(
                f"this turn ({len(fed)} tokens) and its reply ({self.max_new_tokens} at most) do not fit the "
                f"{left} tokens left of the context of {self.session.max_len}")
        logits = self.session.prefill(fed, embeddings, progress=progress)
        self.fed += new
        self.images += images
        self._unfed = []
        self._at += len(fed)
        limit = self.session.metadata.sample_vocab_size
        for step in range(self.max_new_tokens):
            token = sample_numpy(logits, self.sampling, self._rng, limit)
            if token in self.stop:
                return
            self._unfed = [token]  # until decoded: a reply left here (the limit, or the caller) feeds it next turn
            yield token
            if step == self.max_new_tokens - 1:
                return
            # counted fed before the call: an interrupt (Ctrl-C) lands when the call returns, and
            # one that lands before it starts is found by _settle
            self.fed.append(token)
            self._unfed = []
            self._at += 1
            logits = self.session.decode(token)

    def _settle(self):
        """Match the bookkeeping to the session after a reply left at any point: a token counted
        fed whose decode never ran goes back to be fed with the next turn. A session moved
        otherwise (a prefill interrupted, another caller) is a ValueError: reset()."""
        if self.session.position == self._at - 1 and self.fed and not self._unfed:
            self._unfed = [self.fed.pop()]
            self._at -= 1
        if self.session.position != self._at:
            raise ValueError(f"the session is at position {self.session.position}, the conversation at {self._at} "
                             "(a prefill was interrupted, or the session was used outside the conversation): reset "
                             "the conversation")
