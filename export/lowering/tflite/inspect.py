"""Read a .tflite flatbuffer (a file, or the TFLite section of a .litertlm bundle): signatures
with their tensors, op histogram, composites, weight bytes by type, the stored form of each kind of
weight, our metadata, and checks (no CUSTOM op, no TRANSPOSE fed by a weight)."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

from contract.metadata import ArtifactMetadata
from contract.tflite import enum_names, open_model, read_metadata_json, read_signatures


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
    metadata: ArtifactMetadata | None  # ours (contract/metadata.py); None for another tool's model
    # (consuming op, operand) -> stored form ("INT4 blockwise-32", "INT8 per-channel", ...) ->
    # [tensors, bytes]; weights behind a DEQUANTIZE are counted at the op the DEQUANTIZE feeds
    weight_kinds: dict = dataclasses.field(default_factory=dict)


def read(path) -> TFLiteReport:
    path = Path(path)
    S, model, buf, file_bytes = open_model(path)
    op_names, type_names = enum_names(S.BuiltinOperator), enum_names(S.TensorType)
    signatures, sig_subgraph = {}, {}
    for name, sig in read_signatures(model, S).items():
        signatures[name] = {"subgraph": sig.subgraph, "inputs": list(sig.inputs), "outputs": list(sig.outputs)}
        sig_subgraph[sig.subgraph] = name

    histogram = {name: collections.Counter() for name in signatures}
    composites, custom = collections.Counter(), collections.Counter()
    transposed, seen, weight_bytes = [], set(), collections.Counter()
    first_signature = min(sig_subgraph, default=0)
    named_ops = []  # (op name, op) of the first signature's subgraph, for _weight_kinds
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
            if si == first_signature:
                named_ops.append((name, op))
    kinds = _weight_kinds(model, model.Subgraphs(first_signature), named_ops, S, type_names)

    text = read_metadata_json(model, buf)
    metadata = None if text is None else ArtifactMetadata.from_json(text, where=str(path))
    return TFLiteReport(path, file_bytes, signatures, histogram, composites, custom, dict(weight_bytes),
                        transposed, metadata, kinds)


_OPERANDS = {("FULLY_CONNECTED", 1): "weight", ("FULLY_CONNECTED", 2): "bias", ("EMBEDDING_LOOKUP", 1): "table",
             ("BATCH_MATMUL", 1): "rhs", ("GATHER", 0): "table", ("GATHER_ND", 0): "table"}


_INDEX_TYPES = ("INT32", "INT64", "BOOL")


def _stored_form(t, S, type_names) -> str:
    dtype = type_names[t.Type()]
    q = t.Quantization()
    if q is None or (q.ScaleLength() == 0 and q.DetailsType() == S.QuantizationDetails.NONE):
        return dtype
    if q.DetailsType() == S.QuantizationDetails.BlockwiseQuantization:
        details = S.BlockwiseQuantization()
        details.Init(q.Details().Bytes, q.Details().Pos)
        return f"{dtype} blockwise-{details.BlockSize()}"
    return f"{dtype} per-channel" if q.ScaleLength() > 1 else f"{dtype} per-tensor"


def _weight_kinds(model, sg, ops, S, type_names) -> dict:
    """The stored form of every constant operand of one signature's subgraph `sg` (all signatures
    share their weights; `ops` are its (op name, op) pairs), keyed by the op that uses it (the
    per-block offsets of a checkpoint's carried int4 blocks, models.layers.OFFSETS, as "<op> block
    offsets"; the suffix is spelled here so that inspecting needs no JAX)."""

    def is_const(ti):
        data = model.Buffers(sg.Tensors(ti).Buffer())
        return bool(data.DataLength() or data.Size())

    dequantized = {}  # DEQUANTIZE output -> its constant input
    for name, op in ops:
        if name == "DEQUANTIZE" and op.InputsLength() and is_const(op.Inputs(0)):
            dequantized[op.Outputs(0)] = op.Inputs(0)
    out, seen, first = {}, set(), {}  # first: buffer -> the key it was counted under
    for name, op in ops:
        if name == "DEQUANTIZE":
            continue
        for slot in range(op.InputsLength()):
            ti = op.Inputs(slot)
            if ti < 0:
                continue
            src = dequantized.get(ti, ti)
            if not is_const(src) or (src, name, slot) in seen:
                continue
            seen.add((src, name, slot))
            t = sg.Tensors(src)
            data = model.Buffers(t.Buffer())
            size = data.DataLength() or data.Size()
            if (name, slot) not in _OPERANDS and (size < 4096 or type_names[t.Type()] in _INDEX_TYPES):
                continue  # shapes, positions and other small constants are not weights
            form = _stored_form(t, S, type_names) + (" (DEQUANTIZE at load)" if src != ti else "")
            key = f"{name} {_OPERANDS.get((name, slot), f'input {slot}')}"
            if (t.Name() or b"").decode().endswith("_offsets"):  # a carried int4 weight's offsets
                key = f"{name} block offsets"
            owner = first.setdefault(t.Buffer(), key)
            if owner != key:  # one tensor read by two ops (the tied table): its bytes count once
                form += f" = the {owner} tensor"
                size = 0
            entry = out.setdefault(key, {}).setdefault(form, [0, 0])
            entry[0] += 1
            entry[1] += size
    return out
