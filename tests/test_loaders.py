"""Hugging Face safetensors loading: sharded checkpoints and every bad-input error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy

from models import CheckpointError, ConfigError, UnknownModelError, load_checkpoint
from models.loaders.safetensors_io import SafetensorsFile, save_file


@pytest.fixture
def gemma2_folder(hf_checkpoints, tmp_path):
    """A private copy of the tiny HF Gemma 2 checkpoint that a test may damage."""
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints["gemma2"][0], folder)
    return folder


def _tensors(folder):
    return safetensors.numpy.load_file(folder / "model.safetensors")


def test_sharded_checkpoint_equals_single_file(gemma2_folder, tmp_path):
    _, single = load_checkpoint(gemma2_folder)
    tensors = _tensors(gemma2_folder)
    sharded = tmp_path / "sharded"
    shutil.copytree(gemma2_folder, sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, sharded / shard)
        weight_map.update({n: shard for n in members})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, loaded = load_checkpoint(sharded)
    assert loaded.keys() == single.keys()
    for name in single:
        np.testing.assert_array_equal(loaded[name], single[name])

    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-00002.safetensors'.*missing"):
        load_checkpoint(sharded)


def test_our_writer_is_read_by_the_safetensors_library(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, np.float16)}
    save_file(tensors, tmp_path / "x.safetensors")
    back = safetensors.numpy.load_file(tmp_path / "x.safetensors")
    for name in tensors:
        np.testing.assert_array_equal(back[name], tensors[name])
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_file(gemma2_folder):
    path = gemma2_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated safetensors file: tensor '.*' needs bytes"):
        load_checkpoint(gemma2_folder)
    path.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        load_checkpoint(gemma2_folder)


def test_missing_tensor(gemma2_folder):
    tensors = _tensors(gemma2_folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, gemma2_folder / "model.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' .*shape \[128, 64\]"):
        load_checkpoint(gemma2_folder)


def test_wrong_shape(gemma2_folder):
    tensors = _tensors(gemma2_folder)
    tensors["model.layers.2.self_attn.k_proj.weight"] = np.zeros((48, 64), np.float32)
    save_file(tensors, gemma2_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.layers.2.self_attn.k_proj.weight' has shape "
                                              r"\[48, 64\], expected \[32, 64\]"):
        load_checkpoint(gemma2_folder)


def test_unexpected_tensor(gemma2_folder):
    tensors = _tensors(gemma2_folder)
    tensors["model.layers.9.mlp.up_proj.weight"] = np.zeros((128, 64), np.float32)
    save_file(tensors, gemma2_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.9.mlp.up_proj.weight'"):
        load_checkpoint(gemma2_folder)


def test_tied_lm_head_is_accepted(gemma2_folder):
    tensors = _tensors(gemma2_folder)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, gemma2_folder / "model.safetensors")
    _, params = load_checkpoint(gemma2_folder)
    np.testing.assert_array_equal(params["embed"], tensors["model.embed_tokens.weight"])


def test_checkpoint_that_does_not_match_the_named_model(gemma2_folder):
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.self_attn.q_norm.weight'"):
        load_checkpoint(gemma2_folder, "gemma3-tiny")
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight' has shape \[256, 64\]"):
        load_checkpoint(gemma2_folder, "gemma2-2b")
    with pytest.raises(UnknownModelError, match="unknown model 'gemma2-tinny'"):
        load_checkpoint(gemma2_folder, "gemma2-tinny")


def test_unknown_model_type(gemma2_folder):
    cfg = json.loads((gemma2_folder / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (gemma2_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported model_type 'mistral'.*supported: gemma2"):
        load_checkpoint(gemma2_folder)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither .*safetensors.* nor an Orbax checkpoint"):
        load_checkpoint(tmp_path)


def test_reads_convert_exactly_in_row_slices(tmp_path):
    """read / read_rows (positional reads, no mapping) return owned arrays equal to the stored
    ones, bfloat16 widened to float32 bit for bit as ml_dtypes casts it (NaN, inf, -0, subnormal
    included), any row slice."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((37, 24)) * 10.0 ** rng.uniform(-40, 30, (37, 1))).astype(np.float32)
    w[0, :5] = [np.nan, np.inf, -np.inf, -0.0, 1e-39]
    tensors = {"a.bf16": w.astype(ml_dtypes.bfloat16), "b.f16": w.astype(np.float16), "c.f32": w}
    save_file(tensors, tmp_path / "x.safetensors")
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        for name, stored in tensors.items():
            whole = f.read(name)
            assert whole.dtype == stored.dtype and np.array_equal(whole.view(np.uint8), stored.view(np.uint8))
            want = stored.astype(np.float32)
            got = f.read(name, np.float32)
            assert got.flags.owndata and got.dtype == np.float32
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
            for a, b in ((0, 37), (5, 6), (30, 99), (37, 40)):
                rows = f.read_rows(name, a, b, np.float32)
                assert np.array_equal(rows.view(np.uint32), want[a:b].view(np.uint32))


def test_reads_are_owned_copies(gemma2_folder):
    """Each read returns an owned, writable array (nothing of the file stays mapped)."""
    with SafetensorsFile(gemma2_folder / "model.safetensors") as f:
        name = f.names()[0]
        x = f.read(name, np.float32)
        assert x.flags.owndata and x.flags.writeable and x.dtype == np.float32
