"""The streamed TFLite writer (export/lowering/tflite/streamed.py) against its oracle, the earlier
in-memory path (every weight a converter constant, then ai-edge-quantizer): the same graph op by op,
every constant and quantized tensor bit for bit, the same outputs; the weights outside the
flatbuffer at aligned offsets; the skeleton's holes."""

from __future__ import annotations

import numpy as np
import pytest

from models import get_config, init_model
from tflite_oracle import compare, oracle_export, run_signature

# (model, --quant, --dtype, signatures run): every recipe, every storage form the writer has
# (f32, bf16 with its CAST, fp16's DEQUANTIZE, INT8 with and without DEQUANTIZE, INT4 blocks,
# the int8 table of int4-b32-e8) and the three families; the vision tower's position table is
# the weight the converter must fold (a stray hole)
CASES = [("gemma3-tiny", "int4-b32-e8", "f32", ("prefill_4", "decode")),
         ("gemma3-tiny", "int8", "f32", ("decode",)),
         ("gemma3-tiny", "fp16", "f32", ("decode",)),
         ("gemma2-tiny", "dynamic-int8", "f32", ("prefill_4", "decode")),
         ("gemma2-tiny", None, "bf16", ("decode",)),
         ("recurrentgemma-tiny", "int4-b32", "f32", ("prefill_4", "decode")),
         ("gemma3-vision-tiny", "dynamic-int8", "f32", ("vision_encoder", "image_prefill_8"))]


@pytest.mark.parametrize("model,quant,dtype,run", CASES, ids=[f"{c[0]}-{c[1] or c[2]}" for c in CASES])
def test_streamed_writer_equals_the_in_memory_oracle(tmp_path, model, quant, dtype, run):
    from export.driver import export
    from export.options import ExportOptions

    lens = (4, 8)
    cfg, params = init_model(get_config(model), 3, lazy=True)
    oracle = oracle_export(cfg, dict(params), tmp_path / "oracle.tflite", quant, dtype, lens=lens)
    # the writer against the oracle on the same weights: without dynamic-int8's rotations (their
    # f32 constants and rotated weights are an export choice the oracle does not make; they are
    # tested in tests/test_rotate.py)
    ours = export(cfg, dict(params), "tflite", ExportOptions(out_dir=tmp_path, name="ours.tflite", quant=quant,
                                                              dtype=dtype, max_len=64, prefill_lens=lens,
                                                              verify=False, rotation=False)).path
    counts = compare(oracle, ours)
    assert counts["constants"] > 100
    if quant not in (None, "fp16"):
        assert counts["quantized"] >= 7 * 3  # every matmul of a layer, in every signature
    for signature in run:
        a, b = run_signature(oracle, signature), run_signature(ours, signature)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{signature} {k}")


def test_weights_sit_outside_the_flatbuffer_aligned(tmp_path):
    """Every matmul weight (and its block scales) is a buffer at a 64-byte aligned offset past the
    flatbuffer, which holds only the graph and the small weights: no 2 GiB flatbuffer limit, and
    the file is written without holding it in memory. Re-export gives the same bytes."""
    from ai_edge_litert import schema_py_generated as S

    from export.driver import export
    from export.options import ExportOptions

    cfg, params = init_model(get_config("gemma3-tiny"), 0, lazy=True)
    path = export(cfg, params, "tflite", ExportOptions(out_dir=tmp_path, quant="int4-b32", max_len=64,
                                                       prefill_lens=(4,), verify=False)).path
    raw = path.read_bytes()
    model = S.Model.GetRootAs(raw, 0)
    outside = [(model.Buffers(i).Offset(), model.Buffers(i).Size()) for i in range(model.BuffersLength())
               if model.Buffers(i).Offset() > 1]
    matmuls = sum(1 for k, v in params.items() if len(v.shape) == 2 and k != "final_norm")
    assert len(outside) == 2 * matmuls  # codes + scales per weight
    start = min(o for o, _ in outside)
    assert all(o % 64 == 0 for o, _ in outside)
    assert max(o + s for o, s in outside) == len(raw)
    inside = sum(model.Buffers(i).DataLength() for i in range(model.BuffersLength()))
    assert inside < start
    again = export(cfg, params, "tflite", ExportOptions(out_dir=tmp_path / "again", quant="int4-b32", max_len=64,
                                                        prefill_lens=(4,), verify=False)).path
    assert again.read_bytes() == raw


def test_equal_decompositions_are_stored_once(tmp_path):
    """The converter writes a decomposition subgraph per composite call; the writer keeps one of
    each set of equal ones (LiteRT builds every subgraph on load: its tensors, working memory and
    XNNPACK runtime) and points every call at it. Each kept subgraph is distinct and used, and the
    signatures give the outputs of the converter's file (the oracle test above runs them)."""
    from ai_edge_litert import schema_py_generated as S
    from ai_edge_litert.tools import flatbuffer_utils

    from export.driver import export
    from export.lowering.tflite.streamed import _subgraph_fields, share_subgraphs
    from export.options import ExportOptions

    cfg, params = init_model(get_config("recurrentgemma-tiny"), 0, lazy=True)
    path = export(cfg, params, "tflite", ExportOptions(out_dir=tmp_path, max_len=64, prefill_lens=(4, 8),
                                                       verify=False)).path
    model = flatbuffer_utils.read_model(str(path))
    signatures = {sig.subgraphIndex for sig in model.signatureDefs}
    calls = [op.builtinOptions2.decompositionSubgraphIndex for sg in model.subgraphs for op in sg.operators
             if isinstance(op.builtinOptions2, S.StableHLOCompositeOptionsT)]
    names = {op.builtinOptions2.name for sg in model.subgraphs for op in sg.operators
             if isinstance(op.builtinOptions2, S.StableHLOCompositeOptionsT)}
    assert {b"odml.rms_norm", b"gemma_edge.linear_recurrence"} <= names
    # 3 signatures x 6 layers: far more calls than distinct decompositions
    assert len(calls) > 3 * len(set(calls))
    # every subgraph left is a signature or called by some operator (no orphan of the merge)
    called = set()
    for sg in model.subgraphs:
        for op in sg.operators:
            for opts, attr in _subgraph_fields(op):
                value = getattr(opts, attr)
                called.update([value] if isinstance(value, int) else value)
    assert called | signatures == set(range(len(model.subgraphs))) and not called & signatures
    assert share_subgraphs(model) == 0  # nothing equal is left


def test_the_skeleton_lists_its_holes(tmp_path):
    """The converter's skeleton: the matmul weights and the table are signature inputs named
    HOLE + name, each read only as a FULLY_CONNECTED / EMBEDDING_LOOKUP weight; nothing is stray."""
    from ai_edge_litert.tools import flatbuffer_utils

    from export.driver import resolve, storage
    from export.lowering.tflite.convert import convert
    from export.lowering.tflite.streamed import find_holes, stray_holes
    from export.options import ExportOptions
    from export.quantize.sizes import is_quantized_weight

    cfg, params = init_model(get_config("gemma3-tiny"), 0, lazy=True)
    plan = resolve(cfg, "tflite", ExportOptions(max_len=64, prefill_lens=(4,), verify=False, out_dir=tmp_path))
    weights = storage(plan, params)
    names = [k for k, v in params.items() if is_quantized_weight(k, tuple(v.shape))]
    skeleton = convert(plan.target.signatures(plan), weights.stored, tmp_path / "s.tflite", holes=names)
    holes = find_holes(flatbuffer_utils.read_model(str(skeleton)))
    assert sorted(holes) == sorted(names)
    assert holes["embed"].readers == {("EMBEDDING_LOOKUP", 1), ("FULLY_CONNECTED", 1)}
    assert all(len(h.places) == 2 for h in holes.values())  # prefill_4 and decode
    assert stray_holes(skeleton) == []
    assert skeleton.stat().st_size < 0.5 * sum(v.nbytes for v in params.values())


@pytest.mark.parametrize("model,quant", [("gemma3-tiny", "int4-b32-e8"), ("gemma3-vision-tiny", "dynamic-int8")])
def test_the_converter_process_writes_the_in_process_bytes(tmp_path, model, quant):
    """The export runs the converter and the flatbuffer work in a child process
    (export/lowering/tflite/worker.py): its file equals, byte for byte, the one written in this
    process from the same plan (convert, then streamed.fill): INT4 blocks and the int8 table's
    per-channel scales (set in the flatbuffer after the weights are written), and the vision
    tower's stray position table (handed back to the converter through the protocol)."""
    from export.driver import Timer, resolve, storage
    from export.lowering.tflite.convert import convert
    from export.lowering.tflite.streamed import fill, stray_holes
    from export.options import ExportOptions
    from export.quantize.sizes import is_quantized_weight
    from export.quantize.tflite import encoder, layout
    from export.targets.tflite import write_model

    cfg, params = init_model(get_config(model), 1, lazy=True)
    plan = resolve(cfg, "tflite", ExportOptions(max_len=64, prefill_lens=(8,), verify=False, out_dir=tmp_path,
                                                quant=quant))
    weights = storage(plan, params)
    signatures = plan.target.signatures(plan)
    child = write_model(plan, weights, signatures, tmp_path / "child.tflite", Timer(), metadata="{}")
    stored = weights.stored
    holes = [n for n, v in stored.items() if is_quantized_weight(n, tuple(v.shape))]
    skeleton = convert(signatures, stored, tmp_path / "skeleton.tflite", compute=weights.compute, metadata="{}",
                       holes=holes)
    stray = stray_holes(skeleton)
    assert bool(stray) == ("vision" in model)
    if stray:
        skeleton = convert(signatures, stored, tmp_path / "skeleton.tflite", compute=weights.compute,
                           metadata="{}", holes=[n for n in holes if n not in stray])
    here = fill(skeleton, tmp_path / "here.tflite", layout(plan.recipe, weights.blocks),
                encoder(stored, weights.blocks))
    assert child.read_bytes() == here.read_bytes()
