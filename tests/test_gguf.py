"""GGUF (llama.cpp) checkpoints of Gemma 2 and Gemma 3: tiny files written with gguf.GGUFWriter
in every supported storage type, checked against transformers' own GGUF loader (the oracle), plus
the config rules, the raw Q4_0/Q8_0 blocks, the rebuilt tokenizer and the one-line errors.

`write_tiny_gguf` is reusable: `from test_gguf import write_tiny_gguf`."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import mmap
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from conftest import full_logits, hf_config, random_tokens, tiny_corpus
from models import CheckpointError, get_config, load_checkpoint
from models.loaders.gguf import GGUFFile, config_from_gguf, source_blocks
from models.loaders.gguf_tokenizer import sentencepiece_model, write_tokenizer

# ---- a tiny SentencePiece vocabulary in Gemma's layout ---------------------------------------------
# <pad> <eos> <bos> <unk>, 101 <unused…> pieces, then <start_of_turn> = 105, <end_of_turn> = 106
# (Gemma 3's ids), whitespace-run and newline user-defined pieces, BPE pieces; 256 in all.
SPECIAL_PIECES = ([f"<unused{i}>" for i in range(101)] + ["<start_of_turn>", "<end_of_turn>"]
                  + ["\u2581\u2581", "\u2581\u2581\u2581\u2581", "\n\n"])
TINY_VOCAB = 256
# gguf.TokenType values (= SentencePiece piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@functools.lru_cache(maxsize=None)
def tiny_spm() -> Path:
    """A Gemma-style SentencePiece BPE model (no byte fallback), trained once per process."""
    out = Path(tempfile.mkdtemp(prefix="gguf-spm-"))
    atexit.register(shutil.rmtree, out, True)  # the run leaves nothing behind
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_prefix=str(out / "tiny"), vocab_size=TINY_VOCAB,
        hard_vocab_limit=False, model_type="bpe", add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        byte_fallback=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=SPECIAL_PIECES, num_threads=1, minloglevel=2)
    return out / "tiny.model"


def gguf_vocab(spm_path, size: int | None = None):
    """(tokens, scores, types) as llama.cpp's converter writes them from a SentencePiece model and
    Gemma's added_tokens_decoder: the specials and `<…>` pieces CONTROL with score -1000, other
    user-defined pieces USER_DEFINED with '▁' written as ' ' and score -1000, padded with
    `[PAD{i}]` UNUSED pieces up to `size`."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece, score = sp.id_to_piece(i), float(sp.get_score(i))
        if sp.is_byte(i):
            ty = BYTE
        elif sp.is_control(i) or sp.is_unknown(i) or (piece.startswith("<") and piece.endswith(">")
                                                       and piece in SPECIAL_PIECES):
            ty, score = CONTROL, -1000.0
        elif piece in SPECIAL_PIECES or piece in ("<start_of_turn>", "<end_of_turn>"):
            ty, score, piece = USER_DEFINED, -1000.0, piece.replace("\u2581", " ")
        else:
            ty = NORMAL
        if piece in ("<start_of_turn>", "<end_of_turn>"):
            ty, score = CONTROL, -1000.0
        tokens.append(piece)
        scores.append(score)
        types.append(ty)
    for i in range(len(tokens), size or len(tokens)):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    return tokens, scores, types


# ---- the tiny GGUF writer --------------------------------------------------------------------------
# Architectures of our gemma2-tiny / gemma3-tiny, with mlp_dim 256 so ffn_down can be a K-quant.
TINY_DIMS = dict(E=64, H=4, K=2, D=16, F=256, W=8, ctx=128)
LAYERS = {"gemma2": 4, "gemma3": 7}
_ROTATION = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32")
_MATMULS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# f16 scale fields inside a K-quant block: (block bytes, [(offset, magnitude)])
_K_FIELDS = {"Q2_K": (84, [(80, 1e-3), (82, 1e-3)]), "Q3_K": (110, [(108, 2e-4)]),
             "Q4_K": (144, [(0, 2e-4), (2, 2e-4)]), "Q5_K": (176, [(0, 1e-4), (2, 1e-4)]),
             "Q6_K": (210, [(208, 1e-4)])}


def default_types(arch: str) -> dict[str, str]:
    """Every supported storage type at least once: norms F32, token_embd Q8_0, the matmuls
    rotating through Q8_0..F32 by layer, ffn_down Q6_K in layer 0 and Q4_K in layer 1."""
    types = {"token_embd.weight": "Q8_0"}
    for i in range(LAYERS[arch]):
        for j, m in enumerate(_MATMULS):
            types[f"blk.{i}.{m}.weight"] = _ROTATION[(i + j) % len(_ROTATION)]
    types["blk.0.ffn_down.weight"] = "Q6_K"
    types["blk.1.ffn_down.weight"] = "Q4_K"
    return types


def _tensor_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    e, h, k, d, f = (TINY_DIMS[x] for x in "EHKDF")
    shapes = {"token_embd.weight": (TINY_VOCAB, e), "output_norm.weight": (e,)}
    for i in range(LAYERS[arch]):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (e,), b + "post_attention_norm.weight": (e,),
            b + "ffn_norm.weight": (e,), b + "post_ffw_norm.weight": (e,),
            b + "attn_q.weight": (h * d, e), b + "attn_k.weight": (k * d, e),
            b + "attn_v.weight": (k * d, e), b + "attn_output.weight": (e, h * d),
            b + "ffn_gate.weight": (f, e), b + "ffn_up.weight": (f, e), b + "ffn_down.weight": (e, f),
        })
        if arch == "gemma3":
            shapes.update({b + "attn_q_norm.weight": (d,), b + "attn_k_norm.weight": (d,)})
    return shapes


def _encode(x: np.ndarray, type_name: str, rng) -> tuple[np.ndarray, "object"]:
    """(array to hand to GGUFWriter, raw_dtype or None)."""
    import gguf
    from gguf.quants import quantize

    q = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return x.astype(np.float32), None
    if type_name == "F16":
        return x.astype(np.float16), None
    if type_name in _K_FIELDS:
        block_bytes, fields = _K_FIELDS[type_name]
        rows, cols = x.shape
        blocks = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
        for off, mag in fields:
            d = (mag * rng.uniform(0.5, 1.5, (rows, cols // 256))).astype("<f2")
            blocks[..., off:off + 2] = d.view(np.uint8).reshape(rows, cols // 256, 2)
        return blocks.reshape(rows, -1), q
    try:
        return quantize(x.astype(np.float32), q), q
    except NotImplementedError:  # e.g. IQ4_NL: random blocks with a small f16 scale up front
        be, bb = gguf.constants.GGML_QUANT_SIZES[q]
        rows, cols = x.shape
        blocks = rng.integers(0, 256, (rows, cols // be, bb), dtype=np.uint8)
        blocks[..., 0:2] = np.full((rows, cols // be), 1e-3, "<f2")[..., None].view(np.uint8)
        return blocks.reshape(rows, -1), q


def _stored_value(data: np.ndarray, raw_dtype) -> np.ndarray | None:
    """What the file holds, dequantized to float32 (None for types gguf cannot dequantize)."""
    from gguf.quants import dequantize

    if raw_dtype is None:
        return np.asarray(data, np.float32)
    try:
        return np.asarray(dequantize(data, raw_dtype), np.float32)
    except NotImplementedError:
        return None


def write_tiny_gguf(path, arch: str = "gemma3", types: dict[str, str] | None = None, seed: int = 0,
                    *, spm: Path | None = None, chat_template: str | None = None,
                    output: str = "none", name: str | None = None,
                    metadata: dict | None = None) -> dict:
    """Write a tiny random Gemma 2/3 GGUF like llama.cpp's converter would (norms stored as
    w + 1 with bf16-representable w, the vocabulary of `spm` or of the tiny Gemma-style model).

    types: GGUF tensor name -> type name, overriding `default_types(arch)` (norms are F32).
    output: "none" (tied, the usual), "same" (an output.weight equal to token_embd) or "different".
    metadata: extra raw keys {key: value} (ints as uint32, floats as float32, str as string).
    Returns {"path", "arch", "types", "stored": {gguf name: float32 value as stored},
             "params": {our name: float32 value we must load}, "tokens", "scores", "token_types",
             "spm", "dims"}."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    spm = Path(spm) if spm is not None else tiny_spm()
    tokens, scores, token_types = gguf_vocab(spm, TINY_VOCAB if spm == tiny_spm() else None)
    vocab = len(tokens)
    e, h, k, d, f, w, ctx = (TINY_DIMS[x] for x in ("E", "H", "K", "D", "F", "W", "ctx"))
    layers = LAYERS[arch]
    all_types = {**default_types(arch), **(types or {})}

    wr = gguf.GGUFWriter(str(path), arch=arch)
    wr.add_name(name or f"tiny-{arch}")
    wr.add_context_length(ctx)
    wr.add_embedding_length(e)
    wr.add_block_count(layers)
    wr.add_feed_forward_length(f)
    wr.add_head_count(h)
    wr.add_head_count_kv(k)
    wr.add_key_length(d)
    wr.add_value_length(d)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_sliding_window(w)
    if arch == "gemma2":  # like the converter: no rope.freq_base (llama.cpp default 10000)
        wr.add_attn_logit_softcapping(5.0)
        wr.add_final_logit_softcapping(3.0)
    else:
        wr.add_rope_freq_base(1e6)
        wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        wr.add_rope_scaling_factor(8.0)
    wr.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    wr.add_tokenizer_model("llama")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(tokens)
    wr.add_token_scores(scores)
    wr.add_token_types(token_types)
    wr.add_bos_token_id(2)
    wr.add_eos_token_id(1)
    wr.add_unk_token_id(3)
    wr.add_pad_token_id(0)
    wr.add_add_bos_token(True)
    wr.add_add_eos_token(False)
    wr.add_add_space_prefix(False)
    if chat_template:
        wr.add_chat_template(chat_template)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            wr.add_string(key, value)
        elif isinstance(value, float):
            wr.add_float32(key, value)
        else:
            wr.add_uint32(key, int(value))

    shapes = _tensor_shapes(arch)
    if vocab != TINY_VOCAB:
        shapes["token_embd.weight"] = (vocab, e)
    stored, written_types = {}, {}
    for tname, shape in shapes.items():
        if tname.endswith("norm.weight"):
            wv = rng.normal(0.0, 0.1, shape).astype(np.float32)
            wv = np.asarray(gguf.quants.dequantize(gguf.quants.quantize(wv, gguf.GGMLQuantizationType.BF16),
                                                   gguf.GGMLQuantizationType.BF16), np.float32)
            wv[np.abs(wv) < 2.0**-8] = 0.0  # w + 1 - 1 == w exactly
            data, raw_dtype, type_name = wv + np.float32(1), None, "F32"
        else:
            type_name = all_types.get(tname, "F32")
            x = rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), shape).astype(np.float32)
            data, raw_dtype = _encode(x, type_name, rng)
        wr.add_tensor(tname, data, raw_dtype=raw_dtype)
        stored[tname] = _stored_value(data, raw_dtype)
        written_types[tname] = type_name
    if output != "none":
        emb = stored["token_embd.weight"]
        out = emb if output == "same" else emb + np.float32(0.5)
        wr.add_tensor("output.weight", out.astype(np.float32))
        stored["output.weight"] = out
        written_types["output.weight"] = "F32"
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()

    params = {}
    for tname, value in stored.items():
        if tname == "output.weight":
            continue
        ours = _ours(tname)
        params[ours] = None if value is None else (
            value - np.float32(1) if tname.endswith("norm.weight") else value)
    return {"path": path, "arch": arch, "types": written_types, "stored": stored, "params": params,
            "tokens": tokens, "scores": scores, "token_types": token_types, "spm": spm,
            "dims": dict(TINY_DIMS, L=layers, V=vocab)}


_LEAF = {"attn_norm": "pre_attn_norm", "post_attention_norm": "post_attn_norm",
         "ffn_norm": "pre_ffw_norm", "post_ffw_norm": "post_ffw_norm", "attn_q": "attn.q",
         "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.o", "attn_q_norm": "attn.q_norm",
         "attn_k_norm": "attn.k_norm", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down"}


def _ours(tname: str) -> str:
    if tname == "token_embd.weight":
        return "embed"
    if tname == "output_norm.weight":
        return "final_norm"
    _, i, leaf, _ = tname.split(".")
    return f"layers.{i}.{_LEAF[leaf]}"


def tiny_config(arch: str):
    """Our registry tiny config with the GGUF fixture's differences (mlp_dim 256; the tiny
    vocabulary's <end_of_turn> is 106 for both families)."""
    cfg = get_config(f"{arch}-tiny")
    return dataclasses.replace(cfg, mlp_dim=TINY_DIMS["F"],
                               tokens=dataclasses.replace(cfg.tokens, end_of_turn=106))


# ---- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    out = {}
    for arch in ("gemma2", "gemma3"):
        folder = tmp_path_factory.mktemp(f"gguf-{arch}")
        out[arch] = write_tiny_gguf(folder / f"tiny-{arch}.gguf", arch, seed=1)
    return out


def _one_line_error(path, match: str, **kw):
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path, **kw)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


# ---- (a) params and logits vs transformers' GGUF loader ------------------------------------------------
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_logits_match_transformers_gguf(tiny_ggufs, arch):
    import torch
    import transformers as tf

    written = tiny_ggufs[arch]
    path = written["path"]
    cfg, params = load_checkpoint(path)
    assert set(written["types"].values()) >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                                              "Q5_1", "Q4_K", "Q6_K"}
    assert params.keys() == written["params"].keys()
    for name, value in written["params"].items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)

    hf_cfg = hf_config(arch, intermediate_size=TINY_DIMS["F"])
    hf_cfg._attn_implementation = "eager"
    cls = tf.Gemma2ForCausalLM if arch == "gemma2" else tf.Gemma3ForCausalLM
    model = cls.from_pretrained(path.parent, gguf_file=path.name, config=hf_cfg,
                                dtype=torch.float32).eval()
    state = model.state_dict()
    np.testing.assert_array_equal(state["model.embed_tokens.weight"].numpy(), params["embed"])
    np.testing.assert_array_equal(state["model.layers.0.input_layernorm.weight"].numpy(),
                                  params["layers.0.pre_attn_norm"])
    tokens = random_tokens(20)  # more than twice the sliding window (8)
    ours = full_logits(params, cfg, tokens)
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ref).max() > 1.0
    rel = np.abs(ours - ref).max(axis=(0, 2)) / np.abs(ref).max()
    assert rel.max() <= 1e-4, rel


# ---- (b) config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_config_matches_tiny_registry(tiny_ggufs, arch):
    cfg = config_from_gguf(tiny_ggufs[arch]["path"])
    want = tiny_config(arch)
    for field in dataclasses.fields(want):
        if field.name != "name":
            assert getattr(cfg, field.name) == getattr(want, field.name), field.name
    assert cfg.name == f"tiny-{arch}"


def test_config_rules(tmp_path):
    # gemma3 without a sliding window: every layer global (newer llama.cpp); chat template -> IT;
    # attention.scale and rope.freq_base_swa honoured; name from general.name
    w = write_tiny_gguf(tmp_path / "a.gguf", "gemma3", chat_template="{{ messages }}",
                        name="My Gemma 3 (Tiny)",
                        metadata={"gemma3.attention.scale": 0.125, "gemma3.rope.freq_base_swa": 5e4,
                                  "gemma3.attention.sliding_window_pattern": 3})
    cfg = config_from_gguf(w["path"])
    assert cfg.instruction_tuned and cfg.tokens.end_of_turn == 106
    assert cfg.query_scale == 0.125 and cfg.local_rope_base == 5e4 and cfg.global_rope_base == 1e6
    assert [k.value for k in cfg.layer_pattern] == ["local", "local", "global"]
    assert cfg.global_rope_scale == 8.0 and cfg.attn_softcap is None and cfg.final_softcap is None
    assert cfg.name == "my-gemma-3-tiny"
    cfg2 = config_from_gguf(w["path"], name="x")
    assert cfg2.name == "x"
    # gemma2: softcaps default to llama.cpp's 50 / 30 when the keys are missing; 27B query scale
    import gguf

    path = tmp_path / "g2.gguf"
    wr = gguf.GGUFWriter(str(path), arch="gemma2")
    for add, v in ((wr.add_embedding_length, 4608), (wr.add_block_count, 46),
                   (wr.add_feed_forward_length, 36864), (wr.add_head_count, 32),
                   (wr.add_head_count_kv, 16), (wr.add_key_length, 128), (wr.add_value_length, 128),
                   (wr.add_context_length, 8192), (wr.add_sliding_window, 4096)):
        add(v)
    wr.add_tensor("token_embd.weight", np.zeros((256, 32), np.float16))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    cfg = config_from_gguf(path)
    want = get_config("gemma2-27b")
    assert cfg.attn_softcap == 50.0 and cfg.final_softcap == 30.0
    assert cfg.query_scale == want.query_scale == 144**-0.5
    assert cfg.local_rope_base == cfg.global_rope_base == 10_000.0
    assert cfg.layer_pattern == want.layer_pattern and cfg.name == "g2"
    assert not cfg.instruction_tuned


def test_model_override_and_output_head(tmp_path):
    same = write_tiny_gguf(tmp_path / "same.gguf", "gemma3", output="same")
    cfg, params = load_checkpoint(same["path"], model=tiny_config("gemma3"))
    np.testing.assert_array_equal(params["embed"], same["params"]["embed"])
    diff = write_tiny_gguf(tmp_path / "diff.gguf", "gemma3", output="different")
    _one_line_error(diff["path"], "output.weight.*differs")
    # a wrong model for the file: the shape check of common.assemble
    _one_line_error(same["path"], "shape", model="gemma3-tiny")


# ---- (c) raw Q4_0 / Q8_0 blocks ---------------------------------------------------------------------
def test_source_blocks_identity(tiny_ggufs):
    for arch, written in tiny_ggufs.items():
        f = GGUFFile(written["path"])
        cfg = config_from_gguf(f)
        blocks = source_blocks(f, cfg)
        want = {_ours(n) for n, t in written["types"].items() if t in ("Q4_0", "Q8_0", "Q4_K", "Q6_K")}
        assert set(blocks) == want and blocks
        kinds = set()
        # kind -> (block, scale dtype, code range, offsets)
        forms = {"q4_0": (32, np.float16, (-8, 7), False), "q8_0": (32, np.float16, (-128, 127), False),
                 "q4_k": (32, np.float32, (0, 15), True), "q6_k": (16, np.float32, (-32, 31), False)}
        for name, b in blocks.items():
            kinds.add(b.kind)
            block, dtype, (lo, hi), offsets = forms[b.kind]
            assert b.codes.dtype == np.int8 and b.scales.dtype == dtype and b.block == block, name
            assert b.scales.shape == (b.codes.shape[0], b.codes.shape[1] // block)
            assert lo <= b.codes.min() and b.codes.max() <= hi and (b.offsets is not None) == offsets
            value = b.codes.astype(np.float32) * np.repeat(b.scales.astype(np.float32), block, axis=1)
            if offsets:
                value -= np.repeat(b.offsets, block, axis=1)
            np.testing.assert_array_equal(value, f.read(_gguf(name)), err_msg=name)  # the file's own numbers
            if b.kind in ("q4_k", "q6_k"):  # and the forms the writers take, value for value
                from export.quantize.blocks import from_source_blocks

                np.testing.assert_array_equal(from_source_blocks(b).dequantize(), value, err_msg=name)
        assert kinds == {"q4_0", "q8_0", "q4_k", "q6_k"}
        # bytes come from positioned reads into fresh arrays, not views of a mapping (whose
        # touched pages would stay in the process's resident set through a whole export)
        for name in f.names():
            raw = f.raw(name)
            assert not isinstance(raw.base, (np.memmap, mmap.mmap)) and raw.flags.writeable, name
        # a row slice reads only its rows' bytes and dequantizes them as the whole tensor does
        for name, t in f.tensors.items():
            if len(t.shape) == 2:
                a, b = 1, min(t.shape[0], 7)
                np.testing.assert_array_equal(f.read_rows(name, a, b), f.read(name)[a:b], err_msg=name)
        f.close()
        with pytest.raises(ValueError, match="after close"):
            f.raw("token_embd.weight")


def _gguf(ours: str) -> str:
    from models.loaders.gguf import gguf_name

    return gguf_name(ours)


def test_source_blocks_embed_trimmed(tmp_path):
    w = write_tiny_gguf(tmp_path / "t.gguf", "gemma3")
    cfg = dataclasses.replace(tiny_config("gemma3"), vocab_size=TINY_VOCAB - 64)
    blocks = source_blocks(w["path"], cfg)
    assert blocks["embed"].kind == "q8_0" and blocks["embed"].codes.shape == (TINY_VOCAB - 64, 64)
    _, params = load_checkpoint(w["path"], model=cfg)
    assert params["embed"].shape == (TINY_VOCAB - 64, 64)


# ---- (d) one-line errors -----------------------------------------------------------------------------
def test_errors(tiny_ggufs, tmp_path):
    import gguf

    for arch, match in (("llama", "unsupported GGUF architecture 'llama'.*gemma2, gemma3"),
                        ("gemma", "Gemma 1 GGUF.*not supported")):
        path = tmp_path / f"{arch}.gguf"
        wr = gguf.GGUFWriter(str(path), arch=arch)
        wr.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
        _one_line_error(path, match)

    iq = write_tiny_gguf(tmp_path / "iq.gguf", "gemma3", types={"blk.0.ffn_gate.weight": "IQ4_NL"})
    msg = _one_line_error(iq["path"], "blk.0.ffn_gate.weight.*IQ4_NL.*supported: F32")
    assert "Q6_K" in msg

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely not a gguf" * 10)
    _one_line_error(bad, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _one_line_error(empty, "empty file")

    data = tiny_ggufs["gemma2"]["path"].read_bytes()
    for cut, match in ((len(data) - 100, "truncated GGUF file.*tensor"), (200, "truncated GGUF header")):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        _one_line_error(path, match)

    # a GGUF file without the .gguf suffix is recognised by its magic; other files are not
    plain = tmp_path / "model.bin"
    shutil.copy(tiny_ggufs["gemma2"]["path"], plain)
    assert load_checkpoint(plain)[0].num_layers == 4
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    _one_line_error(other, "pass the checkpoint folder")


def test_big_endian_and_version(tiny_ggufs, tmp_path):
    data = bytearray(tiny_ggufs["gemma2"]["path"].read_bytes())
    be = tmp_path / "be.gguf"
    be.write_bytes(bytes(data[:4]) + (3).to_bytes(4, "big") + bytes(data[8:]))
    _one_line_error(be, "big-endian")
    v9 = tmp_path / "v9.gguf"
    v9.write_bytes(bytes(data[:4]) + (9).to_bytes(4, "little") + bytes(data[8:]))
    _one_line_error(v9, "version 9")


def test_split_shard_rejected(tmp_path):
    w = write_tiny_gguf(tmp_path / "m-00001-of-00002.gguf", "gemma2",
                        metadata={"split.count": 2, "split.no": 0})
    _one_line_error(w["path"], "split GGUF shard")


# ---- (e) tokenizer ---------------------------------------------------------------------------------
STRINGS = [
    "Hello world, how are you today?", "the  quick   brown    fox", "a\n\nb\n\n\nc", "  leading",
    "<start_of_turn>user\nwrite a short poem<end_of_turn>\n<start_of_turn>model\n",
    "numbers 1234 and 56789", "tabs\tand\ttabs", "emoji 😀 and 日本語", "<bos>literal<eos>",
    "def f(x):\n    return x + 1\n", "",
]


def test_tokenizer_rebuilt_like_original(tiny_ggufs, tmp_path):
    from contract.tokenizer import Tokenizer

    written = tiny_ggufs["gemma3"]
    out = write_tokenizer(written["path"], tmp_path / "tokenizer.model")
    assert not list(tmp_path.glob("*.tmp*"))
    original = sentencepiece.SentencePieceProcessor(model_file=str(written["spm"]))
    rebuilt = sentencepiece.SentencePieceProcessor(model_file=str(out))
    assert rebuilt.get_piece_size() == TINY_VOCAB
    for s in STRINGS:
        assert rebuilt.encode(s) == original.encode(s), s
    tok = Tokenizer(str(out))
    assert tok.encode("<start_of_turn>", add_bos=False) == [105]
    assert tok.encode("<end_of_turn>", add_bos=False) == [106]
    assert rebuilt.encode("  ") == [original.piece_to_id("\u2581\u2581")]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)


def test_tokenizer_byte_fallback(model_path, tmp_path):
    """The session's 360-piece model with byte fallback, through a GGUF and back."""
    w = write_tiny_gguf(tmp_path / "bf.gguf", "gemma2", spm=model_path)
    original = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    rebuilt = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model(w["path"]))
    for s in STRINGS:
        assert rebuilt.encode(s) == original.encode(s), s
    cfg, params = load_checkpoint(w["path"])
    assert cfg.vocab_size == original.get_piece_size() == params["embed"].shape[0]


def test_tokenizer_model_kind_rejected(tmp_path):
    import gguf

    path = tmp_path / "bpe.gguf"
    wr = gguf.GGUFWriter(str(path), arch="gemma3")
    wr.add_tokenizer_model("gpt2")
    wr.add_token_list(["a", "b"])
    wr.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with pytest.raises(CheckpointError, match="tokenizer.ggml.model is 'gpt2'") as info:
        sentencepiece_model(path)
    assert "\n" not in str(info.value)


def test_header_fields(tiny_ggufs):
    written = tiny_ggufs["gemma3"]
    f = GGUFFile(written["path"])
    assert f.fields["general.architecture"] == "gemma3"
    assert f.fields["tokenizer.ggml.tokens"] == written["tokens"]
    np.testing.assert_array_equal(f.fields["tokenizer.ggml.scores"],
                                  np.asarray(written["scores"], np.float32))
    assert f.tensors["token_embd.weight"].shape == (TINY_VOCAB, 64)
    assert f.tensors["blk.0.ffn_down.weight"].type_name == "Q6_K"
    assert f.raw("token_embd.weight").shape == (TINY_VOCAB, 64 // 32 * 34)
    for name, value in written["stored"].items():
        np.testing.assert_array_equal(f.read(name), value, err_msg=name)
    f.close()


def test_cli_unknown_architecture_exits_2(tmp_path, capsys):
    import gguf

    from export.cli import main as export_main

    path = tmp_path / "llama.gguf"
    wr = gguf.GGUFWriter(str(path), arch="llama")
    wr.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    assert export_main(["--checkpoint", str(path), "--target", "onnx", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported GGUF architecture 'llama'" in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("model", ["gemma3-tiny", "gemma2-tiny"])
def test_random_q4_0_gguf_round_trips_the_config(tmp_path, model):
    """tools/bench_scale.py's GGUF checkpoints (models/loaders/gguf_random.py): the metadata gives
    back the registry's config, every matmul and the table are Q4_0 blocks (carried by int4-b32),
    the norms load as the w of llama.cpp's w + 1, and the file is deterministic for a seed."""
    import dataclasses

    from models import get_config
    from models.loaders.gguf import config_from_gguf, load_gguf, source_blocks
    from models.loaders.gguf_random import save_random_gguf
    from models.params import param_shapes

    cfg = dataclasses.replace(get_config(model), vision=None)
    path = save_random_gguf(cfg, tmp_path / "a.gguf", seed=1)
    assert dataclasses.replace(config_from_gguf(path), name=cfg.name) == cfg
    assert not list(tmp_path.glob("*.tmp"))
    blocks = source_blocks(path, cfg)
    matmuls = [n for n, s in param_shapes(cfg).items() if len(s) == 2]
    assert sorted(blocks) == sorted(matmuls) and {b.kind for b in blocks.values()} == {"q4_0"}
    _, params = load_gguf(path, cfg)
    q = params["layers.0.attn.q"]
    assert 0.5 < q.std() * np.sqrt(q.shape[1]) < 2.0  # a trained layer's spread, not zeros or huge
    norm = params["layers.0.pre_attn_norm"]
    assert np.abs(norm).max() < 1.0 and np.abs(norm).std() > 0.01  # w, not w + 1
    again = save_random_gguf(cfg, tmp_path / "b.gguf", seed=1)
    assert path.read_bytes() == again.read_bytes()
