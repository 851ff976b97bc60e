"""Checkpoint loading: `load_checkpoint(path, model=None)` -> (config, params).

Formats, detected from the path:
  GGUF:         a llama.cpp .gguf file (architectures gemma2, gemma3; F32/F16/BF16 and the Q*_0,
                Q*_1 and K quantizations, dequantized to float32), config from its metadata
                unless a model is given (models/loaders/gguf.py);
  Hugging Face: model.safetensors or sharded with model.safetensors.index.json (bf16/f16/f32),
                config from its config.json unless a model name is given;
  official:     an Orbax PyTree checkpoint (Gemma 2/3 flat or nested layout, RecurrentGemma);
                these carry no config, so a model name is required.
Every tensor is checked against the config before data is read; the first missing, unexpected or
mis-shaped tensor is a one-line CheckpointError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.config import ModelConfig
from models.errors import CheckpointError
from models.hf_config import config_from_hf
from models.loaders import gguf, hf, official
from models.loaders.common import assemble
from models.loaders.safetensors_io import INDEX_FILE, SafetensorsCheckpoint
from models.registry import get_config


def detect_format(path: Path) -> str:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        if gguf.is_gguf(path):
            return "gguf"
        raise CheckpointError(f"{path}: pass the checkpoint folder, not a file inside it")
    if (path / INDEX_FILE).exists() or any(path.glob("*.safetensors")):
        return "hf"
    if official.looks_official(path):
        return "official"
    raise CheckpointError(
        f"{path}: neither *.safetensors (Hugging Face) nor an Orbax checkpoint (official Flax) found"
    )


def resolve_config(path: Path, model: str | ModelConfig | None, fmt: str) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if model is not None:
        return get_config(model)
    if fmt == "gguf":
        return gguf.config_from_gguf(path)
    if fmt == "official":
        raise CheckpointError(f"{path}: official checkpoints carry no config.json; pass --model NAME")
    return config_from_hf(path)


def load_checkpoint(path, model: str | ModelConfig | None = None, dtype=np.float32,
                    vision: bool = True, lazy: bool = False) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Load a checkpoint folder (or a .gguf file) as (config, flat params of `dtype`).

    `lazy`: the text model's params are models.lazy.LazyTensor, read from the
    checkpoint one tensor at a time when loaded; the reader stays open as long as they live.
    Orbax checkpoints restore as one tree, so they load eagerly. The vision tower (Gemma 3 4B+, about 0.4B parameters) is read whole either way.

    Gemma 3 4B+ checkpoints carry the vision tower: its params (`vision.*`, `mm.*`, always f32,
    models/vision.py) join the text model's. A checkpoint without any vision tensor (a text-only
    conversion), or `vision=False`, gives the text model alone, with `cfg.vision` None."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        given = model if isinstance(model, ModelConfig) else get_config(model) if model else None
        return gguf.load_gguf(path, given, dtype=dtype, lazy=lazy)
    cfg = resolve_config(path, model, fmt)
    if fmt == "hf":
        reader = SafetensorsCheckpoint(path)
        try:
            params = assemble(cfg, reader, hf.hf_sources(cfg, reader), dtype=dtype,
                              ignore=hf.is_ignored, where=str(path), lazy=lazy)
            cfg, extra = _vision_params(cfg, reader, path, vision, official=False)
        finally:
            if not lazy:  # lazy params keep the reader (closed when they are collected)
                reader.close()
    else:
        reader = official.OrbaxReader(path)
        params = assemble(cfg, reader, official.official_sources(cfg, reader), dtype=dtype,
                          ignore=official.is_ignored, where=str(path))  # Orbax restores the whole tree
        cfg, extra = _vision_params(cfg, reader, path, vision, official=True)
    params.update(extra)
    return cfg, params


def _vision_params(cfg: ModelConfig, reader, path: Path, wanted: bool, official: bool):
    """(config, vision params): the config without vision when the checkpoint has none or it is
    not wanted."""
    import dataclasses

    from models import vision as vm

    if cfg.vision is None:
        return cfg, {}
    names = [n for n in reader.names() if vm.is_vision_name(n, official)]
    if not wanted or not names:
        return dataclasses.replace(cfg, vision=None), {}
    state = {n: reader.read(n) for n in names}
    convert = vm.official_vision_to_params if official else vm.hf_vision_to_params
    try:
        return cfg, convert(state, cfg.vision, cfg.embed_dim)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


__all__ = ["load_checkpoint", "detect_format", "CheckpointError"]
