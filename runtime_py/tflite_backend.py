"""A Session over a .tflite artifact, run by ai_edge_litert's interpreter.

States never round-trip through fresh numpy arrays: each signature's tensors are allocated once,
and before a call every state input is filled in place from where the state now lives (the
previous call's output tensor, or the zeroed initial arrays), one memcpy per state. Views into
interpreter tensors are taken right before use and never held across an invoke.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime_py.session import Session, SignatureInfo, TensorInfo

_DTYPES = {"FLOAT32": np.float32, "INT32": np.int32, "FLOAT16": np.float16, "INT8": np.int8,
           "BFLOAT16": "bfloat16"}


def _signature_length(name: str) -> int:
    from export.signatures import signature_kind

    return signature_kind(name)[1]


class TFLiteBackend:
    def __init__(self, interpreter, signatures: dict[str, SignatureInfo]):
        self.signatures = signatures
        self._interpreter = interpreter
        self._wrapper = interpreter._interpreter
        defs = interpreter._get_full_signature_list()
        self._io = {}
        for name in signatures:
            subgraph = self._wrapper.GetSubgraphIndexFromSignature(name)
            self._wrapper.AllocateTensors(subgraph)
            self._io[name] = (subgraph, defs[name]["inputs"], defs[name]["outputs"])
        self._source: dict[str, tuple] = {}  # state name -> ("array", ndarray) | ("tensor", sg, index)

    def _view(self, subgraph: int, index: int) -> np.ndarray:
        return self._wrapper.tensor(self._interpreter, index, subgraph)

    def reset(self):
        decode = self.signatures["decode"]
        self._source = {t.name: ("array", np.zeros(t.shape, t.dtype)) for t in decode.state_inputs}

    def _value(self, name: str) -> np.ndarray:
        src = self._source[name]
        return src[1] if src[0] == "array" else self._view(src[1], src[2])

    def states(self) -> dict[str, np.ndarray]:
        return {name: np.array(self._value(name)) for name in self._source}

    def call(self, name: str, tokens: np.ndarray, input_pos: np.ndarray, embeddings=None) -> np.ndarray:
        subgraph, inputs, outputs = self._io[name]
        np.copyto(self._view(subgraph, inputs["tokens"]), tokens)
        np.copyto(self._view(subgraph, inputs["input_pos"]), input_pos)
        if embeddings is not None:
            np.copyto(self._view(subgraph, inputs["embeddings"]), embeddings)
        for state in self._source:
            np.copyto(self._view(subgraph, inputs[state]), self._value(state))
        self._wrapper.Invoke(subgraph)
        for state in self._source:
            self._source[state] = ("tensor", subgraph, outputs[state])
        return np.array(self._view(subgraph, outputs["logits"])[0, -1])

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        subgraph, inputs, outputs = self._io["vision_encoder"]
        np.copyto(self._view(subgraph, inputs["image"]), image)
        self._wrapper.Invoke(subgraph)
        return np.array(self._view(subgraph, outputs["soft_tokens"]))


def load_tflite(path, num_threads: int | None = None) -> Session:
    """A session over a .tflite file, or over the TFLite model of a .litertlm bundle (run by the
    same interpreter; the bundle's tokenizer is kept as `session.tokenizer_model`)."""
    from ai_edge_litert.interpreter import Interpreter

    from export.lowering.tflite.inspect import read

    path = Path(path)
    report = read(path)
    tokenizer_model = None
    if path.suffix == ".litertlm":
        from export.litertlm import read_bundle

        bundle = read_bundle(path)
        interpreter = Interpreter(model_content=bundle.read(bundle.tflite()), num_threads=num_threads)
        tokenizer_model = bundle.tokenizer_bytes()
    else:
        interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    infos = {}
    for name, sig in report.signatures.items():
        def tensors(items):
            return tuple(TensorInfo(n, shape, np.dtype(_DTYPES[t])) for n, shape, t in items)
        infos[name] = SignatureInfo(name, _signature_length(name), tensors(sig["inputs"]),
                                    tensors(sig["outputs"]))
    meta = report.metadata
    max_len = meta.get("max_seq_len") or _context_from_caches(infos["decode"])
    session = Session(TFLiteBackend(interpreter, infos), max_len, meta)
    session.interpreter = interpreter
    session.tokenizer_model = tokenizer_model
    return session


def _context_from_caches(decode: SignatureInfo) -> int:
    rows = [t.shape[2] for t in decode.state_inputs if t.name.startswith("kv_cache_k_")]
    if not rows:
        raise ValueError("artifact has no metadata and no KV cache to infer its context from")
    return max(rows)
