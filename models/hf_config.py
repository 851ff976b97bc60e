"""`config_from_hf`: a ModelConfig from a Hugging Face config.json, so any HF checkpoint folder
(fine-tunes included) loads without a registry entry.

Supported `model_type`s: gemma2, gemma3_text, gemma3 (its text_config; the vision_config becomes
a VisionConfig), recurrent_gemma. Missing keys take the transformers class defaults (recent
transformers versions write only the values that differ from them).

RecurrentGemma: we follow the official reference, whose local attention sees W + 1 keys; HF 5.x
sees W (MODEL_SPEC 5.6). The two agree up to W tokens; `docs/models.md` has the details.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.config import (
    Family,
    LayerKind,
    ModelConfig,
    RecurrentConfig,
    SpecialTokens,
    VisionConfig,
)
from models.errors import ConfigError

SUPPORTED = ("gemma2", "gemma3_text", "gemma3", "recurrent_gemma")

# transformers 5.24 class defaults of the keys we read
_GEMMA2_DEFAULTS = dict(
    vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
    rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096,
    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rope_theta=10_000.0,
    hidden_activation="gelu_pytorch_tanh", eos_token_id=1, bos_token_id=2, pad_token_id=0,
)
_GEMMA3_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
    rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096,
    final_logit_softcapping=None, attn_logit_softcapping=None, rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0, hidden_activation="gelu_pytorch_tanh", eos_token_id=1,
    bos_token_id=2, pad_token_id=0, sliding_window_pattern=6,
)
_GRIFFIN_DEFAULTS = dict(
    vocab_size=256_000, hidden_size=2560, intermediate_size=3 * 2560, num_hidden_layers=26,
    num_attention_heads=10, num_key_value_heads=None, lru_width=None, attention_window_size=2048,
    conv1d_width=4, logits_soft_cap=30.0, rms_norm_eps=1e-6, rope_theta=10_000.0,
    partial_rotary_factor=0.5, block_types=("recurrent", "recurrent", "attention"),
    hidden_activation="gelu_pytorch_tanh", eos_token_id=1, bos_token_id=2, pad_token_id=0,
)
# The context RecurrentGemma was trained on (its config has no max_position_embeddings; the state
# is O(1), so longer contexts run, without having been trained for).
GRIFFIN_TRAINED_CONTEXT = 8192
# Gemma 3's multimodal table carries 64 placeholder rows past the text vocabulary.
GEMMA3_TEXT_VOCAB = 262_144


def config_from_hf(path: str | Path, name: str | None = None) -> ModelConfig:
    """Build a config from `path` (a config.json or a folder holding one)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"no config.json in {path}; pass --model NAME to choose an architecture")
    try:
        raw = json.loads(file.read_text())
    except ValueError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    model_type = raw.get("model_type")
    name = name or file.parent.name or "hf-model"
    instruction_tuned = _has_chat_template(file.parent)
    if model_type == "gemma2":
        return _gemma(raw, name, Family.GEMMA2, _GEMMA2_DEFAULTS, instruction_tuned, file)
    if model_type == "gemma3_text":
        return _gemma(raw, name, Family.GEMMA3, _GEMMA3_DEFAULTS, instruction_tuned, file)
    if model_type == "gemma3":
        text = dict(raw.get("text_config") or {})
        text.setdefault("eos_token_id", raw.get("eos_token_id", 1))
        vision = _vision(raw.get("vision_config") or {}, raw.get("mm_tokens_per_image", 256), raw)
        return _gemma(text, name, Family.GEMMA3, _GEMMA3_DEFAULTS, instruction_tuned, file,
                      vision=vision)
    if model_type == "recurrent_gemma":
        return _griffin(raw, name, instruction_tuned, file)
    raise ConfigError(
        f"{file}: unsupported model_type '{model_type}'; supported: {', '.join(SUPPORTED)}"
    )


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    tok = folder / "tokenizer_config.json"
    try:
        return tok.exists() and "chat_template" in json.loads(tok.read_text())
    except ValueError:
        return False


# Keys whose explicit null means "off" rather than "use the default".
_NULLABLE = frozenset({"final_logit_softcapping", "attn_logit_softcapping", "logits_soft_cap"})


def _getter(raw: dict, defaults: dict):
    def get(key):
        if key in raw and (raw[key] is not None or key in _NULLABLE):
            return raw[key]
        return defaults.get(key)
    return get


def _check_activation(get, file):
    act = get("hidden_activation") or get("hidden_act")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(
            f"{file}: hidden_activation '{act}' is not Gemma's tanh GELU; is this a Gemma config?")


def _tokens(get, end_of_turn_default: int | None) -> SpecialTokens:
    eos = get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    end_of_turn = eos_ids[1] if len(eos_ids) > 1 else end_of_turn_default
    return SpecialTokens(pad=get("pad_token_id") or 0, eos=eos_ids[0], bos=get("bos_token_id"),
                         end_of_turn=end_of_turn)


def _rope(raw: dict, layer_type: str | None, theta_key: str, default_theta: float):
    """(base, linear factor) from HF's rope fields: transformers 5 `rope_parameters` (per layer
    type for Gemma 3), or the legacy top-level `rope_theta` / `rope_local_base_freq` /
    `rope_scaling` (scaling applies to global layers only)."""
    params = raw.get("rope_parameters")
    if params is not None and layer_type is not None:
        params = params.get(layer_type)
    if params is None:
        params = dict(raw.get("rope_scaling") or {}) if layer_type != "sliding_attention" else {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ConfigError(f"rope_type '{rope_type}' is not supported (Gemma uses default and linear)")
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return float(params.get("rope_theta", raw.get(theta_key, default_theta))), factor


def _gemma(raw, name, family, defaults, instruction_tuned, file, vision=None) -> ModelConfig:
    get = _getter(raw, defaults)
    _check_activation(get, file)
    layers = get("num_hidden_layers")
    types = raw.get("layer_types")
    if types is None:
        if family is Family.GEMMA2:
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        else:
            p = get("sliding_window_pattern")
            types = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(layers)]
    kinds = {"sliding_attention": LayerKind.LOCAL, "full_attention": LayerKind.GLOBAL}
    try:
        pattern = _shortest_period(tuple(kinds[t] for t in types))
    except KeyError as e:
        raise ConfigError(f"{file}: unknown layer type {e}") from None
    if raw.get("use_bidirectional_attention"):
        raise ConfigError(f"{file}: bidirectional (embedding) Gemma models are not supported")
    if family is Family.GEMMA2:
        base, _ = _rope(raw, None, "rope_theta", defaults["rope_theta"])
        local_base, global_base, global_scale = base, base, 1.0
    else:
        local_base, _ = _rope(raw, "sliding_attention", "rope_local_base_freq",
                              defaults["rope_local_base_freq"])
        global_base, global_scale = _rope(raw, "full_attention", "rope_theta", defaults["rope_theta"])
    vocab = get("vocab_size")
    return ModelConfig(
        name=name, family=family, vocab_size=vocab, embed_dim=get("hidden_size"),
        num_layers=layers, num_heads=get("num_attention_heads"),
        num_kv_heads=get("num_key_value_heads"), head_dim=get("head_dim"),
        mlp_dim=get("intermediate_size"), layer_pattern=pattern,
        sliding_window=get("sliding_window"), max_seq_len=get("max_position_embeddings"),
        query_scale=float(get("query_pre_attn_scalar")) ** -0.5,
        attn_softcap=get("attn_logit_softcapping"), final_softcap=get("final_logit_softcapping"),
        qk_norm=family is Family.GEMMA3, local_rope_base=local_base, global_rope_base=global_base,
        global_rope_scale=global_scale, norm_eps=get("rms_norm_eps"),
        tokens=_tokens(get, 107 if family is Family.GEMMA2 else 106),
        instruction_tuned=instruction_tuned, vision=vision,
        sample_vocab_size=GEMMA3_TEXT_VOCAB if vision and vocab > GEMMA3_TEXT_VOCAB else None,
    )


def _shortest_period(kinds: tuple) -> tuple:
    """The shortest prefix whose tiling gives the whole per-layer list (the pattern as data)."""
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return kinds[:p]
    return kinds


def _griffin(raw, name, instruction_tuned, file) -> ModelConfig:
    get = _getter(raw, _GRIFFIN_DEFAULTS)
    _check_activation(get, file)
    width, heads = get("hidden_size"), get("num_attention_heads")
    kinds = {"recurrent": LayerKind.RECURRENT, "attention": LayerKind.LOCAL}
    pattern = tuple(kinds[t] for t in get("block_types"))
    base, _ = _rope(raw, None, "rope_theta", _GRIFFIN_DEFAULTS["rope_theta"])
    params = raw.get("rope_parameters") or {}
    fraction = params.get("partial_rotary_factor", get("partial_rotary_factor"))
    return ModelConfig(
        name=name, family=Family.RECURRENTGEMMA, vocab_size=get("vocab_size"), embed_dim=width,
        num_layers=get("num_hidden_layers"), num_heads=heads,
        num_kv_heads=get("num_key_value_heads") or heads, head_dim=width // heads,
        mlp_dim=get("intermediate_size") // 2,  # HF stores twice the branch width (MODEL_SPEC 8.3.15)
        layer_pattern=pattern, sliding_window=get("attention_window_size"),
        max_seq_len=GRIFFIN_TRAINED_CONTEXT, query_scale=(width // heads) ** -0.5,
        final_softcap=get("logits_soft_cap"), local_rope_base=base, global_rope_base=base,
        rope_fraction=fraction, window_extra_key=True, embed_scale_bf16=True, mlp_bias=True,
        attn_out_bias=True, norm_eps=get("rms_norm_eps"),
        recurrent=RecurrentConfig(lru_width=get("lru_width") or width,
                                  conv_width=get("conv1d_width"), num_gate_blocks=heads),
        tokens=_tokens(get, 107), instruction_tuned=instruction_tuned,
    )


def _vision(raw: dict, tokens_per_image: int, top: dict | None = None) -> VisionConfig:
    """The vision_config (SigLIP) plus the image token ids of the top-level Gemma3Config."""
    d, top = VisionConfig(), top or {}
    return VisionConfig(
        boi_token=top.get("boi_token_index", d.boi_token), eoi_token=top.get("eoi_token_index", d.eoi_token),
        soft_token=top.get("image_token_index", top.get("image_token_id", d.soft_token)),
        image_size=raw.get("image_size", d.image_size), patch_size=raw.get("patch_size", d.patch_size),
        width=raw.get("hidden_size", d.width), depth=raw.get("num_hidden_layers", d.depth),
        num_heads=raw.get("num_attention_heads", d.num_heads),
        mlp_dim=raw.get("intermediate_size", d.mlp_dim),
        layer_norm_eps=raw.get("layer_norm_eps", d.layer_norm_eps), tokens_per_image=tokens_per_image,
    )
