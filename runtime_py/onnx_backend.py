"""A Session over an ONNX decoder (a `.onnx` file or an onnxruntime-genai folder), run by
onnxruntime.

The graph takes any chunk length (`input_ids [1, T]`, `attention_mask [1, past + T]`), so the
session's prefill chunks are trimmed to their real tokens before each call (no padding reaches
the model). States are the metadata layout's, named past_* in and present_* out
(contract/layout.py); as onnxruntime-genai does, each state is one buffer bound both as its past
input and its present output (I/O binding), so the graph updates it in place and no state is
copied between calls.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from contract.layout import Naming
from contract.metadata import MetadataError
from contract.onnx import model_file, read_metadata, vision_files
from contract.signatures import (
    IMAGE, INPUT_POS, LOGITS, SOFT_TOKENS, TOKENS, SignatureKind, SignatureSpec, TensorSpec, signature_name,
)
from runtime_py.session import Session

INPUT_IDS, ATTENTION_MASK, INPUTS_EMBEDS = "input_ids", "attention_mask", "inputs_embeds"
PIXEL_VALUES, IMAGE_FEATURES = "pixel_values", "image_features"  # vision.onnx (export/lowering/onnx/multimodal.py)


class OnnxBackend:
    """image_session / vision_session: the image prefill graph (bound to the same state buffers as
    the decoder) and the vision encoder, for a model exported with vision."""

    def __init__(self, session, signatures: dict[str, SignatureSpec], layout, image_session=None,
                 vision_session=None):
        import onnxruntime as ort

        self.signatures = signatures
        self._layout = layout
        self._values = {s.name(Naming.ONNX_PAST): ort.OrtValue.ortvalue_from_numpy(np.zeros(s.shape, s.dtype))
                        for s in layout}
        self._vision = vision_session
        self._sessions = {"text": session}
        if image_session is not None:
            self._sessions["image"] = image_session
        self._bindings = {}
        for key, sess in self._sessions.items():
            binding = sess.io_binding()
            binding.bind_output(LOGITS)  # first: get_outputs() lists outputs in binding order
            for s in layout:
                value = self._values[s.name(Naming.ONNX_PAST)]
                binding.bind_ortvalue_input(s.name(Naming.ONNX_PAST), value)
                binding.bind_ortvalue_output(s.name(Naming.ONNX_PRESENT), value)
            self._bindings[key] = binding

    def reset(self):
        for s in self._layout:
            self._values[s.name(Naming.ONNX_PAST)].update_inplace(np.zeros(s.shape, s.dtype))

    def states(self) -> dict[str, np.ndarray]:
        return {name: np.array(value.numpy()) for name, value in self._values.items()}

    def call(self, name: str, tokens: np.ndarray, input_pos: np.ndarray, embeddings=None) -> np.ndarray:
        run = input_pos == input_pos[0] + np.arange(input_pos.size)
        n = int(np.cumprod(run).sum())  # the leading run of real tokens (pads end it)
        start = int(input_pos[0])
        key = "image" if embeddings is not None else "text"
        binding = self._bindings[key]
        binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(tokens[:, :n], np.int64))
        if key == "image":
            binding.bind_cpu_input(INPUTS_EMBEDS, np.ascontiguousarray(embeddings[:, :n], np.float32))
        binding.bind_cpu_input(ATTENTION_MASK, np.ones((1, start + n), np.int64))
        self._sessions[key].run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return np.array(logits[0, -1])

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """image [1, S, S, 3] channels last -> soft tokens [1, I, E], through vision.onnx (which
        takes onnxruntime-genai's channels-first pixel_values [N, 3, S, S])."""
        pixels = np.ascontiguousarray(np.asarray(image, np.float32).transpose(0, 3, 1, 2))
        return self._vision.run([IMAGE_FEATURES], {PIXEL_VALUES: pixels})[0]


def load_onnx(path, num_threads: int | None = None) -> Session:
    import onnxruntime as ort

    path = Path(path)
    file = model_file(path)
    meta = read_metadata(file)
    if meta is None:
        raise MetadataError(f"{file} holds no gemma-edge metadata: runtime_py runs artifacts written by "
                            "python -m export")
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    options.log_severity_level = 3

    def open_graph(f):
        return ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"])

    session = open_graph(file)
    vision = vision_files(file)
    image_session, vision_session = (open_graph(vision[1]), open_graph(vision[0])) if vision else (None, None)
    layout = meta.states
    declared = {i.name for i in session.get_inputs()}
    missing = [n for n in layout.names(Naming.ONNX_PAST) if n not in declared]
    if missing:
        raise MetadataError(f"{file}: states {missing[:3]} of its metadata are not graph inputs; re-export it")
    max_len = meta.max_seq_len
    states = tuple(TensorSpec(s.name(Naming.ONNX_PAST), s.shape, s.dtype) for s in layout)
    ids = np.dtype(np.int32)
    signatures = {}
    for kind, length in ((SignatureKind.DECODE, 1), (SignatureKind.PREFILL, max_len)):
        name = signature_name(kind, length)
        signatures[name] = SignatureSpec(name, length, (TensorSpec(TOKENS, (1, length), ids),
                                                        TensorSpec(INPUT_POS, (length,), ids), *states),
                                         (TensorSpec(LOGITS, (1, 1, meta.vocab_size), np.dtype(np.float32)),),
                                         tuple(t.name for t in states))
    if vision_session is not None:
        (_, _, s, _), (_, n, e) = vision_session.get_inputs()[0].shape, vision_session.get_outputs()[0].shape
        name = signature_name(SignatureKind.VISION_ENCODER)
        signatures[name] = SignatureSpec(name, 0, (TensorSpec(IMAGE, (1, s, s, 3), np.dtype(np.float32)),),
                                         (TensorSpec(SOFT_TOKENS, (1, n, e), np.dtype(np.float32)),))
        base = signatures[signature_name(SignatureKind.PREFILL, max_len)]
        image_name = signature_name(SignatureKind.IMAGE_PREFILL, max_len)
        signatures[image_name] = dataclasses.replace(base, name=image_name)
    result = Session(OnnxBackend(session, signatures, layout, image_session, vision_session), meta)
    result.ort_session = session
    return result
