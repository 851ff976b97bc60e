"""A Session over an ONNX decoder (a `.onnx` file or an onnxruntime-genai folder), run by
onnxruntime.

The graph takes any chunk length (`input_ids [1, T]`, `attention_mask [1, past + T]`), so the
session's prefill chunks are trimmed to their real tokens before each call (no padding reaches
the model). States are the `past*` inputs; as onnxruntime-genai does, each state is one buffer
bound both as its `past*` input and its `present*` output (I/O binding), so the graph updates
it in place and no state is copied between calls.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from runtime_py.session import Session, SignatureInfo, TensorInfo

METADATA_KEY = "gemma_edge"
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(float16)": np.float16}


def present_name(past: str) -> str:
    """past_key_values.{i}.key -> present.{i}.key; past.{i}.conv -> present.{i}.conv."""
    if past.startswith("past_key_values."):
        return "present." + past[len("past_key_values."):]
    return "present." + past[len("past."):]


def model_file(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.onnx"] if (path / "model.onnx").exists() else sorted(path.glob("*.onnx"))
        if not candidates:
            raise FileNotFoundError(f"no .onnx model in {path}")
        return candidates[0]
    return path


class OnnxBackend:
    """image_session / vision_session: the image prefill graph (bound to the same state buffers as
    the decoder) and the vision encoder, for a model exported with vision."""

    def __init__(self, session, signatures: dict[str, SignatureInfo], states: list[TensorInfo],
                 image_session=None, vision_session=None):
        import onnxruntime as ort

        self.signatures = signatures
        self._session = session
        self._state_infos = states
        self._values = {t.name: ort.OrtValue.ortvalue_from_numpy(np.zeros(t.shape, t.dtype)) for t in states}
        self._vision = vision_session
        self._sessions = {"text": session}
        if image_session is not None:
            self._sessions["image"] = image_session
        self._bindings = {}
        for key, sess in self._sessions.items():
            binding = sess.io_binding()
            binding.bind_output("logits")  # first: get_outputs() lists outputs in binding order
            for t in states:
                binding.bind_ortvalue_input(t.name, self._values[t.name])
                binding.bind_ortvalue_output(present_name(t.name), self._values[t.name])
            self._bindings[key] = binding

    def reset(self):
        for t in self._state_infos:
            self._values[t.name].update_inplace(np.zeros(t.shape, t.dtype))

    def states(self) -> dict[str, np.ndarray]:
        return {name: np.array(value.numpy()) for name, value in self._values.items()}

    def call(self, name: str, tokens: np.ndarray, input_pos: np.ndarray, embeddings=None) -> np.ndarray:
        run = input_pos == input_pos[0] + np.arange(input_pos.size)
        n = int(np.cumprod(run).sum())  # the leading run of real tokens (pads end it)
        start = int(input_pos[0])
        key = "image" if name.startswith("image_prefill") else "text"
        binding = self._bindings[key]
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens[:, :n], np.int64))
        if key == "image":
            binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeddings[:, :n], np.float32))
        binding.bind_cpu_input("attention_mask", np.ones((1, start + n), np.int64))
        self._sessions[key].run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return np.array(logits[0, -1])

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        return self._vision.run(["soft_tokens"], {"image": np.ascontiguousarray(image, np.float32)})[0]


def read_metadata(model_path: Path) -> dict:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props[METADATA_KEY]) if METADATA_KEY in props else {}


def load_onnx(path, num_threads: int | None = None) -> Session:
    import onnxruntime as ort

    path = Path(path)
    file = model_file(path)
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    meta = read_metadata(file)
    folder = file.parent
    image_session = vision_session = None
    if (folder / "image_prefill.onnx").exists() and (folder / "vision_encoder.onnx").exists():
        image_session = ort.InferenceSession(str(folder / "image_prefill.onnx"), options,
                                             providers=["CPUExecutionProvider"])
        vision_session = ort.InferenceSession(str(folder / "vision_encoder.onnx"), options,
                                              providers=["CPUExecutionProvider"])
    exported = {t["name"]: tuple(t["shape"]) for t in meta.get("states", [])}
    states = [TensorInfo(i.name, exported.get(i.name, tuple(i.shape)), np.dtype(_ORT_TYPES[i.type]))
              for i in session.get_inputs() if i.name.startswith("past")]
    if any(not isinstance(d, int) for t in states for d in t.shape):
        raise ValueError(f"{file}: state inputs have symbolic shapes and the model has no metadata giving "
                         f"their sizes ({[t.shape for t in states]})")
    max_len = meta.get("max_seq_len")
    if max_len is None and path.is_dir() and (path / "genai_config.json").exists():
        max_len = json.loads((path / "genai_config.json").read_text())["model"]["context_length"]
    if max_len is None:
        raise ValueError(f"{file}: no context length in its metadata or a genai_config.json beside it")
    ids = TensorInfo("tokens", (1, max_len), np.dtype(np.int32))
    signatures = {}
    for name, length in (("decode", 1), (f"prefill_{max_len}", max_len)):
        signatures[name] = SignatureInfo(name, length, (TensorInfo("tokens", (1, length), ids.dtype),
                                                        TensorInfo("input_pos", (length,), ids.dtype), *states),
                                         (TensorInfo("logits", (1, 1, -1), np.dtype(np.float32)),))
    if vision_session is not None:
        image, soft = vision_session.get_inputs()[0], vision_session.get_outputs()[0]
        signatures["vision_encoder"] = SignatureInfo("vision_encoder", 0, (TensorInfo("image", tuple(image.shape),
                                                                                      np.dtype(np.float32)),),
                                                     (TensorInfo("soft_tokens", tuple(soft.shape), np.dtype(np.float32)),))
        base = signatures[f"prefill_{max_len}"]
        signatures[f"image_prefill_{max_len}"] = dataclasses.replace(base, name=f"image_prefill_{max_len}")
    result = Session(OnnxBackend(session, signatures, states, image_session, vision_session), max_len, meta)
    result.ort_session = session
    return result
