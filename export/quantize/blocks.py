"""Our own block-quantized weights: codes and scales computed once, in numpy, and written exactly
into both targets' formats.

A `BlockQuantized` is a weight `[N out, K in]` as signed integer codes `[N, K]` and one float16
scale per block of `block` inputs of each output row (value = code * scale; symmetric, no zero
point). That is exactly what both targets' fast int4 kernels read:

  TFLite   INT4 tensor (two's complement nibbles, even element in the low nibble) with a
           BlockwiseQuantization of float16 scales [N, K / block] (XNNPACK's blockwise kernels)
  ONNX     MatMulNBits / GatherBlockQuantized: uint4 = code + 8 (the default zero point 8), two
           per byte, even element low; scales f32 [N, K / block] (float16 widens exactly)

and what a GGUF Q4_0 block is (32 codes in [-8, 7] and one float16 scale). So a weight quantized
here, or carried over from a Q4_0 checkpoint, is the same numbers in the .tflite, the ONNX folder
and the parity reference (one exception: XNNPACK refuses negative scales, which Q4_0 gives about
half of its blocks; TFLite gets those blocks negated, exact but for the one value per block that
sits at +8 steps, which moves to +7: `BlockQuantized.positive`); the targets' quantizers (ai-edge-quantizer, onnxruntime's block
quantizer) only provide the layout around them (export/quantize/tflite.py, onnx.py).

8-bit blocks (GGUF Q8_0, 32 int8 codes and a float16 scale) are carried into ONNX's 8-bit
MatMulNBits (uint8 = code + 128) with a block of 32. TFLite's int8 recipes are per output
channel, which cannot hold a block-32 tensor: there the weight is re-quantized (documented in
docs/quantization.md).

Two GGUF k-quant forms go into ONNX only (float32 scales, which MatMulNBits reads and TFLite's
float16 block scales cannot hold exactly; `onnx_only`):
  Q4_K  4-bit codes q in [0, 15] per block of 32 with scale d * sc and an offset dmin * m:
        value = q * scale - offset. Codes are q - 8 with zero point -8 (MatMulNBits' uint4 q, zero
        point 0), `offsets` f32 [N, K / 32]; the writer adds the offsets' term as a small f32
        matmul of the input's block sums (export/quantize/onnx.py).
  Q6_K  6-bit codes in [-32, 31] per block of 16, scale d * sc: 8-bit MatMulNBits blocks of 16.

How the codes are chosen for a float weight (docs/quantization.md has the measurements):

  linear layers  `mse`: per block, the float16 scale with the least squared error: absmax/7
                 shrunk by 8 factors 0.6125..1.0, then each block's best factor tried a half,
                 a quarter and an eighth of a step either side (14 candidates,
                 export/quantize/algorithms.mse_search `refine`; SYMMETRIC_SEARCH). No
                 calibration data; ~2x less perplexity loss than round-to-nearest on the real
                 Gemma 3 270M.
  the table      the tied embedding / LM head (63% of gemma3-270m's parameters): int4 with the
                 symmetric search in int4-b32 / int4-b128 (GatherBlockQuantized reads it too, so
                 no zero points); int8 round to nearest per row and block of 128 in int4-b32-e8
                 (`Recipe.table_bits`): at int4 it alone costs ~15% perplexity on real weights,
                 at int8 ~0%. A checkpoint's own Q4_0 table (Google's QAT GGUFs) is carried
                 at int4: the model was trained for exactly those numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from export.quantize.sizes import TABLE, is_quantized_weight, table_block


@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    codes: np.ndarray  # int8 [N, K]: in [-8, 7] for 4 bits, [-128, 127] for 8
    scales: np.ndarray  # float16 [N, K // block] (float32: a GGUF k-quant's d * sc, ONNX only)
    bits: int
    origin: str  # where the codes came from: "rtn", "mse", "gguf Q4_0", ...
    # int8 [N, K // block], in the codes' range: value = (code - zero) * scale (asymmetric blocks;
    # ONNX MatMulNBits only). None: symmetric, zero = 0.
    zeros: np.ndarray | None = None
    # float32 [N, K // block]: value = (code - zero) * scale - offset (GGUF Q4_K's dmin * m; ONNX
    # only, as a second matmul). None: no offsets.
    offsets: np.ndarray | None = None

    def __post_init__(self):
        n, k = self.codes.shape
        if self.codes.dtype != np.int8 or self.scales.dtype not in (np.float16, np.float32):
            raise TypeError("codes must be int8 and scales float16 (or float32)")
        if self.scales.shape[0] != n or k % self.scales.shape[1]:
            raise ValueError(f"scales {self.scales.shape} do not tile codes {self.codes.shape}")
        if self.zeros is not None and (self.zeros.dtype != np.int8 or self.zeros.shape != self.scales.shape):
            raise ValueError("zeros must be int8 and shaped like the scales")
        if self.offsets is not None and (self.offsets.dtype != np.float32 or self.offsets.shape != self.scales.shape):
            raise ValueError("offsets must be float32 and shaped like the scales")

    @property
    def onnx_only(self) -> bool:
        """Whether only ONNX's MatMulNBits holds these numbers exactly: zero points, offsets or
        float32 scales (TFLite's block scales are float16, its int4 blocks symmetric)."""
        return self.zeros is not None or self.offsets is not None or self.scales.dtype != np.float16

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def block(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        blocks = self.codes.reshape(n, -1, self.block).astype(np.float32)
        if self.zeros is not None:
            blocks = blocks - self.zeros.astype(np.float32)[..., None]
        out = blocks * self.scales.astype(np.float32)[..., None]
        if self.offsets is not None:
            out -= self.offsets[..., None]
        return out.reshape(n, k)

    def positive(self) -> tuple["BlockQuantized", int]:
        """The weight with every scale positive, as XNNPACK's blockwise kernels require, and how
        many codes had to change. GGUF Q4_0 gives a block whose largest-magnitude value is
        positive a negative scale and that value the code -8; negating the block's codes and
        scale is exact except for that code, which becomes 7 instead of 8 (one value in 32 moves
        by one step). ONNX's MatMulNBits takes negative scales, so only TFLite needs this."""
        if self.onnx_only:
            raise ValueError(f"internal error: {self.origin} blocks are ONNX-only")
        neg = self.scales.astype(np.float32) < 0
        if not neg.any():
            return self, 0
        n, k = self.codes.shape
        codes = self.codes.reshape(n, -1, self.block).astype(np.int16)
        codes = np.where(neg[..., None], -codes, codes)
        qmax = 2 ** (self.bits - 1) - 1
        clipped = int((codes > qmax).sum())
        codes = np.minimum(codes, qmax).astype(np.int8).reshape(n, k)
        scales = np.where(neg, -self.scales, self.scales).astype(np.float16)
        return BlockQuantized(codes, scales, self.bits, self.origin + " (scales made positive)"), clipped

    def split_offsets(self) -> tuple["BlockQuantized", np.ndarray]:
        """(symmetric blocks with float16 scales, every scale positive, f32 constants [N, K / block]):
        value = code * scale + constant, what a TFLite INT4 tensor (XNNPACK's symmetric blockwise
        kernel) plus models.layers.dense's `offsets` compute. (code - zero) * s - offset = code * s
        + (-zero * s - offset); a negative scale (GGUF Q4_0 gives half its blocks one) is made
        positive exactly, code * s = (-code - 1) * (-s) - s, the -s going into the constant (no code
        leaves [-8, 7], unlike `positive`). The one change is a float32 scale's float16 rounding (a
        GGUF Q4_K's d * sc has up to 17 significant bits: relative 2^-12, a 500th of a step at the
        largest code); a block whose scale is 0 in float16 (XNNPACK refuses it) keeps only its
        constant."""
        if self.bits != 4:
            raise ValueError(f"internal error: {self.origin} {self.bits}-bit blocks have no TFLite int4 form")
        s = self.scales.astype(np.float32)
        const = np.zeros(s.shape, np.float32)
        if self.zeros is not None:
            const -= self.zeros.astype(np.float32) * s
        if self.offsets is not None:
            const -= self.offsets
        neg = s < 0
        codes = self.codes
        if neg.any():
            n, k = codes.shape
            blocks = codes.reshape(n, -1, self.block)
            codes = np.where(neg[..., None], ~blocks, blocks).reshape(n, k)  # ~c = -c - 1, in [-8, 7]
            const = np.where(neg, const - s, const)  # c * s = (~c) * (-s) - s
            s = np.abs(s)
        half = s.astype(np.float16)
        empty = half == 0  # XNNPACK refuses a zero scale: such a block is its constant alone (codes 0)
        if empty.any():
            n, k = codes.shape
            codes = np.where(empty[..., None], 0, codes.reshape(n, -1, self.block)).reshape(n, k)
            half = np.where(empty, np.finfo(np.float16).tiny, half).astype(np.float16)
        return BlockQuantized(np.ascontiguousarray(codes, np.int8), half, self.bits,
                              self.origin + " (offsets apart)"), const.astype(np.float32)

    # ---- the targets' layouts ----
    def tflite_int4(self) -> np.ndarray:
        """The INT4 tensor's bytes: two's complement nibbles, element 2i low, 2i+1 high (packed
        in chunks: no whole-tensor temporaries)."""
        if self.bits != 4 or self.onnx_only:
            raise ValueError("only symmetric 4-bit blocks with float16 scales go into a TFLite INT4 tensor")
        flat = self.codes.reshape(-1)
        out = np.empty((flat.size + 1) // 2, np.uint8)
        step = 1 << 23  # codes per chunk (even)
        for i in range(0, flat.size, step):
            c = flat[i:i + step].view(np.uint8)
            if c.size % 2:
                c = np.append(c, np.uint8(0))
            out[i // 2:i // 2 + c.size // 2] = _pack_nibbles(c)
        return out

    def nbits(self) -> tuple[np.ndarray, np.ndarray]:
        """MatMulNBits' (B uint8 [N, K/block, block*bits/8], scales f32 [N, K/block]) with the
        default zero point (8 for 4 bits, 128 for 8): the same values as the codes."""
        n, k = self.codes.shape
        kb = k // self.block
        if self.bits not in (4, 8):
            raise ValueError(f"MatMulNBits takes 4 or 8 bits, not {self.bits}")
        packed = np.empty((n, kb, self.block * self.bits // 8), np.uint8)
        step = max(1, (8 << 20) // k)  # rows per chunk: small temporaries (models.lazy.CHUNK_BYTES)
        for r in range(0, n, step):
            u = self.codes[r:r + step].view(np.uint8)
            if self.bits == 4:  # code + 8 in [0, 15]: a wrapping uint8 add of 8
                packed[r:r + step] = _pack_nibbles(u + np.uint8(8)).reshape(-1, kb, self.block // 2)
            else:  # code + 128: the sign bit flipped
                packed[r:r + step] = (u ^ np.uint8(0x80)).reshape(-1, kb, self.block)
        return packed, self.scales.astype(np.float32)

    def nbits_zero_points(self) -> np.ndarray | None:
        """MatMulNBits' packed uint8 zero points ([N, ceil(K/block * bits / 8)]: 4-bit zero + 8,
        two per byte, even block low, each row padded to whole bytes; 8-bit zero + 128), or None
        for symmetric blocks (the default zero point)."""
        if self.zeros is None:
            return None
        offset = 2 ** (self.bits - 1)
        u = (self.zeros.astype(np.int16) + offset).astype(np.uint8)
        if self.bits == 8:
            return np.ascontiguousarray(u)
        if u.shape[1] % 2:
            u = np.concatenate([u, np.full((u.shape[0], 1), offset, np.uint8)], axis=1)
        return np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << 4))


def _pack_nibbles(c: np.ndarray) -> np.ndarray:
    """Bytes of an even-sized uint8 array, the low nibble of element 2i low, of 2i+1 high: read
    as little-endian uint16 pairs (a | b << 8), two contiguous passes instead of strided ones."""
    pairs = np.ascontiguousarray(c).reshape(-1).view("<u2")
    low = (pairs & 0x000F).astype(np.uint8)
    low |= ((pairs >> 4) & 0x00F0).astype(np.uint8)
    return low


def rtn(w: np.ndarray, bits: int, block: int) -> BlockQuantized:
    """Round to nearest with the block's absolute maximum on the positive end of the grid
    (algorithms.rtn "absmax": scale = max|w| / (2^(bits-1) - 1), rounded to float16; codes from
    the rounded scale). An all-zero block gets scale 1 and zero codes."""
    from export.quantize.algorithms import rtn as round_to_nearest

    w = np.asarray(w, np.float32)
    codes, scales = round_to_nearest(w, bits, block, mode="absmax")
    n, k = w.shape
    scales[~np.abs(w.reshape(n, k // block, block)).any(-1)] = np.float16(1.0)
    return BlockQuantized(codes.astype(np.int8), scales, bits, "rtn")


# The block searches' candidates (algorithms.mse_search keywords): a coarse grid, refined around
# each block's best. On the real Gemma 3 270M's linear layers (`python tools/bench_int4_search.py`,
# one weight in three, Hadamard-rotated as the int4 recipes store them) the symmetric search's
# relative squared error is 0.5% lower (7.368e-3 vs 7.406e-3) than the 32-candidate grids it
# replaced (absmax/7 and |extreme|/8, each shrunk by 16 factors 0.70..1.0) with 14 candidates, at
# 40% of the CPU; the asymmetric one's 2.3% lower (5.937e-3 vs 6.077e-3) with 12 instead of 16.
# Perplexity: docs/quantization.md (Refined scale search). 0.6125 = 0.7 * 7/8: the symmetric
# range reaches the old |extreme|/8 family's smallest scale (with positive scales the two
# families differed only in range).
SYMMETRIC_SEARCH = {"grid": np.linspace(0.6125, 1.0, 8), "signed": False, "refine": 3, "positive": True}
ASYMMETRIC_SEARCH = {"grid": np.linspace(0.70, 1.0, 6), "refine": 3, "asymmetric": True}
# GPTQ keeps the 16-factor grids: its scales are searched on the error-updated weights at each
# block's first column, and there the refined search measured worse (real 270M, TFLite int4-b32
# GPTQ ratio 1.1030 -> 1.1175, -e8 1.0747 -> 1.0883; ONNX level, -e8 1.0663 -> 1.0660; the
# trained tiny gemma3's asymmetric GPTQ KL 0.0017 -> 0.0019). GPTQ's time is its column updates.
GPTQ_SYMMETRIC_SEARCH = {"grid": np.linspace(0.70, 1.0, 16), "positive": True}
GPTQ_ASYMMETRIC_SEARCH = {"grid": np.linspace(0.70, 1.0, 16), "asymmetric": True}


def mse(w: np.ndarray, bits: int, block: int) -> BlockQuantized:
    """Per block, the positive float16 scale with the least squared error (see the module doc)."""
    from export.quantize.algorithms import mse_search

    codes, scales = mse_search(np.asarray(w, np.float32), bits, block, **SYMMETRIC_SEARCH)
    return BlockQuantized(codes.astype(np.int8), scales.astype(np.float16), bits, "mse")


def mse_asymmetric(w: np.ndarray, bits: int, block: int) -> BlockQuantized:
    """Per block, scale and integer zero point with the least squared error: the block's
    [min, max] shrunk by 6 factors 0.70..1.0, each block's best refined three times
    (ASYMMETRIC_SEARCH; ONNX MatMulNBits takes zero points, XNNPACK's blockwise kernels do not)."""
    from export.quantize.algorithms import mse_search

    codes, scales, zeros = mse_search(np.asarray(w, np.float32), bits, block, **ASYMMETRIC_SEARCH)
    offset = 2 ** (bits - 1)
    u = codes.view(np.uint8)  # code - offset in place, as a wrapping uint8 subtraction read as int8
    u -= np.uint8(offset)
    return BlockQuantized(u.view(np.int8), scales.astype(np.float16), bits, "mse asymmetric",
                          (zeros.astype(np.int16) - offset).astype(np.int8))


def quantizable(name: str, value) -> bool:
    return is_quantized_weight(name, tuple(np.shape(value)))


class PendingBlocks:
    """The BlockQuantized form of one lazy weight (models.lazy.LazyTensor), computed when
    `resolve()`d and not kept: a streamed export quantizes each weight as it writes it, so the
    codes of the whole model (1 byte per parameter) are never held at once. `bits`, `block`
    and `shape` are known up front (what the writers plan with)."""

    def __init__(self, shape: tuple, bits: int, block: int, compute, origin: str = "pending",
                 onnx_only: bool = False):
        self.shape, self.bits, self.block = tuple(shape), bits, block
        self._compute = compute
        self.origin = origin
        self.onnx_only = onnx_only  # as BlockQuantized.onnx_only, known before computing

    def resolve(self) -> BlockQuantized:
        b = self._compute()
        if b.shape != self.shape or b.bits != self.bits or b.block != self.block:
            raise RuntimeError(f"internal error: planned int{self.bits} blocks of {self.block} {self.shape}, "
                               f"computed int{b.bits} blocks of {b.block} {b.shape}")
        return b


def needs_offsets(b) -> bool:
    """Whether TFLite's symmetric, positive-scale INT4 can hold these 4-bit blocks exactly only
    with `dense`'s per-block offsets (BlockQuantized.split_offsets): a checkpoint's own blocks
    (GGUF Q4_K: offsets and float32 scales; Q4_0: negative scales), not ours (positive scales,
    no zero point on TFLite)."""
    return b.bits == 4 and (b.onnx_only or b.origin.startswith("gguf "))


def resolved(b) -> BlockQuantized:
    """A BlockQuantized, computing a PendingBlocks."""
    return b.resolve() if isinstance(b, PendingBlocks) else b


KEPT_BITS, KEPT_BLOCK = 8, 32  # `plan_blocks`' form for the layers a mixed-precision source keeps wide


def plan_blocks(params: dict, bits: int, block: int, carried: dict | None = None,
                quantize=None, table_bits: int | None = None, kept=()) -> dict[str, BlockQuantized]:
    """The block-quantized form of every matmul weight of `params` whose width divides into
    `block`: carried over from the checkpoint where its source blocks have the same bits and
    block (`carried`: name -> BlockQuantized, e.g. GGUF Q4_0), else `quantize(w, bits, block)`
    (default: round to nearest). With `table_bits`, the table (when not carried) is rounded to
    nearest at that many bits instead, in blocks of `table_block`. `kept`: names written at 8 bits
    (the layers a mixed-precision GGUF holds wider than 4-5 bits: models.loaders.gguf.mix_kept),
    carried where the source blocks are 8-bit (Q8_0, Q6_K as blocks of 16), else rounded to
    nearest in blocks of 32. A lazy weight (models.lazy.LazyTensor) gets a PendingBlocks, computed
    when the writer takes it."""
    from models.lazy import is_lazy

    quantize = quantize or rtn
    carried = carried or {}
    out = {}
    for name, value in params.items():
        shape = tuple(np.shape(value))
        if not quantizable(name, value) or shape[1] % block:
            continue
        src = carried.get(name)
        if name in kept:
            if src is not None and src.bits == KEPT_BITS and src.shape == shape:
                out[name] = src
                continue
            fn, b, k = rtn, KEPT_BITS, KEPT_BLOCK
        elif src is not None and src.bits == bits and src.block == block and src.shape == shape:
            out[name] = src
            continue
        else:
            fn, b, k = _scheme(name, shape, bits, block, quantize, table_bits)
        if is_lazy(value):
            out[name] = PendingBlocks(shape, b, k, lambda fn=fn, v=value, b=b, k=k: by_rows(fn, v, b, k))
        else:
            out[name] = fn(np.asarray(value, np.float32), b, k)
    return out


def _scheme(name: str, shape: tuple, bits: int, block: int, quantize, table_bits: int | None):
    """(fn, bits, block) that `plan_blocks` quantizes the weight `name` with."""
    if name == TABLE and table_bits and table_bits != bits:
        return rtn, table_bits, table_block(shape[1], block)
    if name == TABLE:  # symmetric: GatherBlockQuantized reads it too
        return mse, bits, block
    return quantize, bits, block


def quantizer(bits: int, block: int, quantize=None, table_bits: int | None = None):
    """fn(name, w) -> BlockQuantized: what `plan_blocks` computes for the weight `name` (not
    carried) with the same arguments, for a sample of its rows (export/quantize/rotate.lowers_error)."""
    def fn(name: str, w: np.ndarray) -> BlockQuantized:
        f, b, k = _scheme(name, tuple(np.shape(w)), bits, block, quantize or rtn, table_bits)
        return f(np.asarray(w, np.float32), b, k)

    return fn


def by_rows(fn, value, bits: int, block: int, max_bytes: int | None = None) -> BlockQuantized:
    """`fn(w, bits, block)` of a weight computed over row chunks (models.lazy.row_chunks: a lazy
    weight whose source reads row slices is never held whole in f32). Every block is one row's,
    so the result is the whole weight's, value for value."""
    from models.lazy import row_chunks

    codes = np.empty(tuple(value.shape), np.int8)
    scales, zeros, origin = [], [], ""
    for r, rows in row_chunks(value, *([max_bytes] if max_bytes else [])):
        b = fn(np.asarray(rows, np.float32), bits, block)
        codes[r:r + len(rows)] = b.codes
        scales.append(b.scales)
        zeros.append(b.zeros)
        origin = b.origin
        del b
    zeros = None if zeros[0] is None else np.concatenate(zeros)
    return BlockQuantized(codes, np.concatenate(scales), bits, origin, zeros)


# GGUF block kind -> (bits, block) of its BlockQuantized form
SOURCE_FORMS = {"q4_0": (4, 32), "q8_0": (8, 32), "q4_k": (4, 32), "q6_k": (8, 16)}
ONNX_ONLY_SOURCES = ("q4_k", "q6_k")  # float32 scales (and Q4_K's offsets)


def pending_source_blocks(kind: str, shape: tuple, decode) -> PendingBlocks:
    """A checkpoint's quantized tensor (models.loaders.gguf.source_blocks(lazy=True)) decoded when
    the writer takes it."""
    return PendingBlocks(shape, *SOURCE_FORMS[kind], lambda: from_source_blocks(decode()), f"gguf {kind.upper()}",
                         onnx_only=kind in ONNX_ONLY_SOURCES)


def from_source_blocks(src) -> BlockQuantized:
    """A checkpoint's quantized tensor (models.loaders.gguf.SourceBlocks: kind q4_0 / q8_0 / q4_k /
    q6_k) as a BlockQuantized, value for value."""
    bits, _ = SOURCE_FORMS[src.kind]
    codes = np.ascontiguousarray(src.codes, np.int8)
    origin = f"gguf {src.kind.upper()}"
    if src.kind == "q4_k":  # q in [0, 15] = (q - 8) - (-8): MatMulNBits' uint4 q with zero point 0
        scales = np.ascontiguousarray(src.scales, np.float32)
        return BlockQuantized(codes - np.int8(8), scales, bits, origin, np.full(scales.shape, -8, np.int8),
                              np.ascontiguousarray(src.offsets, np.float32))
    if src.kind == "q6_k":
        return BlockQuantized(codes, np.ascontiguousarray(src.scales, np.float32), bits, origin)
    return BlockQuantized(codes, np.ascontiguousarray(src.scales, np.float16), bits, origin)
