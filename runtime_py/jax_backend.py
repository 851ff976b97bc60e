"""The JAX reference as a Session: the same signatures an artifact exports, run by jax.jit on the
source parameters. `runtime_py.parity` compares an artifact against it on the same token stream."""

from __future__ import annotations

import jax
import numpy as np

from export.signatures import build_signature
from models.config import ModelConfig
from models.model import activation_dtype
from runtime_py.session import FeedBackend, Session


def jax_session(cfg: ModelConfig, params: dict, prefill_lengths, max_len: int) -> Session:
    dtype = activation_dtype(params)
    params = jax.device_put(params)  # once: numpy arguments would be copied on every call
    sigs = [build_signature(cfg, t, max_len, dtype) for t in sorted(set(prefill_lengths)) if t > 1]
    sigs.append(build_signature(cfg, 1, max_len, dtype))
    compiled = {s.name: jax.jit(s.fn) for s in sigs}
    infos = {s.name: s for s in sigs}  # a Signature is the runtime's SignatureInfo

    def run(name, feed):
        sig = infos[name]
        outs = compiled[name](params, *(feed[t.name] for t in sig.inputs))
        return {t.name: np.asarray(v) for t, v in zip(sig.outputs, outs)}

    return Session(FeedBackend(infos, run), max_len, {"sample_vocab_size": cfg.sample_vocab_size})
