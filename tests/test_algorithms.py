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


def _plain_search(w, bits, block, grid, asymmetric=False, positive=False, signed=True, refine=0):
    """The search written the obvious way, [rows, blocks, block] with numpy's own sums: the
    oracle for the column layout mse_search runs in."""
    from export.quantize.algorithms import _asym_scale_zero, _qrange

    qmin, qmax = _qrange(bits, asymmetric)
    b = w.reshape(w.shape[0], -1, block)
    grid = np.asarray(grid, np.float32)

    def f16(x):
        s = x.astype(np.float16).astype(np.float32)
        tiny = np.float32(np.finfo(np.float16).tiny)
        return np.clip(np.where(np.abs(s) < tiny, np.where(s < 0, -tiny, tiny), s), -65504, 65504)

    amax = np.abs(b).max(-1)
    ext = -amax if positive else np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]

    def candidate(family, f):  # (scale, zero point) of every block for factor f and family (scalars or per block)
        if asymmetric:
            return _asym_scale_zero(f * b.min(-1), f * b.max(-1), qmax)
        return f16(np.where(np.equal(family, 0), f * amax / qmax, f * ext / qmin)), 0 * amax

    families = [0] if asymmetric or not signed else [0, 1]
    best = {"err": np.full(b.shape[:2], np.inf, np.float32), "s": 0, "z": 0, "f": 0, "family": 0}

    def score(family, f):
        s, z = candidate(family, f)
        q = np.clip(np.rint(b / s[..., None]) + z[..., None], qmin, qmax) - z[..., None]
        err = np.square(q * s[..., None] - b).sum(-1)
        better = err < best["err"]
        for key, value in (("err", err), ("s", s), ("z", z), ("f", f), ("family", family)):
            best[key] = np.where(better, value, best[key])

    for family in families:
        for f in grid:
            score(family, f)
    step = float(np.min(np.diff(np.sort(grid))))
    for _ in range(refine):
        step /= 2
        f0, fam0 = best["f"].astype(np.float32), best["family"]
        for sign in (-1.0, 1.0):
            score(fam0, f0 + np.float32(sign * step))  # each block in its own family
    return best["s"].astype(np.float16), best["z"]


@pytest.mark.parametrize("bits,block,asymmetric,positive", [(4, 32, False, True), (4, 32, False, False),
                                                            (4, 32, True, False), (4, 128, False, True),
                                                            (4, 128, True, False), (8, 64, True, False)])
@pytest.mark.parametrize("refine", [0, 3])
def test_search_equals_the_plain_formula(bits, block, asymmetric, positive, refine):
    """mse_search (blocks as columns, numpy's summation order reproduced) picks the same scales
    and zero points as the search written over rows, block for block; zero blocks included; with
    the refinement around each block's best factor too."""
    rng = np.random.default_rng(bits + block)
    w = (rng.standard_t(3, size=(96, 512)) * rng.uniform(0.001, 2.0, (96, 1))).astype(np.float32)
    w[5, :block] = 0.0
    w[7, 3] = 50.0
    grid = np.linspace(0.7, 1.0, 16 if refine == 0 else 6)
    got = mse_search(w, bits, block, grid=grid, asymmetric=asymmetric, positive=positive, signed=not asymmetric,
                     refine=refine)
    want_s, want_z = _plain_search(w, bits, block, grid, asymmetric, positive, refine=refine)
    assert np.array_equal(got[1], want_s)
    if asymmetric:
        assert np.array_equal(got[2], want_z.astype(np.uint8))


@pytest.mark.parametrize("search", ["SYMMETRIC_SEARCH", "ASYMMETRIC_SEARCH"])
def test_refined_search_never_loses_to_its_grid_and_beats_the_old_grid(search):
    """The shipped searches (a coarse grid, refined three times around each block's best):
    block for block never a larger error than their own grid alone (the refinement only adds
    candidates), and in total a lower one than the 16-factor grids they replaced, on
    heavy-tailed weights."""
    from export.quantize import blocks

    kw = dict(getattr(blocks, search))
    rng = np.random.default_rng(3)
    w = (rng.standard_t(4, size=(256, 1024)) * rng.uniform(0.01, 1.0, (256, 1))).astype(np.float32)

    def block_err(out):
        return np.square(dequantize(*out) - w).reshape(256, -1, 32).sum(-1)

    refined = block_err(mse_search(w, 4, 32, **kw))
    assert np.all(refined <= block_err(mse_search(w, 4, 32, **{**kw, "refine": 0})) * (1 + 1e-6))
    old = {"grid": np.linspace(0.7, 1.0, 16), "asymmetric": kw.get("asymmetric", False),
           "positive": kw.get("positive", False)}
    assert refined.sum() < block_err(mse_search(w, 4, 32, **old)).sum()


@pytest.mark.parametrize("n", [1, 5, 8, 16, 32, 40, 64, 128, 136, 256])
def test_column_sums_add_in_numpys_order(n):
    """_column_sums over the block axis gives numpy's row sums bit for bit (pairwise summation:
    8 running sums under 128 values, halves past it), so the search's errors do not depend on
    the layout."""
    from export.quantize.algorithms import _column_sums

    rng = np.random.default_rng(n)
    q = (rng.standard_normal((300, n)) ** 2 * 10.0 ** rng.uniform(-6, 6, (300, 1))).astype(np.float32)
    assert np.array_equal(_column_sums(np.ascontiguousarray(q.T)), q.sum(-1))


def test_f16_rounding_equals_the_cast():
    """_f16 (float16's rounding done in float32 bits) equals float16 cast and back, then never
    zero nor infinite, across float32's range, signs, float16 subnormals and the overflow edge."""
    from export.quantize.algorithms import _f16

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(400_000) * 10.0 ** rng.uniform(-30, 10, 400_000)).astype(np.float32)
    edges = np.array([0.0, -0.0, 65504, 65519.9, 65520, 65536, 1e30, -1e30, 2**-14, -(2**-14),
                      2**-14 * (1 - 2**-12), 2**-24, 2**-25, -(2**-26), 1e-40, 0.1, 1 / 3], np.float32)
    x = np.concatenate([x, edges, -edges])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    tiny = np.float32(np.finfo(np.float16).tiny)
    want = np.clip(np.where(np.abs(want) < tiny, np.where(want < 0, -tiny, tiny), want), -65504, 65504)
    assert np.array_equal(_f16(x).view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 128), (8, 32)])
def test_packing_equals_the_plain_layouts(bits, block):
    """MatMulNBits' and TFLite's INT4 bytes (packed as uint16 pairs, in row chunks) equal the
    layouts written out element by element."""
    from export.quantize.blocks import BlockQuantized

    rng = np.random.default_rng(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = rng.integers(lo, hi, (40, 256)).astype(np.int8)
    b = BlockQuantized(codes, rng.uniform(0.01, 1, (40, 256 // block)).astype(np.float16), bits, "test")
    packed, scales = b.nbits()
    u = (codes.astype(np.int16) - lo).astype(np.uint8).reshape(40, -1, block)
    want = u if bits == 8 else u[..., 0::2] | (u[..., 1::2] << 4)
    assert packed.dtype == np.uint8 and np.array_equal(packed, want) and scales.dtype == np.float32
    if bits == 4:
        flat = codes.reshape(-1).view(np.uint8) & 0x0F
        assert np.array_equal(b.tflite_int4(), flat[0::2] | (flat[1::2] << 4))
