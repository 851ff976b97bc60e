"""Gemma 3 with images (models/multimodal.py, the model's `embeddings` path) against Hugging Face: a
tiny random Gemma3ForConditionalGeneration saved with save_pretrained, loaded by our loader, gives
the same logits for prompts holding images (bidirectional attention inside each image's soft
tokens), and greedy generation after images matches HF's."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_config, randomize_vlm

from models import load_checkpoint
from models.cache import init_cache
from models.generate import generate, image_prompt
from models.model import forward
from contract.prompt import chunk_bounds, expand_image_tokens, soft_runs
from models.multimodal import image_blocks
from models.registry import get_config

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 28, "patch_size": 7, "layer_norm_eps": 1e-6, "vision_use_head": False}
# image token ids inside the tiny vocabulary (as gemma3-vision-tiny has them)
IDS = {"boi_token_index": 253, "eoi_token_index": 254, "image_token_index": 255}


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """(torch model, checkpoint folder): random fp32 weights large enough that every part matters."""
    import transformers as tf

    cfg = tf.Gemma3Config(text_config=hf_config("gemma3"), vision_config=tf.SiglipVisionConfig(**VISION),
                          mm_tokens_per_image=4, **IDS)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = randomize_vlm(tf.Gemma3ForConditionalGeneration(cfg).eval())
    folder = tmp_path_factory.mktemp("gemma3_vlm")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def ours(hf_checkpoint):
    return load_checkpoint(hf_checkpoint[1])


def _images(n: int, size: int = 28, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (size, size, 3)).astype(np.float32) for _ in range(n)]


def _hf_logits(model, ids: list[int], images: list[np.ndarray], image_token: int) -> np.ndarray:
    input_ids = torch.tensor([ids])
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() if images else None
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixels,
                    token_type_ids=(input_ids == image_token).long())
    return out.logits[0].numpy()


def test_loader_reads_vision_config_and_weights(ours):
    cfg, params = ours
    v = cfg.vision
    assert (v.boi_token, v.eoi_token, v.soft_token, v.tokens_per_image, v.image_size) == (253, 254, 255, 4, 28)
    assert params["vision.patch_embed.w"].shape == (32, 7 * 7 * 3) and params["mm.proj.w"].shape == (64, 32)
    # the architecture is gemma3-vision-tiny's (the registry's tiny config mirrors this checkpoint)
    reg = get_config("gemma3-vision-tiny")
    assert dataclasses.replace(cfg, name=reg.name) == reg


@pytest.mark.parametrize("layout", ["one image", "two images", "image first"])
def test_logits_match_hf(hf_checkpoint, ours, layout):
    """Every position's logits equal HF's (1e-4) for text around one or two images."""
    model, _ = hf_checkpoint
    cfg, params = ours
    v = cfg.vision
    rng = np.random.default_rng(1)
    text = lambda n: rng.integers(3, 250, n).tolist()
    prompt = {"one image": [2, *text(5), v.boi_token, *text(7)],
              "two images": [2, *text(3), v.boi_token, *text(2), v.boi_token, *text(6)],
              "image first": [2, v.boi_token, *text(9)]}[layout]
    n_images = prompt.count(v.boi_token)
    images = _images(n_images, seed=n_images)
    ids, embeds = image_prompt(params, cfg, prompt, images)
    assert len(ids) == len(prompt) + n_images * (v.image_length - 1)
    ref = _hf_logits(model, ids, images, v.soft_token)
    cache = init_cache(cfg, 1, 64)
    run = jax.jit(lambda p, t, c, e: forward(p, cfg, t, 0, c, embeddings=e))
    logits, _ = run(params, jnp.asarray([ids]), cache, jnp.asarray(embeds[None]))
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=1e-4, rtol=1e-4)


def test_bidirectional_mask_matters(hf_checkpoint, ours):
    """Without the image-block mask the logits differ from HF's (so the test above would catch a
    causal-only model): the soft tokens' own positions, and every later one."""
    model, _ = hf_checkpoint
    cfg, params = ours
    v = cfg.vision
    prompt = [2, 17, 33, v.boi_token, 44, 55]
    images = _images(1)
    ids, embeds = image_prompt(params, cfg, prompt, images)
    ref = _hf_logits(model, ids, images, v.soft_token)
    # the same inputs with every image block emptied: causal attention only
    causal, _ = _causal_forward(params, cfg, ids, embeds)
    s, e = soft_runs(v, ids)[0]
    assert np.abs(causal[s:e - 1] - ref[s:e - 1]).max() > 1e-2  # a soft token sees the later ones
    assert np.abs(causal[e:] - ref[e:]).max() > 1e-3  # and the text after the image depends on it


def _causal_forward(params, cfg, ids, embeds):
    import models.model as mm

    original = mm.image_blocks
    mm.image_blocks = lambda is_soft: jnp.zeros(is_soft.shape, jnp.int32)
    try:
        logits, cache = forward(params, cfg, jnp.asarray([ids]), 0, init_cache(cfg, 1, 64), None, False,
                                jnp.asarray(embeds[None]))
    finally:
        mm.image_blocks = original
    return np.asarray(logits[0]), cache


def test_chunked_prefill_matches_one_call(ours):
    """An image prompt prefilled in chunks that never split an image (chunk_bounds) gives the same
    logits as one call, also when chunks cross the sliding window (8) and an image sits at a chunk
    start."""
    cfg, params = ours
    v = cfg.vision
    prompt = [2, *range(10, 16), v.boi_token, *range(20, 23), v.boi_token, *range(30, 37)]
    ids, embeds = image_prompt(params, cfg, prompt, _images(2, seed=3))
    full, _ = forward(params, cfg, jnp.asarray([ids]), 0, init_cache(cfg, 1, 64), None, False,
                      jnp.asarray(embeds[None]))
    sizes = chunk_bounds(v, ids, [6])
    assert sum(sizes) == len(ids) and max(sizes) <= 6
    for s, e in soft_runs(v, ids):  # no chunk boundary inside a run
        bounds = np.cumsum(sizes)
        assert not any(s < b < e for b in bounds)
    cache, at, out = init_cache(cfg, 1, 64), 0, []
    for n in sizes:
        logits, cache = forward(params, cfg, jnp.asarray([ids[at:at + n]]), at, cache, None, False,
                                jnp.asarray(embeds[None, at:at + n]))
        out.append(np.asarray(logits[0]))
        at += n
    np.testing.assert_allclose(np.concatenate(out), np.asarray(full[0]), atol=2e-5, rtol=1e-5)


def test_greedy_generation_matches_hf(hf_checkpoint, ours):
    """Greedy tokens after two images: our JAX generate equals HF's generate."""
    model, _ = hf_checkpoint
    cfg, params = ours
    v = cfg.vision
    prompt = [2, 40, 41, v.boi_token, 42, v.boi_token, 43, 44]
    images = _images(2, seed=5)
    ids = expand_image_tokens(v, prompt)
    out = generate(params, cfg, [prompt], 12, images=[images], stop_tokens=())
    input_ids = torch.tensor([ids])
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        hf = model.generate(input_ids=input_ids, pixel_values=pixels, token_type_ids=(input_ids == v.soft_token).long(),
                            attention_mask=torch.ones_like(input_ids), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    assert out.tokens[0] == hf[0, len(ids):].tolist()


def test_image_layout_helpers():
    v = get_config("gemma3-vision-tiny").vision
    ids = expand_image_tokens(v, [2, 9, v.boi_token, 8])
    assert ids == [2, 9, 108, 253, 255, 255, 255, 255, 254, 108, 8]
    assert expand_image_tokens(v, ids) == ids  # expanding twice changes nothing
    assert soft_runs(v, ids) == [(4, 8)]
    blocks = np.asarray(image_blocks(jnp.asarray([[0, 1, 1, 0, 1, 0]], bool)))
    assert blocks.tolist() == [[0, 1, 1, 0, 2, 0]]
    with pytest.raises(ValueError, match="prefill length of at least 4"):
        chunk_bounds(v, ids, [3])
    assert chunk_bounds(v, ids, [5]) == [4, 5, 2]


def test_image_errors(ours):
    cfg, params = ours
    with pytest.raises(ValueError, match="1 image place.*2 image"):
        image_prompt(params, cfg, [2, cfg.vision.boi_token, 5], _images(2))
    with pytest.raises(ValueError, match="no vision tower"):
        image_prompt(params, get_config("gemma3-tiny"), [2, 253], _images(1))
