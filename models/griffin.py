"""RecurrentGemma (Griffin) residual block, recurrent block, Conv1D and RG-LRU (MODEL_SPEC 5).

Shapes follow the legend in models/__init__.py.

Residual block: x + temporal(norm(x)), then + mlp(norm(.)); no post-norms. The temporal block is
either the recurrent block below or the shared local-attention block (multi-query, partial RoPE,
W + 1 keys, output bias).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.attention import attention_block
from models.config import LayerKind, ModelConfig
from models.fused import AttentionForm, linear_recurrence
from models.gemma import geglu_mlp
from models.layers import F32, Params, dense, gelu_tanh, rms_norm, rotated


def griffin_layer(p: Params, cfg: ModelConfig, kind: LayerKind, x, positions, start, num_valid,
                  cache: dict, attention: AttentionForm = AttentionForm.SDPA):
    h = rotated(p, "temporal_pre_norm_rotation", rms_norm(x, p["temporal_pre_norm"], cfg.norm_eps))
    if kind is LayerKind.RECURRENT:
        h, cache = recurrent_block(p.scope("rec."), cfg, h, positions, start, num_valid, cache)
    else:
        h, cache = attention_block(p, cfg, kind, h, start, num_valid, cache, attention=attention)
    r = x + h
    return r + geglu_mlp(p, rotated(p, "channel_pre_norm_rotation", rms_norm(r, p["channel_pre_norm"], cfg.norm_eps))), cache


def recurrent_block(p: Params, cfg: ModelConfig, h, positions, start, num_valid, cache: dict):
    """h: [B, T, E] -> ([B, T, E], {"conv", "rg_lru"})."""
    y = gelu_tanh(dense(h, p["linear_y"], p["linear_y_bias"]))  # [B, T, C]
    u = dense(h, p["linear_x"], p["linear_x_bias"])  # [B, T, C]
    u, conv_state = conv1d(u, p["conv_w"], p["conv_bias"], start, num_valid, cache["conv"])
    valid = jnp.arange(h.shape[1])[None, :] < num_valid[:, None]
    u, lru_state = rg_lru(p, cfg, u, positions, valid, cache["rg_lru"])
    out = dense(rotated(p, "linear_out_rotation", u * y), p["linear_out"], p["linear_out_bias"])
    return out, {"conv": conv_state, "rg_lru": lru_state}


def conv1d(u, w, bias, start, num_valid, state):
    """Causal depthwise convolution with state.

    u: [B, T, C]; w: [conv_width, C] (w[-1] multiplies the current step); state:
    [B, conv_width - 1, C], the raw inputs of the conv_width - 1 previous positions. Taps that reach
    before position 0 are zero (the official document mask for a sequence starting at 0). Returns
    ([B, T, C], new state = the last conv_width - 1 valid raw inputs).
    """
    width, t = w.shape[0], u.shape[1]
    window = jnp.concatenate([state.astype(u.dtype), u], axis=1)  # [B, T + conv_width - 1, C]
    window_pos = start[:, None] - (width - 1) + jnp.arange(t + width - 1)[None, :]
    window = jnp.where((window_pos >= 0)[..., None], window, 0)
    out = bias.astype(F32) + sum(
        window[:, k:k + t].astype(F32) * w[k].astype(F32) for k in range(width)
    )
    # rows of the last conv_width - 1 valid inputs
    keep = num_valid[:, None] + jnp.arange(width - 1)[None, :]
    new_state = jnp.take_along_axis(window, keep[..., None], axis=1)
    return out.astype(u.dtype), new_state.astype(state.dtype)


def _block_diagonal(x, w, b):
    """x [B, T, C] with w [nh, bs, bs], b [nh, bs] -> [B, T, C], in f32: nh = num_gate_blocks blocks
    (H in RecurrentGemma; the einsum's h) of bs = C / nh channels."""
    nh, bs, _ = w.shape
    xb = x.astype(F32).reshape(*x.shape[:-1], nh, bs)
    return (jnp.einsum("...hi,hij->...hj", xb, w.astype(F32)) + b.astype(F32)).reshape(x.shape)


def rg_lru(p: Params, cfg: ModelConfig, u, positions, valid, state):
    """Real-gated linear recurrent unit. u: [B, T, C]; state: [B, C] f32.

    a_t = sigmoid(-a_param) ** (c * r_t), computed in log space; the input is normalised by
    sqrt(1 - a_t^2) except on a sequence's first token (position 0), where the state is reset.
    Pad tokens (valid False) leave the state unchanged.
    """
    gate_x = jax.nn.sigmoid(_block_diagonal(u, p["input_gate"], p["input_gate_bias"]))
    gate_a = jax.nn.sigmoid(_block_diagonal(u, p["a_gate"], p["a_gate_bias"]))
    log_a = -cfg.recurrent.log_a_scale * gate_a * jax.nn.softplus(p["a_param"].astype(F32))
    a, a_square = jnp.exp(log_a), jnp.exp(2.0 * log_a)
    reset = (positions == 0)[..., None]
    x = u.astype(F32) * gate_x * jnp.where(reset, 1.0, jnp.sqrt(1.0 - a_square))
    a = jnp.where(reset, 0.0, a)
    keep = valid[..., None]
    a, x = jnp.where(keep, a, 1.0), jnp.where(keep, x, 0.0)
    y, last = linear_recurrence(a, x, state)
    return y.astype(u.dtype), last
