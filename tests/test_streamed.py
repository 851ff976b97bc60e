"""Streamed weights and the bounded-memory gate (docs/memory.md): lazy tensors read from a
checkpoint, a streamed export equal to the in-memory one, and the layer-streamed reference equal
to the in-memory JAX model on all three tiny families, with and without images."""

from __future__ import annotations

import numpy as np
import pytest

from models import get_config, init_model
from models.fused import AttentionForm
from models.lazy import LazyTensor, any_lazy, materialize, random_params
from models.params import param_shapes
from verify.prompts import verify_images, verify_prompts
from verify.reference import reference_session
from verify.streamed import run_artifact, streamed_parity

FAMILIES = ["gemma2-tiny", "gemma3-tiny", "recurrentgemma-tiny"]


def test_lazy_tensor_reads_on_demand_and_transforms():
    reads = []

    def read():
        reads.append(1)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    t = LazyTensor((2, 3), np.float32, read, "w")
    assert (t.shape, t.size, t.nbytes, t.ndim) == ((2, 3), 6, 24, 2) and not reads
    tt = t.T.astype(np.float16)
    assert tt.shape == (3, 2) and tt.dtype == np.float16 and not reads
    np.testing.assert_array_equal(np.asarray(tt), np.arange(6, dtype=np.float16).reshape(2, 3).T)
    assert t.T is t.T  # one transposed object per weight (graphs sharing it are told apart by identity)
    bad = LazyTensor((3, 3), np.float32, read, "w")
    with pytest.raises(RuntimeError, match="declared"):
        bad.load()


def test_row_chunked_quantization_equals_the_whole_weight(hf_checkpoints):
    """A checkpoint's table is read a slice of rows at a time (never whole in f32), and the block
    quantizers and the TFLite int8 encoder give, chunk by chunk, the whole weight's numbers."""
    from export.quantize import blocks
    from export.quantize.tflite import channel_int8, encoder
    from export.lowering.tflite.streamed import Layout
    from models.lazy import row_chunks
    from models.loaders import load_checkpoint

    path, _ = hf_checkpoints["gemma3"]
    _, lazy = load_checkpoint(path, lazy=True)
    table = lazy["embed"]
    assert table.reads_rows and table.astype(np.float16).reads_rows and not table.T.reads_rows
    whole = table.load()
    chunks = list(row_chunks(table, 4096))  # 16 rows of 64 at a time
    assert len(chunks) == whole.shape[0] // 16
    np.testing.assert_array_equal(np.concatenate([r for _, r in chunks]), whole)
    for fn in (blocks.mse, blocks.mse_asymmetric, blocks.rtn):
        a, b = blocks.by_rows(fn, table, 4, 32, max_bytes=4096), fn(whole, 4, 32)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scales, b.scales)
        assert (a.zeros is None and b.zeros is None) or np.array_equal(a.zeros, b.zeros)
    enc = encoder(lazy, None)("embed", Layout("INT8"))
    codes, scales = channel_int8(whole)
    np.testing.assert_array_equal(enc.data, codes)
    np.testing.assert_array_equal(enc.scales, scales)


def test_random_params_are_per_tensor_and_deterministic():
    cfg = get_config("gemma3-tiny")
    a, b = random_params(param_shapes(cfg), 3), random_params(param_shapes(cfg), 3)
    assert all(isinstance(v, LazyTensor) for v in a.values())
    name = "layers.2.attn.q"
    np.testing.assert_array_equal(a[name].load(), b[name].load())
    assert not np.array_equal(a[name].load(), random_params(param_shapes(cfg), 4)[name].load())
    # the std of a matmul weight is 1/sqrt(fan_in), as models.params.init_params draws it
    w = random_params(param_shapes(get_config("gemma3-1b")), 0)["layers.0.mlp.gate"].load()
    assert abs(w.std() * np.sqrt(w.shape[-1]) - 1) < 0.01


def test_lazy_checkpoint_equals_eager(hf_checkpoints):
    from models.loaders import load_checkpoint

    for family, (path, _model) in hf_checkpoints.items():
        _, eager = load_checkpoint(path)
        _, lazy = load_checkpoint(path, lazy=True)
        assert any_lazy(lazy), family
        assert eager.keys() == lazy.keys()
        for k, v in materialize(lazy).items():
            np.testing.assert_array_equal(v, eager[k], err_msg=f"{family} {k}")


def _gate_prompts(cfg, max_len, lens, steps, with_images):
    prompts = verify_prompts(cfg, max_len, lens, steps)
    images = [None] * len(prompts)
    if with_images:
        more, imgs = verify_images(cfg, max_len, lens, steps)
        assert more, "the image prompt must fit"
        prompts, images = prompts + more, images + imgs
    return prompts, images


@pytest.mark.parametrize("model", FAMILIES + ["gemma3-vision-tiny"])
def test_layer_streamed_reference_equals_in_memory(model):
    """The in-memory JAX model (chunked prefill + decode, as the gate runs it) stands in for the
    artifact: the layer-streamed full-sequence reference must give its logits to 1e-5."""
    cfg, lazy = init_model(get_config(model), seed=1, lazy=True)  # the text model lazy, the tower in memory
    arrays = materialize(lazy)
    max_len, lens, steps = 64, [8, 16], 12
    session = reference_session(cfg, arrays, lens, max_len, AttentionForm.SDPA)
    prompts, images = _gate_prompts(cfg, max_len, lens, steps, cfg.vision is not None)
    recorded = run_artifact(session, prompts, steps, images)
    assert sum(len(r.steps) for r in recorded) >= len(prompts) * steps
    encode = None
    if cfg.vision is not None:
        from verify.gate import _jax_encoder

        encode = _jax_encoder(cfg, arrays)
    report = streamed_parity(cfg, lazy, recorded, steps, encode, session.vision)
    assert report.max_rel_rms <= 1e-5, report.worst()
    assert report.greedy_match == [steps] * len(prompts)
    if cfg.vision is not None:
        assert report.encoder and max(e["rel_rms"] for e in report.encoder) <= 1e-6


def _files(path):
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if "parity" not in f.name}


# TFLite: the lazy and the in-memory weights take the same streamed writer; its other recipes are
# held to the earlier in-memory path (converter constants + ai-edge-quantizer) by
# tests/test_streamed_tflite.py
STREAMED_CASES = [("onnx", None), ("onnx", "fp16"), ("onnx", "dynamic-int8"), ("onnx", "int4-b32"),
                  ("onnx", "int4-b32-e8"), ("tflite", None), ("tflite", "int4-b32")]


GATED = {("onnx", None), ("onnx", "int4-b32"), ("tflite", None), ("tflite", "int4-b32")}


@pytest.mark.parametrize("target,quant", STREAMED_CASES)
def test_streamed_export_equals_in_memory_export(tmp_path, target, quant):
    """Lazy weights (read tensor by tensor as the export writes them) give the same bytes as the
    same weights in memory; the streamed export passes the streamed gate."""
    from export.driver import export
    from export.options import ExportOptions

    model = "gemma2-tiny" if quant in ("int8", "fp16") else "gemma3-tiny"
    cfg, lazy = init_model(get_config(model), seed=5, lazy=True)
    arrays = materialize(lazy)
    common = dict(max_len=64, prefill_lens=(8, 16), quant=quant, verify_steps=8)
    gated = (target, quant) in GATED  # the streamed gate on a few (time: the suite runs on 2 cores)
    streamed = export(cfg, lazy, target, ExportOptions(out_dir=tmp_path / "lazy", gate="streamed", verify=gated,
                                                       random_weights=True, **common))  # quantized gates warn
    eager = export(cfg, arrays, target, ExportOptions(out_dir=tmp_path / "eager", verify=False, **common))
    assert _files(streamed.path) == _files(eager.path)
    if gated:
        gate = streamed.gate
        assert gate is not None and (gate.passed or quant is not None), gate.failures
        assert gate.report.decode_steps == 8 and len(gate.report.steps) >= 16


@pytest.mark.parametrize("model", ["gemma3-tiny", "gemma3-vision-tiny"])
def test_spilled_packed_weights_give_the_same_folder(tmp_path, monkeypatch, model):
    """ONNX int4: the packed weights spilled to the scratch file (every one, here) and read back
    by row when model.onnx.data is written give the same folder as packed weights kept in memory;
    with vision, the image prefill graph still references the decoder's spilled weights instead of
    writing them again; the scratch file is gone."""
    import export.quantize.onnx as qonnx
    from export.driver import export
    from export.lowering.onnx import convert
    from export.options import ExportOptions

    monkeypatch.setattr(convert, "EXTERNAL_DATA_BYTES", 0)  # model.onnx.data, as a real model has
    cfg, params = init_model(get_config(model), seed=3)
    common = dict(max_len=64, prefill_lens=(8,), quant="int4-b32", verify=False)
    seen = []
    real_put = qonnx.Spill.put

    def put(self, name, array):
        value = real_put(self, name, array)
        seen.append(value is not array)
        return value

    monkeypatch.setattr(qonnx.Spill, "put", put)
    monkeypatch.setattr(qonnx, "SPILL_MIN_BYTES", 0)
    spilled = export(cfg, params, "onnx", ExportOptions(out_dir=tmp_path / "spilled", **common))
    assert seen and sum(seen) >= 0.6 * len(seen)  # the zero points of symmetric blocks are None
    monkeypatch.setattr(qonnx, "SPILL_MIN_BYTES", 1 << 62)
    kept = export(cfg, params, "onnx", ExportOptions(out_dir=tmp_path / "kept", **common))
    files = _files(spilled.path)
    assert files == _files(kept.path)
    assert not any(".spill" in name for name in files)
    if cfg.vision is not None:
        import onnx

        prefill = onnx.load(str(spilled.path / "image_prefill.onnx"), load_external_data=False)
        shared = [t for t in prefill.graph.initializer
                  if any(e.key == "location" and e.value == "model.onnx.data" for e in t.external_data)]
        assert len(shared) > 10  # the decoder's packed matmuls, fused ones included


def test_spill_reads_back_and_frees_what_was_written(tmp_path):
    """The scratch file of packed ONNX weights: rows read back exactly (a concatenation across
    parts too); once released (copied into model.onnx.data), a tensor's disk blocks are freed and
    reading it is an error, not zeros."""
    import os

    from export.quantize.onnx import Spill

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (512, 64, 16), dtype=np.uint8)
    b = rng.integers(0, 256, (256, 64, 16), dtype=np.uint8)
    spill = Spill(tmp_path / "s.spill", min_bytes=0)
    la, lb = spill.put("a", a), spill.put("b", b)
    fused = spill.concat([la, lb], "ab")
    np.testing.assert_array_equal(fused.read_rows(500, 520), np.concatenate([a, b])[500:520])
    np.testing.assert_array_equal(np.asarray(la), a)
    blocks = os.stat(spill.path).st_blocks
    spill.release(fused)  # releases both parts
    freed = blocks - os.stat(spill.path).st_blocks
    assert freed * 512 >= 0.9 * (a.nbytes + b.nbytes), "no hole punched (file system without fallocate?)"
    with pytest.raises(RuntimeError, match="after it was released"):
        lb.read_rows(0, 1)
    spill.close()
    assert not spill.path.exists()


def test_streamed_gate_catches_a_wrong_artifact():
    """Scored against other weights, the streamed gate must see the difference."""
    cfg, params = init_model(get_config("gemma3-tiny"), seed=1)
    _, other = init_model(get_config("gemma3-tiny"), seed=2)
    max_len, lens, steps = 64, [8, 16], 8
    session = reference_session(cfg, params, lens, max_len, AttentionForm.SDPA)
    prompts, images = _gate_prompts(cfg, max_len, lens, steps, False)
    report = streamed_parity(cfg, other, run_artifact(session, prompts, steps, images), steps)
    assert report.max_rel_rms > 0.1


_PEAK_SCRIPT = """
import dataclasses, json, sys
from pathlib import Path
from models import get_config
from models.loaders import load_checkpoint
from export.driver import export
from export.options import ExportOptions
from export.memory import helper_peaks, peak_rss
cfg = dataclasses.replace(get_config("gemma3-1b"), vocab_size=4096, name="gemma3-1b-v4k")
cfg, params = load_checkpoint(sys.argv[1], cfg, lazy=True)
target, verify = sys.argv[3], sys.argv[4] == "gate"
r = export(cfg, params, target, ExportOptions(out_dir=Path(sys.argv[2]), quant="dynamic-int8", max_len=256,
                                              gate="streamed", verify_steps=8, verify=verify))
size = r.path.stat().st_size if r.path.is_file() else sum(f.stat().st_size for f in r.path.iterdir())
print(json.dumps({"artifact": size, "passed": r.gate.passed if verify else None,
                  "steps": len(r.gate.report.steps) if verify else 0, "peak": peak_rss() + helper_peaks()[1]}))
"""


@pytest.fixture(scope="module")
def v4k_checkpoint(tmp_path_factory):
    """gemma3-1b's 26 layers with a 4096-token vocabulary (so that the layers, not the table, hold
    the weights: 0.69B parameters, 2.8 GB in f32), a bf16 checkpoint written tensor by tensor:
    (path, f32 bytes)."""
    import dataclasses

    import ml_dtypes

    from models.loaders.hf import save_checkpoint

    cfg = dataclasses.replace(get_config("gemma3-1b"), vocab_size=4096, name="gemma3-1b-v4k")
    _, lazy = init_model(cfg, 0, lazy=True)
    path = tmp_path_factory.mktemp("v4k") / "ckpt"
    save_checkpoint(cfg, lazy, path, ml_dtypes.bfloat16)
    return path, sum(v.size for v in lazy.values()) * 4


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_streamed_export_peak_memory_follows_the_artifact(tmp_path, v4k_checkpoint, target):
    """The gemma3-1b-sized checkpoint exported to dynamic-int8 in a subprocess: its peak RSS
    (VmHWM) must stay within the artifact plus a fixed allowance, far below the f32 weights the
    in-memory pipeline held (1.25x them on ONNX, 1.5x on TFLite, plus the gate's 1.5x). ONNX runs
    with the streamed gate; TFLite without (its export streams to disk: the bound is tighter)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    ckpt, f32_bytes = v4k_checkpoint
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    gate = "gate" if target == "onnx" else "none"
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(ckpt), str(tmp_path / "out"), target, gate],
                          capture_output=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    # the child's own peak (VmHWM of its address space): load + export (+ gate), plus the TFLite
    # converter process's (export/lowering/tflite/worker.py). Not getrusage: after fork and exec,
    # Linux's ru_maxrss also counts the parent's resident set at the fork
    peak = result["peak"]
    artifact = result["artifact"]
    assert f32_bytes > 2.5e9 and artifact < 0.3 * f32_bytes
    if target == "onnx":
        assert result["steps"] >= 16  # the gate ran (its int8 thresholds are for trained weights, not these)
        # the artifact (written, then run by the gate: ONNX Runtime holds about 1.3x it) + 0.75 GiB
        # of interpreter, JAX and one layer
        bound = 1.3 * artifact + 0.75 * 2**30
    else:
        # the weights go to disk one at a time: the converter's skeleton of the graph and JAX's
        # tracing are what remains, well under the artifact itself
        bound = 0.75 * artifact + 0.75 * 2**30
    assert peak < bound, f"peak RSS {peak / 2**30:.2f} GiB > {bound / 2**30:.2f} GiB (artifact {artifact / 2**30:.2f})"
    assert peak < 0.6 * f32_bytes
