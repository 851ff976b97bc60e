"""runtime_py/pages.py: an artifact's mapped pages are given back after load and read back intact."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from runtime_py.pages import file_mappings, release_mapped

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

SIZE = 8 * 2**20


def _file(path, seed):
    data = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)
    data.tofile(path)
    return data


def _resident(path) -> int:
    return sum(m["rss"] for m in file_mappings(path))


def test_released_pages_leave_the_resident_set_and_read_back_the_same(tmp_path, monkeypatch):
    monkeypatch.delenv("GEMMA_EDGE_KEEP_MAPPED", raising=False)
    shared_file, private_file = tmp_path / "a.bin", tmp_path / "b.bin"
    a, b = _file(shared_file, 0), _file(private_file, 1)
    shared = np.memmap(shared_file, np.uint8, "r")  # MAP_SHARED, read only (LiteRT's mapping)
    with open(private_file, "rb") as f:
        private = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE, writable (ONNX Runtime's)
    view = np.frombuffer(private, np.uint8)
    assert int(shared.sum()) == int(a.sum()) and int(view.sum()) == int(b.sum())  # every page touched
    assert _resident(shared_file) >= SIZE * 0.5 and _resident(private_file) >= SIZE * 0.5
    assert {m["file"] for m in file_mappings(tmp_path)} == {shared_file.resolve(), private_file.resolve()}

    released = release_mapped(tmp_path)  # a folder names every file under it
    assert released >= SIZE
    assert _resident(shared_file) < SIZE * 0.1 and _resident(private_file) < SIZE * 0.1
    assert np.array_equal(shared, a) and np.array_equal(view, b)  # read back from the file
    del view
    private.close()


def test_privately_written_mappings_are_not_named(tmp_path, monkeypatch):
    monkeypatch.delenv("GEMMA_EDGE_KEEP_MAPPED", raising=False)
    path = tmp_path / "w.bin"
    data = _file(path, 2)
    with open(path, "rb") as f:
        private = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    view = np.frombuffer(private, np.uint8)
    assert int(view.sum()) == int(data.sum())
    view[5] = data[5] ^ 0xFF  # a private copy of one page now holds a write
    (m,) = file_mappings(path)
    assert m["anonymous"] > 0
    assert release_mapped(path) == 0  # named nowhere: nothing advised
    assert view[5] == data[5] ^ 0xFF
    del view
    private.close()


def test_keep_mapped_switch(tmp_path, monkeypatch):
    path = tmp_path / "k.bin"
    _file(path, 3)
    mapped = np.memmap(path, np.uint8, "r")
    int(mapped.sum())
    monkeypatch.setenv("GEMMA_EDGE_KEEP_MAPPED", "1")
    assert release_mapped(path) == 0  # named nowhere: nothing advised
    monkeypatch.delenv("GEMMA_EDGE_KEEP_MAPPED")
    assert release_mapped(path) > 0
    assert file_mappings(tmp_path / "none.bin") == []
