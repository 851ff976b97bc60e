"""export/quantize/blas.py: the quantizer's matrix products on one BLAS thread, whichever thread
asks (threadpoolctl 3.8 ignores limits set by any thread but the first that set one)."""

import threading

import numpy as np

from export.quantize.blas import single_thread
from export.quantize.rotate import _rotate_rows, hadamard


def _blas_threads() -> list[int]:
    from threadpoolctl import ThreadpoolController

    return [lib.get_num_threads() for lib in ThreadpoolController().select(user_api="blas").lib_controllers]


def _in_thread(fn):
    out = {}

    def run():
        out["value"] = fn()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out["value"]


def test_single_thread_limits_blas_in_a_thread_after_another_set_it():
    before = _blas_threads()
    with single_thread():  # the main thread sets (and restores) the limit first
        assert all(n == 1 for n in _blas_threads())
    assert _blas_threads() == before

    def inside():
        with single_thread():
            return _blas_threads()

    assert all(n == 1 for n in _in_thread(inside)), "the limit was ignored in a thread other than the first to set it"
    assert _blas_threads() == before


def test_rotations_are_the_same_numbers_in_every_thread():
    """The export's look-ahead threads rotate weights too: their bytes must be the main thread's
    (on OpenBLAS's two threads some of these products round differently)."""
    h = hadamard(128)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((n, 1152), dtype=np.float32) for n in (2304, 1536, 3000, 777)]
    in_main = [_rotate_rows(a, h) for a in arrays]
    in_thread = _in_thread(lambda: [_rotate_rows(a, h) for a in arrays])
    for a, b in zip(in_main, in_thread):
        np.testing.assert_array_equal(a, b)
