"""A Session over a .tflite artifact, run by ai_edge_litert's interpreter (signature runners)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from runtime_py.session import Session, SignatureInfo, TensorInfo

_DTYPES = {"FLOAT32": np.float32, "INT32": np.int32, "FLOAT16": np.float16, "INT8": np.int8,
           "BFLOAT16": "bfloat16"}


def _signature_length(name: str) -> int:
    if name == "decode":
        return 1
    m = re.fullmatch(r"prefill_(\d+)", name)
    if not m:
        raise ValueError(f"unexpected signature '{name}' (want decode and prefill_<T>)")
    return int(m.group(1))


def load_tflite(path, num_threads: int | None = None) -> Session:
    from ai_edge_litert.interpreter import Interpreter

    from export.lowering.tflite.inspect import read

    path = Path(path)
    report = read(path)
    interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    infos = {}
    for name, sig in report.signatures.items():
        def tensors(items):
            return tuple(TensorInfo(n, shape, np.dtype(_DTYPES[t])) for n, shape, t in items)
        infos[name] = SignatureInfo(name, _signature_length(name), tensors(sig["inputs"]),
                                    tensors(sig["outputs"]))
    runners = {name: interpreter.get_signature_runner(name) for name in infos}
    meta = report.metadata
    max_len = meta.get("max_seq_len") or _context_from_caches(infos["decode"])

    def run(name, feed):
        return runners[name](**feed)

    session = Session(infos, run, max_len, meta)
    session.interpreter = interpreter
    return session


def _context_from_caches(decode: SignatureInfo) -> int:
    rows = [t.shape[2] for t in decode.state_inputs if t.name.startswith("kv_cache_k_")]
    if not rows:
        raise ValueError("artifact has no metadata and no KV cache to infer its context from")
    return max(rows)
