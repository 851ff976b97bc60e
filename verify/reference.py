"""The JAX reference as a Session: the same signatures an artifact exports, traced in the same
attention form, run by jax.jit on the source parameters. `verify.parity` compares an artifact
against it on the same token stream."""

from __future__ import annotations

import jax
import numpy as np

from models.cache import state_layout
from models.config import ModelConfig
from models.fused import AttentionForm
from models.model import activation_dtype
from models.signatures import all_signatures, artifact_metadata
from runtime_py.session import FeedBackend, Session


def reference_session(cfg: ModelConfig, params: dict, prefill_lengths, max_len: int,
                      attention: AttentionForm = AttentionForm.SDPA) -> Session:
    """The source model as a session over `prefill_{T}`/`decode` (and, with a vision tower in cfg,
    the image signatures). `cfg` is final (the loader's: cfg.vision is None for a text-only
    model); `attention` is the form the artifact under test was exported in."""
    from models.lazy import load

    dtype = activation_dtype(params)
    # once, a tensor at a time (a lazy one is read here): numpy arguments would be copied on every call
    params = {k: jax.device_put(load(v)) for k, v in params.items()}
    lens = sorted(set(prefill_lengths))
    sigs = all_signatures(cfg, lens, max_len, dtype, attention)
    compiled = {s.name: jax.jit(s.fn) for s in sigs}
    infos = {s.name: s for s in sigs}  # a Signature is the contract's SignatureSpec

    def run(name, feed):
        sig = infos[name]
        outs = compiled[name](params, *(feed[t.name] for t in sig.inputs))
        return {t.name: np.asarray(v) for t, v in zip(sig.outputs, outs)}

    meta = artifact_metadata(cfg, max_len, state_layout(cfg, max_len, dtype), prefill_lengths=tuple(lens),
                             attention=attention)
    return Session(FeedBackend(infos, run), meta)
