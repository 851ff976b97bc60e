"""The parameter table of every family: names and shapes, from which initialisation, parameter
counts and the loaders' shape checks all derive.

Parameters are a flat dict {name: array}. Names: `embed`, `final_norm`, and `layers.{i}.<leaf>`.
Conventions: 2-D matmul weights are stored [out, in] (they lower to FULLY_CONNECTED without a
runtime transpose); `*_bias` are biases; `*_norm` are RMSNorm scales used as (1 + scale).
"""

from __future__ import annotations

import math

import numpy as np

from models.config import Family, LayerKind, ModelConfig


def _attention_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    e, h, k, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {
        "attn.q": (h * d, e),
        "attn.k": (k * d, e),
        "attn.v": (k * d, e),
        "attn.o": (e, h * d),
    }
    if cfg.qk_norm:
        shapes.update({"attn.q_norm": (d,), "attn.k_norm": (d,)})
    if cfg.attn_out_bias:
        shapes["attn.o_bias"] = (e,)
    return shapes


def _mlp_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    e, f = cfg.embed_dim, cfg.mlp_dim
    shapes = {"mlp.gate": (f, e), "mlp.up": (f, e), "mlp.down": (e, f)}
    if cfg.mlp_bias:
        shapes.update({"mlp.gate_bias": (f,), "mlp.up_bias": (f,), "mlp.down_bias": (e,)})
    return shapes


def _recurrent_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    rc, e = cfg.recurrent, cfg.embed_dim
    lw, nh, bs = rc.lru_width, rc.num_gate_blocks, rc.gate_block_size
    return {
        "rec.linear_x": (lw, e), "rec.linear_x_bias": (lw,),
        "rec.linear_y": (lw, e), "rec.linear_y_bias": (lw,),
        "rec.linear_out": (e, lw), "rec.linear_out_bias": (e,),
        "rec.conv_w": (rc.conv_width, lw), "rec.conv_bias": (lw,),
        "rec.a_param": (lw,),
        "rec.input_gate": (nh, bs, bs), "rec.input_gate_bias": (nh, bs),
        "rec.a_gate": (nh, bs, bs), "rec.a_gate_bias": (nh, bs),
    }


def layer_param_shapes(cfg: ModelConfig, kind: LayerKind) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's parameters, names relative to `layers.{i}.`."""
    e = cfg.embed_dim
    if cfg.family is Family.RECURRENTGEMMA:
        shapes = {"temporal_pre_norm": (e,), "channel_pre_norm": (e,)}
        shapes.update(_recurrent_shapes(cfg) if kind is LayerKind.RECURRENT else _attention_shapes(cfg))
    else:
        shapes = {n: (e,) for n in ("pre_attn_norm", "post_attn_norm", "pre_ffw_norm", "post_ffw_norm")}
        shapes.update(_attention_shapes(cfg))
    shapes.update(_mlp_shapes(cfg))
    return shapes


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in a stable order."""
    shapes = {"embed": (cfg.vocab_size, cfg.embed_dim)}
    for i, kind in enumerate(cfg.layer_kinds):
        shapes.update({f"layers.{i}.{n}": s for n, s in layer_param_shapes(cfg, kind).items()})
    shapes["final_norm"] = (cfg.embed_dim,)
    return shapes


def count_params(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for s in param_shapes(cfg).values())


def init_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random parameters from a seed, scaled so activations stay O(1) through the network.

    Matmul weights ~ N(0, 1/fan_in); norm scales ~ N(0, 0.1) (so the (1 + scale) gains differ
    from 1); embeddings ~ N(0, 1/E) (they are multiplied by sqrt(E)); RG-LRU `a_param` gives
    a = sigmoid(-a_param) in [0.9, 0.999] as in the Griffin paper; biases ~ N(0, 0.02).
    Each tensor is drawn from its own seed (models.lazy.random_tensor), so these equal the lazy
    init (`init_model(..., lazy=True)`, what the CLI's --random-init streams) value for value.
    """
    from models.lazy import random_tensor

    return {name: random_tensor(name, shape, seed, dtype) for name, shape in param_shapes(cfg).items()}


def init_model(cfg: ModelConfig, seed: int = 0, vision: bool = True,
               lazy: bool = False) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(final config, random params) of a whole model, as a loader returns them: with the vision
    tower's params when cfg has one and `vision`, else the text model with cfg.vision None.

    `lazy`: the text model's params are models.lazy.LazyTensor, each drawn from its own seed when
    read (`models.lazy.random_params`: the same values as `init_params`), so a dry run of a large
    model never holds it whole."""
    import dataclasses

    if lazy:
        from models.lazy import random_params

        params = random_params(param_shapes(cfg), seed)
    else:
        params = init_params(cfg, seed)
    if cfg.vision is None:
        return cfg, params
    if not vision:
        return dataclasses.replace(cfg, vision=None), params
    from models.vision import init_vision_params

    params.update(init_vision_params(cfg.vision, cfg.embed_dim, seed))
    return cfg, params
