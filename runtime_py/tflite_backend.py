"""A Session over a .tflite artifact (or the TFLite model of a .litertlm bundle), run by LiteRT.

Two of ai_edge_litert's APIs (docs/memory.md has the measurements):

  compiled     (default) the CompiledModel API. The states live in TensorBuffers shared by
               every signature: a call updates a state in place where the signature allows it
               (the full-length KV caches: only the new rows are written), else reads it from
               one buffer and writes it to a second one, which becomes the current one; no state
               is ever copied between calls. XNNPACK packs the weights once for all
               signatures into a weight cache file (`weight_cache_path`), which later loads map
               instead of packing again: the real Gemma 3 270M at int4 holds 2.4x its file,
               against 5.4x with the interpreter, which packs every weight once per signature.
  interpreter  the Interpreter API. Each signature's tensors are allocated once, and before a
               call every state input is filled in place from where the state now lives (the
               previous call's output tensor, or the zeroed initial arrays), one memcpy per state.
               Views into interpreter tensors are taken right before use and never held across
               an invoke.
"""

from __future__ import annotations

from pathlib import Path

import hashlib
import os

import numpy as np

from contract.layout import Naming
from contract.metadata import ArtifactMetadata, MetadataError
from contract.signatures import (
    EMBEDDINGS, IMAGE, INPUT_POS, LOGITS, SOFT_TOKENS, TOKENS, SignatureKind, SignatureSpec, TensorSpec,
    parse_signature, signature_name,
)
from contract.bundle import FEATURES, MM_EMBEDDINGS, TOKEN_IDS
from contract.tflite import in_place_states, numpy_dtype, read_tflite
from runtime_py.native_log import quiet_litert
from runtime_py.pages import release_mapped, trim_heap
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

    def call(self, name: str, tokens: np.ndarray, input_pos: np.ndarray, embeddings=None,
             rows: bool = False) -> np.ndarray:
        subgraph, inputs, outputs = self._io[name]
        if tokens is not None:  # None: a vision bundle's decoder (embeddings only)
            np.copyto(self._view(subgraph, inputs[TOKENS]), tokens)
        np.copyto(self._view(subgraph, inputs[INPUT_POS]), input_pos)
        if embeddings is not None:
            np.copyto(self._view(subgraph, inputs[EMBEDDINGS]), embeddings)
        for state in self._source:
            np.copyto(self._view(subgraph, inputs[state]), self._value(state))
        self._wrapper.Invoke(subgraph)
        for state in self._source:
            self._source[state] = ("tensor", subgraph, outputs[state])
        logits = self._view(subgraph, outputs[LOGITS])[0]
        return np.array(logits if rows else logits[-1])

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        subgraph, inputs, outputs = self._io["vision_encoder"]
        np.copyto(self._view(subgraph, inputs[IMAGE]), image)
        self._wrapper.Invoke(subgraph)
        return np.array(self._view(subgraph, outputs[SOFT_TOKENS]))


SPARE_IDLE_CALLS = 4  # in-place calls in a row after which CompiledBackend drops the spare buffers


class CompiledBackend:
    """A backend over LiteRT's CompiledModel (see the module docstring).

    Each state has a buffer, and a second one where some signature cannot update it in place.
    A call binds a state's current buffer as its input and, as its output, the same buffer when
    the signature updates that state in place (`in_place`: contract.tflite.in_place_states; a
    full-length KV cache's rows are then written, not the whole cache copied), else the other
    buffer, which then becomes the current one. Nothing is copied between calls either way.

    The second buffer exists only while it is needed: once SPARE_IDLE_CALLS calls in a row have
    updated every state in place (decoding), the spare buffers of the states decode updates in
    place are dropped and the heap trimmed (runtime_py/pages.trim_heap); the next call that
    writes such a state out of place (a prefill) makes a new one (~1 ms for all of them; no
    zeroing: such a call writes the whole state). Gemma 3's local rings are such states (a
    prefill chunk may wrap the ring, a decode step writes one row in place): at gemma3-4b,
    context 4096, ~290 MiB less resident while decoding (docs/memory.md). Not after every
    prefill call: a long prompt's chunks, or speculative decoding's verify calls between decode
    steps, would make and fault in the spares again each time."""

    def __init__(self, model, signatures: dict[str, SignatureSpec], in_place: dict[str, frozenset] | None = None):
        self.signatures = signatures
        self._model = model
        listed = model.get_signature_list()
        self._io = {}
        in_place = in_place or {}
        self._in_place = {name: in_place.get(name, frozenset()) for name in signatures}
        states = [t.name for t in signatures["decode"].state_inputs] if "decode" in signatures else []
        self._state_specs = {t.name: t for t in signatures["decode"].state_inputs} if states else {}
        banked = {n for name, spec in signatures.items() for n in spec.states if n not in self._in_place[name]}
        self._buffers = {n: [model.create_input_buffer_by_name("decode", n),
                             model.create_output_buffer_by_name("decode", n) if n in banked else None]
                         for n in states}
        self._current = {n: 0 for n in states}
        # states whose spare buffer is dropped once decoding: decode writes them in place
        self._spare_dropped = {n for n in banked if n in self._in_place.get("decode", frozenset())}
        self._since_flip = 0  # calls since the last one that wrote a state out of place
        for name in signatures:
            index = model.get_signature_index(name)
            inputs, outputs = listed[name]["inputs"], listed[name]["outputs"]
            # buffers for the signature's own tensors only: making every input's and output's and
            # dropping the states' allocated each signature's KV caches once more during load
            own_in = {n: model.create_input_buffer_by_name(name, n) for n in inputs if n not in self._state_specs}
            own_out = {n: model.create_output_buffer_by_name(name, n) for n in outputs if n not in self._state_specs}
            shapes = {n: (tuple(d["shape"]), np.dtype(d["dtype"]))
                      for n, d in model.get_output_tensor_details(name).items()}
            self._io[name] = (index, inputs, outputs, own_in, own_out, shapes)

    @property
    def in_place(self) -> dict[str, frozenset]:
        """Per signature, the states it updates in place."""
        return dict(self._in_place)

    def reset(self):
        for name, pair in self._buffers.items():
            spec = self._state_specs[name]
            pair[self._current[name]].write(np.zeros(spec.shape, spec.dtype))

    def states(self) -> dict[str, np.ndarray]:
        out = {}
        for name, pair in self._buffers.items():
            spec = self._state_specs[name]
            buffer = pair[self._current[name]]
            out[name] = buffer.read(int(np.prod(spec.shape)), spec.dtype).reshape(spec.shape)
        return out

    def _read(self, name: str, output: str) -> np.ndarray:
        shape, dtype = self._io[name][5][output]
        return self._io[name][4][output].read(int(np.prod(shape)), dtype).reshape(shape)

    def _run(self, name: str):
        index, inputs, outputs, own_in, own_out, _ = self._io[name]
        in_place, cur = self._in_place[name], self._current
        feeds = [own_in[n] if n in own_in else self._buffers[n][cur[n]] for n in inputs]
        outs, flip = [], []
        for n in outputs:
            if n in own_out:
                outs.append(own_out[n])
            elif n in in_place:
                outs.append(self._buffers[n][cur[n]])
            else:
                pair = self._buffers[n]
                if pair[1 - cur[n]] is None:  # dropped after its last use (see the class doc)
                    pair[1 - cur[n]] = self._model.create_output_buffer_by_name("decode", n)
                outs.append(pair[1 - cur[n]])
                flip.append(n)
        self._model.run_by_index(index, feeds, outs)
        for n in flip:
            cur[n] = 1 - cur[n]
        self._since_flip = 0 if flip else self._since_flip + 1
        if self._since_flip == SPARE_IDLE_CALLS:  # decoding now: the spares wait for the next prefill
            dropped = [n for n in self._spare_dropped if self._buffers[n][1 - cur[n]] is not None]
            for n in dropped:
                self._buffers[n][1 - cur[n]] = None
            if dropped:
                trim_heap()

    def call(self, name: str, tokens: np.ndarray, input_pos: np.ndarray, embeddings=None,
             rows: bool = False) -> np.ndarray:
        own_in = self._io[name][3]
        if tokens is not None:  # None: a vision bundle's decoder (embeddings only)
            own_in[TOKENS].write(np.ascontiguousarray(tokens, np.int32))
        own_in[INPUT_POS].write(np.ascontiguousarray(input_pos, np.int32))
        if embeddings is not None:
            own_in[EMBEDDINGS].write(np.ascontiguousarray(embeddings, np.float32))
        self._run(name)
        logits = self._read(name, LOGITS)[0]
        return (logits if rows else logits[-1]).copy()

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        name = "vision_encoder"
        self._io[name][3][IMAGE].write(np.ascontiguousarray(image, np.float32))
        self._run(name)
        return self._read(name, SOFT_TOKENS)


class EmbeddedBackend:
    """A vision bundle's decoder (contract/bundle.py: prefill_{T}/decode over flagged embeddings,
    no token ids) with its embedder, vision encoder and adapter, presented as the token-form
    signatures the Session drives: prefill_{T}, decode (and any verify_{K}, ctx{L}_*),
    image_prefill_{T} for every prefill length that holds an image, and vision_encoder
    (preprocessed image in [-1, 1] -> soft tokens [1, N, E]). So runtime_py runs the same file,
    the same graphs, that LiteRT-LM runs.

    A call builds the decoder's input row by row as LiteRT-LM does: the embedder's row for a text
    token, the adapter's soft-token rows (flag 1) at image positions, and the adapter's last row
    for `<end_of_image>` (LiteRT-LM feeds that row after every image; runtime_py uses it for every
    `<end_of_image>` token, so the two runtimes agree on quantized bundles too, whose embedder row
    is the quantized table's)."""

    def __init__(self, decoder, embedder, encoder, adapter, layout):
        self._decoder, self._embedder, self._encoder, self._adapter = decoder, embedder, encoder, adapter
        self._layout = layout
        self._eoi = None
        self._dim = None
        self.signatures = {}
        for name, spec in decoder.signatures.items():
            flagged = spec.input(EMBEDDINGS)
            self._dim = flagged.shape[-1] - 1
            t = flagged.shape[1]
            rest = tuple(x for x in spec.inputs if x.name != EMBEDDINGS)
            self.signatures[name] = SignatureSpec(name, spec.length, (TensorSpec(TOKENS, (1, t), np.dtype(np.int32)),
                                                                       *rest), spec.outputs, spec.states)
            if spec.kind is SignatureKind.PREFILL and spec.span is None and t >= layout.tokens_per_image:
                image = signature_name(SignatureKind.IMAGE_PREFILL, t)
                embeds = TensorSpec(EMBEDDINGS, (1, t, self._dim), np.dtype(np.float32))
                self.signatures[image] = SignatureSpec(image, t, (self.signatures[name].inputs[0], rest[0], embeds,
                                                                  *rest[1:]), spec.outputs, spec.states)
        s = layout.image_size
        self.signatures["vision_encoder"] = SignatureSpec(
            "vision_encoder", 0, (TensorSpec(IMAGE, (1, s, s, 3), np.dtype(np.float32)),),
            (TensorSpec(SOFT_TOKENS, (1, layout.tokens_per_image, self._dim), np.dtype(np.float32)),))

    def reset(self):
        self._decoder.reset()

    def states(self) -> dict[str, np.ndarray]:
        return self._decoder.states()

    def _adapt(self, unit_pixels: np.ndarray) -> np.ndarray:
        """The adapter's rows [N + 1, E + 1] of an image in [0, 1]."""
        features = self._encoder.run({IMAGE: unit_pixels})[FEATURES]
        return self._adapter.run({FEATURES: features})[MM_EMBEDDINGS][0]

    def _eoi_row(self) -> np.ndarray:
        if self._eoi is None:  # the adapter's last row is a constant: run it once
            features = self._encoder.output_spec(FEATURES)
            self._eoi = self._adapter.run({FEATURES: np.zeros(*features)})[MM_EMBEDDINGS][0, -1].copy()
        return self._eoi

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """image [1, S, S, 3] preprocessed to [-1, 1] (runtime_py/image.py) -> soft tokens [1, N, E]
        (the encoder takes LiteRT-LM's [0, 1] pixels)."""
        unit = (np.asarray(image, np.float32) + np.float32(1.0)) * np.float32(0.5)
        return self._adapt(unit)[None, :self._layout.tokens_per_image, :self._dim]

    def call(self, name: str, tokens: np.ndarray, input_pos: np.ndarray, embeddings=None,
             rows: bool = False) -> np.ndarray:
        tokens = np.asarray(tokens).reshape(-1)
        flagged = np.zeros((1, tokens.size, self._dim + 1), np.float32)
        cache = {}
        for i, t in enumerate(tokens.tolist()):
            if embeddings is not None and t == self._layout.soft_token:
                flagged[0, i, :self._dim] = embeddings[0, i]
                flagged[0, i, self._dim] = 1.0
            elif t == self._layout.eoi_token:
                flagged[0, i] = self._eoi_row()
            else:
                if t not in cache:
                    cache[t] = self._embedder.run({TOKEN_IDS: np.array([[t]], np.int32)})[EMBEDDINGS][0, 0].copy()
                flagged[0, i] = cache[t]
        kind, length = parse_signature(name)
        if kind is SignatureKind.IMAGE_PREFILL:
            name = signature_name(SignatureKind.PREFILL, length)
        return self._decoder.call(name, None, input_pos, flagged, rows)


class SectionModel:
    """One TFLite model of a bundle section with one signature (embedder, encoder, adapter), run by
    LiteRT's CompiledModel: `run({input: array}) -> {output: array}`."""

    def __init__(self, data: bytes, num_threads: int | None):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import Options

        quiet_litert()
        cpu = {} if num_threads is None else {"num_threads": int(num_threads)}
        options = Options(hardware_accelerators=HardwareAccelerator.CPU, cpu_options=CpuOptions(**cpu))
        self._data = data  # the buffer must outlive the model
        self._model = CompiledModel.from_buffer(data, options=options)
        listed = self._model.get_signature_list()
        self.name = next(iter(listed))
        self._inputs, self._outputs = listed[self.name]["inputs"], listed[self.name]["outputs"]
        self._in = dict(zip(self._inputs, self._model.create_input_buffers(0)))
        self._out = dict(zip(self._outputs, self._model.create_output_buffers(0)))
        self._shapes = {n: (tuple(d["shape"]), np.dtype(d["dtype"]))
                        for n, d in self._model.get_output_tensor_details(self.name).items()}

    def output_spec(self, name: str) -> tuple[tuple, np.dtype]:
        return self._shapes[name]

    def run(self, feeds: dict) -> dict:
        for n, value in feeds.items():
            self._in[n].write(np.ascontiguousarray(value))
        self._model.run_by_index(0, [self._in[n] for n in self._inputs], [self._out[n] for n in self._outputs])
        return {n: self._out[n].read(int(np.prod(shape)), dtype).reshape(shape)
                for n, (shape, dtype) in self._shapes.items()}


# Artifacts from this size up get an XNNPACK weight cache file (smaller ones pack in milliseconds,
# and the tests' many tiny artifacts would only fill the cache folder).
WEIGHT_CACHE_MIN_BYTES = 32 * 2**20


def cache_folder() -> Path:
    """Where weight cache files live: $GEMMA_EDGE_CACHE, else $XDG_CACHE_HOME/gemma-edge, else
    ~/.cache/gemma-edge (never beside the artifact: its folder may be read-only, or shipped)."""
    if os.environ.get("GEMMA_EDGE_CACHE"):
        return Path(os.environ["GEMMA_EDGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemma-edge"


def weight_cache_path(path: Path) -> Path | None:
    """The XNNPACK weight cache file for the artifact at `path`: named by its absolute path and
    by its size and modification time, so a re-exported artifact never maps a stale cache (its
    older caches are removed here). None below WEIGHT_CACHE_MIN_BYTES or when the cache folder
    cannot be written."""
    path = Path(path).resolve()
    stat = path.stat()
    if stat.st_size < WEIGHT_CACHE_MIN_BYTES:
        return None
    where = hashlib.blake2b(str(path).encode(), digest_size=8).hexdigest()
    version = hashlib.blake2b(f"{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=6).hexdigest()
    folder = cache_folder() / "xnnpack"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(folder, os.W_OK):
        return None
    target = folder / f"{where}-{version}.xnnpack_cache"
    for pattern in ("*.xnnpack_cache", "*" + SECTION_SUFFIX):  # this artifact's older caches
        for old in folder.glob(f"{where}-{pattern}"):
            if _cache_key(old) != _cache_key(target):
                old.unlink(missing_ok=True)
    return target


SECTION_SUFFIX = ".section.tflite"


def _cache_key(f: Path) -> str:
    """The artifact key a weight cache file is named by (`{where}-{version}`): a cache and its
    bundle's section copy share it."""
    return f.name.split(".")[0]


def section_file(path: Path, begin: int, size: int) -> Path | None:
    """The TFLite section of the bundle at `path` (bytes begin..begin+size) as a file of its own,
    beside the bundle's weight cache (named by the same key, removed with it): CompiledModel maps
    a file, where `from_buffer` takes only `bytes`, which held a second, resident copy of the
    model (a .litertlm measured 2.1-2.6x its size in runtime_py against 1.25-1.66x as a .tflite;
    docs/memory.md). Copied once, by the kernel (os.copy_file_range), through a temporary name.
    None where there is no weight cache (small artifacts, a read-only cache folder): then the
    caller reads the bytes."""
    cache = weight_cache_path(path)
    if cache is None:
        return None
    target = cache.with_name(_cache_key(cache) + SECTION_SUFFIX)
    if target.exists() and target.stat().st_size == size:
        os.utime(target)  # used now (prune_weight_caches removes the least recently used)
        return target
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            try:
                done = 0
                while done < size:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), size - done, begin + done)
                    if n <= 0:
                        raise OSError(f"short copy of {path}'s TFLite section")
                    done += n
            except OSError:  # no copy_file_range here (file system, kernel): through user space
                src.seek(begin)
                dst.seek(0)
                dst.truncate()
                left = size
                while left:
                    chunk = src.read(min(left, 16 << 20))
                    if not chunk:
                        raise OSError(f"short read of {path}'s TFLite section")
                    dst.write(chunk)
                    left -= len(chunk)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        return None
    return target


DEFAULT_CACHE_MAX_GB = 16.0


def prune_weight_caches(keep: Path, max_bytes: int | None = None) -> list[Path]:
    """Keep the weight cache folder under `max_bytes` ($GEMMA_EDGE_CACHE_MAX_GB, default 16 GB):
    mark `keep` (the cache a session is about to map) as just used, then remove the least recently
    used other caches while the folder holds more. `keep`'s own files (the cache and a bundle's
    section copy, which share its key) are never removed, even where they alone pass the cap: the
    session is about to open them. A cache is otherwise removed only when its own artifact is
    re-exported, so caches of deleted or moved artifacts would pile up (one per artifact, about its
    size). Removing a file another process has mapped is safe (POSIX keeps it until unmapped); one
    that cannot be removed is skipped. Returns the removed files."""
    if max_bytes is None:
        try:
            max_bytes = int(float(os.environ.get("GEMMA_EDGE_CACHE_MAX_GB", DEFAULT_CACHE_MAX_GB)) * 1e9)
        except ValueError:
            max_bytes = int(DEFAULT_CACHE_MAX_GB * 1e9)
    keep = Path(keep)
    if keep.exists():
        os.utime(keep)
    files = []
    for f in (*keep.parent.glob("*.xnnpack_cache"), *keep.parent.glob("*" + SECTION_SUFFIX)):
        try:
            st = f.stat()
        except OSError:
            continue
        files.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, f in sorted(files):  # oldest first
        if total <= max_bytes:
            break
        if _cache_key(f) == _cache_key(keep):  # the cache being loaded, or its bundle's section copy
            continue
        try:
            f.unlink()
        except OSError:
            continue
        total -= size
        removed.append(f)
    return removed


def _compiled_model(path: Path, data: bytes | None, num_threads: int | None, weight_cache: bool,
                    model_file: Path | None = None):
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.cpu_options import CpuOptions
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import Options

    quiet_litert()
    cpu = {}
    if num_threads is not None:
        cpu["num_threads"] = int(num_threads)
    cache = weight_cache_path(path) if weight_cache else None
    if cache is not None:
        prune_weight_caches(cache)
        cpu["xnnpack_weight_cache_path"] = str(cache)
    options = Options(hardware_accelerators=HardwareAccelerator.CPU, cpu_options=CpuOptions(**cpu))
    if data is not None:
        model = CompiledModel.from_buffer(data, options=options)
        model._gemma_edge_data = data  # the buffer must outlive the model
        return model, cache
    return CompiledModel.from_file(str(model_file or path), options=options), cache


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


def load_tflite(path, num_threads: int | None = None, api: str = "compiled", weight_cache: bool = True,
                in_place: bool = True) -> Session:
    """A session over a .tflite file, or over the TFLite model of a .litertlm bundle (the
    bundle's tokenizer is kept as `session.tokenizer_model`). `api`: "compiled" (LiteRT's
    CompiledModel, with an XNNPACK weight cache file unless `weight_cache` is False) or
    "interpreter" (module docstring). `in_place`: let the compiled API update the states that a
    signature can update in place (CompiledBackend) in their own buffer."""
    path = Path(path)
    if api not in ("compiled", "interpreter"):
        raise ValueError(f"unknown TFLite api '{api}'; choose compiled or interpreter")
    flat, metadata = read_tflite(path)
    if metadata is None:
        raise MetadataError(f"{path} holds no gemma-edge metadata: runtime_py runs artifacts written by "
                            "python -m export")
    tokenizer_model, data, bundle, model_file = None, None, None, None
    if path.suffix == ".litertlm":
        from contract.bundle import read_bundle

        bundle = read_bundle(path)
        section = bundle.tflite()
        model_file = section_file(path, section.begin, section.size) if weight_cache else None
        data = bundle.read(section) if model_file is None else None
        tokenizer_model = bundle.tokenizer_bytes()
        if not bundle.embedded:
            bundle = None
    specs = signature_specs(flat, metadata)
    if api == "compiled":
        model, cache = _compiled_model(path, data, num_threads, weight_cache, model_file)
        release_mapped(model_file or path)  # what XNNPACK packed (runtime_py/pages.py)
        backend = CompiledBackend(model, specs, in_place_states(path) if in_place else None)
        session = Session(_embedded(backend, bundle, metadata, num_threads), metadata)
        session.compiled_model, session.weight_cache = model, cache
    else:
        from ai_edge_litert.interpreter import Interpreter

        quiet_litert()
        interpreter = (Interpreter(model_content=data, num_threads=num_threads) if data is not None
                       else Interpreter(model_path=str(model_file or path), num_threads=num_threads))
        session = Session(_embedded(TFLiteBackend(interpreter, specs), bundle, metadata, num_threads), metadata)
        session.interpreter = interpreter
    session.tokenizer_model = tokenizer_model
    return session


def _embedded(decoder, bundle, metadata: ArtifactMetadata, num_threads: int | None):
    """`decoder` itself, or for a vision bundle (`bundle` not None) the EmbeddedBackend over it and
    the bundle's embedder, vision encoder and adapter sections."""
    if bundle is None:
        return decoder
    from contract.bundle import EMBEDDER, VISION_ADAPTER, VISION_ENCODER

    if metadata.image is None:
        raise MetadataError(f"{bundle.path} has an embedder section but its metadata has no image layout; "
                            "re-export the bundle")
    embedder, encoder, adapter = (SectionModel(bundle.read(bundle.tflite(t)), num_threads)
                                  for t in (EMBEDDER, VISION_ENCODER, VISION_ADAPTER))
    return EmbeddedBackend(decoder, embedder, encoder, adapter, metadata.image)
