"""The TFLite oracle for the streamed writer: the earlier in-memory path (every weight a converter
constant, then ai-edge-quantizer, our int4 blocks placed into its tensors), and a structural
comparison of two .tflite files, op by op, constant by constant."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.driver import resolve, storage
from export.lowering.tflite.convert import convert
from export.options import ExportOptions
from models.lazy import materialize


def oracle_export(cfg, params: dict, out: Path, quant: str | None, dtype: str = "f32", lens=(4, 16),
                  max_len: int = 64) -> Path:
    """`cfg` exported to `out` the way the exporter did before the streamed writer."""
    from export.quantize.tflite import quantize_file

    plan = resolve(cfg, "tflite", ExportOptions(quant=quant, dtype=dtype, max_len=max_len,
                                                prefill_lens=tuple(lens), verify=False, out_dir=out.parent,
                                                rotation=False))
    weights = storage(plan, params)
    stored = materialize(weights.stored)
    signatures = plan.target.signatures(plan)
    recipe = plan.recipe
    if recipe is None or recipe.bits == 16:
        return convert(signatures, stored, out, compute=weights.compute)
    float_path = out.with_name(out.name + ".float")
    convert(signatures, stored, float_path, compute=weights.compute)
    quantize_file(float_path, out, recipe, weights.blocks, stored)
    float_path.unlink()
    return out


def _names():
    from ai_edge_litert import schema_py_generated as S

    return {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}


def _model(path: Path):
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model(str(path))  # buffers at offsets are read in


def _data(model, t) -> bytes | None:
    data = model.buffers[t.buffer].data
    return None if data is None or not len(data) else bytes(np.asarray(data, np.uint8))


def _quant(model, sg, t):
    q = t.quantization
    if q is None:
        return None
    out = {"scale": None if q.scale is None or not len(q.scale) else np.asarray(q.scale, np.float32).tobytes(),
           "zero": None if q.zeroPoint is None or not len(q.zeroPoint) else np.asarray(q.zeroPoint).tolist(),
           "dim": q.quantizedDimension, "details": q.detailsType}
    if q.details is not None and hasattr(q.details, "blockSize"):
        out["block"] = q.details.blockSize
        out["block_scales"] = _data(model, sg.tensors[q.details.scales])
    if out["scale"] is None and out["zero"] is None and not out["details"]:
        return None
    return out


def compare(a_path: Path, b_path: Path) -> dict:
    """Compare two .tflite files op by op in every subgraph (DEQUANTIZE ops of constants are
    looked through, wherever they sit): op names and options, every input and output tensor's
    type and shape, every constant's bytes and quantization. Returns counts; raises
    AssertionError at the first difference. Equal decomposition subgraphs are merged on both
    sides first (export/lowering/tflite/streamed.share_subgraphs: the writer's, not the
    converter's, so the oracle's file still has one per composite call)."""
    from export.lowering.tflite.streamed import share_subgraphs

    names = _names()
    a, b = _model(a_path), _model(b_path)
    share_subgraphs(a)
    share_subgraphs(b)
    assert [sg.name for sg in a.subgraphs] == [sg.name for sg in b.subgraphs]
    constants = quantized = 0
    for sa, sb in zip(a.subgraphs, b.subgraphs):
        def ops(model, sg):
            produced = {}
            kept = []
            for op in sg.operators:
                name = names[max(model.operatorCodes[op.opcodeIndex].builtinCode,
                                 model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)]
                if name == "DEQUANTIZE" and _data(model, sg.tensors[op.inputs[0]]) is not None:
                    produced[op.outputs[0]] = op.inputs[0]
                    continue
                kept.append((name, op))
            return kept, produced

        oa, pa = ops(a, sa)
        ob, pb = ops(b, sb)
        assert [n for n, _ in oa] == [n for n, _ in ob], sa.name
        for (name, x), (_, y) in zip(oa, ob):
            assert type(x.builtinOptions) is type(y.builtinOptions), (sa.name, name)
            if x.builtinOptions is not None:
                assert vars(x.builtinOptions) == vars(y.builtinOptions), (sa.name, name)
            assert len(x.inputs) == len(y.inputs) and len(x.outputs) == len(y.outputs), (sa.name, name)
            for i, j in zip(list(x.inputs) + list(x.outputs), list(y.inputs) + list(y.outputs)):
                assert (i < 0) == (j < 0), (sa.name, name)
                if i < 0:
                    continue
                da, db = i in pa, j in pb  # read through a DEQUANTIZE
                assert da == db, (sa.name, name, "one side dequantizes")
                ta, tb = sa.tensors[pa.get(i, i)], sb.tensors[pb.get(j, j)]
                where = (sa.name, name, ta.name, tb.name)
                assert ta.type == tb.type and list(ta.shape) == list(tb.shape), where
                ca, cb = _data(a, ta), _data(b, tb)
                assert (ca is None) == (cb is None), where
                if ca is not None:
                    constants += 1
                    assert ca == cb, where
                qa, qb = _quant(a, sa, ta), _quant(b, sb, tb)
                assert qa == qb, where
                quantized += qa is not None
    return {"constants": constants, "quantized": quantized}


def run_signature(path: Path, signature: str, seed: int = 0) -> dict:
    """One signature of `path` run by LiteRT's interpreter on seeded inputs (token ids in the
    vocabulary, positions 0.., zero states): name -> output array."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=1)
    runner = interp.get_signature_runner(signature)
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, d in runner.get_input_details().items():
        shape, dtype = tuple(d["shape"]), d["dtype"]
        if name == "tokens":
            feeds[name] = rng.integers(3, 200, size=shape).astype(dtype)
        elif name == "input_pos":
            feeds[name] = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
        elif np.issubdtype(dtype, np.floating) and name in ("embeddings", "images"):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype)
    return runner(**feeds)
