"""Tests for contract.tokenizer, run against a tiny SentencePiece model trained here.

The model mirrors the real Gemma tokenizer conventions: pad/eos/bos/unk at
ids 0/1/2/3 with pieces ``<pad>``/``<eos>``/``<bos>``/``<unk>``, the turn
markers as user-defined pieces at ids 4/5, byte fallback, no dummy prefix and
no text normalization.
"""

from __future__ import annotations

import enum
import shutil

import pytest
import sentencepiece

from conftest import tiny_corpus
from contract.tokenizer import (
    Tokenizer,
    apply_chat_template,
    normalize_family,
)

ROUND_TRIP_TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "  leading spaces,  doubled  spaces and trailing ",
    "digits 12345 and 6.78",
    "line one\nline two\n\n\ttabbed",
    "accents é ü, CJK 漢字 and emoji 🙂 use byte fallback",
    "zebra xylophone qwerty",  # words absent from the training corpus
]

USER_ASSISTANT = [
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Hi. How can I help?"},
]


@pytest.fixture(scope="session")
def tok(model_path):
    return Tokenizer(model_path)


@pytest.fixture(scope="session")
def model_folder(model_path, tmp_path_factory):
    """A checkpoint-like folder holding the model as ``tokenizer.model``."""
    folder = tmp_path_factory.mktemp("ckpt")
    shutil.copy(model_path, folder / "tokenizer.model")
    return folder


# ------------------------------------------------------------------ ids


def test_special_ids(tok):
    assert tok.pad_id == 0
    assert tok.eos_id == 1
    assert tok.bos_id == 2
    assert tok.unk_id == 3
    assert tok.start_of_turn_id == 4
    assert tok.end_of_turn_id == 5
    assert tok.vocab_size == 360
    assert tok.id_to_piece(4) == "<start_of_turn>"
    assert tok.piece_to_id("<end_of_turn>") == 5
    assert tok.piece_to_id("<bos>") == 2
    assert tok.piece_to_id("no-such-piece") == tok.unk_id


def test_turn_ids_are_none_without_turn_pieces(tmp_path):
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(100)),
        model_prefix=str(tmp_path / "plain"),
        vocab_size=100,
        model_type="bpe",
        num_threads=1,
        minloglevel=2,
    )
    plain = Tokenizer(tmp_path / "plain.model")
    assert plain.pad_id is None  # trainer default: no pad piece
    assert plain.start_of_turn_id is None
    assert plain.end_of_turn_id is None
    assert plain.stop_ids() == (plain.eos_id,)
    with pytest.raises(ValueError, match="no <start_of_turn>"):
        plain.encode_chat([{"role": "user", "content": "hi"}], family="gemma3")


def test_stop_ids(tok):
    assert tok.stop_ids() == (1, 5)
    assert tok.stop_ids(extra=[7, 1, 5]) == (1, 5, 7)
    with pytest.raises(IndexError, match="out of range"):
        tok.stop_ids(extra=[tok.vocab_size])


def test_id_to_piece_out_of_range(tok):
    with pytest.raises(IndexError, match="out of range"):
        tok.id_to_piece(tok.vocab_size)


# ------------------------------------------------------------- encoding


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=False, add_eos=True)) == text


def test_unseen_characters_use_byte_pieces_not_unk(tok):
    ids = tok.encode("é🙂", add_bos=False)
    assert tok.unk_id not in ids
    assert all(tok.id_to_piece(i).startswith("<0x") for i in ids)


def test_bos_prepended_exactly_once(tok):
    ids = tok.encode("hello world")
    assert ids[0] == tok.bos_id
    assert ids.count(tok.bos_id) == 1
    assert tok.encode("hello world", add_bos=False) == ids[1:]
    with_eos = tok.encode("hello world", add_eos=True)
    assert with_eos[-1] == tok.eos_id and with_eos[:-1] == ids


def test_literal_bos_text_is_not_a_second_bos(tok):
    ids = tok.encode("<bos>hello")
    assert ids.count(tok.bos_id) == 1
    assert tok.decode(ids) == "<bos>hello"


def test_turn_markers_encode_to_single_ids(tok):
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>\n", add_bos=False)
    assert ids[0] == tok.start_of_turn_id
    assert ids.count(tok.start_of_turn_id) == 1
    assert ids.count(tok.end_of_turn_id) == 1
    assert ids[-2] == tok.end_of_turn_id
    assert tok.decode(ids[1:-2]) == "user\nhi"


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError):
        tok.encode([1, 2, 3])


def test_decode_skip_special(tok):
    text = "<start_of_turn>user\nhello<end_of_turn>\n"
    ids = [tok.pad_id, *tok.encode(text), tok.eos_id, tok.pad_id]
    assert tok.decode(ids, skip_special=False) == text
    assert tok.decode(ids) == "user\nhello\n"
    assert tok.decode([]) == ""
    with pytest.raises(IndexError, match="out of range"):
        tok.decode([2, 9999])


def test_decode_accepts_numpy_ids(tok):
    np = pytest.importorskip("numpy")
    ids = np.asarray(tok.encode("hello world"), dtype=np.int32)
    assert tok.decode(ids) == "hello world"


# ---------------------------------------------------------- chat template


def test_chat_template_two_turns_gemma2(tok):
    expected = (
        "<start_of_turn>user\nHello there!<end_of_turn>\n"
        "<start_of_turn>model\nHi. How can I help?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(USER_ASSISTANT, family="gemma2") == expected


def test_chat_template_two_turns_gemma3_strips_content(tok):
    messages = [
        {"role": "user", "content": "  Hello there!\n"},
        {"role": "model", "content": "\nHi. How can I help?  "},
    ]
    expected = (
        "<start_of_turn>user\nHello there!<end_of_turn>\n"
        "<start_of_turn>model\nHi. How can I help?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(messages, family="gemma3") == expected


def test_chat_template_two_turns_recurrentgemma_no_generation_prompt(tok):
    expected = (
        "<start_of_turn>user\nHello there!<end_of_turn>\n"
        "<start_of_turn>model\nHi. How can I help?<end_of_turn>\n"
    )
    text = tok.apply_chat_template(
        USER_ASSISTANT, family="recurrentgemma", add_generation_prompt=False
    )
    assert text == expected


def test_chat_template_has_no_bos(tok):
    text = apply_chat_template([{"role": "user", "content": "hi"}], family="gemma3")
    assert text == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert "<bos>" not in text


def test_gemma3_system_prompt_is_prepended_to_first_user_turn():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert apply_chat_template(messages, family="gemma3") == expected


@pytest.mark.parametrize("family", ["gemma2", "recurrentgemma"])
def test_system_role_rejected_by_gemma2_and_recurrentgemma(family):
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=f"System role not supported by {family}"):
        apply_chat_template(messages, family=family)


@pytest.mark.parametrize(
    "roles",
    [
        ["assistant"],
        ["user", "user"],
        ["user", "model", "model"],
        ["model", "user"],
    ],
)
def test_non_alternating_roles_rejected(roles):
    messages = [{"role": r, "content": "x"} for r in roles]
    with pytest.raises(ValueError, match="must alternate user/model"):
        apply_chat_template(messages, family="gemma3")


def test_bad_conversations_rejected():
    with pytest.raises(ValueError, match="empty"):
        apply_chat_template([], family="gemma2")
    with pytest.raises(ValueError, match="only the first message"):
        apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            family="gemma3",
        )
    with pytest.raises(ValueError, match="followed by a user message"):
        apply_chat_template([{"role": "system", "content": "b"}], family="gemma3")
    with pytest.raises(ValueError, match="unknown role"):
        apply_chat_template([{"role": "tool", "content": "b"}], family="gemma3")
    with pytest.raises(ValueError, match="no 'content' key"):
        apply_chat_template([{"role": "user"}], family="gemma3")
    with pytest.raises(TypeError, match="content must be a str"):
        apply_chat_template([{"role": "user", "content": None}], family="gemma3")


def test_family_accepts_enum_and_rejects_unknown():
    class Family(enum.Enum):
        GEMMA2 = "gemma2"
        GEMMA3 = "gemma3"
        RECURRENT = "recurrent_gemma"

    assert normalize_family(Family.GEMMA3) == "gemma3"
    assert normalize_family(Family.RECURRENT) == "recurrentgemma"
    assert normalize_family("Gemma-2") == "gemma2"
    messages = [{"role": "user", "content": "hi"}]
    assert apply_chat_template(messages, family=Family.GEMMA2) == apply_chat_template(
        messages, family="gemma2"
    )
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
        apply_chat_template(messages, family="llama")


def test_encode_chat_single_bos_and_turn_ids(tok):
    ids = tok.encode_chat(USER_ASSISTANT, family="gemma2")
    assert ids[0] == tok.bos_id
    assert ids.count(tok.bos_id) == 1
    assert ids[1] == tok.start_of_turn_id
    assert ids.count(tok.start_of_turn_id) == 3
    assert ids.count(tok.end_of_turn_id) == 2
    text = tok.apply_chat_template(USER_ASSISTANT, family="gemma2")
    assert ids == tok.encode(text, add_bos=True)
    assert tok.decode(ids, skip_special=False) == text


# ---------------------------------------------------------------- loading


def test_load_from_folder(tok, model_folder):
    from_folder = Tokenizer(model_folder)
    assert from_folder.vocab_size == tok.vocab_size
    assert from_folder.encode(ROUND_TRIP_TEXTS[1]) == tok.encode(ROUND_TRIP_TEXTS[1])


def test_load_from_str_path_and_bytes(tok, model_path):
    assert Tokenizer(str(model_path)).encode("hello") == tok.encode("hello")
    from_bytes = Tokenizer.from_bytes(model_path.read_bytes())
    assert from_bytes.encode("hello") == tok.encode("hello")
    assert from_bytes.stop_ids() == tok.stop_ids()


def test_missing_tokenizer_in_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer(tmp_path)
    message = str(info.value)
    assert message == (
        f"no tokenizer.model in {tmp_path}; pass --tokenizer PATH to a SentencePiece .model file"
    )
    assert "\n" not in message


def test_missing_model_file(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*nope.model; pass --tokenizer"):
        Tokenizer(missing)


def test_invalid_model_file(tmp_path):
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        Tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_bytes(b"garbage")


# ------------------------------------------------- Hugging Face cross-check


def test_matches_hugging_face_gemma_tokenizer(tok, model_folder):
    """transformers' GemmaTokenizer, built offline from the same tokenizer.model.

    In transformers 5, ``GemmaTokenizer(vocab_file=...)`` ignores the file;
    ``from_pretrained(folder)`` converts ``tokenizer.model`` instead. It does
    not add BOS unless told to, so ``add_bos_token=True`` is passed.
    """
    transformers = pytest.importorskip("transformers")
    hf = transformers.GemmaTokenizer.from_pretrained(
        str(model_folder), local_files_only=True, add_bos_token=True
    )
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    chat = tok.apply_chat_template(USER_ASSISTANT, family="gemma2")
    for text in [*ROUND_TRIP_TEXTS, chat]:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == "<bos>" + text
    plain = ROUND_TRIP_TEXTS[1]
    assert hf.decode(tok.encode(plain), skip_special_tokens=True) == tok.decode(tok.encode(plain))
