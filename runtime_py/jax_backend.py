"""The JAX reference as a Session: the same signatures an artifact exports, run by jax.jit on the
source parameters. `runtime_py.parity` compares an artifact against it on the same token stream."""

from __future__ import annotations

import jax
import numpy as np

from export.signatures import all_signatures
from models.config import ModelConfig
from models.model import activation_dtype
from runtime_py.session import FeedBackend, Session


def jax_session(cfg: ModelConfig, params: dict, prefill_lengths, max_len: int) -> Session:
    """With a vision tower (cfg.vision and its weights in params), also the image signatures."""
    import dataclasses

    from models.multimodal import with_vision

    dtype = activation_dtype(params)
    cfg = with_vision(cfg, params)
    params = jax.device_put(params)  # once: numpy arguments would be copied on every call
    sigs = all_signatures(cfg, sorted(set(prefill_lengths)), max_len, dtype)
    compiled = {s.name: jax.jit(s.fn) for s in sigs}
    infos = {s.name: s for s in sigs}  # a Signature is the runtime's SignatureInfo

    def run(name, feed):
        sig = infos[name]
        outs = compiled[name](params, *(feed[t.name] for t in sig.inputs))
        return {t.name: np.asarray(v) for t, v in zip(sig.outputs, outs)}

    meta = {"sample_vocab_size": cfg.sample_vocab_size,
            "config": {"vision": None if cfg.vision is None else dataclasses.asdict(cfg.vision)}}
    return Session(FeedBackend(infos, run), max_len, meta)
