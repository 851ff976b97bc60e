"""SentencePiece tokenizer wrapper for Gemma 2, Gemma 3 and RecurrentGemma.

All three model families ship a SentencePiece ``tokenizer.model`` with the
same conventions: ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2, ``<unk>`` = 3,
byte fallback, no dummy prefix, and the chat-turn markers ``<start_of_turn>``
and ``<end_of_turn>`` stored as *user-defined* pieces (so SentencePiece maps
them to a single id whenever they appear in the input text).

This module wraps :class:`sentencepiece.SentencePieceProcessor` with:

* loading from a ``.model`` file, from a checkpoint folder holding
  ``tokenizer.model`` (Hugging Face and official checkpoint layouts), or from
  the serialized model bytes;
* the special ids the runtime needs (``bos_id``, ``eos_id``, the turn markers
  and the generation stop ids);
* the Gemma chat template, reimplemented in plain Python so that prompts can
  be built without Jinja or ``transformers``.

Nothing here touches the network.

BOS handling
------------
:func:`apply_chat_template` returns the prompt text *without* a leading
``<bos>``; :meth:`Tokenizer.encode` adds the BOS id itself (``add_bos=True``).
A literal ``"<bos>"`` inside text is never turned into the BOS id (control
pieces are not parsed from text by SentencePiece), so a prompt encoded this
way always carries exactly one BOS. This avoids the double-BOS pitfall of
rendering a template that already starts with ``<bos>`` and then encoding it
with special tokens enabled, which silently degrades Gemma's output quality.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sentencepiece as spm

def _sentencepiece():
    """sentencepiece, imported when a tokenizer is first built: a runtime that takes and gives
    token ids runs without it."""
    try:
        import sentencepiece
    except ImportError:
        raise ImportError("tokenizing text needs sentencepiece: pip install sentencepiece") from None
    return sentencepiece


__all__ = [
    "CHAT_FAMILIES",
    "END_OF_TURN",
    "START_OF_TURN",
    "Tokenizer",
    "apply_chat_template",
    "normalize_family",
]

#: Piece that opens a chat turn in the Gemma instruction-tuned formats.
START_OF_TURN = "<start_of_turn>"
#: Piece that closes a chat turn; instruction-tuned models also stop on it.
END_OF_TURN = "<end_of_turn>"

#: Model families whose chat template this module knows.
CHAT_FAMILIES = ("gemma2", "gemma3", "recurrentgemma")

# Families whose official template rejects a system message.
_NO_SYSTEM_ROLE = frozenset({"gemma2", "recurrentgemma"})

# File name looked up when a folder is given instead of a .model file.
_FOLDER_MODEL_NAME = "tokenizer.model"

# Message roles accepted on input, mapped to the role rendered in the prompt.
_ROLE_ALIASES = {"user": "user", "assistant": "model", "model": "model"}


def normalize_family(family: Any) -> str:
    """Return the canonical chat-family name for ``family``.

    Args:
        family: A string such as ``"gemma3"`` or any object with a string
            ``.value`` attribute (for example a config ``Enum`` member).
            Case, ``-`` and ``_`` are ignored, so ``"Gemma-3"`` and
            ``"recurrent_gemma"`` are accepted too.

    Returns:
        One of :data:`CHAT_FAMILIES`.

    Raises:
        ValueError: If the family is not one of :data:`CHAT_FAMILIES`.
    """
    raw = getattr(family, "value", family)
    if not isinstance(raw, str):
        raise ValueError(
            f"family must be a string or an enum with a string value, got {family!r}"
        )
    name = raw.lower().replace("-", "").replace("_", "")
    if name not in CHAT_FAMILIES:
        raise ValueError(
            f"unknown model family {raw!r}; expected one of {', '.join(CHAT_FAMILIES)}"
        )
    return name


def _message_role_and_content(index: int, message: Mapping[str, Any]) -> tuple[str, str]:
    """Validate one chat message and return its ``(role, content)`` pair."""
    if not isinstance(message, Mapping):
        raise TypeError(
            f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}"
        )
    try:
        role, content = message["role"], message["content"]
    except KeyError as missing:
        raise ValueError(f"message {index} has no {missing.args[0]!r} key") from None
    if not isinstance(content, str):
        raise TypeError(
            f"message {index} content must be a str, got {type(content).__name__}"
        )
    if role != "system" and role not in _ROLE_ALIASES:
        raise ValueError(
            f"message {index} has unknown role {role!r}; expected user, assistant, model or system"
        )
    return role, content


def apply_chat_template(
    messages: Sequence[Mapping[str, Any]],
    *,
    family: Any,
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation in the Gemma chat format.

    Each turn is rendered as ``<start_of_turn>{role}\\n{content}<end_of_turn>\\n``
    where ``role`` is ``user`` or ``model`` (``assistant`` is rendered as
    ``model``) and ``content`` has surrounding whitespace stripped. With
    ``add_generation_prompt`` the text ends with ``<start_of_turn>model\\n`` so
    the model continues with its answer.

    A leading ``system`` message is only supported by Gemma 3, whose template
    prepends ``system_content + "\\n\\n"`` to the first user turn. Gemma 2 and
    RecurrentGemma reject it, as their official templates do.

    The returned text does **not** start with ``<bos>``: encode it with
    ``add_bos=True`` (or use :meth:`Tokenizer.encode_chat`), which yields
    exactly one BOS id.

    Args:
        messages: Dicts ``{"role": ..., "content": str}`` with role ``user``,
            ``assistant``, ``model`` or (first message only) ``system``. After
            an optional system message, roles must alternate user/model,
            starting with user.
        family: ``"gemma2"``, ``"gemma3"`` or ``"recurrentgemma"``, or an enum
            whose ``.value`` is one of these (see :func:`normalize_family`).
        add_generation_prompt: Append the opening of a model turn.

    Returns:
        The prompt text, without a leading ``<bos>``.

    Raises:
        ValueError: On an unknown family, an empty conversation, a system
            message the family does not support or that is not first, or
            roles that do not alternate user/model starting with user.
        TypeError: If a message is not a dict or its content is not a str.
    """
    family_name = normalize_family(family)
    turns = [_message_role_and_content(i, m) for i, m in enumerate(messages)]
    if not turns:
        raise ValueError("messages is empty; a chat prompt needs at least one user message")

    first_user_prefix = ""
    if turns[0][0] == "system":
        if family_name in _NO_SYSTEM_ROLE:
            raise ValueError(
                f"System role not supported by {family_name}; fold the instructions into the first user message"
            )
        if len(turns) == 1:
            raise ValueError("a system message must be followed by a user message")
        first_user_prefix = turns[0][1] + "\n\n"
        turns = turns[1:]
        offset = 1
    else:
        offset = 0

    parts = []
    for position, (role, content) in enumerate(turns):
        index = position + offset
        if role == "system":
            raise ValueError(
                f"message {index} has role 'system'; only the first message may be a system message"
            )
        rendered_role = _ROLE_ALIASES[role]
        expected = "user" if position % 2 == 0 else "model"
        if rendered_role != expected:
            raise ValueError(
                f"conversation roles must alternate user/model starting with user; "
                f"message {index} is {role!r} but {expected!r} was expected"
            )
        prefix = first_user_prefix if position == 0 else ""
        parts.append(f"{START_OF_TURN}{rendered_role}\n{prefix}{content.strip()}{END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append(f"{START_OF_TURN}model\n")
    return "".join(parts)


def _resolve_model_path(path: str | os.PathLike[str]) -> str:
    """Map ``path`` (a ``.model`` file or a folder) to a model file path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, _FOLDER_MODEL_NAME)
        if os.path.isfile(candidate):
            return candidate
        raise FileNotFoundError(
            f"no {_FOLDER_MODEL_NAME} in {path}; pass --tokenizer PATH to a SentencePiece .model file"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file not found: {path}; pass --tokenizer PATH to a SentencePiece "
            f".model file or to a folder containing {_FOLDER_MODEL_NAME}"
        )
    return path


class Tokenizer:
    """A Gemma-family SentencePiece tokenizer.

    Example::

        tok = Tokenizer("/ckpt/gemma-3-1b-it")          # folder or .model file
        ids = tok.encode_chat([{"role": "user", "content": "Hi"}], family="gemma3")
        ...                                              # generate until tok.stop_ids()
        text = tok.decode(generated_ids)

    Args:
        path: A SentencePiece ``.model`` file, or a folder that contains
            ``tokenizer.model`` (as Hugging Face and official Gemma checkpoint
            folders do).

    Raises:
        FileNotFoundError: If the file, or ``tokenizer.model`` in the folder,
            does not exist.
        ValueError: If the file is not a SentencePiece model.
    """

    def __init__(self, path: str | os.PathLike[str]):
        model_path = _resolve_model_path(path)
        processor = _sentencepiece().SentencePieceProcessor()
        try:
            processor.Load(model_file=model_path)
        except (RuntimeError, OSError) as err:
            raise ValueError(
                f"{model_path} is not a SentencePiece model ({err})"
            ) from None
        self._init_from_processor(processor, source=model_path)

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> Tokenizer:
        """Build a tokenizer from a serialized SentencePiece ``ModelProto``.

        Args:
            model_proto: The raw bytes of a ``.model`` file.

        Raises:
            ValueError: If the bytes are not a SentencePiece model.
        """
        processor = _sentencepiece().SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(bytes(model_proto))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"bytes are not a SentencePiece model ({err})") from None
        tokenizer = cls.__new__(cls)
        tokenizer._init_from_processor(processor, source="<bytes>")
        return tokenizer

    def _init_from_processor(self, processor: spm.SentencePieceProcessor, source: str) -> None:
        """Cache the ids the wrapper needs from a loaded processor."""
        self._sp = processor
        self._source = source
        self._vocab_size = processor.GetPieceSize()
        self._start_of_turn_id = self._optional_piece_id(START_OF_TURN)
        self._end_of_turn_id = self._optional_piece_id(END_OF_TURN)
        # Ids decode() always drops: padding and sequence delimiters.
        self._always_dropped = frozenset(
            i for i in (processor.pad_id(), processor.bos_id(), processor.eos_id()) if i >= 0
        )
        # Ids decode(skip_special=True) additionally drops: every control piece
        # and the chat-turn markers (user-defined pieces that decode to text).
        self._special = self._always_dropped.union(
            i for i in range(self._vocab_size) if processor.IsControl(i)
        ).union(i for i in (self._start_of_turn_id, self._end_of_turn_id) if i is not None)

    def _optional_piece_id(self, piece: str) -> int | None:
        """Return the id of ``piece``, or None if the vocabulary lacks it."""
        piece_id = self._sp.PieceToId(piece)
        if piece_id == self._sp.unk_id() and piece != self._sp.IdToPiece(piece_id):
            return None
        return piece_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._source!r}, vocab_size={self._vocab_size})"

    # ------------------------------------------------------------------ ids

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The underlying :class:`sentencepiece.SentencePieceProcessor`."""
        return self._sp

    @property
    def vocab_size(self) -> int:
        """Number of pieces in the SentencePiece model.

        The model's embedding table may be larger (padded), never smaller.
        """
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence piece, or None if the model has none."""
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence piece, or None if the model has none."""
        return self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    @property
    def pad_id(self) -> int | None:
        """Id of the padding piece, or None if the model has none."""
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    @property
    def unk_id(self) -> int:
        """Id of the unknown piece (every SentencePiece model has one)."""
        return self._sp.unk_id()

    @property
    def start_of_turn_id(self) -> int | None:
        """Id of ``<start_of_turn>``, or None if the vocabulary lacks it."""
        return self._start_of_turn_id

    @property
    def end_of_turn_id(self) -> int | None:
        """Id of ``<end_of_turn>``, or None if the vocabulary lacks it."""
        return self._end_of_turn_id

    def id_to_piece(self, token_id: int) -> str:
        """Return the piece string for ``token_id``.

        Raises:
            IndexError: If the id is outside ``[0, vocab_size)``.
        """
        self._check_ids((token_id,))
        return self._sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """Return the id of ``piece``; unknown pieces map to :attr:`unk_id`."""
        return self._sp.PieceToId(piece)

    def stop_ids(self, extra: Iterable[int] = ()) -> tuple[int, ...]:
        """Ids that end generation: EOS, ``<end_of_turn>`` if present, then ``extra``.

        Instruction-tuned Gemma models finish a reply with ``<end_of_turn>``
        (id 107 in Gemma 2, 106 in Gemma 3) rather than EOS (id 1), so a
        sampler must stop on both. Duplicates are removed, order is kept.

        Raises:
            IndexError: If an ``extra`` id is outside ``[0, vocab_size)``.
        """
        extra = tuple(int(i) for i in extra)
        self._check_ids(extra)
        candidates = (self.eos_id, self.end_of_turn_id, *extra)
        return tuple(dict.fromkeys(i for i in candidates if i is not None))

    # ------------------------------------------------------------ encoding

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Encode ``text`` to token ids.

        User-defined pieces such as ``<start_of_turn>`` written in the text
        become their single id. Control pieces (``<bos>``, ``<eos>``,
        ``<pad>``) written in the text are encoded as ordinary characters, so
        the result holds at most one BOS: the one added by ``add_bos``.

        Args:
            text: The text to encode.
            add_bos: Prepend the BOS id.
            add_eos: Append the EOS id.

        Raises:
            TypeError: If ``text`` is not a str.
            ValueError: If BOS/EOS is requested but the model has none.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but the tokenizer model defines no BOS piece")
        if add_eos and self.eos_id is None:
            raise ValueError("add_eos=True but the tokenizer model defines no EOS piece")
        return list(self._sp.Encode(text, add_bos=add_bos, add_eos=add_eos))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Decode token ids to text.

        BOS, EOS and padding ids are always dropped. With ``skip_special``
        every control piece and the chat-turn markers (``<start_of_turn>``,
        ``<end_of_turn>``) are dropped too, leaving plain text; without it the
        turn markers are rendered literally, which is handy for inspecting a
        prompt.

        Args:
            ids: Token ids (any iterable of ints, e.g. a list or 1-D array).
            skip_special: Drop control pieces and turn markers.

        Raises:
            IndexError: If an id is outside ``[0, vocab_size)``.
        """
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        dropped = self._special if skip_special else self._always_dropped
        return self._sp.Decode([i for i in ids if i not in dropped])

    def _check_ids(self, ids: Iterable[int]) -> None:
        """Raise IndexError naming the first id outside the vocabulary."""
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise IndexError(
                    f"token id {i} is out of range for a vocabulary of {self._vocab_size} pieces"
                )

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        family: Any,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render ``messages`` as Gemma chat text, without a leading ``<bos>``.

        See the module-level :func:`apply_chat_template` for the format and
        errors. Encode the result with ``add_bos=True`` (or call
        :meth:`encode_chat`) so the prompt holds exactly one BOS.
        """
        return apply_chat_template(
            messages, family=family, add_generation_prompt=add_generation_prompt
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        family: Any,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Render ``messages`` with the chat template and encode with one BOS.

        Raises:
            ValueError: As :func:`apply_chat_template`, or if the vocabulary
                has no ``<start_of_turn>``/``<end_of_turn>`` pieces (the
                markers would otherwise be split into ordinary characters).
        """
        if self.start_of_turn_id is None or self.end_of_turn_id is None:
            raise ValueError(
                f"tokenizer {self._source} has no {START_OF_TURN}/{END_OF_TURN} pieces; "
                "it cannot encode Gemma chat prompts"
            )
        text = self.apply_chat_template(
            messages, family=family, add_generation_prompt=add_generation_prompt
        )
        return self.encode(text, add_bos=True, add_eos=False)
