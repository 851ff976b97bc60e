"""Shared fixtures: jitted model calls and tiny random Hugging Face checkpoints (the oracle)."""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sentencepiece  # noqa: E402

from models.cache import init_cache  # noqa: E402
from models.model import forward  # noqa: E402

FAMILIES = ("gemma2", "gemma3", "recurrentgemma")


@pytest.fixture(scope="session", autouse=True)
def _own_weight_cache(tmp_path_factory):
    """XNNPACK weight caches (runtime_py/tflite_backend.py) go to the session's temporary folder,
    not the user's ~/.cache/gemma-edge (kept up to 16 GB there), capped at 1 GB (each load removes
    the least recently used others past it): a suite run leaves none behind, never reads one a
    previous run left, and holds 2 GB of them at most (the real 270M's f32 bundle: its cache and
    section copy) instead of 4.3 GB. Subprocesses inherit
    both settings through the environment."""
    saved = {k: os.environ.get(k) for k in ("GEMMA_EDGE_CACHE", "GEMMA_EDGE_CACHE_MAX_GB")}
    folder = tmp_path_factory.mktemp("weight-cache")
    os.environ["GEMMA_EDGE_CACHE"] = str(folder)
    os.environ["GEMMA_EDGE_CACHE_MAX_GB"] = "1"
    yield folder
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
TINY = {f: f"{f}-tiny" for f in FAMILIES}


@functools.partial(jax.jit, static_argnums=(1,))
def jit_forward(params, cfg, tokens, start, cache, num_valid):
    return forward(params, cfg, tokens, start, cache, num_valid)


def full_logits(params, cfg, tokens, max_len=64):
    """Logits of a whole sequence: one prefill at position 0 into a fresh cache. [B, T, V]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    cache = init_cache(cfg, b, max_len)
    logits, _ = jit_forward(params, cfg, tokens, jnp.zeros(b, jnp.int32), cache,
                            jnp.full(b, t, jnp.int32))
    return np.asarray(logits)


def random_tokens(n, vocab=256, seed=0, batch=1):
    return np.random.default_rng(seed).integers(3, vocab, (batch, n)).astype(np.int32)


# ---- Hugging Face oracle ------------------------------------------------------------------------
def hf_config(family: str, **overrides):
    """A transformers config with the same architecture as our `{family}-tiny`."""
    import transformers as tf

    if family == "gemma2":
        kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=5.0,
                  final_logit_softcapping=3.0, max_position_embeddings=128)
        return tf.Gemma2Config(**{**kw, **overrides})
    if family == "gemma3":
        kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  query_pre_attn_scalar=16, sliding_window=8, max_position_embeddings=128,
                  rope_parameters={
                      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
        return tf.Gemma3TextConfig(**{**kw, **overrides})
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=2 * 192, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=1, attention_window_size=8)
    return tf.RecurrentGemmaConfig(**{**kw, **overrides})


def hf_model(family: str, seed: int = 0, **overrides):
    """A tiny random HF causal LM (fp32, eager attention) with weights large enough that every
    feature matters: norm scales ~ N(0, 0.1) instead of HF's zeros, weights ~ N(0, 1/fan_in)."""
    import torch
    import transformers as tf

    cls = {"gemma2": tf.Gemma2ForCausalLM, "gemma3": tf.Gemma3ForCausalLM,
           "recurrentgemma": tf.RecurrentGemmaForCausalLM}[family]
    cfg = hf_config(family, **overrides)
    cfg._attn_implementation = "eager"  # soft-capping needs eager attention
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / np.sqrt(p.shape[-1]))
            else:
                p.normal_(0.0, 0.05)
    model.generation_config.eos_token_id = None  # random models: generate the full length
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{family: (folder, torch model)}: tiny random HF models saved with save_pretrained."""
    out = {}
    for family in FAMILIES:
        model = hf_model(family)
        folder = tmp_path_factory.mktemp(f"hf-{family}")
        model.save_pretrained(folder)
        out[family] = (folder, model)
    return out


# ---- a tiny Gemma-style SentencePiece model -------------------------------------------------------
_WORDS = (
    "the a an quick brown fox jumps over lazy dog model user hello world how are "
    "you today I am fine thank what is your name my tokenizer test gemma chat "
    "turn write short poem about sea sky river answer question please explain "
    "why this that it was good bad small large number one two three"
).split()


def tiny_corpus(n_lines: int = 400) -> list[str]:
    """A deterministic English-ish corpus for training the tiny model."""
    rng = random.Random(1234)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice(".?!,"))
    return lines


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """Path of a tiny Gemma-style SentencePiece model trained for the session."""
    out = tmp_path_factory.mktemp("spm")
    prefix = out / "tiny"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()),
        model_prefix=str(prefix),
        # byte_fallback reserves 256 byte pieces, so the vocab must exceed
        # 256 + meta pieces + corpus characters (about 300).
        vocab_size=360,
        model_type="bpe",
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        num_threads=1,
        minloglevel=2,
    )
    return out / "tiny.model"


@pytest.fixture(scope="session")
def tokenizer_256(tmp_path_factory):
    """A SentencePiece model of at most 256 pieces, no byte fallback: it fits the tiny random
    configs' vocabulary (256), so a tiny model can be bundled with it (.litertlm)."""
    out = tmp_path_factory.mktemp("spm256")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_prefix=str(out / "tiny256"), vocab_size=256,
        hard_vocab_limit=False, model_type="bpe", add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, byte_fallback=False, pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], num_threads=1, minloglevel=2)
    return out / "tiny256.model"


@pytest.fixture(scope="session")
def tokenizer_vision(tokenizer_256, tmp_path_factory):
    """tokenizer_256 with the pieces Gemma 3's image prompts need at gemma3-vision-tiny's ids, as
    LiteRT-LM's and onnxruntime-genai's Gemma 3 processors write them in text: 108 "\n\n",
    253 <start_of_image>, 254 <end_of_image>, 255 <image_soft_token> (user-defined pieces, matched
    whole in text). They replace four rare pieces (O, R, E, lo), so test prompts avoid those."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb

    proto = spm_pb.ModelProto()
    proto.ParseFromString(Path(tokenizer_256).read_bytes())
    while len(proto.pieces) < 256:
        extra = proto.pieces.add()
        extra.piece, extra.type, extra.score = f"<unused{len(proto.pieces)}>", spm_pb.ModelProto.SentencePiece.USER_DEFINED, 0
    for i, piece in {108: "\n\n", 253: "<start_of_image>", 254: "<end_of_image>", 255: "<image_soft_token>"}.items():
        proto.pieces[i].piece, proto.pieces[i].type, proto.pieces[i].score = piece, spm_pb.ModelProto.SentencePiece.USER_DEFINED, 0
    out = tmp_path_factory.mktemp("spm_vision") / "tokenizer.model"
    out.write_bytes(proto.SerializeToString())
    return out


@pytest.fixture(scope="session")
def vision_tiny():
    """gemma3-vision-tiny with random weights, seed 40: its greedy text after the tests' prompts
    varies and depends on the images (most random tiny models repeat one or two tokens whatever
    they see; seeds 0-39 do). (cfg, params)."""
    from models import get_config, init_params
    from models.vision import init_vision_params

    cfg = get_config("gemma3-vision-tiny")
    params = init_params(cfg, 40)
    params.update(init_vision_params(cfg.vision, cfg.embed_dim, 40))
    return cfg, params


def randomize_vlm(model):
    """Give a Gemma3ForConditionalGeneration non-trivial random weights in place: SigLIP LayerNorm
    gains around 1, their biases and Gemma RMSNorm (1 + w) scales around 0, matrices ~ N(0, 1/fan_in),
    other vectors small."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                gain = name.startswith("model.vision_tower.") and name.endswith("weight")
                p.normal_(1.0 if gain else 0.0, 0.1)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / np.sqrt(p.shape[-1]))
            else:
                p.normal_(0.0, 0.05)
    return model


def quantized_payloads(path) -> tuple[list[bytes], list[bytes]]:
    """(code bytes, scale bytes) of every block-quantized weight of an artifact, in our
    BlockQuantized encodings: TFLite INT4 tensors as stored; ONNX MatMulNBits /
    GatherBlockQuantized initializers of 4 and 8 bits (fused q/k/v and gate/up tensors hold their
    members' rows back to back) with the scales as f32."""
    import onnx

    path = Path(path)
    if path.suffix == ".tflite":
        from export.quantize.tflite import _int4_tensors

        buf = bytearray(path.read_bytes())
        pairs = [(bytes(c), bytes(s)) for _n, _shape, c, s, _b in _int4_tensors(buf)]
        return [c for c, _ in pairs], [s for _, s in pairs]
    model = onnx.load(path / "model.onnx")
    arrays = {t.name: onnx.numpy_helper.to_array(t, base_dir=str(path)) for t in model.graph.initializer}
    codes = [a.tobytes() for n, a in arrays.items() if ".q4" in n or ".q8" in n]
    scales = [a.tobytes() for n, a in arrays.items() if ".scales" in n and a.dtype == np.float32 and a.ndim == 2]
    return codes, scales
