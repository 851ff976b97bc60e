"""onnxruntime-genai runs our Gemma 3 vision ONNX folder with images, unmodified: its processor
(processor_config.json), vision.onnx, embedding.onnx and the image prefill decoder
(export/lowering/onnx/multimodal.py). Oracles: the JAX model (float) and runtime_py on the same
folder (quantized).

onnxruntime-genai's Gemma 3 processor expands every image to 256 soft tokens, so these tests use
gemma3-vision-tiny's text model with a tower that gives 256 (112 x 112 pictures, 7 x 7 patches, no
pooling) and a context of 640."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from contract.prompt import encode_with_images, expand_image_tokens
from contract.tokenizer import Tokenizer
from export.driver import export
from export.options import ExportOptions
from models import get_config, init_params
from models.generate import generate
from models.vision import init_vision_params
from runtime_py import load
from runtime_py.image import preprocess

og = pytest.importorskip("onnxruntime_genai")

MAX_LEN, LENS, NEW = 640, (16, 640), 8


@pytest.fixture(scope="module")
def model():
    base = get_config("gemma3-vision-tiny")
    vision = dataclasses.replace(base.vision, image_size=112, tokens_per_image=256)
    cfg = dataclasses.replace(base, name="gemma3-vision-tiny256", vision=vision, max_seq_len=MAX_LEN)
    params = init_params(cfg, 40)
    params.update(init_vision_params(vision, cfg.embed_dim, 40))
    return cfg, params


@pytest.fixture(scope="module")
def folders(model, tokenizer_vision, tmp_path_factory):
    cfg, params = model
    out = tmp_path_factory.mktemp("genai_vision")
    options = ExportOptions(out_dir=out, max_len=MAX_LEN, prefill_lens=LENS, verify=False, tokenizer=tokenizer_vision)
    return {quant: export(cfg, params, "onnx", dataclasses.replace(options, quant=quant)).path
            for quant in (None, "int4-b32")}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """PNG files smaller than the 112 x 112 input (upscaled: onnxruntime-extensions' resize then
    equals Pillow's to the bit, docs/vision.md)."""
    from PIL import Image

    out = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(7)
    paths = []
    for i, (h, w) in enumerate([(37, 45), (60, 52)]):
        path = out / f"picture{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _jax(model, ids, paths, n=NEW):
    cfg, params = model
    images = [preprocess(p, cfg.vision.image_size) for p in paths]
    return generate(params, cfg, [ids], n, images=[images] if images else None, stop_tokens=(), max_len=MAX_LEN).tokens[0]


TEXT = "the <start_of_image> is a small one"
TWO = "<start_of_image> and <start_of_image> were good"


def test_folder_layout(folders, model):
    """The vision-language sections onnxruntime-genai reads, and the processor's settings."""
    cfg, _ = model
    folder = folders[None]
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    assert config["type"] == "gemma3"
    assert config["decoder"]["filename"] == "image_prefill.onnx"
    assert config["decoder"]["inputs"]["inputs_embeds"] == "inputs_embeds"
    assert config["vision"]["filename"] == "vision.onnx" and config["embedding"]["filename"] == "embedding.onnx"
    resize = json.loads((folder / "processor_config.json").read_text())["processor"]["transforms"][1]["operation"]
    assert resize["attrs"] == {"interpolation": "LINEAR", "width": 112, "height": 112, "keep_aspect_ratio": 0}


def test_genai_with_an_image_generates_the_jax_tokens(folders, model, pictures, tokenizer_vision):
    """onnxruntime-genai's own processor and generator: its prompt ids are ours (the image
    expanded to its 260 positions), its greedy tokens JAX's, its logits within the gate's
    tolerance; removing the image changes the answer."""
    from runtime_py.genai_engine import Engine

    cfg, params = model
    engine = Engine(folders[None])
    ours = encode_with_images(Tokenizer(tokenizer_vision), TEXT, cfg.vision)
    assert engine.prompt_tokens(TEXT, pictures[:1]) == expand_image_tokens(cfg.vision, ours)
    logits = []
    got = engine.generate(TEXT, pictures[:1], NEW, logits=logits)
    assert got == _jax(model, ours, pictures[:1])
    seq = expand_image_tokens(cfg.vision, ours) + got[:-1]
    images = [preprocess(pictures[0], cfg.vision.image_size)]
    want = _full_logits_with_images(params, cfg, seq, images)[len(seq) - len(got):]
    rel = np.sqrt(((np.stack(logits) - want) ** 2).mean(-1) / (want ** 2).mean(-1))
    assert rel.max() < 1e-4
    # the same text without the picture: another answer
    plain = "the  is a small one"
    assert engine.generate(plain, (), NEW) != got


def _full_logits_with_images(params, cfg, seq, images):
    """JAX logits at every position of `seq` (expanded ids) with the images spliced in."""
    import jax.numpy as jnp

    from models import forward, init_cache
    from models.vision import encode_images

    soft = np.concatenate([np.asarray(encode_images(params, cfg.vision, cfg.embed_dim, jnp.asarray(x)))
                           for x in images], axis=1)[0]
    emb = np.zeros((1, len(seq), cfg.embed_dim), np.float32)
    at = np.flatnonzero(np.array(seq) == cfg.vision.soft_token)
    emb[0, at] = soft[: len(at)]
    cache = init_cache(cfg, 1, MAX_LEN)
    logits, _ = forward(params, cfg, jnp.asarray([seq], jnp.int32), jnp.zeros((1,), jnp.int32), cache,
                        jnp.full((1,), len(seq), jnp.int32), embeddings=jnp.asarray(emb))
    return np.asarray(logits[0], np.float32)


def test_genai_with_two_images(folders, model, pictures, tokenizer_vision):
    cfg, _ = model
    from runtime_py.genai_engine import Engine

    ours = encode_with_images(Tokenizer(tokenizer_vision), TWO, cfg.vision)
    got = Engine(folders[None]).generate(TWO, pictures, NEW)
    assert got == _jax(model, ours, pictures)
    # the pictures swapped: each reaches its own place, as in JAX
    assert Engine(folders[None]).generate(TWO, pictures[::-1], NEW) == _jax(model, ours, pictures[::-1])


def test_quantized_folder_matches_runtime_py(folders, model, pictures, tokenizer_vision):
    """int4-b32 (MatMulNBits in the decoder and the tower, attention in standard ops): the greedy
    tokens onnxruntime-genai generates with an image equal runtime_py's on the same folder."""
    import onnx

    from runtime_py.genai_engine import Engine

    cfg, _ = model
    folder = folders["int4-b32"]
    body = onnx.load(str(folder / "vision.onnx"), load_external_data=False).graph.node[0].attribute[0].g
    assert "MatMulNBits" in {n.op_type for n in body.node}
    ours = encode_with_images(Tokenizer(tokenizer_vision), TEXT, cfg.vision)
    want = load(folder).generate(ours, NEW, images=[str(pictures[0])])
    assert Engine(folder).generate(TEXT, pictures[:1], NEW) == want


def test_runtime_cli_engine_genai(folders, pictures, tokenizer_vision, capsys):
    """python -m runtime_py generate --engine genai prints what runtime_py prints for the same
    folder, prompt and image."""
    from runtime_py.__main__ import main as runtime_main

    args = ["generate", "--artifact", str(folders[None]), "--prompt", TEXT, "--image", str(pictures[0]),
            "--max-new-tokens", str(NEW), "--raw"]
    assert runtime_main(args) == 0
    ours = capsys.readouterr().out
    assert runtime_main([*args, "--engine", "genai"]) == 0
    assert capsys.readouterr().out == ours


def test_genai_processor_pixels_equal_ours(folders, model, pictures):
    """onnxruntime-genai's processor (our processor_config.json) gives runtime_py's pixels, to the
    bit, on upscaled PNGs (downscaling and JPEG decoding differ slightly: tools/bench_preprocess.py,
    docs/vision.md)."""
    cfg, _ = model
    processor = og.Model(str(folders[None])).create_multimodal_processor()
    for path in pictures:
        got = processor("<start_of_image>", images=og.Images.open(str(path)))["pixel_values"].as_numpy()
        np.testing.assert_array_equal(got, preprocess(path, cfg.vision.image_size).transpose(0, 3, 1, 2))


def test_image_markers_in_tokenizer_json(tokenizer_256, tokenizer_vision, model, tmp_path):
    """The exported tokenizer.json gets `<image_soft_token>` at the model's id when the
    SentencePiece model lacks it (Gemma 3's does: Hugging Face adds it as 262144); a tokenizer
    that gives the markers' ids to other pieces is refused in one line."""
    from export.tokenizer_files import add_image_tokens, write_tokenizer_files

    cfg, _ = model
    write_tokenizer_files(tokenizer_vision, tmp_path / "ok")
    assert not add_image_tokens(tmp_path / "ok", cfg.vision)  # all three there already
    # a tokenizer without the soft token, whose id is the next after its pieces (as 262144 in Gemma 3)
    path = tmp_path / "ok" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<image_soft_token>"]
    data["model"]["vocab"].pop("<image_soft_token>", None)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="cannot take it at the model's id 300 .its next id is 255"):
        add_image_tokens(tmp_path / "ok", dataclasses.replace(cfg.vision, soft_token=300))
    assert add_image_tokens(tmp_path / "ok", cfg.vision)  # 255: the next id
    added = {t["content"]: t["id"] for t in json.loads(path.read_text())["added_tokens"]}
    assert added["<image_soft_token>"] == 255 and added["<start_of_image>"] == 253
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(path))
    assert hf.encode("<start_of_image><image_soft_token><end_of_image>", add_special_tokens=False).ids == [253, 255, 254]
    write_tokenizer_files(tokenizer_256, tmp_path / "bad")
    with pytest.raises(ValueError, match="gives id 253 to .* but the model's <start_of_image> is 253"):
        add_image_tokens(tmp_path / "bad", cfg.vision)
