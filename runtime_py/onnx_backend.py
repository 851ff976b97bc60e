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

import re
from pathlib import Path

import numpy as np

from contract.layout import Naming
from contract.metadata import MetadataError
from contract.onnx import model_file, read_metadata, vision_files
from contract.signatures import (
    IMAGE, INPUT_POS, LOGITS, SOFT_TOKENS, TOKENS, SignatureKind, SignatureSpec, TensorSpec, signature_name,
)
from runtime_py.pages import release_mapped
from runtime_py.session import Session

INPUT_IDS, ATTENTION_MASK, INPUTS_EMBEDS = "input_ids", "attention_mask", "inputs_embeds"
PIXEL_VALUES, IMAGE_FEATURES = "pixel_values", "image_features"  # vision.onnx (export/lowering/onnx/multimodal.py)


class OnnxBackend:
    """`session` runs every prefill and decode call. For a model exported with vision it is the
    image prefill graph (image_prefill.onnx: the decoder with an `inputs_embeds` input read at the
    image soft-token positions, the graph onnxruntime-genai also runs as its only decoder); text
    calls feed it zeros there, which it never reads, so the folder's weights are held once (the
    text-only model.onnx is not loaded: it is the same decoder without that input).
    vision_session: the vision encoder."""

    def __init__(self, session, signatures: dict[str, SignatureSpec], layout, vision_session=None):
        import onnxruntime as ort

        self.signatures = signatures
        self._layout = layout
        self._values = {s.name(Naming.ONNX_PAST): ort.OrtValue.ortvalue_from_numpy(np.zeros(s.shape, s.dtype))
                        for s in layout}
        self._vision = vision_session
        self._session = session
        embeds = next((i for i in session.get_inputs() if i.name == INPUTS_EMBEDS), None)
        # what text calls feed the image prefill graph's inputs_embeds (never read there): one
        # zero buffer, grown to the longest call, sliced per call
        self._zeros = None if embeds is None else np.zeros((1, 1, embeds.shape[-1]), np.float32)
        self._binding = binding = session.io_binding()
        binding.bind_output(LOGITS)  # first: get_outputs() lists outputs in binding order
        for s in layout:
            value = self._values[s.name(Naming.ONNX_PAST)]
            binding.bind_ortvalue_input(s.name(Naming.ONNX_PAST), value)
            binding.bind_ortvalue_output(s.name(Naming.ONNX_PRESENT), value)

    def reset(self):
        for s in self._layout:
            self._values[s.name(Naming.ONNX_PAST)].update_inplace(np.zeros(s.shape, s.dtype))

    def states(self) -> dict[str, np.ndarray]:
        return {name: np.array(value.numpy()) for name, value in self._values.items()}

    def call(self, name: str, tokens: np.ndarray, input_pos: np.ndarray, embeddings=None) -> np.ndarray:
        run = input_pos == input_pos[0] + np.arange(input_pos.size)
        n = int(np.cumprod(run).sum())  # the leading run of real tokens (pads end it)
        start = int(input_pos[0])
        binding = self._binding
        binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(tokens[:, :n], np.int64))
        if self._zeros is not None:
            if embeddings is None:
                if self._zeros.shape[1] < n:
                    self._zeros = np.zeros((1, n, self._zeros.shape[-1]), np.float32)
                embeddings = self._zeros
            binding.bind_cpu_input(INPUTS_EMBEDS, np.ascontiguousarray(embeddings[:, :n], np.float32))
        binding.bind_cpu_input(ATTENTION_MASK, np.ones((1, start + n), np.int64))
        self._session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return np.array(logits[0, -1])

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """image [1, S, S, 3] channels last -> soft tokens [1, I, E], through vision.onnx (which
        takes onnxruntime-genai's channels-first pixel_values [N, 3, S, S])."""
        pixels = np.ascontiguousarray(np.asarray(image, np.float32).transpose(0, 3, 1, 2))
        return self._vision.run([IMAGE_FEATURES], {PIXEL_VALUES: pixels})[0]


SCORE_BYTES = 256 * 2**20  # the standard op set's attention scores per prefill call, at most


def prefill_length(meta) -> int:
    """The longest chunk runtime_py feeds one prefill call (the graph takes any length).
    GroupQueryAttention (op set default) takes the whole prompt at once. The standard op set's
    attention materialises its scores, [H, T, R] floats for a chunk of T tokens over R cache rows
    (the context, in a global layer), several temporaries of that size: chunks are the largest
    power of two (at least 16) that keeps the scores within SCORE_BYTES, e.g. 512 tokens for
    gemma3-1b at 32K, 128 at 128K (an 8K prompt in one call there needs 4 GiB per layer)."""
    if meta.onnx_op_set != "standard":
        return meta.max_seq_len
    heads = int(meta.config.get("num_heads") or 8)
    fits = max(16, SCORE_BYTES // (4 * heads * meta.max_seq_len))
    return min(meta.max_seq_len, 1 << (fits.bit_length() - 1))


def onnxruntime_load_error(file, message: str) -> str:
    """One line for what onnxruntime said when it could not open `file`: a weights file cut short
    or missing (an interrupted or partial copy of the folder), else its own last words."""
    cut = re.search(r"External initializer: (\S+) offset: (\d+) size to read: (\d+) given file_length: (\d+)", message)
    if cut:
        name, offset, size, length = cut.group(1), *map(int, cut.groups()[1:])
        return (f"{file}'s external weights are cut short: {name} needs bytes up to {offset + size}, the file holds "
                f"{length}; copy or export the folder again")
    missing = re.search(r'External data path does not exist: "?([^"]+)"?', message)
    if missing:
        return f"{missing.group(1)} is missing beside {Path(file).name}: copy the whole artifact folder"
    last = message.strip().splitlines()[-1] if message.strip() else type(message).__name__
    return f"onnxruntime could not load {file}: {last.split(' : ')[-1][:400]}"


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
        try:
            return ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's errors derive from Exception only
            if type(e).__module__.startswith("onnxruntime"):
                raise ValueError(onnxruntime_load_error(f, str(e))) from None
            raise

    vision = vision_files(file)
    session, vision_session = (open_graph(vision[1]), open_graph(vision[0])) if vision else (open_graph(file), None)
    release_mapped(file.parent)  # the weights prepacking read and no call reads again (runtime_py/pages.py)
    layout = meta.states
    declared = {i.name for i in session.get_inputs()}
    missing = [n for n in layout.names(Naming.ONNX_PAST) if n not in declared]
    if missing:
        raise MetadataError(f"{file}: states {missing[:3]} of its metadata are not graph inputs; re-export it")
    max_len = meta.max_seq_len
    states = tuple(TensorSpec(s.name(Naming.ONNX_PAST), s.shape, s.dtype) for s in layout)
    ids = np.dtype(np.int32)

    def signature(kind, length):
        name = signature_name(kind, length)
        return name, SignatureSpec(name, length, (TensorSpec(TOKENS, (1, length), ids),
                                                  TensorSpec(INPUT_POS, (length,), ids), *states),
                                   (TensorSpec(LOGITS, (1, 1, meta.vocab_size), np.dtype(np.float32)),),
                                   tuple(t.name for t in states))

    signatures = dict([signature(SignatureKind.DECODE, 1), signature(SignatureKind.PREFILL, prefill_length(meta))])
    if vision_session is not None:
        (_, _, s, _), (_, n, e) = vision_session.get_inputs()[0].shape, vision_session.get_outputs()[0].shape
        name = signature_name(SignatureKind.VISION_ENCODER)
        signatures[name] = SignatureSpec(name, 0, (TensorSpec(IMAGE, (1, s, s, 3), np.dtype(np.float32)),),
                                         (TensorSpec(SOFT_TOKENS, (1, n, e), np.dtype(np.float32)),))
        signatures.update([signature(SignatureKind.IMAGE_PREFILL, max_len)])  # an image is never split
    return Session(OnnxBackend(session, signatures, layout, vision_session), meta)
