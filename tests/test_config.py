"""The registry, full-size configs through jax.eval_shape (no memory), and config_from_hf."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from models import (
    ConfigError,
    Family,
    LayerKind,
    UnknownModelError,
    config_from_hf,
    count_params,
    forward,
    get_config,
    init_cache,
    list_models,
    param_shapes,
)

# Published sizes (MODEL_SPEC 2, 3, 5.1; the papers' tables): (embedding, non-embedding) params.
PUBLISHED = {
    "gemma2-2b": (590e6, 2.025e9),
    "gemma2-9b": (918e6, 8.324e9),
    "gemma2-27b": (1.180e9, 26.047e9),
    "gemma3-270m": (168e6, 100e6),
    "gemma3-1b": (302e6, 698e6),
    "gemma3-4b": (671e6, 3.209e9),
    "gemma3-12b": (1.007e9, 10.759e9),
    "gemma3-27b": (1.409e9, 25.600e9),
    "recurrentgemma-2b": (0.655e9, 2.028e9),
    "recurrentgemma-9b": (1.049e9, 7.531e9),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_match_published(name):
    cfg = get_config(name)
    embedding = cfg.vocab_size * cfg.embed_dim
    published_embedding, published_rest = PUBLISHED[name]
    assert abs(embedding - published_embedding) / published_embedding < 0.01
    assert abs(count_params(cfg) - embedding - published_rest) / published_rest < 0.01


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_full_size_forward_shapes(name):
    """The real architectures trace end to end: logits [B, T, V], caches keep their shapes."""
    cfg = get_config(name)
    params = {n: jax.ShapeDtypeStruct(s, jnp.bfloat16) for n, s in param_shapes(cfg).items()}
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 4096, jnp.bfloat16))
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    logits, new_cache = jax.eval_shape(lambda p, t, c: forward(p, cfg, t, 0, c), params, tokens, cache)
    assert logits.shape == (1, 4, cfg.vocab_size) and logits.dtype == jnp.float32
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_cache) == jax.tree.map(
        lambda x: (x.shape, x.dtype), cache)
    for kind, layer in zip(cfg.layer_kinds, cache):
        if kind is LayerKind.LOCAL:  # window-sized ring, never the full context
            assert layer["k"].shape[2] == cfg.sliding_window


def test_registry_names_and_it_variants():
    names = list_models()
    assert len(names) == len(set(names))
    for base in PUBLISHED:
        it = get_config(base + "-it")
        assert it.instruction_tuned and not get_config(base).instruction_tuned
        assert dataclasses.replace(it, name=base, instruction_tuned=False) == get_config(base)
    for tiny in ("gemma2-tiny", "gemma3-tiny", "recurrentgemma-tiny"):
        assert tiny in names


def test_layer_patterns():
    g3 = get_config("gemma3-1b").layer_kinds
    assert [i for i, k in enumerate(g3) if k is LayerKind.GLOBAL] == [5, 11, 17, 23]
    g2 = get_config("gemma2-2b").layer_kinds
    assert g2[0] is LayerKind.LOCAL and g2[1] is LayerKind.GLOBAL and len(g2) == 26
    rg = get_config("recurrentgemma-2b").layer_kinds
    assert sum(k is LayerKind.LOCAL for k in rg) == 8 and sum(k is LayerKind.RECURRENT for k in rg) == 18


def test_tiny_configs_switch_every_feature_on():
    g2, g3, rg = (get_config(f"{f}-tiny") for f in ("gemma2", "gemma3", "recurrentgemma"))
    for cfg in (g2, g3):
        assert cfg.num_kv_heads > 1 and cfg.queries_per_kv > 1  # GQA with several groups
        assert {LayerKind.LOCAL, LayerKind.GLOBAL} <= set(cfg.layer_kinds)
        assert cfg.sliding_window < 16
    assert g2.attn_softcap and g2.final_softcap
    assert g3.qk_norm and g3.global_rope_scale != 1.0 and g3.global_rope_base != g3.local_rope_base
    assert {LayerKind.RECURRENT, LayerKind.LOCAL} <= set(rg.layer_kinds)
    assert rg.rope_fraction == 0.5 and rg.window_extra_key and rg.final_softcap


def test_embedding_scale_rounding():
    """MODEL_SPEC 8.2: sqrt(E) rounded to the activation dtype (Gemma), always bf16 (Griffin)."""
    assert get_config("gemma2-9b").embed_scale(jnp.bfloat16) == 59.75
    assert get_config("gemma3-1b").embed_scale(jnp.bfloat16) == 34.0
    assert abs(get_config("gemma3-1b").embed_scale(jnp.float32) - 33.941124) < 1e-5
    assert get_config("recurrentgemma-2b").embed_scale(jnp.float32) == 50.5


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="did you mean gemma3-1b"):
        get_config("gemma3-1bb")


def _write(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_config_from_hf_multimodal_gemma3(tmp_path):
    """A Gemma 3 4B-style config: text_config inside, legacy rope keys, 64 placeholder rows."""
    raw = {
        "model_type": "gemma3", "eos_token_id": [1, 106], "mm_tokens_per_image": 256,
        "text_config": {
            "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
            "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "sliding_window": 1024, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "vocab_size": 262208,
        },
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152,
                          "image_size": 896, "num_hidden_layers": 27, "patch_size": 14},
    }
    cfg = config_from_hf(_write(tmp_path, raw))
    ref = get_config("gemma3-4b")
    assert cfg.family is Family.GEMMA3 and cfg.layer_kinds == ref.layer_kinds
    assert (cfg.global_rope_base, cfg.global_rope_scale, cfg.local_rope_base) == (1e6, 8.0, 1e4)
    assert cfg.vocab_size == 262208 and cfg.sample_vocab_size == 262144
    assert cfg.tokens.end_of_turn == 106 and cfg.vision.depth == 27
    assert count_params(cfg) - count_params(ref) == 64 * 2560


def test_config_from_hf_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        config_from_hf(tmp_path)
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        config_from_hf(_write(tmp_path, {"model_type": "llama"}))
    with pytest.raises(ConfigError, match="tanh GELU"):
        config_from_hf(_write(tmp_path, {"model_type": "gemma2", "hidden_activation": "silu"}))
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        config_from_hf(_write(tmp_path, {"model_type": "gemma2",
                                         "rope_parameters": {"rope_type": "yarn", "factor": 4}}))


def test_chat_template_marks_instruction_tuned(tmp_path):
    _write(tmp_path, {"model_type": "gemma2"})
    assert not config_from_hf(tmp_path).instruction_tuned
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}"}))
    assert config_from_hf(tmp_path).instruction_tuned
