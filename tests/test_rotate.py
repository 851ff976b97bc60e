"""The matmul inputs' Hadamard rotations for TFLite's dynamic-int8 and int4 (export/quantize/rotate.py):
the rotated model computes the f32 model's function on every family, stays lazy on streamed
weights, lowers the error of per-row int8 activations with spikes in down's input, and the CLI
applies it where it belongs, with the rotation stored as f32."""

from __future__ import annotations

import numpy as np
import pytest

from export.quantize import rotate as R
from export.quantize import smooth as S
from export.quantize.sizes import is_quantized_weight
from models import load_checkpoint
from tests.test_smooth import TRAINED, TRAINED_RG, _dynamic_int8, _f32, _gemma2_tiny, _meta


def test_hadamard_and_its_order():
    for n in (16, 64, 128):
        h = R.hadamard(n)
        np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
        np.testing.assert_array_equal(h, h.T)
        assert np.allclose(np.abs(h), n ** -0.5)
    with pytest.raises(ValueError, match="power of two"):
        R.hadamard(96)
    assert [R.block_for(w) for w in (2048, 6912, 10240, 21504, 96, 48, 100)] == [128, 128, 128, 128, 32, 16, None]


@pytest.mark.parametrize("which", ["gemma3", "recurrentgemma", "gemma2"])
def test_rotation_leaves_the_f32_model_unchanged(which):
    from tests.conftest import full_logits

    if which == "gemma2":
        cfg, params = _gemma2_tiny()
    else:
        cfg, params = load_checkpoint(TRAINED if which == "gemma3" else TRAINED_RG)
        params = _f32(params)
    rotated, n = R.rotated(params, cfg)
    groups = R.groups(params, cfg)
    assert n == len(groups) and len(groups) >= 3 * cfg.num_layers + 1
    readers = {r for _, rs in groups for r in rs}
    for suffix in ("mlp.down", "mlp.gate", "attn.o", "embed"):
        assert any(r.endswith(suffix) for r in readers), suffix
    if which == "recurrentgemma":  # the recurrent block's input stays unrotated (export/quantize/rotate.groups)
        assert any(r.endswith("rec.linear_out") for r in readers) and any(r.endswith("attn.q") for r in readers)
        assert not any(r.endswith("rec.linear_x") for r in readers)
    for name, rs in groups:
        assert rotated[name].shape[0] == R.block_for(params[rs[0]].shape[1])
        for r in rs:
            assert not np.allclose(rotated[r], params[r]), r
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 40))
    want = full_logits(params, cfg, ids)
    got = full_logits({k: np.asarray(v) for k, v in rotated.items()}, cfg, ids)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_rotation_keeps_streamed_weights_lazy():
    from models.lazy import LazyTensor

    cfg, params = load_checkpoint(TRAINED)
    params = _f32(params)

    def lazy(name, a):
        return LazyTensor(a.shape, a.dtype, lambda: a.copy(), name, rows=lambda s, e: a[s:e].copy())

    streamed = {k: lazy(k, v) if v.ndim == 2 else v for k, v in params.items()}
    eager, _ = R.rotated(params, cfg)
    late, _ = R.rotated(streamed, cfg)
    name = "layers.0.mlp.down"
    assert isinstance(late[name], LazyTensor) and late[name].reads_rows
    np.testing.assert_allclose(late[name].load(), eager[name], rtol=1e-6)
    np.testing.assert_allclose(late[name].read_rows(3, 9), eager[name][3:9], rtol=1e-6)
    np.testing.assert_array_equal(streamed[name].load(), params[name])  # the source is not written


def test_the_rotation_is_not_quantized_and_smoothing_comes_first():
    """Rotations stay f32; smoothing's groups are the same with or without them (the export
    smooths first, then rotates: export.driver.storage)."""
    cfg, params = load_checkpoint(TRAINED)
    params = _f32(params)
    rotated, _ = R.rotated(params, cfg)
    assert not is_quantized_weight("layers.0." + R.SUFFIX, (128, 128))
    assert not is_quantized_weight("final_norm_rotation", (128, 128))
    assert is_quantized_weight("layers.0.mlp.down", (64, 128))
    assert S.groups(rotated, cfg) == S.groups(params, cfg)
    # smoothed then rotated is still the f32 model (the factors act on x / s, the rotation on that)
    from tests.conftest import full_logits
    from tests.test_smooth import _random_folds

    both = {k: np.asarray(v) for k, v in R.rotated(S.fold(params, _random_folds(params, cfg)), cfg)[0].items()}
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, (1, 24))
    want = full_logits(params, cfg, ids)
    np.testing.assert_allclose(full_logits(both, cfg, ids), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_rotation_lowers_the_error_of_int8_activations_with_spikes():
    """Emulated dynamic int8 (rows of the input asymmetric int8, weights per channel) on the
    trained tiny model given per-token spikes in the down projection's input (as trained Gemmas'
    gelu(gate) * up has them; the fixture's are even): the rotated model's mean KL to f32 is far
    lower. The real Gemma 3 270M: tests/test_real_gemma.py, docs/quantization.md."""
    import jax
    import jax.numpy as jnp

    import models.gemma as G
    from contract.tokenizer import Tokenizer
    from tests.conftest import full_logits
    from tools.train_tiny import generate_stories

    cfg, params = load_checkpoint(TRAINED)
    params = _f32(params)
    tok = Tokenizer(TRAINED)
    held = generate_stories(20, seed=998)
    ids = [tok.encode(" ".join(held[i * 10:(i + 1) * 10]))[:160] for i in range(2)]

    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    # spikes: every token's down input gets one channel 200x larger, a different channel each
    # time (a per-channel factor cannot flatten them); the f32 model with them is the reference
    real_gelu = G.gelu_tanh
    width = params["layers.0.mlp.up"].shape[0]

    def spiky(x):
        y = real_gelu(x)
        t = jnp.arange(y.shape[-2])[:, None]
        j = jnp.arange(width)[None, :]
        return y * jnp.where(j == (t * 5) % width, 200.0, 1.0)

    rotated, _ = R.rotated(params, cfg)
    rotated = {k: np.asarray(v) for k, v in rotated.items()}
    G.gelu_tanh = spiky
    jax.clear_caches()  # no trace without the spikes is reused
    try:
        ref = [logsoftmax(full_logits(params, cfg, [row], max_len=192)[0]) for row in ids]

        def kl(p):
            out = []
            for row, r in zip(ids, ref):
                q = logsoftmax(full_logits(p, cfg, [row], max_len=192)[0])
                out.append((np.exp(r) * (r - q)).sum(-1).mean())
            return float(np.mean(out))

        with _dynamic_int8():
            plain, rot = kl(params), kl(rotated)
    finally:
        G.gelu_tanh = real_gelu
        jax.clear_caches()
    print(f"emulated dynamic int8 KL with spikes in down's input: plain {plain:.5f}, rotated {rot:.5f}")
    assert plain > 1e-4
    assert rot < 0.7 * plain  # measured 0.00456 -> 0.00189


def test_cli_rotates_tflite_dynamic_int8_and_int4(tmp_path):
    """TFLite dynamic-int8 and int4 rotate by default (metadata quant_method, the rotation an f32
    [b, b] constant in the file beside the int8 / int4 weights) and pass the gate; --no-rotation
    does not rotate; ONNX's dynamic-int8 does not."""
    from contract.tflite import open_model
    from export.cli import main

    def run(*extra, target="tflite", quant="dynamic-int8"):
        out = tmp_path / "_".join([target, quant, *[e.strip("-") for e in extra]])
        assert main(["--checkpoint", str(TRAINED), "--target", target, "--quant", quant, "--no-smoothing",
                     "--max-seq-len", "128", "--prefill-lens", "32", "--out", str(out), *extra]) == 0
        (made,) = [p for p in out.iterdir() if p.suffix in (".tflite", "") and not p.name.startswith(".")]
        return made

    def square_f32_constants(path, buffers=None):
        schema, model, _, _ = open_model(path)
        types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        sg = model.Subgraphs(0)
        found = set()
        for i in range(sg.TensorsLength()):
            t = sg.Tensors(i)
            shape = tuple(t.ShapeAsNumpy()) if t.ShapeLength() else ()
            data = model.Buffers(t.Buffer())
            if len(shape) == 2 and shape[0] == shape[1] >= 16 and types[t.Type()] == "FLOAT32" \
                    and (data.DataLength() or data.Size()):
                found.add(shape)
                if buffers is not None:
                    buffers.setdefault(shape, set()).add(t.Buffer())
        return found

    cfg, _ = load_checkpoint(TRAINED)
    b = R.block_for(cfg.mlp_dim)
    rotated = run()
    assert _meta(rotated)["quant_method"] == "rotated"
    assert (b, b) in square_f32_constants(rotated)
    plain = run("--no-rotation")
    assert not _meta(plain).get("quant_method") and (b, b) not in square_f32_constants(plain)
    assert not _meta(run(target="onnx")).get("quant_method")
    int4 = run(quant="int4-b32")
    buffers = {}
    assert _meta(int4)["quant_method"] == "mse+rotated" and (b, b) in square_f32_constants(int4, buffers)
    # every input of one order is rotated by the same matrix, stored once
    # (export/lowering/tflite/streamed.share_constants; the lookup's inverse, its transpose, is
    # the same symmetric matrix)
    assert all(len(v) == 1 for v in buffers.values()), buffers
    assert _meta(run("--no-rotation", quant="int4-b32"))["quant_method"] == "mse"
    # ONNX int4 rotates where its weights gain (rotate.chooser): the trained tiny model's weights,
    # without outliers, gain less than the 5% it asks for on every input (test_onnx_int4_rotates_...)
    assert _meta(run(target="onnx", quant="int4-b32"))["quant_method"] == "mse"
    assert R.wanted("int4-b32", "onnx") and not R.wanted("dynamic-int8", "onnx")
    assert R.wanted("int4-b128", "tflite") and R.wanted("int4-b32-e8", "tflite") and not R.wanted("fp16", "tflite")
    assert not R.wanted("int4-b32", "tflite", enabled=False) and not R.wanted("int8", "tflite")


def _outlier_columns(w: np.ndarray, rng, share: float = 0.03, size: float = 12.0) -> np.ndarray:
    """w with a few input channels (columns) `size` times larger: the outliers a block-32 int4
    grid spends its levels on, which a rotation spreads over 128 channels."""
    cols = rng.choice(w.shape[1], max(1, int(share * w.shape[1])), replace=False)
    w = w.copy()
    w[:, cols] *= size
    return w


def test_onnx_chooses_the_inputs_whose_int4_weights_gain():
    """rotate.lowers_error (ONNX int4): an input whose readers have outlier columns is rotated; one
    whose weights sit on an asymmetric int4 grid already (a GGUF Q4_K's kind: the rotation can only
    lose it) is not; the table is judged with the table's own scheme."""
    from export.quantize import blocks as B

    rng = np.random.default_rng(0)
    choose = R.lowers_error(B.quantizer(4, 32, B.mse_asymmetric))
    gaussian = rng.standard_normal((256, 512)).astype(np.float32)
    h = R.hadamard(128)
    spiky = _outlier_columns(gaussian, rng)
    assert choose({"layers.0.mlp.down": spiky}, h)
    codes = rng.integers(0, 16, (256, 512)).astype(np.float32)
    scale = rng.uniform(0.01, 0.02, (256, 16, 1)).astype(np.float32)
    gridded = ((codes.reshape(256, 16, 32) - rng.integers(4, 12, (256, 16, 1))) * scale).reshape(256, 512)
    assert not choose({"layers.0.mlp.down": gridded}, h)
    # sampled rows: a tall weight is judged on ~2^18 values read in four runs of rows
    tall = rng.standard_normal((8192, 512)).astype(np.float32)
    sample = R.sample_rows(tall)
    assert sample.shape == (512, 512) and np.array_equal(sample[:128], tall[:128])
    assert np.array_equal(sample[-128:], tall[-128:])


def test_onnx_int4_rotates_where_it_pays(tmp_path):
    """A model whose pre-norm readers and down projections have outlier input channels: ONNX
    int4-b32 rotates those inputs (quant_method mse+rotated), as f32 MatMuls (not MatMulNBits) on
    one stored matrix per order, leaves the others, and is closer to the f32 model than without
    the rotation; without the outliers hardly any input is rotated."""
    import onnx

    from export.driver import export as export_to
    from export.options import ExportOptions

    cfg, params = _gemma2_tiny()
    rng = np.random.default_rng(5)
    spiky = dict(params)
    for i in range(cfg.num_layers):
        for r in ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up", "mlp.down"):
            name = f"layers.{i}.{r}"
            spiky[name] = _outlier_columns(params[name], rng)

    def export(p, out, rotation=True):
        return export_to(cfg, p, "onnx", ExportOptions(out_dir=tmp_path / out, max_len=64, prefill_lens=(16,),
                                                       quant="int4-b32", rotation=rotation))

    result = export(spiky, "spiky")
    assert result.metadata.quant_method == "mse+rotated"
    # random weights fail an int4 gate either way (its thresholds are set on trained ones); the
    # rotation lowers the error against the f32 model (measured rel RMS 0.685 -> 0.635, KL 0.476 -> 0.421)
    unrotated = export(spiky, "spiky-unrotated", rotation=False).gate.report
    rotated = result.gate.report
    assert rotated.mean_rel_rms < unrotated.mean_rel_rms and rotated.mean_kl < unrotated.mean_kl, \
        (rotated.mean_rel_rms, unrotated.mean_rel_rms, rotated.mean_kl, unrotated.mean_kl)
    graph = onnx.load(str(result.path / "model.onnx"), load_external_data=False).graph
    inits = {t.name: tuple(t.dims) for t in graph.initializer}
    rotations = {n for n in inits if n.endswith("_rotation")}
    readers = [n for n in graph.node if rotations & set(n.input)]
    orders = sorted(inits[n] for n in rotations)
    assert orders == [(64, 64), (128, 128)], orders  # one matrix per order (the width, down's input)
    assert len(readers) >= 3 * cfg.num_layers, len(readers)  # pre-attn, pre-ffw and down of each layer
    assert {n.op_type for n in readers} <= {"MatMul", "Gemm", "Einsum"}, {n.op_type for n in readers}
    assert not any(n.op_type == "MatMulNBits" and n.input[1].startswith(tuple(rotations)) for n in graph.node)
    # without the outliers: a random tiny weight's error moves by a few percent either way when
    # rotated (sampling noise of ~500 blocks), so at most the odd input passes the 5% bar
    from export.quantize import blocks as B

    choose = R.lowers_error(B.quantizer(4, 32, B.mse_asymmetric))
    assert R.rotated(params, cfg, choose)[1] <= len(R.groups(params, cfg)) // 4
    assert R.rotated(spiky, cfg, choose)[1] >= 3 * cfg.num_layers
