"""A `.litertlm` bundle of Gemma 3 with vision runs with images in LiteRT-LM itself and in runtime_py,
the same file (contract/bundle.py, docs/litertlm.md "Gemma 3 with images"): LiteRT-LM's greedy text
after an image equals the JAX model's, with one image and with two, the image matters, a quantized
bundle matches runtime_py on the same file, and runtime_py on the bundle equals JAX.
gemma3-vision-tiny, random weights (seed 40: greedy text that depends on the image), the
`tokenizer_vision` fixture (image pieces at the tiny model's ids; prompts avoid O, R, E and "lo")."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("litert_lm")

from contract.bundle import EMBEDDER, PREFILL_DECODE, VISION_ADAPTER, VISION_ENCODER, read_bundle  # noqa: E402
from contract.metadata import ImageLayout  # noqa: E402
from contract.prompt import encode_with_images, expand_image_tokens  # noqa: E402
from contract.tokenizer import Tokenizer  # noqa: E402
from export.driver import export  # noqa: E402
from export.options import ExportOptions  # noqa: E402
from models.generate import generate  # noqa: E402
from runtime_py import load  # noqa: E402
from runtime_py.image import preprocess  # noqa: E402
from runtime_py.litertlm_engine import Engine, image_content  # noqa: E402
from verify.engine import image_prompt, litert_lm_chunks, litert_lm_ids  # noqa: E402

MAX_LEN, STEPS = 64, 12


@pytest.fixture(scope="module")
def model(vision_tiny):
    return vision_tiny


@pytest.fixture(scope="module")
def bundles(model, tokenizer_vision, tmp_path_factory):
    """f32 and dynamic-int8 bundles with one prefill length, as a vision bundle's default (the
    context, here), so LiteRT-LM prefills every test prompt in one chunk."""
    cfg, params = model
    out = tmp_path_factory.mktemp("litertlm_vision")
    options = dict(out_dir=out, max_len=MAX_LEN, prefill_lens=(MAX_LEN,), tokenizer=tokenizer_vision, verify=False)
    return {"f32": export(cfg, params, "litertlm", ExportOptions(**options)).path,
            "int8": export(cfg, params, "litertlm", ExportOptions(**options, quant="dynamic-int8")).path}


@pytest.fixture(scope="module")
def engine(bundles):
    e = Engine(bundles["f32"], max_num_images=2)
    yield e
    e.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """PNG files at the encoder's size (28): LiteRT-LM's resize (stb) and ours (Pillow) are then both
    the identity, so both runtimes see the same pixels."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    paths = []
    for k in range(3):
        path = folder / f"image{k}.png"
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _jax_text(model, tok, text, paths):
    cfg, params = model
    ids = encode_with_images(tok, text, cfg.vision)
    pixels = [preprocess(p, cfg.vision.image_size) for p in paths]
    return ids, pixels, tok.decode(generate(params, cfg, [ids], STEPS, images=[pixels], stop_tokens=(1,)).tokens[0])


def _same_ids(engine, tok, layout, text):
    """LiteRT-LM prefills exactly our expanded ids: its text pieces tokenize as ours, and its
    processor's layout (pieces, soft rows, the adapter's eoi row) is contract/prompt.py's."""
    ours = expand_image_tokens(layout, encode_with_images(tok, text, layout))
    assert litert_lm_ids(tok, layout, text) == ours
    for piece in text.split("<start_of_image>"):
        if piece:
            assert engine.tokenize(piece) == tok.encode(piece, add_bos=False)
    assert litert_lm_chunks([MAX_LEN], len(ours)) == [len(ours)]  # one prefill chunk: no image split


def test_bundle_sections_and_metadata(bundles, model):
    cfg, _ = model
    bundle = read_bundle(bundles["f32"])
    types = [s.items.get("model_type") for s in bundle.sections if s.data_type == "TFLiteModel"]
    assert types == [PREFILL_DECODE, EMBEDDER, VISION_ENCODER, VISION_ADAPTER] and bundle.embedded
    g = bundle.llm_metadata().llm_model_type.gemma3
    assert (g.start_of_image_token.token_str, g.end_of_image_token.token_str) == ("<start_of_image>", "<end_of_image>")
    assert g.image_tensor_height == g.image_tensor_width == 28
    assert "<start_of_image>" in bundle.llm_metadata().jinja_prompt_template
    session = load(bundles["f32"])
    assert set(session.signatures) == {"prefill_64", "decode", "image_prefill_64", "vision_encoder"}
    assert session.vision == ImageLayout.of(cfg.vision)
    # the decoder itself takes flagged embeddings and no token ids
    from contract.tflite import read_tflite

    flat, _ = read_tflite(bundles["f32"])
    assert [(n, tuple(s)) for n, s, _ in flat["prefill_64"].inputs[:2]] == [("embeddings", (1, 64, 65)),
                                                                          ("input_pos", (64,))]


def test_litert_lm_with_an_image_equals_jax(engine, bundles, model, tokenizer_vision, images):
    """LiteRT-LM with an image file continues the prompt exactly as the JAX model does; runtime_py on
    the same bundle too; and the image matters (none, or another one, changes the text)."""
    cfg, _ = model
    tok = Tokenizer(tokenizer_vision)
    text = "the <start_of_image> what is the"
    _same_ids(engine, tok, ImageLayout.of(cfg.vision), text)
    ids, pixels, want = _jax_text(model, tok, text, images[:1])
    assert len(set(want)) > 3
    assert engine.generate(text, images[:1], STEPS) == want
    assert tok.decode(load(bundles["f32"]).generate(ids, STEPS, images=pixels, stop_tokens=(1,))) == want
    assert engine.generate(text, images[1:2], STEPS) != want
    assert engine.generate("the  what is the", [], STEPS) != want


def test_litert_lm_with_two_images_equals_jax(engine, model, tokenizer_vision, images):
    cfg, _ = model
    tok = Tokenizer(tokenizer_vision)
    text = "the <start_of_image> and <start_of_image> the"
    _same_ids(engine, tok, ImageLayout.of(cfg.vision), text)
    _, _, want = _jax_text(model, tok, text, images[:2])
    assert engine.generate(text, images[:2], STEPS) == want
    assert engine.generate(text, images[1::-1], STEPS) != want


def test_quantized_bundle_matches_runtime_py(bundles, model, tokenizer_vision, images):
    """dynamic-int8 (decoder, embedder, encoder and adapter weights): LiteRT-LM's text with an image
    equals runtime_py's on the same file."""
    cfg, _ = model
    tok = Tokenizer(tokenizer_vision)
    text = "the <start_of_image> what is the"
    ids = encode_with_images(tok, text, cfg.vision)
    session = load(bundles["int8"])
    want = tok.decode(session.generate(ids, STEPS, images=[preprocess(images[0], 28)], stop_tokens=(1,)))
    e = Engine(bundles["int8"], max_num_images=1)
    try:
        assert e.generate(text, images[:1], STEPS) == want
    finally:
        e.close()


def test_streamed_reply_and_kept_weight_cache(bundles, tokenizer_vision, images, tmp_path):
    """generate(on_token=) streams the same text piece by piece; cache_dir keeps LiteRT-LM's XNNPACK
    weight caches (decoder, encoder, adapter) after close(), and a second engine on them agrees."""
    text = "the <start_of_image> what is the"
    cache = tmp_path / "cache"
    e = Engine(bundles["int8"], max_num_images=1, cache_dir=cache)
    try:
        want = e.generate(text, images[:1], STEPS)
        pieces = []
        assert e.generate(text, images[:1], STEPS, on_token=lambda: pieces.append(1)) == want
        assert 1 < len(pieces) <= STEPS
    finally:
        e.close()
    kept = {p.name.rsplit(".", 2)[-2] for p in cache.iterdir() if p.name.endswith(".xnnpack_cache")}
    assert {"vision_encoder", "vision_adapter"} <= kept and len(kept) >= 3, kept
    e = Engine(bundles["int8"], max_num_images=1, cache_dir=cache)
    try:
        assert e.generate(text, images[:1], STEPS) == want
    finally:
        e.close()


def test_image_content_and_chunks(images):
    a, b = (str(p) for p in images[:2])
    assert image_content("x <start_of_image> y", [a]) == [
        {"type": "text", "text": "x "}, {"type": "image", "path": a}, {"type": "text", "text": " y"}]
    assert [i["type"] for i in image_content("y", [a, b])] == ["image", "image", "text"]
    with pytest.raises(ValueError, match="2 <start_of_image> marker.*1 image"):
        image_content("<start_of_image><start_of_image>", [a])
    # LiteRT-LM's CPU chunking: the longest length while it fits, the rest cascading down
    assert litert_lm_chunks([8, 16], 12) == [8, 4]
    assert litert_lm_chunks([32, 1024], 300) == [32] * 9 + [12]
    assert litert_lm_chunks([64], 20) == [20]


def test_gate_image_prompt_keeps_the_image_in_one_chunk(model, tokenizer_vision):
    cfg, _ = model
    tok, layout = Tokenizer(tokenizer_vision), ImageLayout.of(cfg.vision)
    for lens in ([8, 16], [8, 32], [64]):
        text = image_prompt(tok, layout, lens, 50)
        assert text is not None and "<start_of_image>" in text
    assert image_prompt(tok, layout, [4], 50) is None  # every chunk is shorter than the image


def test_runtime_cli_engine_litertlm(bundles, images, capsys):
    """python -m runtime_py generate --engine litertlm prints what runtime_py prints for the same
    bundle, prompt and image; --pan-and-scan is refused there (LiteRT-LM takes one view per image)."""
    from runtime_py.__main__ import main as runtime_main

    args = ["generate", "--artifact", str(bundles["f32"]), "--prompt", "the <start_of_image> what is the",
            "--image", str(images[0]), "--max-new-tokens", str(STEPS), "--raw"]
    assert runtime_main(args) == 0
    ours = capsys.readouterr().out
    assert runtime_main([*args, "--engine", "litertlm"]) == 0
    assert capsys.readouterr().out == ours
    assert runtime_main([*args, "--engine", "litertlm", "--pan-and-scan"]) == 2
    assert "drop --pan-and-scan" in capsys.readouterr().err
