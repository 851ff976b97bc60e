"""`python -m models`: list, check, generate, and one-line errors with exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import hf_model
from models import generate, load_checkpoint
from models.__main__ import main
from contract.tokenizer import Tokenizer


def test_list_shows_every_model(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("gemma2-27b", "gemma3-1b-it", "recurrentgemma-9b", "gemma3-tiny"):
        assert name in out
    assert "999.9M" in out  # gemma3-1b's parameter count


@pytest.mark.parametrize("model", ["gemma2-tiny", "recurrentgemma-tiny"])
def test_check_passes_on_a_model(capsys, model):
    assert main(["check", "--model", model, "--random-init", "3"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_check_fails_when_the_tolerance_cannot_be_met(capsys):
    assert main(["check", "--model", "gemma3-tiny", "--tolerance", "0"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["check", "--model", "gemma3-1bb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean gemma3-1b" in err
    assert main(["check", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["generate", "--model", "gemma3-tiny", "--prompt", "hi"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_generate_from_an_hf_folder_with_its_tokenizer(tmp_path, model_path):
    folder = tmp_path / "ckpt"
    hf_model("gemma3", vocab_size=360).save_pretrained(folder)  # the test tokenizer has 360 pieces
    shutil.copy(model_path, folder / "tokenizer.model")
    cmd = [sys.executable, "-m", "models", "generate", "--checkpoint", str(folder),
           "--prompt", "hello world", "--max-new-tokens", "8"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    tok = Tokenizer(folder)
    cfg, params = load_checkpoint(folder)
    expected = generate(params, cfg, [tok.encode("hello world")], 8, max_len=64)
    assert run.stdout.endswith(tok.decode(expected.tokens[0]) + "\n")
