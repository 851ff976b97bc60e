"""A GGUF checkpoint's own quantized blocks carried into the exports (export/quantize/blocks.py,
export/driver.usable_carried / offsets_apart): Q4_0 and Q8_0 files, and a Q4_K_M-like 4-bit mix,
written with tests/test_gguf.py's tiny GGUF writer and exported through the CLI to both targets.
docs/quantization.md#gguf-blocks-carried-over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.loaders.gguf import GGUFFile, config_from_gguf, source_blocks
from test_gguf import _MATMULS, LAYERS, write_tiny_gguf


# ---- a checkpoint's own Q4_0 / Q8_0 blocks, carried exactly into the quantized exports -----------
def _all_matmuls(arch: str, type_name: str) -> dict[str, str]:
    types = {"token_embd.weight": type_name}
    types.update({f"blk.{i}.{m}.weight": type_name for i in range(LAYERS[arch]) for m in _MATMULS})
    return types


@pytest.mark.parametrize("target,quant,kind", [("tflite", "int4-b32", "Q4_0"), ("onnx", "int4-b32", "Q4_0"),
                                               ("onnx", "dynamic-int8", "Q8_0")])
def test_gguf_blocks_carried_exactly(tmp_path, target, quant, kind):
    """A Q4_0 GGUF exported with --quant int4-b32 holds exactly the file's codes and scales on both
    targets (the tied table included: a QAT model's table is trained for its int4 numbers), and a
    Q8_0 one exported to ONNX dynamic-int8 its 8-bit blocks; the gate (against the file's own
    dequantized model) passes. XNNPACK refuses negative scales, which Q4_0 gives about half its
    blocks: TFLite holds them exactly as symmetric INT4 blocks plus per-block offsets
    (BlockQuantized.split_offsets: an f32 matmul of the input's block sums; for the table also
    a lookup of its offsets' row), where negating them would move one code per block (+8 -> +7)."""
    from conftest import quantized_payloads
    from export.cli import main as export_main
    from export.quantize.blocks import from_source_blocks

    info = write_tiny_gguf(tmp_path / f"tiny-{kind}.gguf", "gemma3", _all_matmuls("gemma3", kind))
    out = tmp_path / "out"
    rc = export_main(["--checkpoint", str(info["path"]), "--target", target, "--quant", quant, "--max-seq-len", "64",
                      "--prefill-lens", "16", "--verify-steps", "16", "--out", str(out)])
    assert rc == 0
    made = [p for p in out.iterdir() if p.suffix == ".tflite" or p.name.endswith("_onnx")]
    assert len(made) == 1, made
    cfg = config_from_gguf(GGUFFile(info["path"]))
    blocks = {n: from_source_blocks(b) for n, b in source_blocks(info["path"], cfg).items()}
    assert len(blocks) == 1 + 7 * cfg.num_layers and "embed" in blocks
    codes, scales = quantized_payloads(made[0])
    negative = 0
    for name, b in blocks.items():
        if target == "tflite":  # the same weight exactly: ~code and -scale where a scale is negative,
            negative += int((b.scales < 0).sum())  # and the offsets
            b, _offsets = b.split_offsets()
            assert b.scales.min() > 0
            assert b.tflite_int4().tobytes() in codes and b.scales.tobytes() in scales, name
        else:
            packed, s = b.nbits()
            assert any(packed.tobytes() in c for c in codes), name
            assert any(s.tobytes() in c for c in scales), name
    if target == "tflite":
        from export.lowering.tflite.inspect import read

        assert read(made[0]).metadata.quant_method == "mse"  # carried blocks: the int4 rotation is off
        assert negative > 0  # random Q4_0 blocks: about half have negative scales
        assert len(codes) == len(blocks)  # nothing else is int4, the table is stored once
        parity = json.loads(next(out.glob("*.parity.json")).read_text())
        assert parity["mean_rel_rms"] < 0.05, parity  # dynamic int8 activations only (0.1+ with codes moved)


def _q4_k_m_like(arch: str) -> dict[str, str]:
    """A 4-bit mix laid out like llama.cpp's Q4_K_M of a model whose narrow inputs cannot be
    k-quants (Gemma 3 270M, where they are Q5_0; Q4_0 here, so that every layer is carried
    exactly): q/k/o/gate/up Q4_0, attn_v Q8_0 in even layers (Q4_0 in odd), ffn_down Q4_K in even
    layers and Q6_K in odd ones, the table Q4_0 (the real file's is Q8_0)."""
    types = {"token_embd.weight": "Q4_0"}
    for i in range(LAYERS[arch]):
        types.update({f"blk.{i}.{m}.weight": "Q4_0" for m in _MATMULS})
        types[f"blk.{i}.attn_v.weight"] = "Q8_0" if i % 2 == 0 else "Q4_0"
        types[f"blk.{i}.ffn_down.weight"] = "Q4_K" if i % 2 == 0 else "Q6_K"
    return types


def test_gguf_4bit_mix_into_onnx_int4(tmp_path, capsys):
    """A Q4_K_M-style GGUF exported to ONNX int4-b32: its Q4_K blocks are written exactly (codes,
    float32 scales d * sc, the offsets' matmul), the layers the mix keeps at 6-8 bits (Q6_K, Q8_0)
    are 8-bit MatMulNBits (Q6_K's own blocks of 16 where its input is not rotated), the Q4_0 ones
    theirs: with f32 compute the export computes the file's own model to float rounding (a wrong
    offset, scale or code would not). `--gguf-blocks requantize` makes every layer int4 by the
    recipe alone. TFLite writes the Q4_K layers as symmetric INT4 blocks plus their offsets' f32
    block-sum matmul (the same weight; their re-quantization fails the gate on this file) and the
    kept ones int8 per channel."""
    import onnx

    from export.cli import main as export_main
    from export.quantize.blocks import from_source_blocks
    from models.loaders.gguf import mix_kept

    arch = "gemma3"
    info = write_tiny_gguf(tmp_path / "mix.gguf", arch, _q4_k_m_like(arch))
    cfg = config_from_gguf(GGUFFile(info["path"]))
    kept = mix_kept(info["path"], cfg)
    assert kept == {f"layers.{i}.attn.v" for i in range(0, cfg.num_layers, 2)} | {
        f"layers.{i}.mlp.down" for i in range(1, cfg.num_layers, 2)}
    args = ["--checkpoint", str(info["path"]), "--quant", "int4-b32", "--max-seq-len", "64", "--prefill-lens", "16",
            "--verify-steps", "16"]
    assert export_main(args + ["--target", "onnx", "--onnx-compute", "f32", "--out", str(tmp_path / "onnx")]) == 0
    assert f"{len(kept)} layers the checkpoint's mix keeps at 6-8 bits" in capsys.readouterr().out
    (folder,) = (tmp_path / "onnx").glob("*_onnx")
    model = onnx.load(folder / "model.onnx")
    arrays = {t.name: onnx.numpy_helper.to_array(t, base_dir=str(folder)) for t in model.graph.initializer}
    nbits = [(node.input[1], dict((a.name, a.i) for a in node.attribute)["bits"])
             for node in model.graph.node if node.op_type == "MatMulNBits"]  # (B's name, bits)
    bits = {b.rsplit(".q", 1)[0]: n for b, n in nbits if ".fused" not in b}
    source = source_blocks(info["path"], cfg)
    rotated = {n.removesuffix("_rotation") for n in arrays if n.endswith("_rotation")}
    for i in range(cfg.num_layers):
        down = f"layers.{i}.mlp.down"
        b = from_source_blocks(source[down])
        packed, scales = b.nbits()
        if source[down].kind == "q4_k":  # exactly the file's blocks, always (their input is never rotated)
            assert down not in rotated and bits[down] == 4
            np.testing.assert_array_equal(arrays[f"{down}.q4"], packed)
            np.testing.assert_array_equal(arrays[f"{down}.scales"], scales)
            np.testing.assert_array_equal(arrays[f"{down}.zero_points"], b.nbits_zero_points())
            np.testing.assert_array_equal(arrays[f"{down}.offsets"], -b.offsets.T)
        else:
            assert bits[down] == 8
            if down not in rotated:  # Q6_K's own 8-bit blocks of 16
                np.testing.assert_array_equal(arrays[f"{down}.q8"], packed)
    for i in range(cfg.num_layers):  # q, k (and odd layers' v) fused at 4 bits; even layers' v alone at 8
        qkv = sorted((b[len(f"layers.{i}.attn."):].split(".")[0], n) for b, n in nbits
                     if b.startswith(f"layers.{i}.attn.") and not b.startswith(f"layers.{i}.attn.o."))
        assert qkv == ([("q", 4), ("v", 8)] if i % 2 == 0 else [("q", 4)]), (i, qkv)
    assert not rotated  # every input reads a carried block, or gains too little on random weights
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["passed"] and parity["mean_rel_rms"] < 1e-5 and parity["top1_agreement"] == 1.0, parity

    assert export_main(args + ["--target", "onnx", "--gguf-blocks", "requantize", "--out", str(tmp_path / "req")]) == 0
    (req,) = (tmp_path / "req").glob("*_onnx")
    model = onnx.load(req / "model.onnx", load_external_data=False)
    assert {dict((a.name, a.i) for a in n.attribute)["bits"] for n in model.graph.node
            if n.op_type == "MatMulNBits"} == {4}
    assert not [t.name for t in model.graph.initializer if t.name.endswith(".offsets")]
    # what the file's blocks add, as the disk check estimates it from the header, is what they add
    from export.cli import build_parser, parse_request

    request = parse_request(build_parser().parse_args(args + ["--target", "onnx"]))
    extra = request.source_extra_bytes(cfg)
    size = lambda f: sum(p.stat().st_size for p in f.glob("model.onnx*"))  # noqa: E731
    grown = size(folder) - size(req)
    assert 0.7 * extra < grown < 1.6 * extra, (grown, extra)

    assert export_main(args + ["--target", "tflite", "--out", str(tmp_path / "tfl")]) == 0
    offsets = sum(b.kind in ("q4_0", "q4_k") for b in source.values())
    assert f"{offsets} of them with per-block offsets" in capsys.readouterr().out
    # --gguf-blocks is about a GGUF's blocks under an integer recipe: anything else is one line, exit 2
    fixture = str(Path(__file__).parent / "fixtures" / "gemma3-tiny-trained")
    for bad in (["--checkpoint", fixture, "--quant", "int4-b32"], ["--checkpoint", str(info["path"])]):
        assert export_main(bad + ["--gguf-blocks", "requantize", "--target", "onnx", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--gguf-blocks requantize" in err[0], err
    from conftest import quantized_payloads

    (tfl,) = (tmp_path / "tfl").glob("*.tflite")
    codes, _ = quantized_payloads(tfl)  # INT4 tensors: every matmul and the table once, but the kept (int8)
    assert len(codes) == 1 + 7 * cfg.num_layers - len(kept)
    # TFLite carries the Q4_K downs too: symmetric INT4 blocks (the file's codes - 8, its scales in
    # float16) and the offsets as an f32 matmul of the input's block sums (models.layers.dense), and
    # the Q4_0 weights with their negative scales made positive exactly the same way
    from ai_edge_litert import schema_py_generated as S

    from export.quantize.tflite import _buffer_view, _int4_tensors

    buf = bytearray(tfl.read_bytes())
    int4 = {name: (bytes(c), np.array(sc)) for name, _shape, c, sc, _b in _int4_tensors(buf)}
    model = S.Model.GetRootAs(buf, 0)
    sg = model.Subgraphs(0)
    floats = {sg.Tensors(i).Name().decode(): sg.Tensors(i) for i in range(sg.TensorsLength())}
    for i in range(0, cfg.num_layers, 2):
        down = f"layers.{i}.mlp.down"
        sym, const = from_source_blocks(source[down]).split_offsets()
        assert int4[down][0] == sym.tflite_int4().tobytes()
        np.testing.assert_array_equal(int4[down][1], sym.scales.reshape(-1))
        t = floats[down + "_offsets"]
        assert t.Type() == S.TensorType.FLOAT32
        np.testing.assert_array_equal(_buffer_view(buf, model.Buffers(t.Buffer())).view(np.float32).reshape(const.shape),
                                      const)
    # every weight carried at 4 bits has them (Q4_0's negative scales too, the table included), no other
    assert {n for n in floats if n.endswith("_offsets")} == {
        f"{n}_offsets" for n, b in source.items() if b.kind in ("q4_0", "q4_k")}
    from export.inspect import describe  # and `export inspect` names them

    forms = describe(tfl)["weights"]
    assert forms["FULLY_CONNECTED block offsets"]["FLOAT32"][0] == offsets - 1  # the layers'
    assert forms["EMBEDDING_LOOKUP block offsets"]["FLOAT32"][0] == 1  # the table's (the LM head reads it too)
    # ... which the re-quantized export cannot match: its Q4_K layers' error fails the gate here
    keep = json.loads(next((tmp_path / "tfl").glob("*parity.json")).read_text())
    assert export_main(args + ["--target", "tflite", "--gguf-blocks", "requantize", "--out", str(tmp_path / "tfr")]) == 1
    req = json.loads(next((tmp_path / "tfr").glob("*parity.json")).read_text())
    assert keep["passed"] and keep["mean_rel_rms"] < 0.6 * req["mean_rel_rms"], (keep, req)
    # the disk check's estimate of what the file's blocks add holds on TFLite too (kept layers, offsets)
    extra = parse_request(build_parser().parse_args(args + ["--target", "tflite"])).source_extra_bytes(cfg)
    grown = tfl.stat().st_size - next((tmp_path / "tfr").glob("*.tflite")).stat().st_size
    assert 0.7 * extra < grown < 1.6 * extra, (grown, extra)


def test_the_checks_before_an_export_read_the_gguf_blocks_once(tmp_path, monkeypatch):
    """The memory and disk checks both count what the file's blocks add to the artifact
    (Request.source_extra_bytes: Q4_0's offsets here); the header is read for it once, and both
    checks get the same figure."""
    from export import memory
    from export.cli import Request, build_parser, parse_request

    info = write_tiny_gguf(tmp_path / "tiny-Q4_0.gguf", "gemma3", _all_matmuls("gemma3", "Q4_0"))
    request = parse_request(build_parser().parse_args(["--checkpoint", str(info["path"]), "--target", "tflite",
                                                       "--quant", "int4-b32", "--out", str(tmp_path / "out")]))
    calls, seen = [], []
    real, check = Request.source_extra_bytes, memory.check_fits
    monkeypatch.setattr(Request, "source_extra_bytes", lambda self, cfg: calls.append(1) or real(self, cfg))
    monkeypatch.setattr(memory, "check_fits", lambda *a, **k: seen.append(k["extra_artifact"]) or check(*a, **k))
    request.validate()
    assert len(calls) == 1 and seen[0] > 0
