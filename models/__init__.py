"""Gemma 2, Gemma 3 and RecurrentGemma in pure JAX: configs, parameters, caches, forward pass,
reference generation, checkpoint loaders and the tokenizer. Imports nothing from `export/`."""

from models.cache import init_cache
from models.config import Family, LayerKind, ModelConfig, RecurrentConfig, VisionConfig
from models.errors import CheckpointError, ConfigError
from models.generate import GREEDY, Generation, Sampling, generate, sample
from models.hf_config import config_from_hf
from models.loaders import load_checkpoint
from models.model import forward
from models.params import count_params, init_params, param_shapes
from models.registry import MODELS, UnknownModelError, get_config, list_models

__all__ = [
    "CheckpointError", "ConfigError", "Family", "GREEDY", "Generation", "LayerKind", "MODELS",
    "ModelConfig", "RecurrentConfig", "Sampling", "UnknownModelError", "VisionConfig",
    "config_from_hf", "count_params", "forward", "generate", "get_config",
    "init_cache", "init_params", "list_models", "load_checkpoint", "param_shapes", "sample",
]
