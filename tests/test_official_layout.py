"""Official (Flax/Orbax) checkpoint layouts: RecurrentGemma against Google's own `recurrentgemma`
package, Gemma 2 / Gemma 3 against trees built here from MODEL_SPEC section 6.1.

RecurrentGemma: the oracle is `recurrentgemma.jax.Griffin` (google-deepmind/recurrentgemma, a test
extra). Its randomly initialised params are saved with `orbax.checkpoint.PyTreeCheckpointer` (the
format `recurrentgemma.jax.load_parameters` reads), loaded by our loader, and both models' logits
are compared for a prompt longer than twice the attention window (the official window admits W + 1
keys) and through their decode cache token by token. The package is a core oracle: if it cannot be
imported this module fails to collect (an error, never a skip).

Gemma 2 / 3: Google's `gemma` package pulls TensorFlow and ~150 other packages, so it is not used.
Instead the official trees (flat `transformer/layer_{i}/...` keys with leaf dicts, and the nested
layout of `gm.ckpts.load_params`) are built here from our random params with inverse transforms
written from the spec, independently of models/loaders/official.py; the inverse transforms are
themselves checked against the official einsum equations of gemma/gm/nn/_modules.py.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
import recurrentgemma.jax as rg  # noqa: E402  (a failed import must fail the run)
from recurrentgemma import common  # noqa: E402

from models.cache import init_cache  # noqa: E402
from models.errors import CheckpointError  # noqa: E402
from models.loaders import load_checkpoint  # noqa: E402
from models.model import forward  # noqa: E402
from models.params import init_params  # noqa: E402
from models.registry import get_config  # noqa: E402

jit_forward = jax.jit(forward, static_argnums=(1,))

B = 2  # batch rows, different tokens
MAX_LEN = 64


def save_orbax(folder, tree):
    path = os.path.abspath(folder)
    ocp.PyTreeCheckpointer().save(path, tree)
    return path


def our_logits(params, cfg, tokens, max_len=MAX_LEN):
    tokens = jnp.asarray(tokens, jnp.int32)
    logits, _ = jit_forward(params, cfg, tokens, 0, init_cache(cfg, tokens.shape[0], max_len))
    return np.asarray(logits)


def random_tokens(n, seed=0, vocab=256):
    return np.random.default_rng(seed).integers(3, vocab, (B, n)).astype(np.int32)


# =================================================================================================
# RecurrentGemma: Google's recurrentgemma package is the oracle
# =================================================================================================
RG_T = 30  # > 3 windows: the official window admits W + 1 = 9 keys
RG_CHUNK = 3  # our chunked prefill: chunk starts not aligned to the ring buffer (8 rows)
RG_PREFILL = 6  # tokens prefilled before 1-token decoding (the rest, 24 steps, is decoded)


@pytest.fixture(scope="module")
def rg_oracle(tmp_path_factory):
    cfg = get_config("recurrentgemma-tiny")
    assert (cfg.embed_dim, cfg.num_layers, cfg.num_heads, cfg.sliding_window,
            cfg.recurrent.lru_width, cfg.mlp_dim, cfg.vocab_size) == (64, 6, 4, 8, 64, 192, 256)
    rec, att = common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION
    gcfg = rg.GriffinConfig(
        vocab_size=256, width=64, mlp_expanded_width=192, num_heads=4,
        block_types=(rec, rec, att, rec, rec, att), embeddings_scale_by_sqrt_dim=True,
        attention_window_size=8, logits_soft_cap=30.0, lru_width=64,
    )
    model = rg.Griffin(gcfg)
    tokens = jnp.asarray(random_tokens(RG_T, seed=1))  # the oracle type-checks for jax arrays
    segment_pos = jnp.broadcast_to(jnp.arange(RG_T, dtype=jnp.int32), (B, RG_T))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens[:, :1], segment_pos[:, :1])

    # Norm scales and biases initialise at zero: perturb them so that every parameter matters.
    # a_param keeps its init (a stable recurrence, a in [0.9, 0.999]).
    rng = np.random.default_rng(0)

    def perturb(path, x):
        x = np.asarray(x, np.float32)
        leaf = str(getattr(path[-1], "key", path[-1]))
        if leaf in ("scale", "b", "bias"):
            return (x + rng.normal(0.0, 0.1, x.shape)).astype(np.float32)
        return x

    params = jax.tree_util.tree_map_with_path(perturb, variables["params"])
    n_zero = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
              if not np.any(v)]
    assert not n_zero, n_zero

    folder = save_orbax(tmp_path_factory.mktemp("rg") / "ckpt", params)
    loaded_cfg, ours = load_checkpoint(folder, "recurrentgemma-tiny")

    apply = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s))
    step = jax.jit(lambda p, t, s, c: model.apply({"params": p}, t, s, cache=c))
    return dict(cfg=loaded_cfg, ours=ours, params=params, model=model, apply=apply, step=step,
                tokens=tokens, segment_pos=segment_pos, folder=folder)


@pytest.fixture(scope="module")
def rg_reference_logits(rg_oracle):
    o = rg_oracle
    logits, _ = o["apply"](o["params"], o["tokens"], o["segment_pos"])
    return np.asarray(logits)


def test_recurrentgemma_full_sequence_matches_official(rg_oracle, rg_reference_logits):
    o, ref = rg_oracle, rg_reference_logits
    assert o["cfg"].name == "recurrentgemma-tiny"
    ours = our_logits(o["ours"], o["cfg"], o["tokens"])
    assert np.abs(ref).max() > 1.0  # not two near-zero tensors
    per_position = np.abs(ours - ref).max(axis=(0, 2))
    assert per_position.max() <= 1e-4, per_position

    # The comparison sees the window semantics: with W keys (Gemma's convention) instead of the
    # official W + 1, every position from W on differs.
    w = o["cfg"].sliding_window
    narrow = dataclasses.replace(o["cfg"], window_extra_key=False)
    diff = np.abs(our_logits(o["ours"], narrow, o["tokens"]) - ref).max(axis=(0, 2))
    assert diff[:w].max() <= 1e-4 and diff[w:].min() > 1e-3, diff


def test_recurrentgemma_chunked_prefill_and_decode_match_official(rg_oracle, rg_reference_logits):
    o, ref_full = rg_oracle, rg_reference_logits
    cfg, params, tokens, pos = o["cfg"], o["ours"], o["tokens"], o["segment_pos"]

    # Ours: chunked prefill over the whole sequence (compared with the official full forward);
    # the cache after RG_PREFILL tokens is kept for decoding.
    cache = init_cache(cfg, B, MAX_LEN)
    chunks, decode_cache = [], None
    for s in range(0, RG_T, RG_CHUNK):
        logits, cache = jit_forward(params, cfg, tokens[:, s:s + RG_CHUNK], s, cache)
        chunks.append(np.asarray(logits))
        if s + RG_CHUNK == RG_PREFILL:
            decode_cache = cache
    chunked = np.concatenate(chunks, axis=1)
    per_position = np.abs(chunked - ref_full).max(axis=(0, 2))
    assert per_position.max() <= 1e-4, per_position

    # Official: prefill RG_PREFILL tokens (cache returned), then 1-token steps through its cache.
    ref_logits, ref_cache = o["apply"](o["params"], tokens[:, :RG_PREFILL], pos[:, :RG_PREFILL])
    assert np.abs(np.asarray(ref_logits) - ref_full[:, :RG_PREFILL]).max() <= 1e-4
    ours_cache = decode_cache
    steps = list(range(RG_PREFILL, RG_T))
    assert len(steps) >= 10 + cfg.sliding_window  # decodes well past the window
    for p in steps:
        ref_step, ref_cache = o["step"](o["params"], tokens[:, p:p + 1], pos[:, p:p + 1], ref_cache)
        ours_step, ours_cache = jit_forward(params, cfg, tokens[:, p:p + 1], p, ours_cache)
        ref_step, ours_step = np.asarray(ref_step), np.asarray(ours_step)
        assert np.abs(ours_step - ref_step).max() <= 1e-4, p
        assert np.abs(ref_step[:, 0] - ref_full[:, p]).max() <= 1e-4, p  # the oracle agrees too


def test_recurrentgemma_params_wrapper_and_mapping(rg_oracle, tmp_path):
    """`{"params": ...}` (saved variables) loads the same; spot-check the layout transforms."""
    o = rg_oracle
    folder = save_orbax(tmp_path / "ckpt", {"params": o["params"]})
    _, wrapped = load_checkpoint(folder, "recurrentgemma-tiny")
    assert wrapped.keys() == o["ours"].keys()
    for name, value in o["ours"].items():
        np.testing.assert_array_equal(wrapped[name], value, err_msg=name)

    p, ours = o["params"], o["ours"]
    np.testing.assert_array_equal(ours["layers.0.rec.linear_x"],
                                  p["blocks.0"]["recurrent_block"]["linear_x"]["kernel"].T)
    ffw = p["blocks.2"]["mlp_block"]["ffw_up"]
    np.testing.assert_array_equal(ours["layers.2.mlp.gate"], ffw["w"][0].T)
    np.testing.assert_array_equal(ours["layers.2.mlp.up_bias"], ffw["b"][1, 0, 0])
    np.testing.assert_array_equal(ours["layers.2.attn.k"],
                                  p["blocks.2"]["attention_block"]["proj_k"]["kernel"].T)


# =================================================================================================
# Gemma 2 / Gemma 3: official trees built from MODEL_SPEC 6.1
# =================================================================================================
G_T = 20  # > 2 sliding windows (8)


@pytest.fixture(scope="module")
def gemma_params():
    out = {}
    for name in ("gemma2-tiny", "gemma3-tiny"):
        cfg = get_config(name)
        out[name] = (cfg, init_params(cfg, 0))
    return out


def official_layer(cfg, params, i, *, transposed_gating=False):
    """{module path: {leaf: array}} of layer i, from our [out, in] params (inverse transforms).

    q_einsum w[n, e, d] = q[n*D + d, e]; kv_einsum w[c, k, e, d] = (K if c == 0 else V)[k*D + d, e];
    attn_vec_einsum w[n, d, e] = o[e, n*D + d]; gating_einsum w[c, f, e] = (gate, up)[c][f, e]
    (Gemma 2 2B: w[c, e, f]); linear w[f, e] = down[e, f].
    """
    h, k, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    p = lambda leaf: params[f"layers.{i}.{leaf}"]  # noqa: E731
    heads = lambda w, n: np.stack([w[j * d:(j + 1) * d].T for j in range(n)])  # [n, E, D]
    gating = np.stack([p("mlp.gate"), p("mlp.up")])
    if transposed_gating:
        gating = np.stack([p("mlp.gate").T, p("mlp.up").T])
    layer = {
        "pre_attention_norm": {"scale": p("pre_attn_norm")},
        "post_attention_norm": {"scale": p("post_attn_norm")},
        "pre_ffw_norm": {"scale": p("pre_ffw_norm")},
        "post_ffw_norm": {"scale": p("post_ffw_norm")},
        "attn/q_einsum": {"w": heads(p("attn.q"), h)},
        "attn/kv_einsum": {"w": np.stack([heads(p("attn.k"), k), heads(p("attn.v"), k)])},
        "attn/attn_vec_einsum": {"w": np.stack(
            [p("attn.o")[:, j * d:(j + 1) * d].T for j in range(h)])},
        "mlp/gating_einsum": {"w": gating},
        "mlp/linear": {"w": p("mlp.down").T},
    }
    if cfg.qk_norm:
        layer["attn/_query_norm"] = {"scale": p("attn.q_norm")}
        layer["attn/_key_norm"] = {"scale": p("attn.k_norm")}
    assert layer["attn/q_einsum"]["w"].shape == (h, e, d)
    assert layer["attn/kv_einsum"]["w"].shape == (2, k, e, d)
    assert layer["attn/attn_vec_einsum"]["w"].shape == (h, d, e)
    return layer


def official_flat(cfg, params, *, prefix="transformer/", transposed_gating=False, pad_rows=0,
                  dtype=np.float32):
    """The FLAT layout of the released checkpoints: '/'-joined module paths -> {leaf: array}."""
    embed = params["embed"]
    if pad_rows:
        embed = np.concatenate([embed, np.full((pad_rows, embed.shape[1]), 7.0, embed.dtype)])
    tree = {f"{prefix}embedder": {"input_embedding": embed},
            f"{prefix}final_norm": {"scale": params["final_norm"]}}
    for i in range(cfg.num_layers):
        layer = official_layer(cfg, params, i, transposed_gating=transposed_gating)
        for path, leaves in layer.items():
            tree[f"{prefix}layer_{i}/{path}"] = leaves
    return jax.tree.map(lambda x: np.asarray(x, dtype), tree)


def official_nested(cfg, params, *, dtype=np.float32):
    """The NESTED layout of gm.ckpts.load_params: no `transformer/`, MLP leaves without `w`."""
    tree = {"embedder": {"input_embedding": params["embed"]},
            "final_norm": {"scale": params["final_norm"]}}
    for i in range(cfg.num_layers):
        layer = {}
        for path, leaves in official_layer(cfg, params, i).items():
            node = layer
            *parents, last = path.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = leaves["w"] if parents == ["mlp"] else leaves
        tree[f"layer_{i}"] = layer
    return jax.tree.map(lambda x: np.asarray(x, dtype), tree)


def test_inverse_transforms_match_official_einsums(gemma_params):
    """The trees above compute what the official modules compute (gemma/gm/nn/_modules.py)."""
    cfg, params = gemma_params["gemma3-tiny"]
    h, k, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    layer = official_layer(cfg, params, 1)
    x = np.random.default_rng(3).standard_normal((2, 5, e)).astype(np.float32)
    p = lambda leaf: params[f"layers.1.{leaf}"]  # noqa: E731
    tol = dict(rtol=1e-5, atol=1e-5)

    q = np.einsum("BTD,NDH->BTNH", x, layer["attn/q_einsum"]["w"])
    np.testing.assert_allclose(q, (x @ p("attn.q").T).reshape(2, 5, h, d), **tol)
    key, value = np.einsum("BSD,CKDH->CBSKH", x, layer["attn/kv_einsum"]["w"])
    np.testing.assert_allclose(key, (x @ p("attn.k").T).reshape(2, 5, k, d), **tol)
    np.testing.assert_allclose(value, (x @ p("attn.v").T).reshape(2, 5, k, d), **tol)
    enc = np.random.default_rng(4).standard_normal((2, 5, h, d)).astype(np.float32)
    out = np.einsum("BTNH,NHD->BTD", enc, layer["attn/attn_vec_einsum"]["w"])
    np.testing.assert_allclose(out, enc.reshape(2, 5, h * d) @ p("attn.o").T, **tol)

    gate = np.einsum("...F,NHF->...NH", x, layer["mlp/gating_einsum"]["w"])  # [2, F, E]
    np.testing.assert_allclose(gate[..., 0, :], x @ p("mlp.gate").T, **tol)
    np.testing.assert_allclose(gate[..., 1, :], x @ p("mlp.up").T, **tol)
    w_2b = official_layer(cfg, params, 1, transposed_gating=True)["mlp/gating_einsum"]["w"]
    np.testing.assert_allclose(np.einsum("...F,NFH->...NH", x, w_2b), gate, **tol)  # [2, E, F]
    act = np.random.default_rng(5).standard_normal((2, 5, cfg.mlp_dim)).astype(np.float32)
    np.testing.assert_allclose(np.einsum("...H,HF->...F", act, layer["mlp/linear"]["w"]),
                               act @ p("mlp.down").T, **tol)


MM_EXTRAS = {  # multimodal leaves the text decoder ignores (MODEL_SPEC 6.1)
    "transformer/embedder/mm_input_projection": {"w": np.ones((12, 64), np.float32)},
    "transformer/embedder/mm_soft_embedding_norm": {"scale": np.ones((12,), np.float32)},
    "SigLiPFromPatches_0/siglip_encoder": {"pos_embedding": np.ones((1, 4, 12), np.float32)},
    "SigLiPFromPatches_0/siglip_encoder/embedding": {"kernel": np.ones((2, 2, 3, 12), np.float32),
                                                     "bias": np.ones((12,), np.float32)},
}

CASES = {
    "gemma2-flat": ("gemma2-tiny", lambda c, p: official_flat(c, p)),
    "gemma3-flat": ("gemma3-tiny", lambda c, p: official_flat(c, p)),
    "gemma2-nested": ("gemma2-tiny", lambda c, p: official_nested(c, p)),
    "gemma3-nested": ("gemma3-tiny", lambda c, p: {
        **official_nested(c, p),
        "vision_encoder": {"siglip_encoder": {"pos_embedding": np.ones((1, 4, 12), np.float32)}}}),
    "gemma3-nested-params-wrapper": ("gemma3-tiny", lambda c, p: {"params": official_nested(c, p)}),
    "gemma2-2b-transposed-gating": ("gemma2-tiny",
                                    lambda c, p: official_flat(c, p, transposed_gating=True)),
    "gemma2-padded-embedding": ("gemma2-tiny", lambda c, p: official_flat(c, p, pad_rows=128)),
    "gemma3-rlx-prefix": ("gemma3-tiny", lambda c, p: official_flat(
        c, p, prefix="rlx_networks/policy_network/transformer/")),
    "gemma3-multimodal-extras": ("gemma3-tiny", lambda c, p: {**official_flat(c, p), **MM_EXTRAS}),
    "gemma2-bf16": ("gemma2-tiny", lambda c, p: official_flat(c, p, dtype=ml_dtypes.bfloat16)),
    "gemma3-bf16": ("gemma3-tiny", lambda c, p: official_flat(c, p, dtype=ml_dtypes.bfloat16)),
}


@pytest.fixture(scope="module")
def gemma_reference_logits(gemma_params):
    """Logits of our params (f32 and rounded to bf16) per model, computed once."""
    tokens = random_tokens(G_T, seed=2)
    out = {}
    for name, (cfg, params) in gemma_params.items():
        rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in params.items()}
        out[name] = {np.float32: our_logits(params, cfg, tokens),
                     ml_dtypes.bfloat16: our_logits(rounded, cfg, tokens)}
    return tokens, out


@pytest.mark.parametrize("case", list(CASES))
def test_gemma_official_layout_loads_exactly(case, gemma_params, gemma_reference_logits, tmp_path):
    name, build = CASES[case]
    cfg, params = gemma_params[name]
    tree = build(cfg, params)
    bf16 = case.endswith("bf16")
    folder = save_orbax(tmp_path / "ckpt", tree)

    loaded_cfg, loaded = load_checkpoint(folder, name)
    assert loaded_cfg == cfg
    assert loaded.keys() == params.keys()
    saved_dtype = ml_dtypes.bfloat16 if bf16 else np.float32
    for key, value in params.items():
        want = value.astype(saved_dtype).astype(np.float32)
        assert loaded[key].dtype == np.float32 and loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], want, err_msg=key)
    if bf16:  # the rounding is real: the f32 params are not bf16 values
        assert not np.array_equal(loaded["layers.0.attn.q"], params["layers.0.attn.q"])

    tokens, reference = gemma_reference_logits
    np.testing.assert_array_equal(our_logits(loaded, cfg, tokens), reference[name][saved_dtype])

    if bf16:  # loading straight to bf16 keeps the stored values
        _, as_bf16 = load_checkpoint(folder, name, dtype=ml_dtypes.bfloat16)
        for key, value in params.items():
            assert as_bf16[key].dtype == ml_dtypes.bfloat16, key
            np.testing.assert_array_equal(as_bf16[key], value.astype(ml_dtypes.bfloat16),
                                          err_msg=key)


def test_gemma2_gating_layouts_are_distinguished(gemma_params, tmp_path):
    """[2, F, E] and Gemma 2 2B's [2, E, F] give the same params; a swapped gate/up does not."""
    cfg, params = gemma_params["gemma2-tiny"]
    tree = official_flat(cfg, params, transposed_gating=True)
    w = tree["transformer/layer_1/mlp/gating_einsum"]["w"]
    tree["transformer/layer_1/mlp/gating_einsum"]["w"] = w[::-1].copy()  # up, gate
    _, loaded = load_checkpoint(save_orbax(tmp_path / "ckpt", tree), "gemma2-tiny")
    np.testing.assert_array_equal(loaded["layers.1.mlp.gate"], params["layers.1.mlp.up"])
    np.testing.assert_array_equal(loaded["layers.1.mlp.up"], params["layers.1.mlp.gate"])


# =================================================================================================
# Errors
# =================================================================================================
def _load_error(tmp_path, tree, model="gemma3-tiny") -> str:
    folder = save_orbax(tmp_path / "ckpt", tree)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, model)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_official_checkpoint_needs_a_model_name(rg_oracle, gemma_params, tmp_path):
    with pytest.raises(CheckpointError, match="--model"):
        load_checkpoint(rg_oracle["folder"])
    cfg, params = gemma_params["gemma3-tiny"]
    folder = save_orbax(tmp_path / "ckpt", official_flat(cfg, params))
    with pytest.raises(CheckpointError, match="--model"):
        load_checkpoint(folder)


@pytest.mark.parametrize("tensor, bad_shape, official_shape", [
    ("layer_1/attn/q_einsum", (5, 64, 16), (4, 64, 16)),  # one head too many
    ("layer_1/attn/q_einsum", (8, 64, 8), (4, 64, 16)),  # same size: a reshape alone accepts it
    ("layer_3/attn/kv_einsum", (2, 2, 64, 8), (2, 2, 64, 16)),
    ("layer_0/attn/attn_vec_einsum", (4, 64, 16), (4, 16, 64)),  # [H, E, D] instead of [H, D, E]
    ("layer_5/mlp/gating_einsum", (3, 128, 64), (2, 128, 64)),  # w[0], w[1] alone accept it
    ("layer_6/mlp/linear", (64, 128), (128, 64)),  # [E, F]: named in the official layout
])
def test_wrong_shape_names_tensor_and_expected_shape(gemma_params, tmp_path, tensor, bad_shape,
                                                      official_shape):
    cfg, params = gemma_params["gemma3-tiny"]
    tree = official_flat(cfg, params)
    tree[f"transformer/{tensor}"]["w"] = np.zeros(bad_shape, np.float32)
    message = _load_error(tmp_path, tree)
    assert f"'{tensor}/w'" in message
    assert str(tmp_path) in message  # the checkpoint folder
    assert "[" + ", ".join(map(str, bad_shape)) + "]" in message  # what the checkpoint has
    assert "[" + ", ".join(map(str, official_shape)) + "]" in message  # what the model needs


def test_wrong_shape_of_a_plain_tensor(gemma_params, tmp_path):
    cfg, params = gemma_params["gemma2-tiny"]
    tree = official_flat(cfg, params)
    tree["transformer/layer_1/pre_ffw_norm"]["scale"] = np.zeros(63, np.float32)
    message = _load_error(tmp_path, tree, "gemma2-tiny")
    assert "'layer_1/pre_ffw_norm/scale'" in message and "[63]" in message and "[64]" in message


def test_wrong_embedding_rows_is_an_error(gemma_params, tmp_path):
    cfg, params = gemma_params["gemma2-tiny"]
    message = _load_error(tmp_path, official_flat(cfg, params, pad_rows=7), "gemma2-tiny")
    assert "embedder/input_embedding" in message and "[263, 64]" in message


def test_missing_layer_tensor_is_named(gemma_params, tmp_path):
    cfg, params = gemma_params["gemma3-tiny"]
    tree = official_flat(cfg, params)
    del tree["transformer/layer_2/attn/kv_einsum"]
    message = _load_error(tmp_path, tree)
    assert "missing" in message and "layer_2/attn/kv_einsum/w" in message


def test_unexpected_tensor_is_named(gemma_params, tmp_path):
    cfg, params = gemma_params["gemma3-tiny"]
    tree = official_flat(cfg, params)
    tree[f"transformer/layer_{cfg.num_layers}/pre_ffw_norm"] = {"scale": np.zeros(64, np.float32)}
    message = _load_error(tmp_path, tree)
    assert "unexpected" in message and f"layer_{cfg.num_layers}/pre_ffw_norm/scale" in message


def test_wrong_family_is_an_error(gemma_params, tmp_path):
    """A Gemma 2 checkpoint (no QK-norm) named as Gemma 3 fails on the first missing tensor."""
    cfg, params = gemma_params["gemma2-tiny"]
    message = _load_error(tmp_path, official_flat(cfg, params), "gemma3-tiny")
    assert "layer_0/attn/_query_norm/scale" in message


def test_export_from_an_official_recurrentgemma_checkpoint(rg_oracle, tmp_path):
    """`python -m export --checkpoint <Orbax folder> --model ...` exports and passes the gate."""
    import json

    from export.cli import main as export_main

    out = tmp_path / "out"
    assert export_main(["--checkpoint", rg_oracle["folder"], "--model", "recurrentgemma-tiny",
                        "--out", str(out), "--max-seq-len", "48", "--prefill-lens", "8",
                        "--verify-steps", "24"]) == 0
    report = json.loads(next(out.glob("*.parity.json")).read_text())
    assert report["passed"] and report["greedy_match"] == [24, 24]
