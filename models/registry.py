"""The registry of model sizes, keyed by CLI name. One list of names: `MODELS`.

`-it` names resolve to the same architecture with `instruction_tuned=True` (chat template, stop on
<end_of_turn>). Values from ../shared/MODEL_SPEC.md sections 2, 3 and 5.
"""

from __future__ import annotations

import dataclasses
import difflib

from models.config import (
    Family,
    LayerKind,
    ModelConfig,
    RecurrentConfig,
    SpecialTokens,
    VisionConfig,
)

G, L, R = LayerKind.GLOBAL, LayerKind.LOCAL, LayerKind.RECURRENT
GEMMA2_PATTERN = (L, G)
GEMMA3_PATTERN = (L, L, L, L, L, G)
GRIFFIN_PATTERN = (R, R, L)

GEMMA2_TOKENS = SpecialTokens(pad=0, eos=1, bos=2, end_of_turn=107)
GEMMA3_TOKENS = SpecialTokens(pad=0, eos=1, bos=2, end_of_turn=106)
RECURRENTGEMMA_TOKENS = SpecialTokens(pad=0, eos=1, bos=2, end_of_turn=107)


def _gemma2(name, *, embed_dim, num_layers, num_heads, num_kv_heads, head_dim, mlp_dim,
            query_pre_attn_scalar, **kw) -> ModelConfig:
    kw = {
        "vocab_size": 256_000, "sliding_window": 4096, "max_seq_len": 8192,
        "attn_softcap": 50.0, "final_softcap": 30.0, "tokens": GEMMA2_TOKENS, **kw,
    }
    return ModelConfig(
        name=name, family=Family.GEMMA2, embed_dim=embed_dim, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, mlp_dim=mlp_dim,
        layer_pattern=GEMMA2_PATTERN, query_scale=query_pre_attn_scalar**-0.5, **kw,
    )


def _gemma3(name, *, embed_dim, num_layers, num_heads, num_kv_heads, head_dim, mlp_dim,
            query_pre_attn_scalar=256, sliding_window=1024, max_seq_len=131_072,
            global_rope_scale=8.0, vision: bool | VisionConfig = True, **kw) -> ModelConfig:
    kw = {"vocab_size": 262_144, "tokens": GEMMA3_TOKENS, **kw}
    return ModelConfig(
        name=name, family=Family.GEMMA3, embed_dim=embed_dim, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, mlp_dim=mlp_dim,
        layer_pattern=GEMMA3_PATTERN, sliding_window=sliding_window, max_seq_len=max_seq_len,
        query_scale=query_pre_attn_scalar**-0.5, qk_norm=True, local_rope_base=10_000.0,
        global_rope_base=1_000_000.0, global_rope_scale=global_rope_scale,
        vision=vision if isinstance(vision, VisionConfig) else VisionConfig() if vision else None, **kw,
    )


def _griffin(name, *, width, num_layers, num_heads, **kw) -> ModelConfig:
    kw = {
        "vocab_size": 256_000, "sliding_window": 2048, "max_seq_len": 8192,
        "tokens": RECURRENTGEMMA_TOKENS, **kw,
    }
    return ModelConfig(
        name=name, family=Family.RECURRENTGEMMA, embed_dim=width, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=1, head_dim=width // num_heads, mlp_dim=3 * width,
        layer_pattern=GRIFFIN_PATTERN, query_scale=(width // num_heads) ** -0.5,
        final_softcap=30.0, rope_fraction=0.5, window_extra_key=True, embed_scale_bf16=True,
        mlp_bias=True, attn_out_bias=True,
        recurrent=RecurrentConfig(lru_width=width, conv_width=4, num_gate_blocks=num_heads),
        **kw,
    )


_BASE = [
    _gemma2("gemma2-2b", embed_dim=2304, num_layers=26, num_heads=8, num_kv_heads=4,
            head_dim=256, mlp_dim=9216, query_pre_attn_scalar=256),
    _gemma2("gemma2-9b", embed_dim=3584, num_layers=42, num_heads=16, num_kv_heads=8,
            head_dim=256, mlp_dim=14336, query_pre_attn_scalar=256),
    _gemma2("gemma2-27b", embed_dim=4608, num_layers=46, num_heads=32, num_kv_heads=16,
            head_dim=128, mlp_dim=36864, query_pre_attn_scalar=144),
    _gemma3("gemma3-270m", embed_dim=640, num_layers=18, num_heads=4, num_kv_heads=1,
            head_dim=256, mlp_dim=2048, sliding_window=512, max_seq_len=32_768,
            global_rope_scale=1.0, vision=False),
    _gemma3("gemma3-1b", embed_dim=1152, num_layers=26, num_heads=4, num_kv_heads=1,
            head_dim=256, mlp_dim=6912, sliding_window=512, max_seq_len=32_768,
            global_rope_scale=1.0, vision=False),
    _gemma3("gemma3-4b", embed_dim=2560, num_layers=34, num_heads=8, num_kv_heads=4,
            head_dim=256, mlp_dim=10240),
    _gemma3("gemma3-12b", embed_dim=3840, num_layers=48, num_heads=16, num_kv_heads=8,
            head_dim=256, mlp_dim=15360),
    _gemma3("gemma3-27b", embed_dim=5376, num_layers=62, num_heads=32, num_kv_heads=16,
            head_dim=128, mlp_dim=21504, query_pre_attn_scalar=168),
    _griffin("recurrentgemma-2b", width=2560, num_layers=26, num_heads=10),
    _griffin("recurrentgemma-9b", width=4096, num_layers=38, num_heads=16),
]

# Tiny configs: every feature of the family switched on, small enough for 2 CPU cores. Softcaps are
# set low enough to bite on random weights; windows are a few tokens so tests cross them.
_TINY = [
    _gemma2("gemma2-tiny", vocab_size=256, embed_dim=64, num_layers=4, num_heads=4,
            num_kv_heads=2, head_dim=16, mlp_dim=128, query_pre_attn_scalar=16,
            sliding_window=8, max_seq_len=128, attn_softcap=5.0, final_softcap=3.0),
    _gemma3("gemma3-tiny", vocab_size=256, embed_dim=64, num_layers=7, num_heads=4,
            num_kv_heads=2, head_dim=16, mlp_dim=128, query_pre_attn_scalar=16,
            sliding_window=8, max_seq_len=128, global_rope_scale=8.0, vision=False),
    # gemma3-tiny with a tiny vision tower: 28x28 images, 7x7 patches (4x4 grid) pooled 2x2 to 4 soft
    # tokens; image token ids inside the tiny vocabulary
    _gemma3("gemma3-vision-tiny", vocab_size=256, embed_dim=64, num_layers=7, num_heads=4,
            num_kv_heads=2, head_dim=16, mlp_dim=128, query_pre_attn_scalar=16,
            sliding_window=8, max_seq_len=128, global_rope_scale=8.0,
            vision=VisionConfig(image_size=28, patch_size=7, width=32, depth=2, num_heads=2, mlp_dim=64,
                                tokens_per_image=4, boi_token=253, eoi_token=254, soft_token=255,
                                newline_token=108)),
    _griffin("recurrentgemma-tiny", vocab_size=256, width=64, num_layers=6, num_heads=4,
             sliding_window=8, max_seq_len=128),
]

class UnknownModelError(ValueError):
    pass


_IT_SUFFIX = "-it"
MODELS: dict[str, ModelConfig] = {c.name: c for c in _BASE + _TINY}
MODELS.update({
    c.name + _IT_SUFFIX: dataclasses.replace(c, name=c.name + _IT_SUFFIX, instruction_tuned=True)
    for c in _BASE
})


def list_models() -> list[str]:
    return list(MODELS)


def get_config(name: str) -> ModelConfig:
    """The registered config for a CLI name; a clear error with the closest names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model '{name}'{hint} (see `python -m models list`, or pass --checkpoint with a "
            "config.json)"
        ) from None
