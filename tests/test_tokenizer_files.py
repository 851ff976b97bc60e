"""Tests for export.tokenizer_files: tokenizer.json / tokenizer_config.json for exported folders.

The SentencePiece model is conftest's tiny Gemma-style BPE model (`model_path`): pad/eos/bos/unk
at ids 0-3, the turn markers as user-defined pieces, byte fallback, no dummy prefix.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from conftest import tiny_corpus
from export import tokenizer_files
from export.tokenizer_files import write_tokenizer_files

tokenizers = pytest.importorskip("tokenizers")

PLAIN_TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "digits 0123456789 and 12345",
    "  leading, doubled  and   tripled spaces, trailing  ",
    "line one\nline two\n\n\ttabbed\t\t",
    "accents é ü and CJK 日本 and emoji 🙂 use byte fallback",
    "zebra xylophone qwerty",
    "",
]
CHAT = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
TEXTS = [*PLAIN_TEXTS, CHAT, "a<start_of_turn>b<end_of_turn>"]
SP_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"]


@pytest.fixture(scope="module")
def converted(model_path, tmp_path_factory):
    """Output folder of converting the bare tiny tokenizer.model."""
    out = tmp_path_factory.mktemp("converted")
    assert write_tokenizer_files(model_path, out) == SP_FILES
    return out


@pytest.fixture(scope="module")
def sp(model_path):
    return sentencepiece.SentencePieceProcessor(model_file=str(model_path))


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def _check_against_sentencepiece(tok_json, sp, texts):
    tk = tokenizers.Tokenizer.from_file(str(tok_json))
    for text in texts:
        ids = tk.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), text
        assert tk.decode(ids, skip_special_tokens=False) == text
    return tk


def _genai_tokenizer(folder, vocab_size):
    """onnxruntime-genai's tokenizer for `folder`. og.Tokenizer(path) reads genai_config.json and the
    tokenizer files only (no model.onnx needed), so a minimal config is written next to them."""
    og = pytest.importorskip("onnxruntime_genai")
    config = {"model": {"type": "gemma3_text", "vocab_size": vocab_size, "context_length": 64,
                        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
                        "decoder": {"filename": "model.onnx", "head_size": 8, "hidden_size": 32,
                                    "num_attention_heads": 4, "num_hidden_layers": 1,
                                    "num_key_value_heads": 1}}}
    (folder / "genai_config.json").write_text(json.dumps(config))
    return og.Tokenizer(str(folder))


# ---- conversion of a bare SentencePiece model ---------------------------------------------------
def test_converted_ids_and_decode_match_sentencepiece(converted, sp):
    tk = _check_against_sentencepiece(converted / "tokenizer.json", sp, TEXTS)
    # add_special_tokens=True prepends <bos> (post-processor, as in HF Gemma tokenizer.json files).
    assert tk.encode("hello").ids == [sp.bos_id(), *sp.encode("hello")]
    assert _leftovers(converted) == []


def test_converted_layout(converted, model_path, sp):
    data = json.loads((converted / "tokenizer.json").read_text())
    assert data["model"]["type"] == "BPE" and data["model"]["byte_fallback"] is True
    assert data["model"]["unk_token"] == "<unk>"
    assert data["normalizer"] == {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    assert data["pre_tokenizer"]["type"] == "Split"
    assert [d["type"] for d in data["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse"]
    vocab = data["model"]["vocab"]
    assert len(vocab) == sp.vocab_size()
    assert all(vocab[sp.id_to_piece(i)] == i for i in range(sp.vocab_size()))
    added = {t["content"]: (t["id"], t["special"]) for t in data["added_tokens"]}
    assert added == {"<pad>": (0, True), "<eos>": (1, True), "<bos>": (2, True), "<unk>": (3, True),
                     "<start_of_turn>": (4, True), "<end_of_turn>": (5, True)}
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<bos>", "<eos>", "<pad>", "<unk>")
    assert "chat_template" not in config
    assert (converted / "tokenizer.model").read_bytes() == model_path.read_bytes()


def test_onnxruntime_genai_tokenizer_matches_sentencepiece(converted, sp, tmp_path):
    folder = tmp_path / "genai"
    shutil.copytree(converted, folder)
    tok = _genai_tokenizer(folder, sp.vocab_size())
    for text in TEXTS:
        ids = [int(i) for i in tok.encode(text)]
        assert ids == sp.encode(text), text  # in particular: genai does not prepend BOS
        decoded = tok.decode(np.array(ids, dtype=np.int32))
        # genai's decode always drops special tokens, the turn markers included.
        expected = text.replace("<start_of_turn>", "").replace("<end_of_turn>", "")
        assert decoded == expected, text
    # A literal "<bos>" in the prompt is the BOS id: how callers include BOS.
    assert [int(i) for i in tok.encode("<bos>hi")] == [sp.bos_id(), *sp.encode("hi")]


def _edited_model(model_path, tmp_path, add):
    """The tiny model with extra pieces appended: [(piece, score, type)]."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    for piece, score, typ in add:
        proto.pieces.add(piece=piece, score=score, type=typ)
    path = tmp_path / "edited.model"
    path.write_bytes(proto.SerializeToString())
    return path


def test_byte_piece_renamed_for_merges_and_whitespace_user_pieces(model_path, tmp_path):
    """A piece built from a character that is no piece itself ("\\t\\t" without "\\t", as in old
    Gemma vocabularies) and user-defined whitespace runs ("▁▁")."""
    user, normal = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED, 1
    path = _edited_model(model_path, tmp_path, [("\t\t", -1000.0, normal), ("▁▁", 0.0, user)])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    texts = ["\t", "a\t\tb\t\t\tc", "x  y   z    ", *TEXTS]
    assert sp.encode("\t\t", out_type=str) == ["\t\t"] and sp.encode("a  b", out_type=str)[1] == "▁▁"
    out = tmp_path / "out"
    write_tokenizer_files(path, out)
    tk = _check_against_sentencepiece(out / "tokenizer.json", sp, texts)
    assert tk.token_to_id("\t") == sp.piece_to_id("<0x09>")
    tok = _genai_tokenizer(out, sp.vocab_size())
    for text in texts[:3]:
        ids = [int(i) for i in tok.encode(text)]
        assert ids == sp.encode(text), text
        assert tok.decode(np.array(ids, dtype=np.int32)) == text


def test_chat_template_carried_from_source_config(model_path, tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    shutil.copy(model_path, src / "tokenizer.model")
    template = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    out = tmp_path / "out"
    assert write_tokenizer_files(src, out) == SP_FILES
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template


# ---- copying a Hugging Face tokenizer folder ----------------------------------------------------
def test_copies_existing_hf_tokenizer(converted, sp, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(converted, hf)
    config = {**json.loads((hf / "tokenizer_config.json").read_text()), "chat_template": "T"}
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    (hf / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<bos>"}))
    out = tmp_path / "out"
    written = write_tokenizer_files(hf, out)
    assert sorted(written) == sorted([*SP_FILES, "special_tokens_map.json"])
    for name in written:
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name
    _check_against_sentencepiece(out / "tokenizer.json", sp, TEXTS)
    assert _leftovers(out) == []


def test_copy_writes_minimal_config_when_missing(converted, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(converted / "tokenizer.json", hf)  # tokenizer.json only: names from its added tokens
    (hf / "chat_template.jinja").write_text("J")
    out = tmp_path / "out"
    assert write_tokenizer_files(hf, out) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<bos>", "<eos>", "<pad>", "<unk>")
    assert config["chat_template"] == "J"


def test_direct_tokenizer_json_path(converted, tmp_path):
    out = tmp_path / "out"
    written = write_tokenizer_files(converted / "tokenizer.json", out)
    assert written == ["tokenizer.json", "tokenizer_config.json"]


# ---- nothing found / unsupported / unreadable ---------------------------------------------------
def test_no_tokenizer_returns_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    out = tmp_path / "out"
    assert write_tokenizer_files(tmp_path, out) is None
    assert write_tokenizer_files(tmp_path / "missing", out) is None
    assert not out.exists()


def _train(tmp_path, name, **kw):
    prefix = tmp_path / name
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(200)), model_prefix=str(prefix), vocab_size=120,
        num_threads=1, minloglevel=2, **kw)
    return prefix.with_suffix(".model")


def test_unigram_model_rejected(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    _train(src, "tokenizer", model_type="unigram")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"tokenizer\.model.*unigram.*not supported.*tokenizer\.json"):
        write_tokenizer_files(src, out)
    assert not out.exists()


def test_non_gemma_bpe_model_rejected(tmp_path):
    path = _train(tmp_path, "llama_style", model_type="bpe")  # dummy prefix, nmt_nfkc
    with pytest.raises(ValueError, match="add_dummy_prefix"):
        write_tokenizer_files(path, tmp_path / "out")


def test_unreadable_files_rejected(converted, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes(b"\xff\x00 not a model")
    with pytest.raises(ValueError, match=r"bad/tokenizer\.model: not a .*SentencePiece model"):
        write_tokenizer_files(bad, tmp_path / "out")
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad/tokenizer\.json: not valid JSON"):
        write_tokenizer_files(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizers_package(model_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ValueError, match="pip install tokenizers"):
        write_tokenizer_files(model_path, tmp_path / "out")


def test_failed_write_leaves_no_temp_file(model_path, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def fail(src, dst):
        raise OSError("disk full")

    import contract.files

    monkeypatch.setattr(contract.files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_tokenizer_files(model_path, out)
    assert list(out.iterdir()) == []
