"""Fill a converted skeleton's weight holes: the final .tflite, its weights written tensor by tensor.

The converter never sees the large weights (export/lowering/tflite/convert.py `holes`): each one
is a leading input of every signature, named HOLE + parameter name. This module turns those
inputs into constant tensors stored as the recipe asks, in exactly the layouts ai-edge-quantizer
writes and XNNPACK's kernels take (export/quantize/tflite.py has the encoders; the tests compare
them with ai-edge-quantizer bit for bit):

  float (f32, bf16)      the tensor itself; a bf16 weight keeps the graph's CAST to f32
  float16                the tensor, and the CAST the graph applies becomes a DEQUANTIZE (LiteRT
                         runs it once at load; the converter's own form for f16 constants)
  INT8, per channel      one f32 scale per output row (zero points 0, dimension 0), read directly
                         by FULLY_CONNECTED / EMBEDDING_LOOKUP (dynamic-int8), or through a
                         DEQUANTIZE placed before the first reader (int8 weight-only)
  INT4, blockwise        packed codes, a FLOAT16 [rows, cols / block] scale tensor beside it

File layout: the flatbuffer (graph, small constants, quantization parameters) first, then each
weight's bytes at a 64-byte aligned offset that its Buffer records (`offset`/`size`, TFLite's form
for models past 2 GiB, which every LiteRT loader reads). The offsets depend only on the weights'
shapes, so the flatbuffer is packed once with placeholder scales to learn its size, the data is
streamed after it one weight at a time (read, quantized, written, dropped), and the flatbuffer is
packed again with the real scales (its size cannot change: only values differ) and written in
front. Peak memory: the skeleton plus one weight. `path` is the driver's temporary name
(export/driver.py: atomic_output renames it when complete and removes it on any error).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.lowering.tflite.convert import HOLE

ALIGN = 64
QUANTIZED_READERS = {("FULLY_CONNECTED", 1), ("EMBEDDING_LOOKUP", 1)}  # (op, input index)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one weight is stored, known before its values are: its tensor type, and for INT8 a
    scale per output row, for INT4 the block of inputs per float16 scale."""

    type: str  # schema TensorType name: FLOAT32, FLOAT16, BFLOAT16, INT8, INT4
    block: int = 0  # INT4 only
    dequantize: bool = False  # INT8: a DEQUANTIZE to f32 feeds the readers (weight-only int8)

    def nbytes(self, shape: tuple) -> int:
        n = int(np.prod(shape))
        return {"FLOAT32": 4 * n, "FLOAT16": 2 * n, "BFLOAT16": 2 * n, "INT8": n, "INT4": (n + 1) // 2}[self.type]

    def scale_shape(self, shape: tuple) -> tuple | None:
        if self.type == "INT8":
            return (shape[0],)
        if self.type == "INT4":
            return (shape[0], shape[1] // self.block)
        return None


@dataclasses.dataclass(frozen=True)
class Layouts:
    """hole -> Layout, as data (picklable: the converter's child process applies it,
    export/lowering/tflite/worker.py). `recipe` None: every hole in its own float type. Else a
    quantizable f32 hole takes its entry in `named` (name -> (Layout, the shape it was planned
    for, or None)), or `quantized` (None: an internal error, nothing was planned for it); any
    other hole stays float. export/quantize/tflite.layout builds one from a recipe."""

    recipe: str | None = None
    named: dict = dataclasses.field(default_factory=dict)
    quantized: Layout | None = None

    def __call__(self, hole: "Hole") -> Layout:
        if self.recipe is None or not hole.quantizable:
            return Layout(hole.dtype)
        if hole.dtype != "FLOAT32":
            raise RuntimeError(f"internal error: {self.recipe} quantizes f32 weights; {hole.name} is {hole.dtype}")
        if hole.name in self.named:
            lay, shape = self.named[hole.name]
            if shape is not None and tuple(shape) != hole.shape:
                raise RuntimeError(f"internal error: blocks of {hole.name} are {tuple(shape)}, the tensor {hole.shape}")
            return lay
        if self.quantized is None:
            raise RuntimeError(f"internal error: no int4 blocks were planned for {hole.name} {hole.shape}")
        return self.quantized


@dataclasses.dataclass
class Encoded:
    """One weight's stored values: `data` (its bytes, any dtype) and, for a quantized layout,
    `scales` (INT8: f32 [rows]; INT4: f16 [rows, cols / block])."""

    data: np.ndarray
    scales: np.ndarray | None = None


@dataclasses.dataclass
class Hole:
    """One weight left out of the conversion: where it is read, and how it will be stored."""

    name: str
    shape: tuple
    dtype: str  # the skeleton's tensor type name (the stored float dtype)
    places: list  # (subgraph index, tensor index) of its input tensor in each signature
    readers: set  # (op name, input index) over all signatures
    layout: Layout | None = None

    @property
    def quantizable(self) -> bool:
        """Read only as a matmul or lookup weight (what the recipes quantize)."""
        return bool(self.readers) and self.readers <= QUANTIZED_READERS


def _schema():
    from ai_edge_litert import schema_py_generated as S

    return S


def _op_names(model) -> list[str]:
    S = _schema()
    names = {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}
    return [names[max(c.builtinCode, c.deprecatedBuiltinCode)] for c in model.operatorCodes]


def _readers(model, sg) -> dict[int, list]:
    """tensor index -> [(operator index, op name, input index)] in one subgraph."""
    names = _op_names(model)
    out: dict[int, list] = {}
    for oi, op in enumerate(sg.operators):
        for pos, t in enumerate(op.inputs):
            if t >= 0:
                out.setdefault(t, []).append((oi, names[op.opcodeIndex], pos))
    return out


def find_holes(model) -> dict[str, Hole]:
    """The weight holes of a skeleton (by its signature inputs named HOLE + name)."""
    S = _schema()
    types = {v: k for k, v in vars(S.TensorType).items() if not k.startswith("_")}
    holes: dict[str, Hole] = {}
    for sig in model.signatureDefs or []:
        sg = model.subgraphs[sig.subgraphIndex]
        readers = _readers(model, sg)
        for tmap in sig.inputs:
            key = tmap.name.decode() if isinstance(tmap.name, bytes) else tmap.name
            if not key.startswith(HOLE):
                continue
            name, t = key[len(HOLE):], sg.tensors[tmap.tensorIndex]
            hole = holes.setdefault(name, Hole(name, tuple(int(d) for d in t.shape), types[t.type], [], set()))
            hole.places.append((sig.subgraphIndex, tmap.tensorIndex))
            for oi, op, pos in readers.get(tmap.tensorIndex, []):
                if op == "CAST":  # a 16-bit weight cast to f32 for compute: what reads the cast counts
                    for _, op2, pos2 in readers.get(sg.operators[oi].outputs[0], []):
                        hole.readers.add((op2, pos2))
                else:
                    hole.readers.add((op, pos))
    return holes


def read_skeleton(skeleton: Path):
    """The skeleton's flatbuffer as objects (ai_edge_litert's object API: ~1 s for gemma3-1b's,
    so it is read once for `stray_holes` and `fill`)."""
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model(str(skeleton))


def stray_holes(skeleton: Path, model=None) -> list[str]:
    """The holes of a skeleton that something other than a matmul or lookup reads (a position
    table added to activations): the converter folds such a weight into its neighbours when it
    is a constant, so the export gives it to the converter instead (convert once more).
    `model`: the skeleton already read (`read_skeleton`)."""
    model = read_skeleton(skeleton) if model is None else model
    return sorted(h.name for h in find_holes(model).values() if not h.quantizable)


def _opcode(model, name: str, version: int) -> int:
    S = _schema()
    code = getattr(S.BuiltinOperator, name)
    for i, c in enumerate(model.operatorCodes):
        if max(c.builtinCode, c.deprecatedBuiltinCode) == code:
            return i
    oc = S.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def _tensor(name: str, shape: tuple, type_name: str, buffer: int, has_rank: bool = True):
    S = _schema()
    t = S.TensorT()
    t.name, t.shape, t.type, t.buffer = name.encode(), list(shape), getattr(S.TensorType, type_name), buffer
    t.hasRank = has_rank
    return t


def _buffer():
    b = _schema().BufferT()
    b.offset, b.size = 1, 1  # placeholders: present in the packed table, set before the final pack
    return b


def _place(model, holes: dict[str, Hole]) -> tuple[list, dict]:
    """Turn every hole into constant tensors as its layout says. Returns the data buffers in
    write order [(buffer index, nbytes, name, 'data' | 'scales')] and name -> the scale arrays the
    flatbuffer holds (INT8: filled in place once the values are known)."""
    S = _schema()
    buffers, channel_scales = [], {}
    # every subgraph's readers, taken once before any change; the DEQUANTIZE ops are inserted at
    # the end (from the back, so the indices hold)
    readers = {si: _readers(model, sg) for si, sg in enumerate(model.subgraphs)}
    inserts: dict[int, list] = {}
    for name in sorted(holes):
        hole, layout = holes[name], holes[name].layout
        data_buf = len(model.buffers)
        model.buffers.append(_buffer())
        buffers.append((data_buf, layout.nbytes(hole.shape), name, "data"))
        scale_buf = None
        if layout.type == "INT4":
            scale_buf = len(model.buffers)
            model.buffers.append(_buffer())
            buffers.append((scale_buf, 2 * int(np.prod(layout.scale_shape(hole.shape))), name, "scales"))
        if layout.type == "INT8":
            channel_scales[name] = np.ones(hole.shape[0], np.float32)
        for si, ti in hole.places:
            sg = model.subgraphs[si]
            target = sg.tensors[ti]
            if layout.dequantize:  # a new INT8 constant, dequantized into the hole's f32 tensor
                stored = _tensor(name, hole.shape, layout.type, data_buf)
                sg.tensors.append(stored)
                deq = S.OperatorT()
                deq.opcodeIndex, deq.inputs, deq.outputs = _opcode(model, "DEQUANTIZE", 1), [len(sg.tensors) - 1], [ti]
                first = min(oi for oi, _, _ in readers[si].get(ti, [(len(sg.operators), None, None)]))
                inserts.setdefault(si, []).append((first, deq))
                target.name = (name + "_dequant").encode()
            else:
                stored = target
                stored.name, stored.type, stored.buffer = name.encode(), getattr(S.TensorType, layout.type), data_buf
                stored.hasRank = True
            if layout.type == "INT8":
                q = S.QuantizationParametersT()
                q.scale, q.zeroPoint, q.quantizedDimension = channel_scales[name], np.zeros(hole.shape[0], np.int64), 0
                stored.quantization = q
            elif layout.type == "INT4":
                sg.tensors.append(_tensor(name + "_scales", layout.scale_shape(hole.shape), "FLOAT16", scale_buf,
                                          has_rank=False))
                details = S.BlockwiseQuantizationT()
                details.scales, details.zeroPoints, details.blockSize = len(sg.tensors) - 1, -1, layout.block
                q = S.QuantizationParametersT()
                q.detailsType, q.details = S.QuantizationDetails.BlockwiseQuantization, details
                stored.quantization = q
            elif layout.type == "FLOAT16":  # the graph's CAST to f32 becomes a DEQUANTIZE, as for f16 constants
                for oi, op, _pos in readers[si].get(ti, []):
                    if op == "CAST":
                        cast = sg.operators[oi]
                        cast.opcodeIndex = _opcode(model, "DEQUANTIZE", 3)
                        cast.builtinOptionsType, cast.builtinOptions = 0, None
            sg.inputs = [i for i in sg.inputs if i != ti]
    for si, ops in inserts.items():
        for first, deq in sorted(ops, key=lambda x: x[0], reverse=True):
            model.subgraphs[si].operators.insert(first, deq)
    for sig in model.signatureDefs or []:
        sig.inputs = [m for m in sig.inputs
                      if not (m.name.decode() if isinstance(m.name, bytes) else m.name).startswith(HOLE)]
    return buffers, channel_scales


def _pack(model) -> bytearray:
    import flatbuffers

    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return builder.Output()


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def share_constants(model, min_bytes: int = 1024) -> int:
    """Point the tensors of every constant buffer (of at least `min_bytes`) whose bytes equal an
    earlier buffer's at that buffer, and empty the copy; returns the bytes saved. The converter
    writes each constant of the graph on its own: the input rotations (export/quantize/rotate.py)
    are one Hadamard matrix per order, 64 KiB each at order 128, 105 of them at gemma3-1b."""
    from export.lowering.dedupe import earlier_copies

    moved = earlier_copies((i, None, np.asarray(b.data, np.uint8)) for i, b in enumerate(model.buffers)
                           if getattr(b, "data", None) is not None and len(b.data) >= min_bytes)
    if not moved:
        return 0
    saved = sum(len(model.buffers[i].data) for i in moved)
    for sg in model.subgraphs:
        for t in sg.tensors:
            if t.buffer in moved and not t.isVariable:
                t.buffer = moved[t.buffer]
    used = {t.buffer for sg in model.subgraphs for t in sg.tensors}
    for i in moved:
        if i not in used:
            model.buffers[i].data = None
    return saved


def _names_subgraph(opts, attr: str) -> bool:
    """Whether an options table's attribute holds subgraph indices (composites' decompositions,
    reduce, scatter, sort and while bodies, if branches: ...SubgraphIndex / ...SubgraphIndices;
    CALL's `subgraph`)."""
    return attr.endswith(("SubgraphIndex", "SubgraphIndices")) or (
        attr == "subgraph" and type(opts).__name__ == "CallOptionsT")


def _subgraph_fields(op):
    """(options object, attribute name) of every subgraph index an operator holds."""
    for opts in (op.builtinOptions, op.builtinOptions2):
        for attr in vars(opts) if opts is not None and hasattr(opts, "__dict__") else ():
            if _names_subgraph(opts, attr):
                yield opts, attr


def _mapped(value, new: Callable[[int], int]):
    """A subgraph field's index (or list of them) through `new`."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return new(int(value))
    return [new(int(v)) for v in value]


def _remap_subgraph_fields(op, new: Callable[[int], int]):
    for opts, attr in _subgraph_fields(op):
        setattr(opts, attr, _mapped(getattr(opts, attr), new))


def _canonical(obj, buffer_key: Callable[[int], object], canon: list[int]):
    """A hashable description of a subgraph's parts: object-API tables as their fields (tensor
    and subgraph names left out: they do not change what runs), constant buffers by content,
    subgraph indices through `canon`."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, np.integer, np.floating)):
        return obj.item() if isinstance(obj, (np.integer, np.floating)) else obj
    if isinstance(obj, np.ndarray):
        return ("array", obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, (list, tuple)):
        return tuple(_canonical(v, buffer_key, canon) for v in obj)
    if isinstance(obj, dict):
        return tuple((k, _canonical(v, buffer_key, canon)) for k, v in sorted(obj.items()))
    fields = dict(vars(obj))
    kind = type(obj).__name__
    if kind in ("TensorT", "SubGraphT"):
        fields.pop("name", None)
    if kind == "TensorT":
        fields["buffer"] = buffer_key(fields["buffer"])
    if kind == "OperatorT":  # the subgraphs it calls by their merged index
        for key in ("builtinOptions", "builtinOptions2"):
            opts = fields.get(key)
            if opts is not None and hasattr(opts, "__dict__"):
                mapped = {a: _mapped(v, canon.__getitem__) if _names_subgraph(opts, a) else v
                          for a, v in vars(opts).items()}
                fields[key] = (type(opts).__name__, _canonical(mapped, buffer_key, canon))
    return (kind,) + tuple((k, _canonical(v, buffer_key, canon)) for k, v in sorted(fields.items()))


def share_subgraphs(model) -> int:
    """Point every operator at one copy of each set of equal subgraphs and drop the others;
    returns the number dropped. The converter writes a decomposition subgraph per composite call
    (gemma3-1b: 1,103 of them for 6 signatures, an `odml.rms_norm` or an attention per call, most
    of them equal), and LiteRT builds each one on load: its own tensors, its own working memory
    and its own XNNPACK runtime. The stablehlo_composite kernel runs a decomposition subgraph as a
    call (inputs and outputs bound at each call, its memory released after each), so calls with
    equal operand shapes and attributes can share one. Signature subgraphs are never merged."""
    from export.lowering.dedupe import earlier_copies

    n = len(model.subgraphs)
    pinned = {sig.subgraphIndex for sig in model.signatureDefs or []}
    data = {i: np.asarray(b.data, np.uint8) for i, b in enumerate(model.buffers)
            if getattr(b, "data", None) is not None and len(b.data)}
    firsts = earlier_copies((i, None, a) for i, a in data.items())

    def buffer_key(i):
        i = firsts.get(i, i)
        return ("data", i) if i in data else ("empty",)

    canon = list(range(n))
    while True:  # a subgraph equal to another once what it calls is merged: until nothing changes
        seen: dict = {}
        new = list(range(n))
        for i, sg in enumerate(model.subgraphs):
            if i in pinned:
                continue
            key = _canonical(sg, buffer_key, canon)
            new[i] = seen.setdefault(key, i)
        if new == canon:
            break
        canon = new
    kept = [i for i in range(n) if canon[i] == i]
    if len(kept) == n:
        return 0
    index = {old: pos for pos, old in enumerate(kept)}
    for i in kept:
        for op in model.subgraphs[i].operators:
            _remap_subgraph_fields(op, lambda s: index[canon[s]])
    dropped = [model.subgraphs[i] for i in range(n) if canon[i] != i]
    model.subgraphs = [model.subgraphs[i] for i in kept]
    for sig in model.signatureDefs or []:
        sig.subgraphIndex = index[sig.subgraphIndex]
    used = {t.buffer for sg in model.subgraphs for t in sg.tensors}
    for sg in dropped:
        for t in sg.tensors:
            if t.buffer not in used:
                model.buffers[t.buffer].data = None
    return n - len(kept)


@dataclasses.dataclass
class Placement:
    """Where a filled skeleton's bytes go: the flatbuffer's `size` (its bytes come first), every
    hole with its layout, each weight's data (and INT4 scales) at `where[(name, 'data' |
    'scales')]` = (offset, nbytes), the file's `end`. Picklable (the converter's child process
    makes it, the exporter writes the weights by it)."""

    size: int
    end: int
    holes: dict
    where: dict


def place(model, layout: Callable[[Hole], Layout]) -> tuple[Placement, dict]:
    """Turn the skeleton `model`'s holes into constants as `layout(hole)` says (in place) and fix
    every weight's offset. Returns the placement and name -> the INT8 per-channel scale arrays
    the flatbuffer holds (`finish` sets their values)."""
    share_subgraphs(model)
    holes = find_holes(model)
    for hole in holes.values():
        hole.layout = layout(hole)
        if hole.layout.type in ("INT8", "INT4") and not hole.quantizable:
            raise RuntimeError(f"internal error: weight {hole.name} is read by {sorted(hole.readers)}, "
                               "which take no quantized weight")
    share_constants(model)
    buffers, channel_scales = _place(model, holes)
    size = len(_pack(model))
    offset = _align(size)
    where = {}
    for index, nbytes, name, what in buffers:
        model.buffers[index].offset, model.buffers[index].size = offset, nbytes
        where[(name, what)] = (offset, nbytes)
        offset = _align(offset + nbytes)
    return Placement(size, offset, holes, where), channel_scales


def write_weights(f, placement: Placement, encode: Callable[[str, Layout], Encoded],
                  progress: Callable | None = None) -> dict[str, np.ndarray]:
    """Write every weight's bytes where `placement` says, `encode(name, layout)` called once per
    weight in name order; returns name -> the INT8 weights' per-channel scales (f32)."""
    channel = {}
    names = sorted(placement.holes)
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), f"write {name}")
        hole = placement.holes[name]
        enc = encode(name, hole.layout)
        _write(f, placement.where[(name, "data")], enc.data, name)
        shape = hole.layout.scale_shape(hole.shape)
        if hole.layout.type == "INT8":
            channel[name] = np.asarray(enc.scales, np.float32).reshape(shape)
        elif hole.layout.type == "INT4":
            _write(f, placement.where[(name, "scales")], np.asarray(enc.scales, np.float16).reshape(shape), name)
        del enc
    if progress:
        progress(len(names), len(names), "weights written")
    return channel


def finish(model, placement: Placement, channel_scales: dict, values: dict) -> bytes:
    """The final flatbuffer: `place`'s model with the INT8 scales set to `values`."""
    for name, v in values.items():
        channel_scales[name][:] = v
    flat = _pack(model)
    if len(flat) != placement.size:
        raise RuntimeError(f"internal error: the flatbuffer changed size ({placement.size} -> {len(flat)} bytes) "
                           "when its scales were set")
    return bytes(flat)


def write_flatbuffer(f, placement: Placement, flat: bytes):
    """The flatbuffer in front of the weights `write_weights` wrote; the file cut at its end."""
    f.seek(0)
    f.write(flat)
    f.write(b"\0" * (_align(placement.size) - placement.size))
    f.truncate(placement.end)


def fill(skeleton: Path, path: Path, layout: Callable[[Hole], Layout], encode: Callable[[str, Layout], Encoded],
         progress: Callable | None = None, model=None) -> Path:
    """Write `path` (a temporary name: the caller renames it): the skeleton with every hole filled. `layout(hole)` says how each weight is
    stored; `encode(name, layout)` gives its values (called once per weight, in name order, as
    it is written). `model`: the skeleton already read (`read_skeleton`; changed in place).
    The exporter runs the same steps, those on the flatbuffer in a child process
    (export/lowering/tflite/worker.py)."""
    model = read_skeleton(skeleton) if model is None else model
    placement, channel_scales = place(model, layout)
    path = Path(path)
    with open(path, "wb") as f:
        values = write_weights(f, placement, encode, progress)
        write_flatbuffer(f, placement, finish(model, placement, channel_scales, values))
    return path


def _write(f, place: tuple[int, int], values: np.ndarray, name: str):
    offset, nbytes = place
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    if raw.nbytes != nbytes:
        raise RuntimeError(f"internal error: weight {name} encodes to {raw.nbytes} bytes, its layout holds {nbytes}")
    f.seek(offset)
    f.write(raw)
