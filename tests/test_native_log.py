"""LiteRT's native log: quiet by default in runtime_py, back on request, a clear error for a bad
setting (runtime_py/native_log.py)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from export.cli import main as export_main

LOAD = "import sys, runtime_py; runtime_py.load(sys.argv[1]); print('loaded')"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("native_log")
    assert export_main(["--model", "gemma3-tiny", "--random-init", "0", "--out", str(out),
                        "--max-seq-len", "32", "--prefill-lens", "8", "--no-verify"]) == 0
    return next(out.glob("*.tflite"))


def _load(artifact, level: str | None):
    env = {k: v for k, v in os.environ.items() if k != "GEMMA_EDGE_LITERT_LOG"}
    if level is not None:
        env["GEMMA_EDGE_LITERT_LOG"] = level
    return subprocess.run([sys.executable, "-c", LOAD, str(artifact)], capture_output=True, text=True,
                          timeout=300, env=env)


def _litert_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("INFO: ", "WARNING: ["))]


def test_litert_log_is_quiet_by_default_and_back_on_request(artifact):
    quiet = _load(artifact, None)
    assert quiet.returncode == 0 and quiet.stdout == "loaded\n", quiet.stderr
    assert _litert_lines(quiet.stderr) == [], quiet.stderr
    loud = _load(artifact, "info")  # LiteRT's own default
    assert loud.returncode == 0, loud.stderr
    assert any("Creating LiteRT environment" in line for line in _litert_lines(loud.stderr)), loud.stderr


def test_a_bad_log_level_is_one_clear_line(artifact, tokenizer_256):
    env = dict(os.environ, GEMMA_EDGE_LITERT_LOG="loud")
    run = subprocess.run([sys.executable, "-m", "runtime_py", "generate", "--artifact", str(artifact),
                          "--tokenizer", str(tokenizer_256), "--prompt", "hello", "--max-new-tokens", "2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "error: GEMMA_EDGE_LITERT_LOG='loud' is not a LiteRT log level: use one of verbose, info, warning, error, silent")


def test_thresholds_are_found_in_the_loaded_library():
    """Both loggers' thresholds are where native_log looks (a future ai-edge-litert that moves
    them turns this red rather than the logs silently loud again)."""
    from runtime_py import native_log

    importlib.import_module("ai_edge_litert.compiled_model")  # loads the library

    libraries = native_log._mapped_libraries()
    found = {}
    for path in libraries:
        found.update(native_log.symbols(path)[0])
    assert set(found) == set(native_log.THRESHOLDS)
    assert sorted(size for _, size in found.values()) == [1, 4]


def test_the_converter_load_log_follows_the_setting(tmp_path):
    """The converter's library logs at INFO through absl while it loads (in the exporter's
    conversion worker): dropped by default, kept with `info`."""
    def export(level: str | None, out):
        env = {k: v for k, v in os.environ.items() if k != "GEMMA_EDGE_LITERT_LOG"}
        if level is not None:
            env["GEMMA_EDGE_LITERT_LOG"] = level
        run = subprocess.run([sys.executable, "-m", "export", "--model", "gemma3-tiny", "--random-init", "0",
                              "--out", str(out), "--max-seq-len", "32", "--prefill-lens", "8", "--no-verify"],
                             capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, run.stderr
        return [line for line in run.stderr.splitlines() if native_log.ABSL_QUIET.match(line)]

    from runtime_py import native_log

    assert export(None, tmp_path / "quiet") == []
    assert any("InitializeLog" in line for line in export("info", tmp_path / "loud"))
