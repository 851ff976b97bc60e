"""A Session over a .tflite artifact (or the TFLite model of a .litertlm bundle), run by
ai_edge_litert's interpreter.

States never round-trip through fresh numpy arrays: each signature's tensors are allocated once,
and before a call every state input is filled in place from where the state now lives (the
previous call's output tensor, or the zeroed initial arrays), one memcpy per state. Views into
interpreter tensors are taken right before use and never held across an invoke.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contract.layout import Naming
from contract.metadata import ArtifactMetadata, MetadataError
from contract.signatures import (
    EMBEDDINGS, IMAGE, INPUT_POS, LOGITS, SOFT_TOKENS, TOKENS, SignatureKind, SignatureSpec, TensorSpec,
    parse_signature,
)
from contract.tflite import numpy_dtype, read_tflite
from runtime_py.session import Session


class TFLiteBackend:
    def __init__(self, interpreter, signatures: dict[str, SignatureSpec]):
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
        np.copyto(self._view(subgraph, inputs[TOKENS]), tokens)
        np.copyto(self._view(subgraph, inputs[INPUT_POS]), input_pos)
        if embeddings is not None:
            np.copyto(self._view(subgraph, inputs[EMBEDDINGS]), embeddings)
        for state in self._source:
            np.copyto(self._view(subgraph, inputs[state]), self._value(state))
        self._wrapper.Invoke(subgraph)
        for state in self._source:
            self._source[state] = ("tensor", subgraph, outputs[state])
        return np.array(self._view(subgraph, outputs[LOGITS])[0, -1])

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        subgraph, inputs, outputs = self._io["vision_encoder"]
        np.copyto(self._view(subgraph, inputs[IMAGE]), image)
        self._wrapper.Invoke(subgraph)
        return np.array(self._view(subgraph, outputs[SOFT_TOKENS]))


def signature_specs(flat: dict, metadata: ArtifactMetadata) -> dict[str, SignatureSpec]:
    """The contract's SignatureSpecs of a TFLite model's signatures; states are the metadata
    layout's, checked against the signature's tensors (a layout that does not match the file is
    an error, not a guess)."""
    layout = metadata.states.by_name(Naming.TFLITE)
    out = {}
    for name, sig in flat.items():
        kind, length = parse_signature(name)
        inputs = tuple(TensorSpec(n, shape, numpy_dtype(t)) for n, shape, t in sig.inputs)
        outputs = tuple(TensorSpec(n, shape, numpy_dtype(t)) for n, shape, t in sig.outputs)
        states = ()
        if kind is not SignatureKind.VISION_ENCODER:
            declared = {t.name: t.shape for t in inputs}
            for state_name, spec in layout.items():
                if declared.get(state_name) != spec.shape:
                    raise MetadataError(f"signature {name}: state {state_name} is {declared.get(state_name)} in the "
                                        f"file but {spec.shape} in its metadata; re-export the artifact")
            states = tuple(layout)
        out[name] = SignatureSpec(name, length, inputs, outputs, states)
    return out


def load_tflite(path, num_threads: int | None = None) -> Session:
    """A session over a .tflite file, or over the TFLite model of a .litertlm bundle (run by the
    same interpreter; the bundle's tokenizer is kept as `session.tokenizer_model`)."""
    from ai_edge_litert.interpreter import Interpreter

    path = Path(path)
    flat, metadata = read_tflite(path)
    if metadata is None:
        raise MetadataError(f"{path} holds no gemma-edge metadata: runtime_py runs artifacts written by "
                            "python -m export")
    tokenizer_model = None
    if path.suffix == ".litertlm":
        from contract.bundle import read_bundle

        bundle = read_bundle(path)
        interpreter = Interpreter(model_content=bundle.read(bundle.tflite()), num_threads=num_threads)
        tokenizer_model = bundle.tokenizer_bytes()
    else:
        interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    session = Session(TFLiteBackend(interpreter, signature_specs(flat, metadata)), metadata)
    session.interpreter = interpreter
    session.tokenizer_model = tokenizer_model
    return session
