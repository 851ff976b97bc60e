"""Read a .tflite flatbuffer: signatures with their tensors, op histogram, composites, weight
bytes by type, our metadata, and checks (no CUSTOM op, no TRANSPOSE fed by a weight)."""

from __future__ import annotations

import collections
import dataclasses
import json
import mmap
from pathlib import Path


@dataclasses.dataclass
class TFLiteReport:
    path: Path
    file_bytes: int
    signatures: dict[str, dict]  # name -> {"subgraph", "inputs": [(name, shape, dtype)], "outputs"}
    op_histogram: dict[str, collections.Counter]  # signature -> op name -> count (main subgraph)
    composites: collections.Counter  # composite name -> count (all signatures)
    custom_ops: collections.Counter
    weight_bytes: dict[str, int]  # tensor type -> bytes of constant buffers
    transposed_weights: list[str]  # TRANSPOSE ops whose input is a constant buffer
    metadata: dict


def _names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_")}


def _buffer_bytes(buf, data) -> bytes:
    """A buffer's bytes, stored inline or (files past 2 GB, and ai-edge-quantizer's output) after
    the flatbuffer at an offset."""
    if data.DataLength():
        return data.DataAsNumpy().tobytes()
    return bytes(buf[data.Offset():data.Offset() + data.Size()])


def read(path) -> TFLiteReport:
    from ai_edge_litert import schema_py_generated as S

    path = Path(path)
    with open(path, "rb") as f:  # mapped, not read: artifacts can be several GB
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    model = S.Model.GetRootAs(buf, 0)
    op_names, type_names = _names(S.BuiltinOperator), _names(S.TensorType)

    def tensor_info(sg, idx):
        t = sg.Tensors(idx)
        return t.Name().decode(), tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else (), \
            type_names[t.Type()]

    signatures, sig_subgraph = {}, {}
    for i in range(model.SignatureDefsLength()):
        sd = model.SignatureDefs(i)
        sg = model.Subgraphs(sd.SubgraphIndex())
        io = {}
        for kind, n, get in (("inputs", sd.InputsLength(), sd.Inputs), ("outputs", sd.OutputsLength(), sd.Outputs)):
            io[kind] = []
            for j in range(n):
                tm = get(j)
                _, shape, dtype = tensor_info(sg, tm.TensorIndex())
                io[kind].append((tm.Name().decode(), shape, dtype))
        name = sd.SignatureKey().decode()
        signatures[name] = {"subgraph": sd.SubgraphIndex(), **io}
        sig_subgraph[sd.SubgraphIndex()] = name

    histogram = {name: collections.Counter() for name in signatures}
    composites, custom = collections.Counter(), collections.Counter()
    transposed, seen, weight_bytes = [], set(), collections.Counter()
    for si in range(model.SubgraphsLength()):
        sg = model.Subgraphs(si)
        for ti in range(sg.TensorsLength()):
            t = sg.Tensors(ti)
            data = model.Buffers(t.Buffer())
            size = data.DataLength() or data.Size()
            if size and t.Buffer() not in seen:
                seen.add(t.Buffer())
                weight_bytes[type_names[t.Type()]] += size
        for oi in range(sg.OperatorsLength()):
            op = sg.Operators(oi)
            code = model.OperatorCodes(op.OpcodeIndex())
            name = op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?")
            if name == "CUSTOM":
                custom[code.CustomCode().decode()] += 1
            if name == "STABLEHLO_COMPOSITE":
                options = S.StableHLOCompositeOptions()
                table = op.BuiltinOptions2()
                options.Init(table.Bytes, table.Pos)
                composites[options.Name().decode()] += 1
            if name == "TRANSPOSE" and op.InputsLength():
                src = sg.Tensors(op.Inputs(0))
                data = model.Buffers(src.Buffer())
                if data.DataLength() or data.Size():
                    transposed.append(src.Name().decode())
            if si in sig_subgraph:
                histogram[sig_subgraph[si]][name] += 1

    metadata = {}
    for i in range(model.MetadataLength()):
        md = model.Metadata(i)
        if md.Name().decode() == "gemma_edge":
            metadata = json.loads(_buffer_bytes(buf, model.Buffers(md.Buffer())).decode())
    return TFLiteReport(path, len(buf), signatures, histogram, composites, custom, dict(weight_bytes),
                        transposed, metadata)
