"""Tokenizer files for an exported model folder: ``tokenizer.json`` + ``tokenizer_config.json``.

Why tokenizer.json
------------------
onnxruntime-genai (0.18) loads a model folder's tokenizer only from the Hugging Face pair
``tokenizer.json`` + ``tokenizer_config.json``. A SentencePiece ``tokenizer.model`` alone is refused
(``Failed to open a json file: .../tokenizer_config.json``), and so is ``tokenizer.model`` with a
config (``Invalid file: .../tokenizer.json``). The config must exist but may be nearly empty.
The same pair is also what transformers and the ``tokenizers`` package load, so one layout serves
every consumer. ``tokenizer.model`` is copied alongside for tools that use SentencePiece.

What the conversion does
------------------------
Hugging Face checkpoints already ship ``tokenizer.json``, so those files are copied. Official
Gemma / RecurrentGemma checkpoints ship only the SentencePiece ``tokenizer.model``. We convert it
with our own code, built on the ``tokenizers`` API. The layout is the same as transformers'
``GemmaConverter`` output:

* a BPE model over the SentencePiece vocabulary with the same ids, ``byte_fallback`` and
  ``<unk>`` as its unknown token. The merges come from the vocabulary. For each normal piece
  (and each user-defined whitespace run, see below), every split into two such pieces is one
  merge. They are ranked by the merged piece's score, highest first. This is the order in which
  SentencePiece's BPE applies them.
* The normalizer ``Replace(" ", "▁")`` and the pre-tokenizer ``Split(" ", merged_with_previous)``.
  The pre-tokenizer is a no-op after the normalizer, as in ``GemmaConverter``. The decoder is
  ``Replace("▁", " ")`` + ``ByteFallback`` + ``Fuse``.
* Control, unknown and user-defined pieces (``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``,
  ``<start_of_turn>``, ``<end_of_turn>``, ...) become added tokens. They are matched in the raw
  text before BPE, as SentencePiece matches user-defined pieces. Control and unknown pieces are
  marked special. Of the user-defined pieces, only the known Gemma markers
  (:data:`SPECIAL_USER_DEFINED`) are. Other user-defined pieces are content, such as Gemma's
  newline runs and HTML tags. If they were marked special, a decode with ``skip_special_tokens``
  would drop them, and onnxruntime-genai's decode always drops special tokens. User-defined
  whitespace runs (pieces containing ``▁``) stay plain vocab entries that merges reach, because
  genai would decode them verbatim as ``▁``.
* Where a piece needs a one-byte character that is not a piece itself, the matching ``<0xNN>`` byte
  piece gets the character's name. Examples are tab runs in older Gemma vocabularies:
  ``GemmaConverter``'s ``\\t`` fix. The ids do not change.
* A ``TemplateProcessing`` post-processor ``<bos> $A``, as in Hugging Face Gemma
  ``tokenizer.json`` files. ``tokenizers``/transformers users get BOS with
  ``add_special_tokens=True``.

The converted ids equal SentencePiece's: the tests check this with ``tokenizers`` and with
onnxruntime-genai's own tokenizer. One exception is in onnxruntime-genai 0.18's BPE. On rare strings
that mix byte-fallback runs and a later merge, it skips that merge. An example is
``"8 4kk🙂i.\\n"`` on a small test vocabulary. transformers' ``GemmaConverter`` output fails the
same way, so the cause is onnxruntime-genai, not the file.

Only Gemma-style SentencePiece models convert exactly. They are BPE, with identity normalization,
no dummy prefix and no whitespace removal. Anything else (a unigram model, for example) raises
:class:`ValueError` instead of producing a tokenizer that silently gives other ids.

BOS
---
``tokenizer_config.json`` says ``add_bos_token: true`` for transformers. onnxruntime-genai's
``Tokenizer.encode`` does **not** add BOS, whatever the config or the post-processor says. This
was checked with 0.18, where ``encode("hi")`` returns no ``<bos>``. Callers must start the prompt
with ``<bos>``. Either prepend ``bos_token_id``, or put the literal ``<bos>`` first in the text:
it is a special added token, so ``encode("<bos>...")`` maps it to the BOS id. Gemma's chat
template renders ``{{ bos_token }}`` first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contract.files import write_atomic

__all__ = ["SPECIAL_USER_DEFINED", "add_image_tokens", "sentencepiece_to_tokenizer", "write_tokenizer_files"]

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SP_MODEL = "tokenizer.model"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

#: User-defined SentencePiece pieces that are control markers in Gemma, so are marked special.
#: Other user-defined pieces (whitespace runs, HTML tags, ...) are text and stay non-special.
SPECIAL_USER_DEFINED = frozenset(
    {"<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"}
)

# SentencePiece piece types and model types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_MODEL_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}
_BPE = 2
_FIX_HINT = "ship a tokenizer.json (e.g. from the model's Hugging Face repository) next to it"


def write_tokenizer_files(source: Path, out_dir: Path) -> list[str] | None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (and copies) for ``source`` into ``out_dir``.

    Args:
        source: A checkpoint folder, or a direct path to a SentencePiece ``tokenizer.model``
            (or to a ``tokenizer.json``).
        out_dir: Folder to write into; created if needed. Each file is written to a temporary
            name and moved into place, so no half-written file remains.

    Returns:
        The names of the files written, or None (nothing written) when ``source`` holds no
        tokenizer at all.

    Raises:
        ValueError: If a tokenizer file exists but cannot be read or converted. Examples are a
            corrupt file, a SentencePiece unigram model, or ``tokenizers`` not being installed.
    """
    source, out_dir = Path(source), Path(out_dir)
    tok_json = sp_model = None
    if source.is_file():
        folder = source.parent
        if source.suffix == ".json":
            tok_json = source
        else:
            sp_model = source
    elif source.is_dir():
        folder = source
        tok_json = source / TOKENIZER_JSON if (source / TOKENIZER_JSON).is_file() else None
        sp_model = source / SP_MODEL if (source / SP_MODEL).is_file() else None
    else:
        return None
    if tok_json is None and sp_model is None:
        return None

    # Build every file in memory first, so that an error leaves out_dir untouched.
    files: dict[str, bytes] = {}
    source_config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else None
    chat_template = _chat_template(folder, source_config)
    if tok_json is not None:
        raw = tok_json.read_bytes()
        _check_tokenizer_json(tok_json, raw)
        files[TOKENIZER_JSON] = raw
        if source_config is not None:
            if chat_template is not None and "chat_template" not in source_config:
                # transformers 5 saves the template to chat_template.jinja; genai reads the config.
                files[TOKENIZER_CONFIG] = _dump({**source_config, "chat_template": chat_template})
            else:
                files[TOKENIZER_CONFIG] = (folder / TOKENIZER_CONFIG).read_bytes()
        else:
            names = _token_names_for_copy(folder, raw, sp_model)
            files[TOKENIZER_CONFIG] = _dump(_tokenizer_config(names, chat_template))
        if (folder / SPECIAL_TOKENS_MAP).is_file():
            _read_json(folder / SPECIAL_TOKENS_MAP)
            files[SPECIAL_TOKENS_MAP] = (folder / SPECIAL_TOKENS_MAP).read_bytes()
    else:
        tokenizer, names = sentencepiece_to_tokenizer(sp_model)
        files[TOKENIZER_JSON] = tokenizer.to_str(pretty=True).encode("utf-8")
        files[TOKENIZER_CONFIG] = _dump(_tokenizer_config(names, chat_template))
    if sp_model is not None:
        files[SP_MODEL] = sp_model.read_bytes()

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_atomic(out_dir / name, data)
    return list(files)


def sentencepiece_to_tokenizer(model_file: Path) -> tuple[Any, dict[str, str]]:
    """Convert a Gemma-style SentencePiece BPE model to a ``tokenizers.Tokenizer``.

    Returns:
        ``(tokenizer, names)``: the tokenizer, and the ``bos_token`` / ``eos_token`` /
        ``pad_token`` / ``unk_token`` pieces the model defines.

    Raises:
        ValueError: If ``tokenizers`` is missing, or the file is not a SentencePiece model, or it is
            one that this converter cannot reproduce exactly (unigram, normalizing, dummy prefix).
    """
    model_file = Path(model_file)
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    except ImportError:
        raise ValueError(
            f"{model_file}: converting a SentencePiece model to tokenizer.json needs the tokenizers "
            "package: pip install tokenizers") from None
    proto = _load_sentencepiece_proto(model_file)
    _check_gemma_style(model_file, proto)

    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    piece_set = {piece for piece, _, _ in pieces}
    # Pieces that BPE builds: normal ones, and user-defined whitespace runs (not added tokens, below).
    bpe = [typ == _NORMAL or (typ == _USER_DEFINED and "▁" in piece) for piece, _, typ in pieces]
    # One-byte characters that pieces are built from but that are no piece themselves: BPE in
    # `tokenizers` needs them in the vocab to merge, so their byte piece takes their name.
    needed = {ch for (piece, _, _), b in zip(pieces, bpe) if b and len(piece) > 1 for ch in piece}
    rename = {f"<0x{ord(ch):02X}>": ch for ch in needed if ord(ch) < 0x80 and ch not in piece_set}
    vocab: dict[str, int] = {}
    for index, (piece, _, typ) in enumerate(pieces):
        vocab[rename.get(piece, piece) if typ == _BYTE else piece] = index
    mergeable = {piece for (piece, _, _), b in zip(pieces, bpe) if b} | set(rename.values())

    merges = []
    for index, (piece, score, typ) in enumerate(pieces):
        if not bpe[index]:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-score, index, vocab[left], vocab[right], left, right))
    merges.sort()

    trainer = proto.trainer_spec
    unk = next((piece for piece, _, typ in pieces if typ == _UNKNOWN), None)
    byte_fallback = any(typ == _BYTE for _, _, typ in pieces)
    model = models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk,
                       fuse_unk=True, byte_fallback=byte_fallback)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_tokens([
        AddedToken(piece, normalized=False,
                   special=typ in (_CONTROL, _UNKNOWN) or piece in SPECIAL_USER_DEFINED)
        for piece, _, typ in pieces
        # A user-defined piece with "▁" (a whitespace run) can never match the raw text, and
        # onnxruntime-genai decodes added tokens verbatim ("▁▁", not "  "). It stays a plain vocab
        # entry, reached by merges like SentencePiece's whitespace runs.
        if typ in (_CONTROL, _UNKNOWN) or (typ == _USER_DEFINED and "▁" not in piece)])

    def piece_at(index: int) -> str | None:
        return pieces[index][0] if 0 <= index < len(pieces) else None

    names = {"bos_token": piece_at(trainer.bos_id), "eos_token": piece_at(trainer.eos_id),
             "pad_token": piece_at(trainer.pad_id), "unk_token": unk}
    names = {k: v for k, v in names.items() if v is not None}
    if "bos_token" in names:
        bos = names["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, trainer.bos_id)])
    return tokenizer, names


# ---- helpers --------------------------------------------------------------------------------------
def _load_sentencepiece_proto(model_file: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # sentencepiece is a dependency; its proto module needs protobuf
        raise ValueError(
            f"{model_file}: reading a SentencePiece model needs sentencepiece and protobuf "
            f"({e}): pip install sentencepiece protobuf") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:  # protobuf raises DecodeError (and others for garbage input)
        raise ValueError(f"{model_file}: not a readable SentencePiece model ({type(e).__name__}); "
                         f"replace it with the checkpoint's original tokenizer.model") from None
    if not proto.pieces:
        raise ValueError(f"{model_file}: not a SentencePiece model (no pieces); "
                         "replace it with the checkpoint's original tokenizer.model")
    return proto


def _check_gemma_style(model_file: Path, proto) -> None:
    model_type = proto.trainer_spec.model_type
    if model_type != _BPE:
        kind = _MODEL_TYPES.get(model_type, f"type {model_type}")
        raise ValueError(
            f"{model_file}: SentencePiece {kind} models are not supported (only BPE models such as "
            f"Gemma's convert to tokenizer.json); {_FIX_HINT}")
    norm = proto.normalizer_spec
    problems = []
    if norm.precompiled_charsmap:
        problems.append(f"normalization '{norm.name}'")
    if norm.add_dummy_prefix:
        problems.append("add_dummy_prefix")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces=false")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix")
    if problems:
        raise ValueError(
            f"{model_file}: SentencePiece BPE model with {', '.join(problems)} is not supported "
            f"(only Gemma-style models: identity normalization, no dummy prefix); {_FIX_HINT}")


def _check_tokenizer_json(path: Path, raw: bytes) -> None:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); replace it with the model's original "
                         "tokenizer.json or delete it to convert tokenizer.model") from None
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json (no 'model'); replace it with "
                         "the model's original tokenizer.json or delete it to convert tokenizer.model")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return  # copying does not need tokenizers; the JSON check above has to do
    try:
        Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:
        raise ValueError(f"{path}: the tokenizers package cannot load it ({str(e)[:200]}); replace "
                         "it with the model's original tokenizer.json or delete it to convert "
                         "tokenizer.model") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object; fix or delete the file")
    return data


def _chat_template(folder: Path, config: dict | None) -> Any:
    """The chat template the source declares: tokenizer_config.json, chat_template.jinja/.json."""
    if config is not None and config.get("chat_template"):
        return config["chat_template"]
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return _read_json(folder / "chat_template.json").get("chat_template")
    return None


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_names_for_copy(folder: Path, tok_json_raw: bytes, sp_model: Path | None) -> dict[str, str]:
    """bos/eos/pad/unk names for a minimal config: special_tokens_map.json, tokenizer.model, or
    the Gemma names found among tokenizer.json's added tokens."""
    keys = ("bos_token", "eos_token", "pad_token", "unk_token")
    if (folder / SPECIAL_TOKENS_MAP).is_file():
        data = _read_json(folder / SPECIAL_TOKENS_MAP)
        names = {k: _token_content(data.get(k)) for k in keys}
        return {k: v for k, v in names.items() if v is not None}
    if sp_model is not None:
        proto = _load_sentencepiece_proto(sp_model)
        pieces, t = proto.pieces, proto.trainer_spec
        ids = {"bos_token": t.bos_id, "eos_token": t.eos_id, "pad_token": t.pad_id, "unk_token": t.unk_id}
        return {k: pieces[i].piece for k, i in ids.items() if 0 <= i < len(pieces)}
    data = json.loads(tok_json_raw)
    added = {t.get("content") for t in data.get("added_tokens", []) if isinstance(t, dict)}
    names = {k: f"<{k.split('_')[0]}>" for k in keys}
    names = {k: v for k, v in names.items() if v in added}
    unk = (data.get("model") or {}).get("unk_token")
    if isinstance(unk, str):
        names["unk_token"] = unk
    return names


def _tokenizer_config(names: dict[str, str], chat_template: Any) -> dict:
    config: dict[str, Any] = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True,
                              "add_eos_token": False, **names,
                              "clean_up_tokenization_spaces": False,
                              "spaces_between_special_tokens": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def _dump(data: dict) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def add_image_tokens(out_dir: Path, vision) -> bool:
    """Make the tokenizer.json in `out_dir` hold Gemma 3's image markers at the model's ids, as
    onnxruntime-genai's Gemma 3 processor needs: it writes `<start_of_image>`, 256 x
    `<image_soft_token>` and `<end_of_image>` in the prompt text and tokenizes it, so each must be
    one token with the id the model expects (`vision`: the VisionConfig's boi / eoi / soft ids).
    Gemma 3's SentencePiece model has the first two but not `<image_soft_token>` (Hugging Face
    adds it as token 262144 in tokenizer.json): a marker the file lacks, at an id no other token
    has, is added as a special token. Returns whether the file changed; raises ValueError naming
    the marker when the tokenizer maps it to another id, or gives its id to another token."""
    path = Path(out_dir) / TOKENIZER_JSON
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = (data.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, list):  # unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    taken = {**{i: p for p, i in vocab.items()}, **{i: p for p, i in added.items()}}
    changed = False
    for marker, want in (("<start_of_image>", vision.boi_token), ("<end_of_image>", vision.eoi_token),
                         ("<image_soft_token>", vision.soft_token)):
        have = added.get(marker, vocab.get(marker))
        if have == want:
            continue
        if have is not None or want in taken:
            what = f"maps {marker} to {have}" if have is not None else f"gives id {want} to {taken[want]!r}"
            raise ValueError(f"the tokenizer {what}, but the model's {marker} is {want}: pass the model's own "
                             "tokenizer (--tokenizer PATH)")
        if want != max(taken) + 1:  # tokenizers numbers a new token after the last id, whatever the file says
            raise ValueError(f"the tokenizer lacks {marker} and cannot take it at the model's id {want} (its next id "
                             f"is {max(taken) + 1}): pass the model's own tokenizer.json (--tokenizer PATH)")
        data.setdefault("added_tokens", []).append({"id": want, "content": marker, "single_word": False,
                                                    "lstrip": False, "rstrip": False, "normalized": False,
                                                    "special": True})
        taken[want] = marker
        changed = True
    if changed:
        data["added_tokens"].sort(key=lambda t: t["id"])
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(_dump(data))
        tmp.replace(path)
    return changed
