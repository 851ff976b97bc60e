"""Gemma 3 vision tower (models/vision.py) against Hugging Face's `get_image_features`: a tiny random
Gemma3ForConditionalGeneration (SigLIP 56x56 images, 14x14 patches -> 4x4 grid -> 2x2 pooled tokens)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
from conftest import hf_config, randomize_vlm

from models.config import VisionConfig
from models.hf_config import _vision
from models.vision import (
    encode_images,
    hf_vision_to_params,
    init_vision_params,
    official_vision_to_params,
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
    model = randomize_vlm(tf.Gemma3ForConditionalGeneration(cfg).eval())
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


# ---- official (Flax/Orbax) layout -------------------------------------------------------------------
_SIGLIP = "SigLiPFromPatches_0/siglip_encoder"


def _hf_to_official(model, vcfg: VisionConfig) -> dict[str, np.ndarray]:
    """The tiny HF model as an official flat checkpoint {'path/leaf': array}, inverting MODEL_SPEC 6.2
    "Vision + projector (HF)" (HF = f(Flax) there), plus two text-model tensors that must be ignored."""
    hf = {}
    for k, v in _numpy_state(model).items():
        for prefix in ("model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.",
                       "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector."):
            if k.startswith(prefix):
                hf[k[len(prefix):]] = v
                break
    w, heads = vcfg.width, vcfg.num_heads
    out = {
        f"{_SIGLIP}/embedding/kernel": hf["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        f"{_SIGLIP}/embedding/bias": hf["embeddings.patch_embedding.bias"],
        f"{_SIGLIP}/pos_embedding": hf["embeddings.position_embedding.weight"][None],
        f"{_SIGLIP}/Transformer/encoder_norm/scale": hf["post_layernorm.weight"],
        f"{_SIGLIP}/Transformer/encoder_norm/bias": hf["post_layernorm.bias"],
        "transformer/embedder/mm_soft_embedding_norm/scale": hf["mm_soft_emb_norm.weight"],
        "transformer/embedder/mm_input_projection/w": hf["mm_input_projection_weight"],
        # text model and an extra embedder leaf: ignored
        "transformer/embedder/input_embedding": np.zeros((8, 4), np.float32),
        "transformer/layer_0/attn/q_einsum/w": np.zeros((2, 4, 2), np.float32),
        "transformer/embedder/mm_output_embedding": np.zeros((3, 4), np.float32),
    }
    for j in range(vcfg.depth):
        blk, layer = f"{_SIGLIP}/Transformer/encoderblock_{j}", f"encoder.layers.{j}."
        for ln, hf_ln in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
            out[f"{blk}/{ln}/scale"] = hf[f"{layer}{hf_ln}.weight"]
            out[f"{blk}/{ln}/bias"] = hf[f"{layer}{hf_ln}.bias"]
        attn = f"{blk}/MultiHeadDotProductAttention_0"
        for proj, hf_proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[f"{attn}/{proj}/kernel"] = hf[f"{layer}self_attn.{hf_proj}.weight"].T.reshape(w, heads, -1)
            out[f"{attn}/{proj}/bias"] = hf[f"{layer}self_attn.{hf_proj}.bias"].reshape(heads, -1)
        out[f"{attn}/out/kernel"] = hf[f"{layer}self_attn.out_proj.weight"].T.reshape(heads, -1, w)
        out[f"{attn}/out/bias"] = hf[f"{layer}self_attn.out_proj.bias"]
        for dense_, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[f"{blk}/MlpBlock_0/{dense_}/kernel"] = hf[f"{layer}mlp.{fc}.weight"].T
            out[f"{blk}/MlpBlock_0/{dense_}/bias"] = hf[f"{layer}mlp.{fc}.bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _as_nested_layout(flat: dict) -> dict:
    """gm.ckpts.load_params layout: `vision_encoder/siglip_encoder/...`, no `transformer/`, nested dicts."""
    moved = {}
    for k, v in flat.items():
        k = k.replace("SigLiPFromPatches_0/", "vision_encoder/", 1)
        moved[k.removeprefix("transformer/")] = v
    return _nest(moved)


def test_official_matches_hf(hf_vlm):
    model, vcfg, text_dim = hf_vlm
    reference = hf_vision_to_params(_numpy_state(model), vcfg, text_dim)
    params = official_vision_to_params(_hf_to_official(model, vcfg), vcfg, text_dim)
    assert list(params) == list(vision_param_shapes(vcfg, text_dim))
    for name in params:
        assert params[name].dtype == np.float32 and params[name].flags.c_contiguous
        np.testing.assert_array_equal(params[name], reference[name], err_msg=name)
    images = _images(vcfg)
    want = _hf_soft_tokens(model, images)
    got = np.asarray(jit_encode(params, vcfg, text_dim, images))
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5


@pytest.mark.parametrize("layout", ["orbax_flat", "nested", "rlx", "rlx_nested", "tuple_keys"])
def test_official_layouts(hf_vlm, layout):
    """The flat layout as Orbax stores it ({path: {leaf: array}}), the nested layout, the post-trained
    `rlx_networks/policy_network/` prefix (on either) and (path, leaf) tuple keys all load alike."""
    model, vcfg, text_dim = hf_vlm
    flat = _hf_to_official(model, vcfg)
    reference = official_vision_to_params(flat, vcfg, text_dim)
    if layout == "orbax_flat":
        state = {}
        for k, v in flat.items():
            path, leaf = k.rsplit("/", 1)
            state.setdefault(path, {})[leaf] = v
    elif layout == "nested":
        state = _as_nested_layout(flat)
    elif layout == "rlx":
        state = {f"rlx_networks/policy_network/{k}": v for k, v in flat.items()}
    elif layout == "rlx_nested":
        state = {"rlx_networks": {"policy_network": _as_nested_layout(flat)}}
    else:
        state = {tuple(k.rsplit("/", 1)): v for k, v in flat.items()}
    params = official_vision_to_params(state, vcfg, text_dim)
    assert params.keys() == reference.keys()
    for name in params:
        np.testing.assert_array_equal(params[name], reference[name], err_msg=name)


@pytest.mark.parametrize("prefix", ["", "rlx_networks/policy_network/"])
def test_official_missing_and_misshaped(hf_vlm, prefix):
    model, vcfg, text_dim = hf_vlm
    flat = {prefix + k: v for k, v in _hf_to_official(model, vcfg).items()}
    for gone in (f"{prefix}{_SIGLIP}/Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias",
                 f"{prefix}transformer/embedder/mm_soft_embedding_norm/scale"):
        with pytest.raises(ValueError, match="missing") as info:
            official_vision_to_params({k: v for k, v in flat.items() if k != gone}, vcfg, text_dim)
        assert f"'{gone}'" in str(info.value) and "\n" not in str(info.value)
    key = f"{prefix}{_SIGLIP}/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
    with pytest.raises(ValueError, match="shape") as info:  # [W, heads*hd] instead of [W, heads, hd]
        official_vision_to_params({**flat, key: flat[key].reshape(vcfg.width, -1)}, vcfg, text_dim)
    assert f"'{key}'" in str(info.value) and "\n" not in str(info.value)
    key = f"{prefix}transformer/embedder/mm_input_projection/w"
    with pytest.raises(ValueError, match="mm_input_projection/w.*shape"):  # ours [E, W], not [W, E]
        official_vision_to_params({**flat, key: flat[key].T}, vcfg, text_dim)


def test_official_missing_is_spelled_in_the_callers_layout(hf_vlm):
    model, vcfg, text_dim = hf_vlm
    tree = _as_nested_layout(_hf_to_official(model, vcfg))
    del tree["vision_encoder"]["siglip_encoder"]["Transformer"]["encoder_norm"]["bias"]
    with pytest.raises(ValueError, match="missing vision tensor "
                       "'vision_encoder/siglip_encoder/Transformer/encoder_norm/bias'"):
        official_vision_to_params(tree, vcfg, text_dim)


def test_official_unexpected_and_duplicated(hf_vlm):
    model, vcfg, text_dim = hf_vlm
    flat = _hf_to_official(model, vcfg)
    extra = f"{_SIGLIP}/Transformer/encoderblock_2/LayerNorm_0/scale"  # depth is 2
    with pytest.raises(ValueError, match="unexpected.*encoderblock_2/LayerNorm_0/scale"):
        official_vision_to_params({**flat, extra: np.ones(vcfg.width, np.float32)}, vcfg, text_dim)
    key = "transformer/embedder/mm_input_projection/w"
    with pytest.raises(ValueError, match="given twice"):
        official_vision_to_params({**flat, "embedder/mm_input_projection/w": flat[key]}, vcfg, text_dim)


def test_load_checkpoint_reads_an_official_checkpoint_with_vision(hf_vlm, tmp_path):
    """An Orbax checkpoint holding the text model and the vision tower, through `load_checkpoint`:
    the vision params equal the HF ones; vision=False (--no-vision) gives the text model alone."""
    import dataclasses

    from test_official_layout import official_flat, save_orbax

    from models import get_config, init_params, load_checkpoint

    model, vcfg, text_dim = hf_vlm
    text_cfg = get_config("gemma3-tiny")
    cfg = dataclasses.replace(text_cfg, vision=vcfg)
    text = init_params(text_cfg, 0)
    tree = official_flat(cfg, text)
    for key, value in _hf_to_official(model, vcfg).items():
        if key in ("transformer/embedder/input_embedding", "transformer/layer_0/attn/q_einsum/w"):
            continue  # _hf_to_official's stand-ins for the text model; the real ones are in the tree
        path, leaf = key.rsplit("/", 1)
        tree.setdefault(path, {})[leaf] = value
    folder = save_orbax(tmp_path / "ckpt", tree)
    got_cfg, params = load_checkpoint(folder, cfg)
    assert got_cfg.vision == vcfg
    reference = hf_vision_to_params(_numpy_state(model), vcfg, text_dim)
    for name, value in reference.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    np.testing.assert_array_equal(params["layers.0.attn.q"], text["layers.0.attn.q"])
    text_cfg_got, text_only = load_checkpoint(folder, cfg, vision=False)
    assert text_cfg_got.vision is None and not any(k.startswith(("vision.", "mm.")) for k in text_only)
