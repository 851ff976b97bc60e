"""Export choices for CPU decode speed (docs/decode.md): --inline-composites traces RMS norm and
attention as plain ops; the artifact computes the same logits and passes the same gate."""

from __future__ import annotations

import json

import numpy as np

from conftest import TINY
from export.cli import main as export_main
from export.lowering.tflite.inspect import read
from runtime_py import load

MAX_LEN = 128


def _export(out, *extra):
    model = TINY["gemma3"]
    assert export_main(["--model", model, "--random-init", "0", "--out", str(out), "--max-seq-len", str(MAX_LEN),
                        "--prefill-lens", "16", "--verify-steps", "24", *extra]) == 0
    return out / f"{model}_f32_ctx{MAX_LEN}.tflite"


def test_inline_composites_same_logits_no_composite_calls(tmp_path):
    plain, inline = _export(tmp_path / "composites"), _export(tmp_path / "inline", "--inline-composites")
    assert json.loads(inline.with_suffix(".parity.json").read_text())["passed"]
    kept, gone = read(plain).composites, read(inline).composites
    assert kept["odml.rms_norm"] > 0 and kept["odml.scaled_dot_product_attention"] > 0
    assert "odml.rms_norm" not in gone and "odml.scaled_dot_product_attention" not in gone
    a, b = load(plain), load(inline)
    prompt = [2] + list(range(10, 50))  # past the window (8): the rings wrap
    la, lb = a.prefill(prompt), b.prefill(prompt)
    for token in (5, 6, 7):
        la, lb = a.decode(token), b.decode(token)
        assert np.abs(la - lb).max() <= 1e-5 * np.abs(la).max()


def test_inline_composites_is_tflite_only(tmp_path, capsys):
    rc = export_main(["--model", TINY["gemma3"], "--random-init", "0", "--target", "onnx", "--out", str(tmp_path),
                      "--inline-composites"])
    assert rc == 2 and "--inline-composites is TFLite's" in capsys.readouterr().err
