"""What a new user meets first (docs/cli.md): arguments refused before any weights load, Ctrl-C,
a failed gate never under the final name, the parity verdict `inspect` shows, the runtime's
tokenizer check, progress output, help, console scripts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from export.cli import main as export_main
from export.inspect import main as inspect_main

BASE = ["--model", "gemma3-tiny", "--random-init", "0", "--max-seq-len", "32", "--prefill-lens", "4",
        "--verify-steps", "4"]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the weights fails the test: the checks must come before it."""
    from export import cli

    def load(self):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(cli.Request, "load", load)


@pytest.mark.parametrize("args,says", [
    (["--max-seq-len", "0"], "--max-seq-len 0 is too small"),
    (["--max-seq-len", "100000"], "beyond gemma3-tiny's trained context of 128 tokens"),
    (["--prefill-lens", "4,999"], "prefill length 999 must be between 2 and the context (32)"),
    (["--tokenizer", "/nonexistent/tokenizer.model"], "--tokenizer /nonexistent/tokenizer.model does not exist"),
    (["--target", "litertlm"], "no tokenizer for the bundle"),
    (["--quant", "int4-b128"], "needs matmul widths divisible by 128"),
    (["--target", "onnx", "--quant", "int8"], "--quant int8 is not supported for --target onnx"),
], ids=["context-0", "context-untrained", "prefill", "tokenizer", "litertlm-tokenizer", "block", "recipe"])
def test_bad_arguments_are_refused_before_the_weights_load(tmp_path, capsys, no_loading, args, says):
    out = tmp_path / "out"
    assert export_main(BASE + ["--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and says in err, err
    assert not out.exists() or list(out.iterdir()) == []


def test_disk_space_is_checked_before_the_weights_load(tmp_path, capsys, no_loading, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    assert export_main(BASE + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GiB free" in err and "--out" in err


def test_an_untrained_context_needs_the_flag(tmp_path):
    from export.cli import build_parser, parse_request

    args = build_parser().parse_args(BASE + ["--max-seq-len", "256", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--untrained-context"):
        parse_request(args).validate()
    args = build_parser().parse_args(BASE + ["--max-seq-len", "256", "--untrained-context", "--out", str(tmp_path)])
    parse_request(args).validate()
    # RecurrentGemma's state does not grow with the context: any length, without the flag
    args = build_parser().parse_args(["--model", "recurrentgemma-tiny", "--random-init", "0", "--max-seq-len", "512",
                                      "--out", str(tmp_path)])
    parse_request(args).validate()


def test_ctrl_c_during_the_gate_leaves_nothing(tmp_path, capsys, monkeypatch):
    import verify.gate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify.gate, "parity", interrupted)
    assert export_main(BASE + ["--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == "interrupted: no artifact was written (partial files removed)"
    assert list(tmp_path.iterdir()) == []  # not the artifact, not its hidden pending name


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    """Three exports of gemma3-tiny: passed, failed (a gate of tolerance 0), not verified."""
    from verify import gates

    out = tmp_path_factory.mktemp("verdicts")
    paths = {}
    assert export_main(BASE + ["--out", str(out / "pass")]) == 0
    paths["PASSED"] = out / "pass" / "gemma3-tiny_f32_ctx32.tflite"
    real = gates.GATES[("tflite", None)]
    gates.GATES[("tflite", None)] = gates.Gate(max_rel_rms=0.0)
    try:
        assert export_main(BASE + ["--out", str(out / "fail")]) == 1
    finally:
        gates.GATES[("tflite", None)] = real
    paths["FAILED"] = out / "fail" / "gemma3-tiny_f32_ctx32.FAILED.tflite"
    assert export_main(BASE + ["--out", str(out / "none"), "--no-verify"]) == 0
    paths["NOT VERIFIED"] = out / "none" / "gemma3-tiny_f32_ctx32.tflite"
    return paths


def test_a_failed_gate_never_leaves_the_final_name(verdicts):
    folder = verdicts["FAILED"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["gemma3-tiny_f32_ctx32.FAILED.parity.json",
                                                         "gemma3-tiny_f32_ctx32.FAILED.parity.png",
                                                         "gemma3-tiny_f32_ctx32.FAILED.tflite"]
    assert sorted(p.name for p in verdicts["PASSED"].parent.iterdir()) == ["gemma3-tiny_f32_ctx32.parity.json",
                                                                          "gemma3-tiny_f32_ctx32.parity.png",
                                                                          "gemma3-tiny_f32_ctx32.tflite"]


@pytest.mark.parametrize("verdict", ["PASSED", "FAILED", "NOT VERIFIED"])
def test_inspect_shows_the_parity_verdict_first(verdicts, capsys, verdict):
    assert inspect_main([str(verdicts[verdict])]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"parity: {verdict}: "), first
    if verdict == "NOT VERIFIED":
        assert "--no-verify" in first
    assert inspect_main([str(verdicts[verdict]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parity"]["verdict"] == verdict


def test_a_report_for_another_file_does_not_count(verdicts, tmp_path, capsys):
    import shutil

    copy = tmp_path / verdicts["PASSED"].name
    shutil.copy(verdicts["PASSED"], copy)
    report = json.loads(verdicts["PASSED"].with_suffix(".parity.json").read_text())
    report["artifact_bytes"] += 1  # the file changed since its gate ran
    copy.with_suffix(".parity.json").write_text(json.dumps(report))
    assert inspect_main([str(copy)]) == 0
    assert capsys.readouterr().out.startswith("parity: NOT VERIFIED: ")


def test_the_runtime_refuses_a_tokenizer_of_another_model(verdicts, model_path, tokenizer_256, capsys):
    from runtime_py.__main__ import main as run_main

    artifact = str(verdicts["PASSED"])
    # 360 pieces for a 256-row model: ids past its table
    assert run_main(["generate", "--artifact", artifact, "--tokenizer", str(model_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "360 pieces" in err and "256 vocabulary rows" in err
    # its own size of tokenizer runs
    assert run_main(["generate", "--artifact", artifact, "--tokenizer", str(tokenizer_256), "--prompt", "hi",
                     "--max-new-tokens", "2", "--raw"]) == 0


def test_progress_is_plain_lines_in_a_log_and_stages_say_they_are_alive(capsys, monkeypatch):
    import time

    from export import driver

    timer = driver.Timer(verbose=True, interactive=False)
    with timer.stage("loop"):
        for i in range(101):
            timer.progress(i, 100, f"step {i}")
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = [x for x in out.splitlines() if "/100" in x]
    assert 10 <= len(lines) <= 12 and lines[-1].strip().startswith("100/100")
    monkeypatch.setattr(driver, "HEARTBEAT_S", 0.3)
    with timer.stage("quiet"):
        time.sleep(2.5)
    assert "[quiet] still running" in capsys.readouterr().out


def test_help_teaches(capsys):
    from models.__main__ import main as models_main
    from runtime_py.__main__ import main as run_main

    for fn, argv, wants in [(export_main, ["--help"], ["examples:", "inspect ARTIFACT", "(default: tflite)",
                                                       "--untrained-context"]),
                            (run_main, ["generate", "--help"], ["(default: 64)", "greedy", "--threads"]),
                            (models_main, ["--help"], ["python -m models check --model", "Bad input exits 2"])]:
        with pytest.raises(SystemExit) as e:
            fn(argv)
        assert e.value.code == 0
        text = capsys.readouterr().out
        for want in wants:
            assert want in text, (argv, want)


def test_console_scripts_are_declared():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"gemma-edge-export", "gemma-edge-run", "gemma-edge-models"}
    import importlib

    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))
    bin_dir = Path(sys.executable).parent
    installed = [n for n in scripts if (bin_dir / n).exists()]
    if installed:  # an install of this checkout (pip install -e .) puts them beside python
        assert os.access(bin_dir / installed[0], os.X_OK)


def test_the_report_picture_and_table(verdicts, capsys):
    """Beside each gated artifact, its report drawn (1200 x 700 PNG); `inspect --report` prints it
    as a table; an unverified artifact has neither."""
    from PIL import Image

    for verdict in ("PASSED", "FAILED"):
        png = verdicts[verdict].with_suffix(".parity.png")
        with Image.open(png) as im:
            assert im.size == (1200, 700) and im.format == "PNG"
        assert inspect_main([str(verdicts[verdict]), "--report"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"parity: {verdict}") and out[1].split()[:3] == ["prompt", "calls", "max"]
        assert out[-2].startswith(f"verdict: {verdict}") and out[-1] == f"picture: {png}"
    assert not verdicts["NOT VERIFIED"].with_suffix(".parity.png").exists()
    assert inspect_main([str(verdicts["NOT VERIFIED"]), "--report"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "not verified (--no-verify)"
