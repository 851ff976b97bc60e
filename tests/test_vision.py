"""Gemma 3 vision tower (models/vision.py) against Hugging Face's `get_image_features`: a tiny random
Gemma3ForConditionalGeneration (SigLIP 56x56 images, 14x14 patches -> 4x4 grid -> 2x2 pooled tokens)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
from conftest import hf_config

from models.config import VisionConfig
from models.hf_config import _vision
from models.vision import (
    encode_images,
    hf_vision_to_params,
    init_vision_params,
    vision_param_shapes,
)

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 56, "patch_size": 14, "layer_norm_eps": 1e-6, "vision_use_head": False}
TOKENS = 4  # mm_tokens_per_image: HF pools with kernel (56 // 14) // sqrt(4) = 2


@functools.partial(jax.jit, static_argnums=(1, 2))
def jit_encode(params, vcfg, text_dim, images):
    return encode_images(params, vcfg, text_dim, images)


@pytest.fixture(scope="module")
def hf_vlm():
    """(torch model, our VisionConfig, text_dim): fp32, eval, non-trivial random weights."""
    import transformers as tf

    text = hf_config("gemma3")
    cfg = tf.Gemma3Config(text_config=text, vision_config=tf.SiglipVisionConfig(**VISION),
                          mm_tokens_per_image=TOKENS)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                # SigLIP LayerNorm weights around 1; their biases and Gemma RMSNorm (1 + w) scales
                # around 0
                layer_norm_gain = name.startswith("model.vision_tower.") and name.endswith("weight")
                p.normal_(1.0 if layer_norm_gain else 0.0, 0.1)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / np.sqrt(p.shape[-1]))
            else:
                p.normal_(0.0, 0.05)
    vcfg = _vision(cfg.vision_config.to_dict(), cfg.mm_tokens_per_image)
    return model, vcfg, text.hidden_size


def _numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _hf_soft_tokens(model, images_nhwc: np.ndarray) -> np.ndarray:
    pixels = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()  # HF takes [B, 3, H, W]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    tokens = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(tokens, (list, tuple)):
        tokens = torch.stack(list(tokens))
    return tokens.numpy()


def _images(vcfg: VisionConfig, batch: int = 2, seed: int = 0) -> np.ndarray:
    s = vcfg.image_size
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (batch, s, s, 3)).astype(np.float32)


def test_config_from_hf(hf_vlm):
    _, vcfg, _ = hf_vlm
    assert vcfg == VisionConfig(image_size=56, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=64,
                                layer_norm_eps=1e-6, tokens_per_image=TOKENS)


def test_matches_hf_get_image_features(hf_vlm):
    model, vcfg, text_dim = hf_vlm
    params = hf_vision_to_params(_numpy_state(model), vcfg, text_dim)
    assert set(params) == set(vision_param_shapes(vcfg, text_dim))
    images = _images(vcfg)
    want = _hf_soft_tokens(model, images)
    got = np.asarray(jit_encode(params, vcfg, text_dim, images))
    assert got.shape == want.shape == (2, TOKENS, text_dim)
    assert got.dtype == np.float32
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    # measured ~6e-7; 1e-5 (tighter than 1e-4) also catches exact-vs-tanh GELU (~6e-5 here)
    assert err < 1e-5, err
    # the two images differ, so a batch mix-up would show
    assert not np.allclose(got[0], got[1])


_OLD = {"model.vision_tower.": "vision_tower.vision_model.",
        "model.multi_modal_projector.": "multi_modal_projector."}
_NEW = {"model.vision_tower.": "model.vision_tower.vision_model."}


def _relayout(state: dict, mapping: dict) -> dict:
    out = {}
    for k, v in state.items():
        for a, b in mapping.items():
            if k.startswith(a):
                k = b + k[len(a):]
                break
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["transformers5", "old", "new", "saved"])
def test_key_layouts(hf_vlm, layout):
    """Released checkpoints (`vision_tower.vision_model.…`), 4.52+ (`model.vision_tower.vision_model.…`),
    transformers 5 state dicts (`model.vision_tower.…`) and its saves (`vision_tower.…`) all load alike."""
    model, vcfg, text_dim = hf_vlm
    state = _numpy_state(model)
    reference = hf_vision_to_params(state, vcfg, text_dim)
    mapping = {"transformers5": {}, "old": _OLD, "new": _NEW,
               "saved": {"model.vision_tower.": "vision_tower.",
                         "model.multi_modal_projector.": "multi_modal_projector."}}[layout]
    moved = _relayout(state, mapping)
    if layout != "transformers5":
        assert not any(k.startswith("model.vision_tower.") and "vision_model" not in k for k in moved)
    params = hf_vision_to_params(moved, vcfg, text_dim)
    assert params.keys() == reference.keys()
    for name in params:
        np.testing.assert_array_equal(params[name], reference[name])


@pytest.mark.parametrize("mapping", [{}, _OLD], ids=["transformers5", "old"])
def test_missing_key_is_named(hf_vlm, mapping):
    model, vcfg, text_dim = hf_vlm
    state = _relayout(_numpy_state(model), mapping)
    for gone in [k for k in state if k.endswith(("encoder.layers.1.mlp.fc2.bias", "mm_soft_emb_norm.weight"))]:
        broken = {k: v for k, v in state.items() if k != gone}
        with pytest.raises(ValueError, match="missing") as info:
            hf_vision_to_params(broken, vcfg, text_dim)
        assert gone in str(info.value) and "\n" not in str(info.value)


def test_unexpected_and_misshaped_keys(hf_vlm):
    model, vcfg, text_dim = hf_vlm
    state = _relayout(_numpy_state(model), _OLD)
    extra = "vision_tower.vision_model.encoder.layers.2.mlp.fc1.bias"  # a third layer: depth is 2
    with pytest.raises(ValueError, match="unexpected.*layers.2.mlp.fc1.bias"):
        hf_vision_to_params({**state, extra: np.zeros(64, np.float32)}, vcfg, text_dim)
    with pytest.raises(ValueError, match="given twice"):
        hf_vision_to_params({**state, **_relayout(state, {"vision_tower.vision_model.": "model.vision_tower."})},
                            vcfg, text_dim)
    key = "multi_modal_projector.mm_input_projection_weight"
    with pytest.raises(ValueError, match="mm_input_projection_weight.*shape"):
        hf_vision_to_params({**state, key: state[key].T}, vcfg, text_dim)
    # SigLIP's attention-pooling head (vision_use_head=True) is not part of Gemma 3: skipped
    head = {"vision_tower.vision_model.head.probe": np.zeros((1, 1, 32), np.float32)}
    assert hf_vision_to_params({**state, **head}, vcfg, text_dim).keys() == vision_param_shapes(
        vcfg, text_dim).keys()


def test_init_params_run_and_jit():
    vcfg = VisionConfig(image_size=28, patch_size=7, width=16, depth=1, num_heads=2, mlp_dim=24,
                        tokens_per_image=4)
    params = init_vision_params(vcfg, 8, seed=1)
    shapes = vision_param_shapes(vcfg, 8)
    assert {k: v.shape for k, v in params.items()} == shapes
    out = np.asarray(jit_encode(params, vcfg, 8, _images(vcfg, batch=1)))
    assert out.shape == (1, 4, 8) and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="channels last"):
        encode_images(params, vcfg, 8, np.zeros((1, 3, 28, 28), np.float32))
