"""Read a TFLite flatbuffer (a `.tflite` file, or the model section of a `.litertlm` bundle),
memory-mapped: its signatures with their tensors, and our metadata.

The flatbuffer schema is the one `ai-edge-litert` ships (the runtime that runs these files);
nothing is loaded into an interpreter. `python -m export inspect` reads more from the same
buffer (op histogram, weight forms): export/lowering/tflite/inspect.py.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path

import numpy as np

from contract.metadata import METADATA_KEY, ArtifactMetadata

_NUMPY = {"FLOAT32": np.float32, "INT32": np.int32, "FLOAT16": np.float16, "INT8": np.int8, "INT64": np.int64,
          "UINT8": np.uint8, "BOOL": np.bool_, "INT16": np.int16}


def numpy_dtype(tflite_type: str) -> np.dtype:
    if tflite_type == "BFLOAT16":
        import ml_dtypes  # a dependency of ai-edge-litert

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_NUMPY[tflite_type])


def enum_names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_")}


def buffer_bytes(buf, data) -> bytes:
    """A buffer's bytes, stored inline or (files past 2 GB, and ai-edge-quantizer's output) after
    the flatbuffer at an offset."""
    if data.DataLength():
        return data.DataAsNumpy().tobytes()
    return bytes(buf[data.Offset():data.Offset() + data.Size()])


def model_buffer(path) -> tuple[memoryview | mmap.mmap, int]:
    """(buffer of the flatbuffer, file bytes): the whole .tflite, or a .litertlm's model section;
    mapped, not read (artifacts can be several GB)."""
    path = Path(path)
    with open(path, "rb") as f:
        if path.is_file() and path.stat().st_size == 0:
            raise ValueError(f"{path} is empty: copy or export it again")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if path.suffix != ".litertlm":
        return mm, len(mm)
    from contract.bundle import read_bundle

    section = read_bundle(path).tflite()  # a bundle cut short is refused there
    return memoryview(mm)[section.begin:section.end], len(mm)


@dataclasses.dataclass(frozen=True)
class FlatSignature:
    """A signature as the flatbuffer holds it: its subgraph and (name, shape, TFLite type) tensors."""

    name: str
    subgraph: int
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]
    outputs: tuple[tuple[str, tuple[int, ...], str], ...]


def read_signatures(model, schema) -> dict[str, FlatSignature]:
    type_names = enum_names(schema.TensorType)
    out = {}
    for i in range(model.SignatureDefsLength()):
        sd = model.SignatureDefs(i)
        sg = model.Subgraphs(sd.SubgraphIndex())
        io = []
        for n, get in ((sd.InputsLength(), sd.Inputs), (sd.OutputsLength(), sd.Outputs)):
            items = []
            for j in range(n):
                tm = get(j)
                t = sg.Tensors(tm.TensorIndex())
                shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
                items.append((tm.Name().decode(), shape, type_names[t.Type()]))
            io.append(tuple(items))
        name = sd.SignatureKey().decode()
        out[name] = FlatSignature(name, sd.SubgraphIndex(), *io)
    return out


def read_metadata_json(model, buf) -> str | None:
    for i in range(model.MetadataLength()):
        md = model.Metadata(i)
        if md.Name().decode() == METADATA_KEY:
            return buffer_bytes(buf, model.Buffers(md.Buffer())).decode()
    return None


def open_model(path):
    """(schema module, flatbuffer Model, buffer, file bytes)."""
    from ai_edge_litert import schema_py_generated as schema

    buf, file_bytes = model_buffer(path)
    if len(buf) < 8 or bytes(buf[4:8]) != b"TFL3":
        raise ValueError(f"{path} is not a TFLite model (no TFL3 identifier): pass a .tflite or .litertlm written by "
                         "python -m export")
    return schema, schema.Model.GetRootAs(buf, 0), buf, file_bytes


def read_tflite(path) -> tuple[dict[str, FlatSignature], ArtifactMetadata | None]:
    """(signatures, metadata or None when the model carries none of ours). A file that is not a
    TFLite model, or one cut short (an interrupted copy), is a ValueError naming it."""
    schema, model, buf, _ = open_model(path)
    try:
        text = read_metadata_json(model, buf)
        signatures = read_signatures(model, schema)
        for i in range(model.BuffersLength()):  # weights stored after the flatbuffer (files past 2 GiB)
            b = model.Buffers(i)
            if b.Offset() > 1 and b.Offset() + b.Size() > len(buf):
                raise struct.error(f"buffer {i} ends at byte {b.Offset() + b.Size()}")
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is cut short or corrupt ({len(buf)} bytes of model; reading it failed: {e}): copy "
                         "or export it again") from None
    meta = None if text is None else ArtifactMetadata.from_json(text, where=str(path))
    return signatures, meta


# ops whose output may share its input's memory (TFLite lets them run in place): a read of their
# output is a read of their input's buffer
_ALIASING = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "BITCAST"}


def in_place_states(path, names=None) -> dict[str, frozenset[str]]:
    """For each signature (or those in `names`): the states that a runtime may bind to one buffer
    as both input and output. A state qualifies when its output is written by a
    DYNAMIC_UPDATE_SLICE whose operand is the state input itself, and every other op that reads
    the input (directly, or through ops that alias it) is an ancestor of that write, so it runs
    before it in any execution order. LiteRT's DYNAMIC_UPDATE_SLICE skips copying its operand
    when operand and output share memory, so such a call writes the updated rows only (a
    full-length KV cache is not copied every step)."""
    schema, model, _, _ = open_model(path)
    op_names = enum_names(schema.BuiltinOperator)
    codes = []
    for i in range(model.OperatorCodesLength()):
        c = model.OperatorCodes(i)
        codes.append(op_names.get(max(c.BuiltinCode(), c.DeprecatedBuiltinCode()), ""))
    out = {}
    for i in range(model.SignatureDefsLength()):
        sd = model.SignatureDefs(i)
        key = sd.SignatureKey().decode()
        if names is not None and key not in names:
            continue
        sg = model.Subgraphs(sd.SubgraphIndex())
        ins = {sd.Inputs(j).Name().decode(): sd.Inputs(j).TensorIndex() for j in range(sd.InputsLength())}
        outs = {sd.Outputs(j).Name().decode(): sd.Outputs(j).TensorIndex() for j in range(sd.OutputsLength())}
        ops, producer, consumers = [], {}, {}
        for k in range(sg.OperatorsLength()):
            op = sg.Operators(k)
            inputs = [int(x) for x in op.InputsAsNumpy()] if op.InputsLength() else []
            outputs = [int(x) for x in op.OutputsAsNumpy()] if op.OutputsLength() else []
            ops.append((codes[op.OpcodeIndex()], inputs, outputs))
            for t in outputs:
                producer[t] = k
            for t in inputs:
                if t >= 0:
                    consumers.setdefault(t, []).append(k)
        good = set()
        for name, t_in in ins.items():
            k = producer.get(outs.get(name, -1))
            if k is None or ops[k][0] != "DYNAMIC_UPDATE_SLICE" or ops[k][1][0] != t_in:
                continue
            if t_in in ops[k][1][1:]:
                continue
            ancestors = _ancestors(k, ops, producer)
            readers, seen, ok = list(consumers.get(t_in, [])), set(), True
            while readers and ok:
                r = readers.pop()
                if r == k or r in seen:
                    continue
                seen.add(r)
                if r not in ancestors:
                    ok = False
                elif ops[r][0] in _ALIASING:
                    readers += consumers.get(ops[r][2][0], [])
            if ok:
                good.add(name)
        out[key] = frozenset(good)
    return out


def _ancestors(k: int, ops, producer) -> set[int]:
    seen, stack = set(), [k]
    while stack:
        for t in ops[stack.pop()][1]:
            p = producer.get(t)
            if p is not None and p not in seen:
                seen.add(p)
                stack.append(p)
    return seen
