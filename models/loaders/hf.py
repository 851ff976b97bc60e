"""Hugging Face safetensors checkpoints (Gemma2ForCausalLM, Gemma3ForCausalLM,
Gemma3ForConditionalGeneration's text part, RecurrentGemmaForCausalLM): MODEL_SPEC 6.2, 6.3.

Our parameter layout is HF's ([out, in] matmul weights), so almost every tensor maps one to one.
"""

from __future__ import annotations

import re

import numpy as np

from models.config import Family, ModelConfig
from models.loaders.common import Source, TensorReader
from models.params import param_shapes

# HF names of a Gemma 2/3 layer's tensors, relative to `{prefix}layers.{i}.`
_GEMMA_LAYER = {
    "pre_attn_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
    "pre_ffw_norm": "pre_feedforward_layernorm.weight",
    "post_ffw_norm": "post_feedforward_layernorm.weight",
    "attn.q": "self_attn.q_proj.weight",
    "attn.k": "self_attn.k_proj.weight",
    "attn.v": "self_attn.v_proj.weight",
    "attn.o": "self_attn.o_proj.weight",
    "attn.q_norm": "self_attn.q_norm.weight",
    "attn.k_norm": "self_attn.k_norm.weight",
    "mlp.gate": "mlp.gate_proj.weight",
    "mlp.up": "mlp.up_proj.weight",
    "mlp.down": "mlp.down_proj.weight",
}

_GRIFFIN_LAYER = {
    "temporal_pre_norm": "temporal_pre_norm.weight",
    "channel_pre_norm": "channel_pre_norm.weight",
    "attn.q": "temporal_block.q_proj.weight",
    "attn.k": "temporal_block.k_proj.weight",
    "attn.v": "temporal_block.v_proj.weight",
    "attn.o": "temporal_block.o_proj.weight",
    "attn.o_bias": "temporal_block.o_proj.bias",
    "rec.linear_x": "temporal_block.linear_x.weight",
    "rec.linear_x_bias": "temporal_block.linear_x.bias",
    "rec.linear_y": "temporal_block.linear_y.weight",
    "rec.linear_y_bias": "temporal_block.linear_y.bias",
    "rec.linear_out": "temporal_block.linear_out.weight",
    "rec.linear_out_bias": "temporal_block.linear_out.bias",
    "rec.conv_w": "temporal_block.conv_1d.weight",
    "rec.conv_bias": "temporal_block.conv_1d.bias",
    "rec.a_param": "temporal_block.rg_lru.recurrent_param",
    "rec.input_gate": "temporal_block.rg_lru.input_gate_weight",
    "rec.input_gate_bias": "temporal_block.rg_lru.input_gate_bias",
    "rec.a_gate": "temporal_block.rg_lru.recurrent_gate_weight",
    "rec.a_gate_bias": "temporal_block.rg_lru.recurrent_gate_bias",
    "mlp.gate": "mlp_block.gate_proj.weight",
    "mlp.gate_bias": "mlp_block.gate_proj.bias",
    "mlp.up": "mlp_block.up_proj.weight",
    "mlp.up_bias": "mlp_block.up_proj.bias",
    "mlp.down": "mlp_block.down_proj.weight",
    "mlp.down_bias": "mlp_block.down_proj.bias",
}


def _conv_from_hf(w: np.ndarray) -> np.ndarray:
    """HF depthwise Conv1d weight [C, 1, W] -> ours [W, C]."""
    return w[:, 0, :].T


def _conv_to_hf(w: np.ndarray) -> np.ndarray:
    return w.T[:, None, :]


_TRANSFORMS = {"rec.conv_w": _conv_from_hf}
_INVERSE = {"rec.conv_w": _conv_to_hf}

# Text-decoder prefixes: text-only models, transformers <= 4.51 multimodal, >= 4.52 multimodal.
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
# Tensors an HF checkpoint may hold that the text decoder does not use: the tied LM head and the
# Gemma 3 vision tower and projector (loaded by the vision model, not here).
_IGNORED = re.compile(
    r"^(lm_head\.weight|language_model\.lm_head\.weight|(model\.)?(vision_tower|multi_modal_projector)\..*)$"
)


def detect_prefix(names: list[str]) -> str:
    names = set(names)
    for prefix in _PREFIXES:
        if prefix + "embed_tokens.weight" in names:
            return prefix
    return "model."


def hf_sources(cfg: ModelConfig, reader: TensorReader) -> dict[str, Source]:
    return _sources(cfg, detect_prefix(reader.names()))


def _sources(cfg: ModelConfig, prefix: str) -> dict[str, Source]:
    final = "final_norm.weight" if cfg.family is Family.RECURRENTGEMMA else "norm.weight"
    layer_names = _GRIFFIN_LAYER if cfg.family is Family.RECURRENTGEMMA else _GEMMA_LAYER
    sources = {}
    for ours in param_shapes(cfg):
        if ours == "embed":
            sources[ours] = Source(prefix + "embed_tokens.weight")
        elif ours == "final_norm":
            sources[ours] = Source(prefix + final)
        else:
            _, i, leaf = ours.split(".", 2)
            sources[ours] = Source(f"{prefix}layers.{i}.{layer_names[leaf]}", _TRANSFORMS.get(leaf))
    return sources


def is_ignored(name: str) -> bool:
    return bool(_IGNORED.match(name))


def to_hf_tensors(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our parameters under HF names and layouts (text-only model, `model.` prefix). Lazy
    params (models/lazy.py) stay lazy, converted when read (a checkpoint written tensor by tensor)."""
    from models.lazy import is_lazy

    out = {}
    for ours, src in _sources(cfg, "model.").items():
        leaf = ours.split(".", 2)[-1]
        inverse = _INVERSE.get(leaf)
        value = params[ours]
        if is_lazy(value):
            if inverse:
                shape = inverse(np.broadcast_to(np.zeros((), value.dtype), value.shape)).shape
                value = value.apply(lambda a, f=inverse: np.ascontiguousarray(f(a)), shape=shape)
            out[src.name] = value
        else:
            out[src.name] = np.ascontiguousarray(inverse(value) if inverse else value)
    return out


def save_checkpoint(cfg: ModelConfig, params: dict, folder, dtype=None):
    """Write `params` (arrays or lazy tensors) as a Hugging Face `model.safetensors` in `folder`,
    one tensor in memory at a time, cast to `dtype` if given (e.g. ml_dtypes.bfloat16). No
    config.json: load it back with the model's name (`--model NAME --checkpoint folder`)."""
    from pathlib import Path

    from models.lazy import cast
    from models.loaders.safetensors_io import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(cfg, params)
    if dtype is not None:
        tensors = {k: cast(v, dtype) for k, v in tensors.items()}
    save_file(tensors, folder / "model.safetensors")
    return folder / "model.safetensors"
