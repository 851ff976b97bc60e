"""Fast checks of export/quantize/algorithms.py (numpy only, < 10 s)."""

import numpy as np
import pytest

from export.quantize.algorithms import dequantize, gptq, mse_search, rtn


def _w(n=64, k=256, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, size=(n, k)) * 0.02).astype(np.float32)


def _x(t=2048, k=256, seed=1):
    rng = np.random.default_rng(seed)
    # correlated inputs with a few strong channels, like a transformer's activations
    mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.normal(size=(t, k)) @ mix
    x[:, rng.choice(k, 8, replace=False)] *= 10
    return x.astype(np.float32)


def test_shapes_dtypes_and_ranges():
    w = _w()
    for out in (rtn(w), rtn(w, mode="signed"), mse_search(w)):
        codes, scales = out
        assert codes.dtype == np.int8 and codes.shape == w.shape
        assert scales.dtype == np.float16 and scales.shape == (64, 8)
        assert codes.min() >= -8 and codes.max() <= 7
    codes, scales, zp = mse_search(w, asymmetric=True)
    assert codes.min() >= 0 and codes.max() <= 15 and zp.dtype == np.uint8 and zp.max() <= 15
    assert dequantize(codes, scales, zp).shape == w.shape


def test_rtn_absmax_keeps_extremes():
    w = _w()
    codes, scales = rtn(w)
    assert np.abs(codes).max() == 7
    assert np.abs(dequantize(codes, scales) - w).max() <= np.abs(scales).max() * 0.51 + 1e-6


@pytest.mark.parametrize("asym", [False, True])
def test_mse_never_worse_than_rtn(asym):
    w = _w()
    e_rtn = np.square(dequantize(*rtn(w, asymmetric=asym)) - w).reshape(64, 8, 32).sum(-1)
    e_mse = np.square(dequantize(*mse_search(w, asymmetric=asym)) - w).reshape(64, 8, 32).sum(-1)
    assert np.all(e_mse <= e_rtn + 1e-9)
    assert e_mse.sum() < 0.97 * e_rtn.sum()


@pytest.mark.parametrize("asym", [False, True])
def test_gptq_lowers_output_error(asym):
    w, x = _w(), _x()
    h = x.T.astype(np.float64) @ x
    y = x @ w.T
    e_mse = np.square(x @ dequantize(*mse_search(w, asymmetric=asym)).T - y).mean()
    e_gptq = np.square(x @ dequantize(*gptq(w, h, asymmetric=asym)).T - y).mean()
    assert e_gptq < 0.8 * e_mse


def test_chunking_does_not_change_results():
    w = _w(n=50)
    a = mse_search(w, chunk=7)
    b = mse_search(w)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    h = _x(k=256).T @ _x(k=256)
    g1, g2 = gptq(w, h, chunk=13), gptq(w, h)
    assert np.array_equal(g1[0], g2[0])


def test_positive_scales_exact_but_the_plus_eight_code():
    """GGUF Q4_0 blocks with a negative scale, negated for XNNPACK: the same values except each
    code -8 of such a block (+8 steps), which becomes +7."""
    from export.quantize.blocks import BlockQuantized

    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, (6, 128)).astype(np.int8)
    sign = rng.choice([-1.0, 1.0], (6, 4))
    scales = (sign * rng.uniform(0.01, 0.1, (6, 4))).astype(np.float16)
    b = BlockQuantized(codes, scales, 4, "test")
    p, moved = b.positive()
    assert (p.scales.astype(np.float32) > 0).all()
    expect = (codes.reshape(6, 4, 32) == -8) & (sign[..., None] < 0)
    assert moved == int(expect.sum()) > 0
    diff = (b.dequantize() - p.dequantize()).reshape(6, 4, 32)
    assert np.array_equal(diff != 0, expect)
    np.testing.assert_allclose(diff[expect], np.broadcast_to(scales.astype(np.float32)[..., None], diff.shape)[expect]
                               * -1.0)
    same, none = BlockQuantized(codes, np.abs(scales), 4, "t").positive()
    assert none == 0
