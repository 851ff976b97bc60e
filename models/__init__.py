"""Gemma 2, Gemma 3 and RecurrentGemma in pure JAX: configs, parameters, caches, forward pass,
the signatures an artifact exports, reference generation and checkpoint loaders. Imports only the
artifact contract (contract/: layer kinds, state layout, tokenizer, prompt layout, sampling), never
`export/`, `runtime_py/` or `verify/`.

Shape legend (MODEL_SPEC section 0): the same letters in every shape comment, einsum and
docstring of this package; ModelConfig's fields in brackets.

  B  batch                            T  tokens of this call (query length)
  S  key positions a query attends    R  rows of a cache: the context (global layers), the ring (local)
  E  embedding width [embed_dim]      V  vocabulary rows [vocab_size]
  H  query heads [num_heads]          K  key/value heads [num_kv_heads]
  G  queries per key/value head, H/K  D  head width [head_dim]
  F  MLP width per branch [mlp_dim]   L  layers [num_layers]
  W  sliding window [sliding_window]  C  RG-LRU width [recurrent.lru_width]
  vision tower (models/vision.py): P patches, Ev tower width [vision.width], Hv tower heads
  [vision.num_heads], Dv = Ev / Hv, Fv tower MLP width [vision.mlp_dim], I soft tokens per image
  [vision.tokens_per_image]
"""

from contract.sampling import GREEDY, Sampling
from models.cache import init_cache
from models.config import Family, LayerKind, ModelConfig, RecurrentConfig, VisionConfig
from models.errors import CheckpointError, ConfigError
from models.generate import Generation, generate, sample
from models.hf_config import config_from_hf
from models.loaders import load_checkpoint
from models.model import forward
from models.params import count_params, init_model, init_params, param_shapes
from models.registry import MODELS, UnknownModelError, get_config, list_models

__all__ = [
    "CheckpointError", "ConfigError", "Family", "GREEDY", "Generation", "LayerKind", "MODELS",
    "ModelConfig", "RecurrentConfig", "Sampling", "UnknownModelError", "VisionConfig",
    "config_from_hf", "count_params", "forward", "generate", "get_config",
    "init_cache", "init_model", "init_params", "list_models", "load_checkpoint", "param_shapes", "sample",
]
