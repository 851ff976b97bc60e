"""A damaged artifact (empty, not a model, cut short by an interrupted copy) is one clear error
naming the file, from runtime_py.load and the CLI, never a traceback from a parser."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.driver import export
from export.litertlm import write_bundle
from export.options import ExportOptions
from models import get_config, init_params
from runtime_py import load


@pytest.fixture(scope="module")
def good(tokenizer_256, tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged")
    cfg = get_config("gemma3-tiny")
    params = init_params(cfg, 0)
    options = ExportOptions(out_dir=out, max_len=32, prefill_lens=(8,), verify=False)
    tfl = export(cfg, params, "tflite", options).path
    onnx = export(cfg, params, "onnx", options).path
    bundle = write_bundle(tfl, Path(tokenizer_256), cfg, 32, out / "tiny.litertlm")
    return {"tflite": tfl, "onnx": onnx, "litertlm": bundle}


def _cut(src: Path, dst: Path, keep: float | int) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    return dst


def _damaged(good, tmp_path):
    onnx = tmp_path / "onnx"
    shutil.copytree(good["onnx"], onnx)
    _cut(good["onnx"] / "model.onnx", onnx / "model.onnx", 0.5)
    text = tmp_path / "notes.tflite"
    text.write_text("not a model\n")
    return [
        (_cut(good["tflite"], tmp_path / "empty.tflite", 0), "is empty"),
        (text, "is not a TFLite model"),
        (_cut(good["tflite"], tmp_path / "head.tflite", 4096), "is cut short or corrupt"),
        (_cut(good["tflite"], tmp_path / "most.tflite", 0.9), "is cut short or corrupt"),
        (_cut(good["litertlm"], tmp_path / "head.litertlm", 0.5), "is cut short: its TFLiteModel section"),
        (onnx, "is not a complete ONNX model"),
    ]


def test_damaged_artifacts_are_one_clear_error(good, tmp_path):
    for path, message in _damaged(good, tmp_path):
        with pytest.raises(ValueError) as e:
            load(path)
        assert message in str(e.value) and path.name in str(e.value) and "\n" not in str(e.value), (path, e.value)
    for path in good.values():  # the intact ones still load
        assert load(path).max_len == 32


def test_onnx_external_weights_cut_short_or_missing(good, tmp_path):
    import onnx

    folder = tmp_path / "external"
    shutil.copytree(good["onnx"], folder)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert load(folder).max_len == 32
    data = folder / "model.onnx.data"
    whole = data.stat().st_size
    _cut(data, data, 0.5)
    with pytest.raises(ValueError, match=rf"external weights are cut short: .* the file holds {whole // 2}; copy"):
        load(folder)
    data.unlink()
    with pytest.raises(ValueError, match="model.onnx.data is missing beside model.onnx: copy the whole artifact"):
        load(folder)


def test_the_cli_says_it_in_one_line(good, tmp_path, tokenizer_256):
    path = _cut(good["tflite"], tmp_path / "most.tflite", 0.9)
    run = subprocess.run([sys.executable, "-m", "runtime_py", "generate", "--artifact", str(path),
                          "--tokenizer", str(tokenizer_256), "--prompt", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: {path} is cut short or corrupt")
