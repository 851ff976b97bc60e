"""Gemma 2 and Gemma 3 decoder layer (MODEL_SPEC 1.7): pre- and post-norms around attention and
the GeGLU MLP. Gemma 2 and 3 differ only in config data (soft-caps, QK-norm, pattern, RoPE)."""

from __future__ import annotations

from models.attention import attention_block
from models.config import LayerKind, ModelConfig
from models.fused import AttentionForm
from models.layers import Params, gelu_tanh, linear, rms_norm, rotated


def geglu_mlp(p: Params, x):
    """down(gelu_tanh(gate(x)) * up(x)), biases where the family has them. An export may add
    `mlp.down_rotation` (export/quantize/rotate.py: down's input rotated per block, its weight
    rotated to match; the same function), as the layer may rotate each norm's output."""
    gate = linear(p, "mlp.gate", x, "mlp.gate_bias")
    up = linear(p, "mlp.up", x, "mlp.up_bias")
    y = rotated(p, "mlp.down_rotation", gelu_tanh(gate) * up)
    return linear(p, "mlp.down", y, "mlp.down_bias")


def gemma_layer(p: Params, cfg: ModelConfig, kind: LayerKind, x, positions, start, num_valid,
                cache: dict, blocks=None, attention: AttentionForm = AttentionForm.SDPA, span: int | None = None,
                total=None):
    eps = cfg.norm_eps
    h = rotated(p, "pre_attn_norm_rotation", rms_norm(x, p["pre_attn_norm"], eps))
    a, cache = attention_block(p, cfg, kind, h, start, num_valid, cache, blocks, attention, span, total)
    x = x + rms_norm(a, p["post_attn_norm"], eps)
    h = rotated(p, "pre_ffw_norm_rotation", rms_norm(x, p["pre_ffw_norm"], eps))
    x = x + rms_norm(geglu_mlp(p, h), p["post_ffw_norm"], eps)
    return x, cache
