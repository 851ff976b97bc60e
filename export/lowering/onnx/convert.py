"""A decoder signature -> an ONNX model: trace (trace.py), walk (graph.py + rules), assemble.

The model follows onnxruntime-genai's decoder conventions (DESIGN section 5): inputs
`input_ids` and `attention_mask` (int64, as onnxruntime-genai feeds them; cast to int32 in the
graph), the state inputs `past_key_values.{i}.key/value` (and `past.{i}.conv/recurrent`), outputs
`logits` and the `present.*` states. Weights are initializers, in the file or, past 2 GB, in one
external data file written tensor by tensor (no second in-memory copy of the weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

# import for their registrations
from export.lowering.onnx import (  # noqa: F401
    rules_elementwise,
    rules_gather,
    rules_reduce_dot,
    rules_shape,
)
from export.lowering.onnx.fused import MS_DOMAIN, OP_SETS, OPSET
from export.lowering.onnx.graph import NUMPY_TO_ONNX, Lowering
from export.stablehlo import stablehlo, weight_names
from models.lazy import is_lazy, load
from models.signatures import Signature

GRAPH_INPUT_TYPES = {"input_ids": np.dtype(np.int64), "attention_mask": np.dtype(np.int64)}
# Weights past this go to model.onnx.data, streamed tensor by tensor: an in-file model is
# serialised in memory (about 3x the weights at peak), and protobuf caps a file at 2 GB.
EXTERNAL_DATA_BYTES = 64 * 2**20
INLINE_BYTES = 1024  # tensors below this stay in model.onnx even when the weights go external
BLOCK_BYTES = 32 * 2**20  # transposed weights are made contiguous this much at a time
IR_VERSION = 10


def lower_to_graph(sig: Signature, params: dict, *, op_set: str, max_len: int, compute=None) -> Lowering:
    """Trace the signature with symbolic lengths and lower it; returns the filled Lowering."""
    if op_set not in OP_SETS:
        raise ValueError(f"unknown ONNX op set '{op_set}' (choose from {', '.join(OP_SETS)})")
    module = stablehlo(sig, params, compute)
    with module.context:
        lw = Lowering(module, OP_SETS[op_set], params)
        lw.options.update(max_len=max_len, opset=OPSET)
        names = weight_names(params)
        lw.weight_names = names
        main = lw.funcs["main"]
        lw.analyze_weight_uses(main, len(names))
        args = list(names)
        for t in sig.inputs:
            if t.name in GRAPH_INPUT_TYPES:
                args.append(lw.node1("Cast", [t.name], to=NUMPY_TO_ONNX[t.dtype], hint=f"{t.name}_i32"))
            else:
                args.append(t.name)
        lw.results = lw.lower_function("main", args)
    return lw


def _value_info(name: str, dtype, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, NUMPY_TO_ONNX[np.dtype(dtype)], list(shape))


def _state_shape(lw: Lowering, name: str, shape, concrete: bool = False) -> tuple:
    """A state's shape as the graph declares it (symbolic rows where a fused op asked for them),
    or with `concrete`, the shape runtime_py allocates."""
    if name not in lw.state_rows:
        return tuple(shape)
    rows, symbol = lw.state_rows[name]
    return (shape[0], shape[1], rows if concrete or symbol is None else symbol, *shape[3:])


def state_shapes(sig: Signature, lw: Lowering) -> dict[str, tuple]:
    """{state input name: the shape runtime_py allocates}."""
    return {t.name: _state_shape(lw, t.name, t.shape, concrete=True) for t in sig.state_inputs}


def assemble(sig: Signature, lw: Lowering, metadata: dict[str, str]) -> tuple[onnx.ModelProto, dict]:
    """The model proto without weights, and the weights to attach {name: array}."""
    nodes = list(lw.nodes)
    producers = {out: node for node in nodes for out in node.output}
    renames, outputs = {}, []
    for info, result in zip(sig.outputs, lw.results):
        shape = _state_shape(lw, result, info.shape)
        if result in producers and result not in renames and producers[result].op_type != "Constant":
            renames[result] = info.name
        else:
            nodes.append(helper.make_node("Identity", [result], [info.name]))
        outputs.append(_value_info(info.name, info.dtype, shape))
    for node in nodes:
        node.output[:] = [renames.get(o, o) for o in node.output]
        node.input[:] = [renames.get(i, i) for i in node.input]
    nodes = live_nodes(nodes, [o.name for o in outputs])
    inputs = [_value_info(t.name, GRAPH_INPUT_TYPES.get(t.name, t.dtype), _state_shape(lw, t.name, t.shape))
              for t in sig.inputs]
    used = {i for node in nodes for i in node.input}
    weights = dict(lw.initializers)
    for name in lw.weight_names:
        if name in used and name not in weights:
            weights[name] = lw.weights[name]
    weights = {k: v for k, v in weights.items() if k in used}
    graph = helper.make_graph(nodes, "decoder", inputs, outputs)
    imports = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in sorted(lw.opset_imports.items())]
    model = helper.make_model(graph, opset_imports=imports, producer_name="gemma-edge",
                              functions=list(lw.functions.values()))
    model.ir_version = IR_VERSION
    helper.set_model_props(model, metadata)
    return model, weights


def live_nodes(nodes: list, outputs: list[str]) -> list:
    """The nodes the outputs depend on, in their original (topological) order."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]


def _write_rows(f, array: np.ndarray):
    """Write an array's bytes in C order, a block of rows at a time (views, e.g. a transposed
    weight, are never copied whole). A lazy weight whose source reads rows alone (a spilled
    packed weight) is read a block of rows at a time; any other is read here whole and dropped
    once written."""
    if not (is_lazy(array) and array.reads_rows and array.ndim >= 1):
        array = load(array)
        if array.flags.c_contiguous:
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
            return
    take = array.read_rows if is_lazy(array) else (lambda a, b: array[a:b])
    rows = max(1, BLOCK_BYTES // max(1, array.nbytes // max(1, array.shape[0])))
    for i in range(0, array.shape[0], rows):
        f.write(memoryview(np.ascontiguousarray(take(i, i + rows)).reshape(-1).view(np.uint8)))


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    array = np.ascontiguousarray(array)
    tensor = onnx.TensorProto(name=name, data_type=NUMPY_TO_ONNX[array.dtype], dims=array.shape)
    tensor.raw_data = array.view(np.uint16).tobytes() if array.dtype.itemsize == 2 and array.dtype.kind == "V" \
        else array.tobytes()
    return tensor


def external_table(model: onnx.ModelProto, weights: dict) -> dict:
    """{name: (array, location, offset, length)} of the weights a saved model keeps in its external
    data file, for `save(..., reuse=)`."""
    table = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL and t.name in weights:
            info = {e.key: e.value for e in t.external_data}
            table[t.name] = (weights[t.name], info["location"], int(info["offset"]), int(info["length"]))
    return table


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a is b:
        return True
    if is_lazy(a) or is_lazy(b):  # the same source gives the same lazy object (LazyTensor.T is kept)
        return False
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def share_equal_weights(model: onnx.ModelProto, weights: dict, min_bytes: int = INLINE_BYTES,
                        max_bytes: int = 4 << 20) -> dict:
    """`weights` with every in-memory array equal to another (same dtype, shape and bytes; from
    `min_bytes` to `max_bytes`: the weights proper are lazy or large, and not compared) dropped,
    and the nodes reading it (subgraphs included) rewired to the first name in sorted order (the
    same name in every graph of a folder, so `save(reuse=)` still finds it). The input rotations
    (export/quantize/rotate.py) are one matrix per order, repeated per input: stored once."""
    from export.lowering.dedupe import earlier_copies

    renames = earlier_copies((name, (a.dtype.str, a.shape), a) for name, a in sorted(weights.items())
                             if not is_lazy(a) and min_bytes <= a.nbytes <= max_bytes)
    if not renames:
        return weights

    def rewire(graph):
        for node in graph.node:
            if any(i in renames for i in node.input):
                node.input[:] = [renames.get(i, i) for i in node.input]
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    rewire(sub)

    rewire(model.graph)
    return {k: v for k, v in weights.items() if k not in renames}


def save(model: onnx.ModelProto, weights: dict, path: Path, reuse: dict | None = None,
         progress=None, on_written=None) -> list[Path]:
    """Write model.onnx (+ model.onnx.data when the weights pass EXTERNAL_DATA_BYTES), each to a
    temporary name first. Weights go in sorted order, so the same inputs give identical bytes.

    reuse (`external_table` of a model saved in the same folder): weights equal to one there are
    referenced in its data file instead of written again (the image prefill graph shares the text
    decoder's weights this way). on_written(array), if given, is called once each weight is in the
    external data file (the ONNX target frees the packed weights' scratch copies this way). Equal
    in-memory weights are stored once (`share_equal_weights`)."""
    path = Path(path)
    weights = share_equal_weights(model, dict(weights))
    for name, (array, location, offset, length) in (reuse or {}).items():
        if name in weights and _same(weights[name], array):
            del weights[name]
            tensor = onnx.TensorProto(name=name, data_type=NUMPY_TO_ONNX[array.dtype], dims=array.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            model.graph.initializer.append(tensor)
    # external only when something big remains (after `reuse`, maybe nothing does)
    external = sum(a.nbytes for a in weights.values()) > EXTERNAL_DATA_BYTES and \
        any(a.nbytes >= INLINE_BYTES for a in weights.values())
    written = []
    data_path = path.with_name(path.name + ".data")
    tmp_data = data_path.with_name(data_path.name + ".tmp")
    try:
        if external:
            # small tensors (shapes, scalars) stay in the model: shape inference reads them
            inline = sorted(n for n, a in weights.items() if a.nbytes < INLINE_BYTES)
            model.graph.initializer.extend(_tensor(name, weights[name]) for name in inline)
            with open(tmp_data, "wb") as f:
                names = sorted(set(weights) - set(inline))
                for i, name in enumerate(names):
                    if progress:
                        progress(i, len(names), f"write {name}")
                    array = weights[name]
                    pad = (-f.tell()) % 64
                    f.write(b"\0" * pad)
                    offset = f.tell()
                    _write_rows(f, array)
                    if on_written is not None:
                        on_written(array)
                    tensor = onnx.TensorProto(name=name, data_type=NUMPY_TO_ONNX[array.dtype], dims=array.shape)
                    tensor.data_location = TensorProto.EXTERNAL
                    for key, value in (("location", data_path.name), ("offset", str(offset)),
                                       ("length", str(array.nbytes))):
                        entry = tensor.external_data.add()
                        entry.key, entry.value = key, value
                    model.graph.initializer.append(tensor)
                if progress:
                    progress(len(names), len(names), "written")
            written.append(data_path)
        else:
            model.graph.initializer.extend(_tensor(name, weights[name]) for name in sorted(weights))
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
        if external:
            os.replace(tmp_data, data_path)
        os.replace(tmp, path)
        written.insert(0, path)
    finally:
        for leftover in (tmp_data, path.with_name(path.name + ".tmp")):
            if leftover.exists():
                leftover.unlink()
    return written


def contrib_ops(model: onnx.ModelProto) -> set[str]:
    """Ops from Microsoft's contrib domain, anywhere in the model (graph and functions)."""
    ops = {n.op_type for n in model.graph.node if n.domain == MS_DOMAIN}
    for f in model.functions:
        ops |= {n.op_type for n in f.node if n.domain == MS_DOMAIN}
    return ops


__all__ = ["assemble", "contrib_ops", "external_table", "lower_to_graph", "save", "state_shapes"]
