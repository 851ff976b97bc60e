"""How the codes of a block-quantized weight are chosen (numpy only: no torch, no JAX).

Every function takes a float weight ``w`` float32 ``[N out, K in]`` and returns

  symmetric   (codes int8 [N, K], scales float16 [N, K / block])
              value = code * scale, codes in [-2**(bits-1), 2**(bits-1) - 1] ([-8, 7] for 4 bits)
  asymmetric  (codes int8 [N, K], scales float16 [N, K / block], zero_points uint8 [N, K / block])
              value = (code - zero_point) * scale, codes and zero points in [0, 2**bits - 1]
              ([0, 15] for 4 bits; ONNX MatMulNBits' uint4 codes and zero points)

The symmetric form is what both targets' int4 kernels read (export/quantize/blocks.py:
``BlockQuantized``); the asymmetric form only fits ONNX (MatMulNBits with zero points). Scales
are rounded to float16 *inside* every search, so the error that is minimised is the error of the
numbers that are written.

Functions:
  rtn          round to nearest; scale = absmax / qmax ("absmax") or the signed value of largest
               magnitude / qmin ("signed", ggml Q4_0 and onnxruntime's block quantizer); with
               ``asymmetric=True`` min/max with a zero point
  mse_search   per block, the scale (and zero point) among shrunk candidates with the smallest
               squared error of the block
  gptq         GPTQ (Frantar et al. 2022) with block-wise scales chosen from the error-updated
               weights when each block starts; needs the Hessian X^T X of the layer's input
  dequantize   back to float32

Memory: each call works on ``chunk`` rows at a time, so its temporaries are bounded by a few
times the matrix (the search's candidates are looped over, not broadcast).
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import numpy as np

DEFAULT_GRID = np.linspace(0.70, 1.0, 32)


def _qrange(bits: int, asymmetric: bool) -> tuple[int, int]:
    if asymmetric:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 and back (the stored scale), never to zero or infinity."""
    x = np.asarray(x, np.float32)
    tiny = np.float32(np.finfo(np.float16).tiny)
    # float16's 10 mantissa bits, round half to even, in float32 bits (numpy's float16 cast is
    # element by element and cost a pass over the whole weight per candidate scale); equal to
    # the cast wherever float16 is normal, and above it the clip below gives 65504 either way
    bits = x.view(np.uint32)
    r = bits + np.uint32(0x0FFF)
    r += (bits >> np.uint32(13)) & np.uint32(1)
    r &= np.uint32(0xFFFFE000)
    s = r.view(np.float32)
    small = np.abs(x) < tiny  # float16 subnormals, zero: the cast's rounding, then tiny
    if small.any():
        s[small] = x[small].astype(np.float16).astype(np.float32)
    s = np.where(np.abs(s) < tiny, np.where(s < 0, -tiny, tiny), s)
    return np.clip(s, -65504.0, 65504.0).astype(np.float32)


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    n, k = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of block={block}")
    return np.asarray(w, np.float32).reshape(n, k // block, block)


def _chunks(n: int, chunk: int):
    for r0 in range(0, n, chunk):
        yield slice(r0, min(n, r0 + chunk))


_POOL = None
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _pool():
    """One thread per core for the whole process: a pool per call (hundreds per export) cost
    thread start-ups and, worse, fresh pages for every task's buffers."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="quantize")
        return _POOL


def _scratch(key: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    """A per-thread buffer of `shape`, reused by the next task of this thread (its contents
    are not kept). malloc returns freed blocks of a few MiB to the kernel, so a fresh
    buffer per task meant zeroing fresh pages over and over (8% of an export's time)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = getattr(_LOCAL, key, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, np.uint8)
        setattr(_LOCAL, key, buf)
    return buf[:size].view(dtype).reshape(shape)


def _parallel(fn, items: list):
    """fn over items on every core (numpy releases the GIL in its array loops); each call writes
    its own rows, so the result does not depend on the order."""
    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1 or getattr(_LOCAL, "in_pool", False):  # one item, or called from a task: inline
        for it in items:
            fn(it)
        return
    list(_pool().map(_in_pool(fn), items))


def _in_pool(fn):
    def task(item):
        _LOCAL.in_pool = True
        return fn(item)

    return task


def _quant_sym(b: np.ndarray, s: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """codes (float) of blocks b [..., block] for scales s [...]."""
    return np.clip(np.rint(b / s[..., None]), qmin, qmax)


def _quant_asym(b, s, z, qmax):
    return np.clip(np.rint(b / s[..., None]) + z[..., None], 0, qmax)


def _asym_scale_zero(lo: np.ndarray, hi: np.ndarray, qmax: int):
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    s = _f16((hi - lo) / qmax)
    z = np.clip(np.rint(-lo / s), 0, qmax)
    return s, z


def rtn(w: np.ndarray, bits: int = 4, block: int = 32, mode: str = "absmax",
        asymmetric: bool = False, chunk: int = 4096):
    """Round to nearest with one float16 scale per ``block`` inputs of each row.

    mode "absmax": scale = max|w| / qmax (7 for 4 bits), the block's extreme maps to +-7.
    mode "signed": scale = w[argmax|w|] / qmin (-8), the extreme maps exactly to -8 (ggml Q4_0,
                   onnxruntime's MatMul4BitsQuantizer); the scale is negative when the extreme
                   is positive, which is fine for value = code * scale.
    asymmetric: scale = (max - min) / 15, zero point = round(-min / scale) (range includes 0).
    """
    wb = _blocks(w, block)
    n, nb, _ = wb.shape
    qmin, qmax = _qrange(bits, asymmetric)
    codes = np.empty(wb.shape, np.int8)
    scales = np.empty((n, nb), np.float16)
    zps = np.empty((n, nb), np.uint8) if asymmetric else None
    for rs in _chunks(n, chunk):
        b = wb[rs]
        if asymmetric:
            s, z = _asym_scale_zero(b.min(-1), b.max(-1), qmax)
            codes[rs] = _quant_asym(b, s, z, qmax)
            zps[rs] = z
        else:
            if mode == "absmax":
                s = np.abs(b).max(-1) / qmax
            elif mode == "signed":
                idx = np.abs(b).argmax(-1)
                s = np.take_along_axis(b, idx[..., None], -1)[..., 0] / qmin
            else:
                raise ValueError(mode)
            s = _f16(s)
            codes[rs] = _quant_sym(b, s, qmin, qmax)
        scales[rs] = s
    codes = codes.reshape(n, -1)
    return (codes, scales, zps) if asymmetric else (codes, scales)


def _column_sums(q: np.ndarray, lo: int = 0, n: int | None = None) -> np.ndarray:
    """q[lo:lo+n].sum(0), adding in the order numpy's pairwise summation adds a contiguous row of
    n values (8 running sums, combined pairwise; halves past 128), so a block's error is the same
    float32 number as ``block.sum(-1)`` in the [rows, block] layout: the search picks the same
    scales in either layout (tests/test_algorithms.py)."""
    n = q.shape[0] - lo if n is None else n
    if n < 8:
        res = q[lo].copy()
        for i in range(1, n):
            res += q[lo + i]
        return res
    if n <= 128:
        r = q[lo:lo + 8].copy()
        tail = n - n % 8
        for i in range(8, tail, 8):
            r += q[lo + i:lo + i + 8]
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for i in range(tail, n):
            res += q[lo + i]
        return res
    half = n // 2
    half -= half % 8
    return _column_sums(q, lo, half) + _column_sums(q, lo + half, n - half)


def mse_search(w: np.ndarray, bits: int = 4, block: int = 32, grid=DEFAULT_GRID,
               asymmetric: bool = False, signed: bool = True, chunk: int | None = None,
               positive: bool = False, refine: int = 0):
    """Per block, the candidate scale with the least squared error sum((w - q(w))^2).

    Symmetric candidates: f * absmax / qmax for f in ``grid`` (default 32 steps 0.70..1.0),
    plus (``signed=True``) f * w[argmax|w|] / qmin, which uses the extra negative code. Each
    candidate is rounded to float16 before it is scored. Asymmetric: the block's [min, max]
    shrunk by f with zero point round(-min/scale). The plain RTN scale (f = 1) is always a
    candidate, so the error is never above ``rtn``'s. ``positive=True`` keeps every scale
    positive (XNNPACK's blockwise kernels): the signed candidates become f * |w[argmax|w|]| / -qmin,
    which only reach the extra code where the block's extreme is negative (the same scales as
    the absmax family's, over another range). ``refine=n``: then n times, each block's best factor
    f tried at f -+ d (of its own candidate family) with d half the grid's step, halved each time:
    a coarse grid refined this way finds lower errors than a fine one in fewer evaluations
    (export/quantize/blocks.py's settings).
    """
    wb = _blocks(w, block)
    n, nb, _ = wb.shape
    qmin, qmax = _qrange(bits, asymmetric)
    grid = np.asarray(grid, np.float32)
    if not np.any(np.isclose(grid, 1.0)):
        grid = np.append(grid, np.float32(1.0))
    codes = np.empty(wb.shape, np.int8)
    scales = np.empty((n, nb), np.float16)
    zps = np.empty((n, nb), np.uint8) if asymmetric else None

    def search(rs):
        b = wb[rs]
        # The blocks as columns, [block, m]: every step below runs over long contiguous rows
        # (a block's 32 values along the last axis make numpy's loops 3-10x slower)
        m = b.shape[0] * b.shape[1]
        bt = _scratch("blocks", (block, m))
        bt[...] = b.reshape(m, block).T
        best_err = np.full(m, np.inf, np.float32)
        best_s = np.zeros(m, np.float32)
        best_z = np.zeros(m, np.float32)
        # for `refine`: each block's winning factor, and its family where there are two
        best_f = np.zeros(m, np.float32) if refine else None
        if asymmetric:
            bases = [(bt.min(0), bt.max(0))]
        else:
            amax = np.maximum(bt.max(0), -bt.min(0))
            bases = [(amax, qmax)]
            if signed:
                if positive:  # -|the extreme| is -amax: no need to find where it is
                    ext = -amax
                else:
                    idx = np.abs(bt).argmax(0)
                    ext = np.take_along_axis(bt, idx[None], 0)[0]
                bases.append((ext, qmin))
        best_k = np.zeros(m, np.int8) if refine and len(bases) > 1 else None
        q = _scratch("work", bt.shape)  # one buffer, every step in place: the same numbers as the plain expressions

        def score(base, f, k=0):
            if asymmetric:  # clip(rint(b / s) + z, 0, qmax) - z, as one clip to [-z, qmax - z]
                s, z = _asym_scale_zero(f * base[0], f * base[1], qmax)
                np.divide(bt, s, out=q)
                np.rint(q, out=q)
                np.maximum(q, -z, out=q)
                np.minimum(q, qmax - z, out=q)
            else:
                s = _f16(f * base[0] / base[1])
                z = best_z
                np.divide(bt, s, out=q)
                np.rint(q, out=q)
                np.clip(q, qmin, qmax, out=q)
            np.multiply(q, s, out=q)
            np.subtract(q, bt, out=q)
            np.square(q, out=q)
            err = _column_sums(q)
            better = err < best_err
            np.putmask(best_err, better, err)
            np.putmask(best_s, better, s)
            if asymmetric:
                np.putmask(best_z, better, z)
            if best_f is not None:
                np.putmask(best_f, better, f)
            if best_k is not None:
                np.putmask(best_k, better, k)

        for k, base in enumerate(bases):
            for f in grid:
                score(base, f, k)
        # refine: each block's best factor (in its own family), tried a half, a quarter, ... of
        # the grid's step either side
        if refine:
            if best_k is None:
                base = bases[0]
            else:  # per block, its family's base
                base = tuple(np.choose(best_k, [b[i] for b in bases]).astype(np.float32) for i in range(2))
            step = float(np.min(np.diff(np.sort(grid)))) if len(grid) > 1 else 0.0
            for _ in range(refine):
                step /= 2
                f0 = best_f.copy()
                for sign in (-1.0, 1.0):
                    score(base, f0 + np.float32(sign * step), best_k if best_k is not None else 0)
        # the codes of the chosen scales, in the columns' layout, back to rows as int8
        np.divide(bt, best_s, out=q)
        np.rint(q, out=q)
        if asymmetric:
            q += best_z
            np.clip(q, 0, qmax, out=q)
            zps[rs] = best_z.reshape(b.shape[:2])
        else:
            np.clip(q, qmin, qmax, out=q)
        codes[rs] = q.astype(np.int8).T.reshape(b.shape)
        scales[rs] = best_s.reshape(b.shape[:2])

    if chunk is None:  # rows per task: ~2 MiB of blocks (cache-sized), and work for every core
        cores = os.cpu_count() or 1
        chunk = max(1, min((2 << 20) // (4 * max(1, nb * block)), -(-n // (4 * cores))))
    _parallel(search, list(_chunks(n, chunk)))
    codes = codes.reshape(n, -1)
    return (codes, scales, zps) if asymmetric else (codes, scales)


def dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None = None):
    """float32 [N, K] from codes [N, K], scales [N, K/block] (and zero points [N, K/block])."""
    n, k = codes.shape
    nb = scales.shape[1]
    c = codes.reshape(n, nb, k // nb).astype(np.float32)
    if zero_points is not None:
        c = c - zero_points.astype(np.float32)[..., None]
    return (c * scales.astype(np.float32)[..., None]).reshape(n, k)


def upper_factor_of_inverse(h: np.ndarray) -> np.ndarray:
    """U, upper triangular with a positive diagonal, such that H^-1 = U^T U (the Cholesky factor
    GPTQ steps with), without forming H^-1: with J the reversal, J H J = L L^T (Cholesky), and
    U = J L^-1 J. 2/3 n^3 flops instead of an inverse and a Cholesky's 7/3 n^3 (a 6912-wide
    input: ~3 s instead of ~10 s on 2 cores)."""
    from scipy.linalg import lapack

    low = np.linalg.cholesky(np.ascontiguousarray(h[::-1, ::-1]))
    inverse, info = (lapack.dtrtri if low.dtype == np.float64 else lapack.strtri)(low, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"triangular inverse failed (info {info})")
    return np.ascontiguousarray(inverse[::-1, ::-1])


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int = 4, block: int = 32, damp: float = 0.01,
         scale_fn: Callable = mse_search, lazy: int = 128, chunk: int = 1024, **scale_kw):
    """GPTQ: quantize columns in order, spreading each column's error over the columns not yet
    quantized so that the layer's output X W^T changes least (H = X^T X of the layer's input).

    ``hessian`` [K, K] is sum over calibration tokens of x x^T (any positive scale). Damping adds
    ``damp * mean(diag H)`` to the diagonal; columns whose input is always zero are zeroed. At the
    first column of each block of ``block`` inputs, the block's scale (and zero point) is chosen
    by ``scale_fn`` (``mse_search`` or ``rtn``, with ``scale_kw``, e.g. asymmetric=True) from the
    *current*, error-updated weights of that block; the columns are then rounded with it one at a
    time. No activation reordering (it would mix blocks). Rows are independent given H, so they
    are processed ``chunk`` at a time (temporaries ~ chunk x K plus the K x K factor).
    Returns what ``scale_fn`` returns: (codes, scales) or (codes, scales, zero_points).
    """
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of block={block}")
    asym = bool(scale_kw.get("asymmetric", False))
    qmin, qmax = _qrange(bits, asym)
    # f64 algebra, f32 for the widest inputs (K > 4096: 12B's and 27B's down projections, where
    # four f64 K x K matrices would be 7-15 GiB; the damping keeps H well conditioned)
    h = np.array(hessian, np.float64 if k <= 4096 else np.float32, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    hinv = upper_factor_of_inverse(h).astype(np.float32)  # upper U, H^-1 = U^T U
    nb = k // block
    codes = np.empty((n, k), np.int8)
    scales = np.empty((n, nb), np.float16)
    zps = np.empty((n, nb), np.uint8) if asym else None
    lazy = max(block, (lazy // block) * block)

    def run(rs):
        W = w[rs].copy()
        W[:, dead] = 0.0
        m = W.shape[0]
        s = np.zeros(m, np.float32)
        z = np.zeros(m, np.float32)
        for i1 in range(0, k, lazy):
            i2 = min(i1 + lazy, k)
            W1 = W[:, i1:i2].copy()
            E1 = np.zeros_like(W1)
            U1 = hinv[i1:i2, i1:i2]
            for j in range(i2 - i1):
                col = i1 + j
                if col % block == 0:  # one task: the rows are already spread over the cores
                    out = scale_fn(W1[:, j:j + block], bits=bits, block=block, chunk=m, **scale_kw)
                    # an all-zero block (at its start) gets scale 1: its later columns may still
                    # take error updates, which round against a finite scale
                    s16 = np.where(out[1][:, 0] == 0, np.float16(1.0), out[1][:, 0]).astype(np.float16)
                    s = s16.astype(np.float32)
                    scales[rs, col // block] = s16
                    if asym:
                        z = out[2][:, 0].astype(np.float32)
                        zps[rs, col // block] = out[2][:, 0]
                x = W1[:, j]
                if asym:
                    q = np.clip(np.rint(x / s) + z, 0, qmax)
                    deq = (q - z) * s
                else:
                    q = np.clip(np.rint(x / s), qmin, qmax)
                    deq = q * s
                codes[rs, col] = q.astype(np.int8)
                d = U1[j, j]
                err = (x - deq) / d
                W1[:, j:] -= np.outer(err, U1[j, j:])
                E1[:, j] = err
            W[:, i2:] -= E1 @ hinv[i1:i2, i2:]

    # rows are independent given H: chunks of rows on every core (each writes its own rows)
    chunk = max(1, min(chunk, -(-n // (os.cpu_count() or 1))))
    _parallel(run, list(_chunks(n, chunk)))
    return (codes, scales, zps) if asym else (codes, scales)

