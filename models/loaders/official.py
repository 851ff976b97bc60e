"""Official Flax/Orbax checkpoints: Gemma 2/3 (google-deepmind/gemma, flat or nested layout) and
RecurrentGemma (google-deepmind/recurrentgemma). MODEL_SPEC 6.1 and 6.3.

Tensor names are normalised to '/'-joined paths without the wrapper prefixes (`params/`,
`rlx_networks/policy_network/`, `transformer/`); the nested Gemma layout's bare MLP leaves
(`mlp/gating_einsum`) get the flat layout's `/w`. Orbax metadata gives every shape before any
data is read, so a mismatching checkpoint fails before it costs memory.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from models.config import Family, ModelConfig
from models.errors import CheckpointError
from models.loaders.common import Source
from models.params import param_shapes

_WRAPPERS = ("params/", "rlx_networks/policy_network/", "transformer/")
_BARE_MLP = re.compile(r"(^|/)mlp/(gating_einsum|linear)$")
# Leaves of the multimodal Gemma 3 checkpoints that the text decoder does not use.
_IGNORED = re.compile(r"^(SigLiPFromPatches_0/.*|vision_encoder/.*|embedder/mm_.*)$")


def normalize(path: str) -> str:
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if path.startswith(w):
                path, changed = path[len(w):], True
    return path + "/w" if _BARE_MLP.search(path) else path


class OrbaxReader:
    """The tensors of an Orbax PyTree checkpoint by normalised name. Reading consumes a tensor."""

    def __init__(self, path: str | Path):
        import jax
        import orbax.checkpoint as ocp

        self.path = Path(path)
        self._checkpointer = ocp.PyTreeCheckpointer()
        try:
            meta = self._checkpointer.metadata(self.path)
        except Exception as e:  # orbax raises many types for a folder it cannot read
            raise CheckpointError(
                f"{self.path}: not a readable Orbax checkpoint ({type(e).__name__})") from None
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        self._shapes = {normalize(_join(k)): tuple(m.shape) for k, m in flat}
        self._tree_meta = tree
        self._arrays: dict[str, np.ndarray] | None = None

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, dtype=None) -> np.ndarray:
        if self._arrays is None:
            self._arrays = self._restore()
        x = self._arrays.pop(name)
        return x.astype(dtype or x.dtype, copy=False)

    def _restore(self) -> dict[str, np.ndarray]:
        import jax
        import orbax.checkpoint as ocp

        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), self._tree_meta)
        restored = self._checkpointer.restore(self.path, restore_args=args)
        flat = jax.tree_util.tree_flatten_with_path(restored)[0]
        return {normalize(_join(k)): np.asarray(v) for k, v in flat}


def _join(keypath) -> str:
    parts = []
    for k in keypath:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def is_ignored(name: str) -> bool:
    return bool(_IGNORED.match(name))


def official_sources(cfg: ModelConfig, reader) -> dict[str, Source]:
    if cfg.family is Family.RECURRENTGEMMA:
        return _griffin_sources(cfg)
    return _gemma_sources(cfg, reader)


# ---- Gemma 2 / 3 --------------------------------------------------------------------------------
def _gemma_sources(cfg: ModelConfig, reader) -> dict[str, Source]:
    e, f = cfg.embed_dim, cfg.mlp_dim
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def gating(i: str, branch: int) -> Source:
        # [2, F, E] in every checkpoint except Gemma 2 2B's [2, E, F] (MODEL_SPEC 1.6)
        name = f"layer_{i}/mlp/gating_einsum/w"
        transposed = name in reader.names() and reader.shape(name) == (2, e, f) and e != f
        if transposed:
            return Source(name, lambda w: w[branch].T, (2, e, f))
        return Source(name, lambda w: w[branch], (2, f, e))

    leaf_sources = {
        "pre_attn_norm": ("pre_attention_norm/scale", None),
        "post_attn_norm": ("post_attention_norm/scale", None),
        "pre_ffw_norm": ("pre_ffw_norm/scale", None),
        "post_ffw_norm": ("post_ffw_norm/scale", None),
        # [H, E, D] -> [H*D, E]
        "attn.q": ("attn/q_einsum/w", lambda w: w.transpose(0, 2, 1).reshape(h * d, e)),
        # [2, K, E, D] -> K: [K*D, E], V: [K*D, E]
        "attn.k": ("attn/kv_einsum/w", lambda w: w[0].transpose(0, 2, 1).reshape(k * d, e)),
        "attn.v": ("attn/kv_einsum/w", lambda w: w[1].transpose(0, 2, 1).reshape(k * d, e)),
        # [H, D, E] -> [E, H*D]
        "attn.o": ("attn/attn_vec_einsum/w", lambda w: w.transpose(2, 0, 1).reshape(e, h * d)),
        "attn.q_norm": ("attn/_query_norm/scale", None),
        "attn.k_norm": ("attn/_key_norm/scale", None),
        "mlp.down": ("mlp/linear/w", lambda w: w.T),  # [F, E] -> [E, F]
    }
    einsum_shapes = {  # official shapes (MODEL_SPEC 6.1)
        "attn/q_einsum/w": (h, e, d),
        "attn/kv_einsum/w": (2, k, e, d),
        "attn/attn_vec_einsum/w": (h, d, e),
        "mlp/linear/w": (f, e),
    }
    sources = {
        "embed": Source("embedder/input_embedding"),
        "final_norm": Source("final_norm/scale"),
    }
    for ours in param_shapes(cfg):
        if ours in sources:
            continue
        _, i, leaf = ours.split(".", 2)
        if leaf in ("mlp.gate", "mlp.up"):
            sources[ours] = gating(i, 1 if leaf == "mlp.up" else 0)
        else:
            name, transform = leaf_sources[leaf]
            sources[ours] = Source(f"layer_{i}/{name}", transform, einsum_shapes.get(name))
    return sources


# ---- RecurrentGemma -----------------------------------------------------------------------------
def _t(w):
    return w.T


_GRIFFIN_LEAVES = {
    "temporal_pre_norm": ("temporal_pre_norm/scale", None),
    "channel_pre_norm": ("channel_pre_norm/scale", None),
    # Dense kernels are [in, out] -> ours [out, in]
    "attn.q": ("attention_block/proj_q/kernel", _t),
    "attn.k": ("attention_block/proj_k/kernel", _t),
    "attn.v": ("attention_block/proj_v/kernel", _t),
    "attn.o": ("attention_block/proj_final/kernel", _t),
    "attn.o_bias": ("attention_block/proj_final/bias", None),
    "rec.linear_x": ("recurrent_block/linear_x/kernel", _t),
    "rec.linear_x_bias": ("recurrent_block/linear_x/bias", None),
    "rec.linear_y": ("recurrent_block/linear_y/kernel", _t),
    "rec.linear_y_bias": ("recurrent_block/linear_y/bias", None),
    "rec.linear_out": ("recurrent_block/linear_out/kernel", _t),
    "rec.linear_out_bias": ("recurrent_block/linear_out/bias", None),
    "rec.conv_w": ("recurrent_block/conv_1d/w", None),
    "rec.conv_bias": ("recurrent_block/conv_1d/b", None),
    "rec.a_param": ("recurrent_block/rg_lru/a_param", None),
    "rec.input_gate": ("recurrent_block/rg_lru/input_gate/w", None),
    "rec.input_gate_bias": ("recurrent_block/rg_lru/input_gate/b", None),
    "rec.a_gate": ("recurrent_block/rg_lru/a_gate/w", None),
    "rec.a_gate_bias": ("recurrent_block/rg_lru/a_gate/b", None),
    # ffw_up w: [2, E, M] (0 = gate, 1 = up), b: [2, 1, 1, M]
    "mlp.gate": ("mlp_block/ffw_up/w", lambda w: w[0].T),
    "mlp.up": ("mlp_block/ffw_up/w", lambda w: w[1].T),
    "mlp.gate_bias": ("mlp_block/ffw_up/b", lambda b: b[0].reshape(-1)),
    "mlp.up_bias": ("mlp_block/ffw_up/b", lambda b: b[1].reshape(-1)),
    "mlp.down": ("mlp_block/ffw_down/kernel", _t),
    "mlp.down_bias": ("mlp_block/ffw_down/bias", None),
}


def _griffin_sources(cfg: ModelConfig) -> dict[str, Source]:
    sources = {
        "embed": Source("embedder/input_embedding"),
        "final_norm": Source("final_norm/scale"),
    }
    for ours in param_shapes(cfg):
        if ours not in sources:
            _, i, leaf = ours.split(".", 2)
            name, transform = _GRIFFIN_LEAVES[leaf]
            sources[ours] = Source(f"blocks.{i}/{name}", transform)
    return sources


def looks_official(path: Path) -> bool:
    """An Orbax checkpoint folder (what the official releases ship)."""
    return any((path / marker).exists() for marker in ("_METADATA", "manifest.ocdbt", "checkpoint"))
