"""The up-front memory check (export/memory.py): an export that cannot fit is refused before any
weights load, in one line with the memory it needs."""

from __future__ import annotations

import time

import pytest

from export import memory
from export.cli import main as export_main
from models import get_config

GiB = memory.GiB


@pytest.fixture
def machine_of(monkeypatch):
    def set_total(gib: float):
        monkeypatch.setattr(memory, "total_memory", lambda: int(gib * GiB))
    return set_total


def test_a_27b_export_is_refused_before_loading(machine_of, tmp_path, capsys):
    machine_of(24)
    t0 = time.perf_counter()
    rc = export_main(["--model", "gemma3-27b", "--random-init", "0", "--target", "tflite", "--quant", "int4-b32",
                      "--out", str(tmp_path)])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert rc == 2 and elapsed < 30  # a random init of 27B parameters alone would take minutes
    assert len(err.splitlines()) == 1, err
    assert "gemma3-27b" in err and "needs about" in err and "this machine has 24 GiB" in err
    needed = float(err.split("needs about ")[1].split(" GiB")[0])
    assert needed > 24  # the gate runs a ~14 GiB artifact; the export itself streams
    assert "--skip-memory-check" in err
    assert list(tmp_path.iterdir()) == []


def test_the_refusal_names_what_would_fit():
    cfg = get_config("gemma3-1b")
    est = memory.estimate(cfg, "tflite", "int4-b32", gate="memory")
    between = (max(est.export_bytes, est.streamed_gate_bytes) + est.gate_bytes) / 2  # only the in-memory gate fails
    assert max(est.export_bytes, est.streamed_gate_bytes) < est.gate_bytes
    with pytest.raises(ValueError, match=r"--gate streamed or --no-verify \(no parity gate\).* would fit"):
        memory.check_fits(cfg, "tflite", "int4-b32", available=int(between), gate="memory")
    assert memory.check_fits(cfg, "tflite", "int4-b32", verify=False, available=int(between)).peak <= between
    # auto picks the streamed gate where the in-memory one would not fit comfortably
    auto = memory.check_fits(cfg, "tflite", "int4-b32", available=int(between))
    assert auto.gate == "streamed" and auto.peak <= between
    assert memory.gate_mode(cfg, "tflite", "int4-b32", available=64 * GiB) == "memory"


def test_streamed_onnx_export_needs_its_artifact_not_its_f32_weights():
    """ONNX quantizes tensor by tensor: a 12B int4 export fits 24 GiB, its f32 weights (44 GiB) do not."""
    est = memory.estimate(get_config("gemma3-12b"), "onnx", "int4-b32", vision=False, available=24 * GiB)
    assert est.f32_bytes > 40 * GiB and est.peak < 24 * GiB and est.gate == "streamed"
    assert est.export_bytes < est.artifact_bytes + 6 * GiB  # the packed artifact and the f32 table being quantized


def test_estimates_follow_the_artifact_and_the_model():
    small, big = get_config("gemma3-1b"), get_config("gemma3-4b")
    for gate in ("memory", "streamed"):
        assert memory.estimate(big, "onnx", "int4-b32", gate=gate).peak > \
            memory.estimate(small, "onnx", "int4-b32", gate=gate).peak
        # the gate holds the runtime of the artifact: float weights cost more than int4
        assert memory.estimate(small, "tflite", None, gate=gate).gate_bytes > \
            memory.estimate(small, "tflite", "int4-b32", gate=gate).gate_bytes
    # the vision tower counts only when exported
    with_v = memory.estimate(big, "onnx", "int4-b32", vision=True)
    without = memory.estimate(big, "onnx", "int4-b32", vision=False)
    assert with_v.params - without.params > 300e6  # SigLIP So400m


def test_skip_memory_check_and_small_models_pass(machine_of, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from export.cli import build_parser, parse_request

    machine_of(0.001)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 0, 2**40))  # its ~15 GB artifact fits
    args = build_parser().parse_args(["--model", "gemma3-27b", "--random-init", "0", "--target", "onnx", "--no-vision",
                                      "--quant", "int4-b32", "--skip-memory-check", "--out", str(tmp_path)])
    parse_request(args).validate()  # no refusal
    machine_of(24)
    args = build_parser().parse_args(["--model", "gemma3-tiny", "--random-init", "0", "--target", "tflite",
                                      "--out", str(tmp_path)])
    parse_request(args).validate()


def test_weight_cache_folder_is_pruned_least_recently_used_first(tmp_path, monkeypatch):
    """runtime_py's XNNPACK weight caches (one per artifact) stay under the cap: the least
    recently used go first, the one being loaded never; GEMMA_EDGE_CACHE_MAX_GB sets the cap."""
    import os

    from runtime_py.tflite_backend import (SECTION_SUFFIX, WEIGHT_CACHE_MIN_BYTES, prune_weight_caches,
                                           weight_cache_path)

    monkeypatch.setenv("GEMMA_EDGE_CACHE", str(tmp_path / "cache"))
    artifact = tmp_path / "model.tflite"
    with open(artifact, "wb") as f:
        f.truncate(WEIGHT_CACHE_MIN_BYTES + 1)  # sparse: big enough to get a cache
    keep = weight_cache_path(artifact)
    others = [keep.parent / f"other{i}-0.xnnpack_cache" for i in range(4)]
    for i, f in enumerate(others):
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))  # other0 is the least recently used
    keep.write_bytes(b"x" * 1000)
    os.utime(keep, (1, 1))  # the oldest of all, but it is the one in use
    monkeypatch.setenv("GEMMA_EDGE_CACHE_MAX_GB", str(3500 / 1e9))
    removed = prune_weight_caches(keep)
    assert removed == others[:2] and keep.exists() and all(f.exists() for f in others[2:])
    assert prune_weight_caches(keep) == []  # under the cap now
    assert keep.stat().st_mtime > others[3].stat().st_mtime  # marked as just used
    # a bundle's section copy shares its cache's key: never removed while that cache is loaded,
    # even where the two alone pass the cap (the session opens the section right after pruning)
    section = keep.with_name(keep.name.split(".")[0] + SECTION_SUFFIX)
    section.write_bytes(b"x" * 5000)
    os.utime(section, (1, 1))
    monkeypatch.setenv("GEMMA_EDGE_CACHE_MAX_GB", str(1000 / 1e9))
    assert prune_weight_caches(keep) == others[2:] and keep.exists() and section.exists()


def test_smoothing_calibration_is_counted():
    """TFLite dynamic-int8's smoothing calibration (a layer's f32 weights, the table) enters the
    export's estimate where it is larger than the writer's."""
    cfg = get_config("gemma3-1b")
    plain = memory.estimate(cfg, "tflite", "dynamic-int8", verify=False, vision=False)
    smooth = memory.estimate(cfg, "tflite", "dynamic-int8", verify=False, vision=False, smooth=True)
    need = memory.smooth_bytes(memory.param_shapes_with_vision(cfg, False))
    assert smooth.export_bytes == max(plain.export_bytes, need) and need > 2 * memory.GiB
    assert smooth.peak >= plain.peak


def test_a_checkpoints_own_blocks_count_in_the_gates_runtime(machine_of, tmp_path, monkeypatch):
    """What a GGUF's own blocks add to the artifact (8-bit kept layers, block offsets) is held by the
    gate's runtime: the estimate grows by the runtime's share of it (the export streams them), and
    the CLI's check passes its header's figure (Request.source_extra_bytes)."""
    from export.cli import Request, build_parser, parse_request

    cfg = get_config("gemma3-1b")
    for gate in ("memory", "streamed"):
        plain = memory.estimate(cfg, "tflite", "int4-b32", vision=False, gate=gate)
        extra = memory.estimate(cfg, "tflite", "int4-b32", vision=False, gate=gate, extra_artifact=GiB)
        assert extra.artifact_bytes == plain.artifact_bytes + GiB
        assert extra.export_bytes == plain.export_bytes
        assert extra.gate_bytes - plain.gate_bytes >= GiB
    machine_of(24)
    args = build_parser().parse_args(["--model", "gemma3-1b", "--random-init", "0", "--target", "tflite",
                                      "--no-vision", "--quant", "int4-b32", "--out", str(tmp_path)])
    request = parse_request(args)
    request.check_memory()  # fits
    monkeypatch.setattr(Request, "source_extra_bytes", lambda self, cfg: 40 * GiB)
    with pytest.raises(ValueError, match="needs about"):
        request.check_memory()
