"""Gemma 3 with images, exported (models/signatures.py: vision_encoder, image_prefill_{T}; ONNX:
vision_encoder.onnx, image_prefill.onnx): both targets pass the parity gate with image prompts,
greedy generation after images matches the JAX model, the CLIs take images, and bad input is a
clear error. gemma3-vision-tiny, random weights."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from contract.metadata import ImageLayout
from contract.prompt import expand_image_tokens
from export.cli import main as export_main
from export.driver import export
from export.options import ExportOptions
from models import get_config, init_params
from models.generate import generate
from runtime_py import load
from runtime_py.__main__ import main as runtime_main
from verify import gate_for, parity, reference_session

MAX_LEN, LENS = 64, [8, 16]


@pytest.fixture(scope="module")
def model(vision_tiny):
    return vision_tiny


@pytest.fixture(scope="module")
def artifacts(model, tmp_path_factory):
    cfg, params = model
    out = tmp_path_factory.mktemp("vision_export")
    options = ExportOptions(out_dir=out, max_len=MAX_LEN, prefill_lens=tuple(LENS), verify=False)
    tfl = export(cfg, params, "tflite", options).path
    onnx = export(cfg, params, "onnx", dataclasses.replace(options, onnx_ops="standard")).path
    return {"tflite": tfl, "onnx": onnx}


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (1, 28, 28, 3)).astype(np.float32) for _ in range(n)]


def _prompt(cfg, seed=0):
    """Text, an image, text, an image, text past the sliding window (8)."""
    rng = np.random.default_rng(seed)
    v = cfg.vision
    return [2, *rng.integers(3, 250, 5).tolist(), v.boi_token, *rng.integers(3, 250, 3).tolist(), v.boi_token,
            *rng.integers(3, 250, 11).tolist()]


def test_tflite_signatures(artifacts, model):
    cfg, _ = model
    session = load(artifacts["tflite"])
    sigs = session.signatures
    assert set(sigs) == {"prefill_8", "prefill_16", "decode", "vision_encoder", "image_prefill_8", "image_prefill_16"}
    assert [(t.name, t.shape) for t in sigs["vision_encoder"].inputs] == [("image", (1, 28, 28, 3))]
    assert [(t.name, t.shape) for t in sigs["vision_encoder"].outputs] == [("soft_tokens", (1, 4, 64))]
    inputs = {t.name: t.shape for t in sigs["image_prefill_16"].inputs}
    assert (inputs["tokens"], inputs["input_pos"], inputs["embeddings"]) == ((1, 16), (16,), (1, 16, 64))
    # the image prefill carries exactly the text prefill's states
    assert sigs["image_prefill_16"].state_inputs == sigs["prefill_16"].state_inputs
    assert session.vision == ImageLayout.of(cfg.vision)


@pytest.mark.parametrize("target", ["tflite", "onnx"])
def test_parity_gate_with_images(artifacts, model, target):
    """The exported encoder and image prefill against the JAX model: soft tokens and logits of every
    prefill chunk and 12 decode steps (relative RMS 1e-4, greedy identical)."""
    from export.targets import TARGETS

    cfg, params = model
    reference = reference_session(cfg, params, LENS, MAX_LEN, TARGETS[target].attention)
    session = load(artifacts[target])
    prompts = [_prompt(cfg, 0), [2, cfg.vision.boi_token, 7, 9]]
    report = parity(reference, session, prompts, 12, images=[_images(2, 1), _images(1, 2)])
    assert gate_for(target, None).failures(report) == [], report.worst()
    assert len(report.encoder) == 3 and max(e["rel_rms"] for e in report.encoder) < 1e-5
    used = {s.signature for s in report.steps}
    if target == "tflite":
        assert {"image_prefill_16", "decode"} <= used
    # no chunk splits an image: every chunk boundary lies outside the soft-token runs
    from contract.prompt import soft_runs

    ids = expand_image_tokens(cfg.vision, prompts[0])
    bounds = np.cumsum([take for _, take in session.image_chunks(ids)])
    assert bounds[-1] == len(ids)
    assert not any(s < b < e for s, e in soft_runs(cfg.vision, ids) for b in bounds)
    assert sum(s.signature == "decode" for s in report.steps) == 24


@pytest.mark.parametrize("target", ["tflite", "onnx"])
def test_greedy_after_images_matches_jax(artifacts, model, target):
    cfg, params = model
    prompt, images = _prompt(cfg, 3), _images(2, 4)
    want = generate(params, cfg, [prompt], 20, images=[images], stop_tokens=()).tokens[0]
    assert len(set(want)) > 5
    session = load(artifacts[target])
    assert session.generate(prompt, 20, images=images) == want
    # the same prompt already expanded gives the same tokens
    assert session.generate(expand_image_tokens(cfg.vision, prompt), 20, images=images) == want
    # and the images matter
    assert session.generate(prompt, 20, images=images[::-1]) != want


def test_image_errors(artifacts, model, tmp_path):
    cfg, _ = model
    session = load(artifacts["tflite"])
    with pytest.raises(ValueError, match="2 image place.*1 image"):
        session.generate(_prompt(cfg), 4, images=_images(1))
    text_only = export(get_config("gemma3-tiny"), init_params(get_config("gemma3-tiny"), 0), "tflite",
                       ExportOptions(out_dir=tmp_path, max_len=32, prefill_lens=(8,), verify=False)).path
    with pytest.raises(ValueError, match="no vision encoder"):
        load(text_only).generate([2, 5], 4, images=_images(1))


def test_cli_exports_both_targets_with_images(tmp_path, capsys):
    """python -m export on a model with vision: the gate's image prompt (recorded in parity.json); ONNX
    picks the standard op set by itself; an explicit GroupQueryAttention op set is refused; prefill
    lengths that cannot hold an image are refused; --no-vision exports text only."""
    common = ["--model", "gemma3-vision-tiny", "--random-init", "0", "--max-seq-len", "64", "--verify-steps", "8",
              "--out", str(tmp_path)]
    assert export_main([*common, "--target", "tflite", "--prefill-lens", "8,16"]) == 0
    report = json.loads((tmp_path / "gemma3-vision-tiny_f32_ctx64.parity.json").read_text())
    assert report["passed"] and len(report["encoder"]) == 2
    assert any(s["signature"].startswith("image_prefill_") for s in report["steps"])
    assert export_main([*common, "--target", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "--onnx-ops standard" in out and "vision.onnx" in out and "embedding.onnx" in out
    folder = tmp_path / "gemma3-vision-tiny_f32_ctx64_standard_onnx"
    assert json.loads((folder / "parity.json").read_text())["passed"]
    assert export_main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "vision.onnx" in out and "pixel_values['num_images', 3, 28, 28]" in out
    assert "inputs_embeds[1, 'sequence_length', 64]" in out
    assert export_main(["inspect", str(tmp_path / "gemma3-vision-tiny_f32_ctx64.tflite")]) == 0
    out = capsys.readouterr().out
    assert "signature vision_encoder: image[1, 28, 28, 3] -> soft_tokens[1, 4, 64]" in out
    assert "signature image_prefill_16: tokens[1, 16] input_pos[16] embeddings[1, 16, 64]" in out
    assert export_main([*common, "--target", "onnx", "--onnx-ops", "default"]) == 2
    assert "GroupQueryAttention" in capsys.readouterr().err
    assert export_main([*common, "--target", "tflite", "--prefill-lens", "2,3"]) == 2
    assert "prefill length of at least 4" in capsys.readouterr().err
    assert export_main([*common, "--target", "tflite", "--prefill-lens", "8", "--no-vision", "--no-verify"]) == 0
    assert "vision_encoder" not in load(tmp_path / "gemma3-vision-tiny_f32_ctx64.tflite").signatures


def test_runtime_cli_generates_from_an_image_file(artifacts, model, tokenizer_256, tmp_path, capsys):
    """python -m runtime_py generate --image: the PNG is preprocessed (runtime_py.image) and placed
    at the prompt's marker; the text equals the JAX model's greedy text for the same pixels."""
    from PIL import Image

    from contract.prompt import encode_with_images
    from contract.tokenizer import Tokenizer
    from runtime_py.image import preprocess

    cfg, params = model
    rng = np.random.default_rng(7)
    png = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(png)
    tok = Tokenizer(tokenizer_256)
    text = "Look at this <start_of_image> and tell me a story about it"
    ids = encode_with_images(tok, text, cfg.vision)
    assert ids.count(cfg.vision.boi_token) == 1 and ids[0] == 2
    want = generate(params, cfg, [ids], 12, images=[[preprocess(png, 28)]], stop_tokens=(1,)).tokens[0]
    capsys.readouterr()
    rc = runtime_main(["generate", "--artifact", str(artifacts["tflite"]), "--tokenizer", str(tokenizer_256),
                       "--image", str(png), "--prompt", text, "--max-new-tokens", "12"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.rstrip("\n") == tok.decode(want)
    assert "(1 images)" in captured.err
    # no marker: the image goes first
    assert runtime_main(["generate", "--artifact", str(artifacts["onnx"]), "--tokenizer", str(tokenizer_256),
                         "--image", str(png), "--prompt", "a story", "--max-new-tokens", "4"]) == 0
    # a marker without an image, and a file that is not an image: one line, exit 2
    assert runtime_main(["generate", "--artifact", str(artifacts["tflite"]), "--tokenizer", str(tokenizer_256),
                         "--prompt", text]) == 2
    assert "but no image was given" in capsys.readouterr().err
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert runtime_main(["generate", "--artifact", str(artifacts["tflite"]), "--tokenizer", str(tokenizer_256),
                         "--image", str(bad), "--prompt", text]) == 2
    assert "not an image" in capsys.readouterr().err


def test_litertlm_bundle_of_a_vision_model_runs_in_litert_lm(tmp_path, tokenizer_vision, tokenizer_256, capsys):
    """The bundle of a model with vision runs in LiteRT-LM with images (tests/test_litertlm_vision.py):
    the export's engine check runs text and an image prompt that LiteRT-LM prefills without
    splitting the image (prefill lengths 8 and 16 here), and runtime_py runs the same file with
    the image signatures. A tokenizer without the image pieces is refused."""
    common = ["--model", "gemma3-vision-tiny", "--random-init", "0", "--target", "litertlm", "--out", str(tmp_path),
              "--max-seq-len", "64", "--prefill-lens", "8,16", "--verify-steps", "8"]
    rc = export_main([*common, "--tokenizer", str(tokenizer_vision)])
    assert rc == 0
    report = json.loads((tmp_path / "gemma3-vision-tiny_f32_ctx64.parity.json").read_text())
    assert report["passed"] and report["litert_lm"]["match"] and len(report["encoder"]) == 2
    assert report["litert_lm"]["image"]["match"] and report["litert_lm"]["image"]["images"] == 1
    assert "vision_encoder" in load(tmp_path / "gemma3-vision-tiny_f32_ctx64.litertlm").signatures
    capsys.readouterr()
    assert export_main([*common, "--tokenizer", str(tokenizer_256)]) == 2
    assert "image layout needs" in capsys.readouterr().err


def test_pad_for_blocks_is_exact(model):
    """Blockwise recipes need contraction widths divisible by the block: the tower's patch width
    (147 here, 588 in Gemma 3) and MLP width are zero-padded, which changes no soft token."""
    import jax

    from models.vision import encode_images, pad_for_blocks

    cfg, params = model
    v = cfg.vision
    padded = pad_for_blocks(params, v, 32)
    assert padded["vision.patch_embed.w"].shape == (32, 160) and padded["vision.layers.0.mlp.fc1.w"].shape == (64, 32)
    wide = pad_for_blocks(params, v, 128)
    assert wide["vision.layers.1.mlp.fc1.w"].shape == (128, 32) and wide["vision.layers.1.mlp.fc2.w"].shape == (32, 128)
    images = np.concatenate(_images(2, 9))
    run = jax.jit(encode_images, static_argnums=(1, 2))
    want = np.asarray(run(params, v, cfg.embed_dim, images))
    for p in (padded, wide):
        np.testing.assert_allclose(np.asarray(run(p, v, cfg.embed_dim, images)), want, rtol=1e-5, atol=1e-6)


def test_quantized_exports_with_vision(tmp_path, capsys):
    """int4-b32 on TFLite quantizes the padded tower too and keeps the image signatures (the gate
    runs; on random weights it only warns); ONNX with images runs fp16 and the integer recipes
    (contrib quantized matmuls beside standard attention: tests/test_genai_vision.py runs int4-b32),
    but an explicit --onnx-ops standard (no contrib op) refuses them with the fix."""
    common = ["--model", "gemma3-vision-tiny", "--random-init", "0", "--max-seq-len", "64", "--verify-steps", "8",
              "--prefill-lens", "8,16", "--out", str(tmp_path)]
    assert export_main([*common, "--target", "tflite", "--quant", "int4-b32"]) == 0
    report = json.loads((tmp_path / "gemma3-vision-tiny_int4-b32_ctx64.parity.json").read_text())
    assert len(report["encoder"]) == 2 and report["encoder"][0]["rel_rms"] > 1e-4  # quantized, so measurable
    session = load(tmp_path / "gemma3-vision-tiny_int4-b32_ctx64.tflite")
    assert "vision_encoder" in session.signatures and "image_prefill_16" in session.signatures
    assert export_main([*common, "--target", "onnx", "--quant", "fp16"]) == 0
    assert json.loads((tmp_path / "gemma3-vision-tiny_fp16_ctx64_standard_onnx" / "parity.json").read_text())["passed"]
    capsys.readouterr()
    # dynamic-int8: int8 MatMulNBits needs widths in blocks of 16+; the tower's (147 here) are padded
    assert export_main([*common, "--target", "onnx", "--quant", "dynamic-int8"]) == 0
    assert json.loads((tmp_path / "gemma3-vision-tiny_dynamic-int8_ctx64_standard_onnx" / "parity.json").read_text())["passed"]
    # an explicit --onnx-ops standard promises no contrib op: integer recipes are refused there
    assert export_main([*common, "--target", "onnx", "--onnx-ops", "standard", "--quant", "int4-b32"]) == 2
    assert "contrib ops" in capsys.readouterr().err


def test_onnx_image_prefill_shares_the_decoder_weight_file(model, tmp_path, monkeypatch):
    """With external weights (large models), image_prefill.onnx references the text weights in
    model.onnx.data instead of storing them again, and still runs."""
    import onnx

    import export.lowering.onnx.convert as conv

    monkeypatch.setattr(conv, "EXTERNAL_DATA_BYTES", 0)  # tiny weights, handled as a large model's
    cfg, params = model
    folder = export(cfg, params, "onnx", ExportOptions(out_dir=tmp_path, max_len=MAX_LEN, prefill_lens=tuple(LENS),
                                                       onnx_ops="standard", verify=False)).path
    graph = onnx.load(str(folder / "image_prefill.onnx"), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == \
        {"model.onnx.data"}
    assert not (folder / "image_prefill.onnx.data").exists()
    prompt, images = _prompt(cfg, 3), _images(2, 4)
    want = generate(params, cfg, [prompt], 8, images=[images], stop_tokens=()).tokens[0]
    assert load(folder).generate(prompt, 8, images=images) == want


def test_runtime_generate_text_in_text_out(artifacts, model, tokenizer_256):
    """runtime_py.generate: a prompt string and image files in, the model's text out (the same
    text the CLI prints); images given to a text-only model are refused."""
    import runtime_py
    from contract.prompt import encode_with_images
    from contract.tokenizer import Tokenizer

    cfg, params = model
    tok = Tokenizer(tokenizer_256)
    images = _images(2, 6)
    text = "first <start_of_image> then <start_of_image> and a story"
    want = generate(params, cfg, [encode_with_images(tok, text, cfg.vision)], 10, images=[images],
                    stop_tokens=(1,)).tokens[0]
    for artifact in (artifacts["onnx"], load(artifacts["tflite"])):
        got = runtime_py.generate(artifact, text, images=images, tokenizer=tokenizer_256, max_new_tokens=10)
        assert got == tok.decode(want)
    with pytest.raises(ValueError, match="2 image place.*1 image"):
        runtime_py.generate(artifacts["tflite"], text, images=images[:1], tokenizer=tokenizer_256)


def test_onnx_vision_encoder_uses_the_attention_op(artifacts):
    """The tower's attention is the standard Attention op (one per layer, computed head by head by
    ONNX Runtime), not MatMul-Softmax-MatMul with [heads, N, N] intermediates (10 GB peak RSS and
    100 s at gemma3-4b's 4096 patches, tools/bench_vision.py); and broadcasts feeding elementwise
    ops stay un-expanded (ONNX broadcasting does it)."""
    import onnx

    graph = onnx.load(str(artifacts["onnx"] / "vision.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graph.node] == ["Scan"]  # over the images; the tower is its body
    ops = [n.op_type for n in graph.node[0].attribute[0].g.node]
    assert ops.count("Attention") == get_config("gemma3-vision-tiny").vision.depth
    assert "Expand" not in ops and "Softmax" not in ops


def test_onnx_tower_attention_in_head_groups(model, tmp_path, monkeypatch):
    """Attention logits above SCORE_BYTES go in head groups (one Attention op per group, the
    outputs concatenated): the soft tokens are the JAX tower's."""
    import jax
    import onnx

    import export.lowering.onnx.fused as fused
    from models.vision import encode_images

    cfg, params = model
    monkeypatch.setattr(fused, "SCORE_BYTES", 1)  # one head per op
    folder = export(cfg, params, "onnx", ExportOptions(out_dir=tmp_path, max_len=MAX_LEN, prefill_lens=tuple(LENS),
                                                       verify=False, onnx_ops="standard")).path
    body = onnx.load(str(folder / "vision.onnx"), load_external_data=False).graph.node[0].attribute[0].g
    assert [n.op_type for n in body.node].count("Attention") == cfg.vision.depth * cfg.vision.num_heads
    image = _images(1, 3)[0]
    want = np.asarray(jax.jit(encode_images, static_argnums=(1, 2))(params, cfg.vision, cfg.embed_dim, image))
    np.testing.assert_allclose(load(folder).encode_image(image), want[0], rtol=1e-5, atol=1e-5)


def test_runtime_generate_with_pan_and_scan(model, tokenizer_256, tmp_path):
    """runtime_py.generate(..., pan_and_scan=True): a wide picture goes in as itself and its crops,
    the prompt gets HF's phrase, and the text equals the JAX model's on those views and ids."""
    from PIL import Image

    import runtime_py
    from contract.prompt import encode_with_images
    from contract.tokenizer import Tokenizer
    from runtime_py.image import crops_prompt, preprocess, with_crops

    cfg, params = model
    folder = export(cfg, params, "onnx", ExportOptions(out_dir=tmp_path, max_len=128, prefill_lens=(16, 64),
                                                       verify=False, onnx_ops="standard")).path
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 700, 3), dtype=np.uint8)).save(wide)
    text = "the <start_of_image> one"
    views, counts = with_crops([wide])
    assert counts == [2]
    tok = Tokenizer(tokenizer_256)
    ids = encode_with_images(tok, crops_prompt(text, counts), cfg.vision)
    assert ids.count(cfg.vision.boi_token) == 3
    images = [preprocess(v, cfg.vision.image_size) for v in views]
    want = generate(params, cfg, [ids], 10, images=[images], stop_tokens=(1,), max_len=128).tokens[0]
    got = runtime_py.generate(folder, text, images=[wide], tokenizer=tokenizer_256, max_new_tokens=10,
                              pan_and_scan=True)
    assert got == tok.decode(want)
    assert got != runtime_py.generate(folder, text, images=[wide], tokenizer=tokenizer_256, max_new_tokens=10)


def test_onnx_int4_rotations_are_shared_by_the_image_prefill_graph(model, tmp_path, monkeypatch):
    """ONNX int4 with input rotations (export/quantize/rotate.py; forced onto every input here:
    the random tiny weights gain too little for the chooser) and external weights: each graph
    stores one rotation matrix per order (export/lowering/onnx/convert.share_equal_weights),
    image_prefill.onnx reads the decoder's from model.onnx.data, and the folder generates with
    images exactly as the same export with every weight inline does."""
    import onnx

    import export.lowering.onnx.convert as conv
    import export.quantize.rotate as rotate

    monkeypatch.setattr(rotate, "chooser", lambda plan: None)  # rotate every input
    cfg, params = model
    prompt, images = _prompt(cfg, 3), _images(2, 4)

    def run(out):
        result = export(cfg, params, "onnx", ExportOptions(out_dir=tmp_path / out, max_len=MAX_LEN,
                                                           prefill_lens=tuple(LENS), quant="int4-b32", verify=False))
        assert result.metadata.quant_method == "mse+rotated"
        return result.path

    inline = run("inline")
    monkeypatch.setattr(conv, "EXTERNAL_DATA_BYTES", 0)  # tiny weights, handled as a large model's
    folder = run("external")
    for graph_file in ("model.onnx", "image_prefill.onnx"):
        graph = onnx.load(str(folder / graph_file), load_external_data=False).graph
        rotations = [t for t in graph.initializer if t.name.endswith("_rotation")]
        readers = [n for n in graph.node if {t.name for t in rotations} & set(n.input)]
        assert rotations and len({tuple(t.dims) for t in rotations}) == len(rotations), graph_file
        assert len(readers) > 2 * cfg.num_layers, graph_file
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in rotations if t.dims[0] >= 16)
    assert not (folder / "image_prefill.onnx.data").exists()
    assert load(folder).generate(prompt, 8, images=images) == load(inline).generate(prompt, 8, images=images)
