"""Read an exported ONNX decoder (file or onnxruntime-genai folder) without loading its weights:
inputs/outputs, op histogram (graph and model-local functions), contrib ops, weight bytes, our
metadata and the genai_config.json beside it."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

from contract.metadata import ArtifactMetadata
from contract.onnx import model_file, read_metadata


@dataclasses.dataclass
class OnnxReport:
    path: Path
    file_bytes: int  # model.onnx plus its external data
    inputs: list[tuple[str, tuple, str]]
    outputs: list[tuple[str, tuple, str]]
    op_histogram: collections.Counter  # graph nodes, "domain::Op" for non-default domains
    function_ops: dict[str, collections.Counter]  # "domain::Function" -> its body's ops
    weight_bytes: int
    metadata: ArtifactMetadata | None  # ours (contract/metadata.py); None for another tool's model
    genai_config: dict | None

    @property
    def contrib_ops(self) -> set[str]:
        ops = {op for op in self.op_histogram if op.startswith("com.microsoft::")}
        for body in self.function_ops.values():
            ops |= {op for op in body if op.startswith("com.microsoft::")}
        return ops


def _op(node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain else node.op_type


def _dims(value) -> tuple:
    return tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)


def read(path) -> OnnxReport:
    import onnx

    path = Path(path)
    file = model_file(path)
    model = onnx.load(str(file), load_external_data=False)
    type_names = {v: k for k, v in onnx.TensorProto.DataType.items()}
    io = {kind: [(v.name, _dims(v), type_names[v.type.tensor_type.elem_type]) for v in values]
          for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output))}
    weight_bytes = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            weight_bytes += int({e.key: e.value for e in t.external_data}["length"])
        else:
            weight_bytes += len(t.raw_data)
    data = file.with_name(file.name + ".data")
    files = [file, data] if data.exists() else [file]
    genai = file.parent / "genai_config.json"
    return OnnxReport(
        path, sum(f.stat().st_size for f in files), io["inputs"], io["outputs"],
        collections.Counter(_op(n) for n in model.graph.node),
        {f"{f.domain}::{f.name}": collections.Counter(_op(n) for n in f.node) for f in model.functions},
        weight_bytes, read_metadata(file),
        json.loads(genai.read_text()) if genai.exists() else None)
