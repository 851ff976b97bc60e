"""Quantize an assembled ONNX decoder (the model proto and its weights, before they are written).

Weights are quantized with onnxruntime's block quantizer (`quantize_matmul_4bits` /
`quantize_matmul_8bits`, the kernels behind onnxruntime.quantization's MatMulNBitsQuantizer),
symmetric, into MatMulNBits' layout: B [N, K / block, block * bits / 8] uint8 and scales
[N, K / block] f32. The rewrite:

  MatMul(x, W[K, N])                 -> MatMulNBits(x, B, scales)          (every matmul weight)
  Gemm(x, E[V, D], transB=1)         -> MatMulNBits(x, B, scales)          (tied logits)
  Gather(E[V, D], ids)               -> GatherBlockQuantized(B, ids, scales as [V, D/block, 1])
                                        -> Reshape to [..., D]             (embedding)

so the tied table is stored once, in the layout both ops read (GatherBlockQuantized takes the 3-D
MatMulNBits tensor with quantize_axis 2; only the small scale tensor is reshaped). MatMulNBits
runs with accuracy_level 4 (activations quantized to int8 per row inside the kernel), the fast
CPU path and what onnxruntime-genai's own builder uses. `dynamic-int8` uses 8-bit MatMulNBits with
a block of 128 inputs (or the largest power of two dividing the width): MatMulNBits has no
per-channel form for widths that are not a power of two.

fp16 does not come through here: the weights are stored float16 by the exporter (embedding
included) and cast to f32 in the graph.

Packed weights past a few MiB can be spilled (`Spill`): written to a scratch file as each is made
and read back by row when `save` copies it into model.onnx.data, so a quantized export never
holds the packed model in memory (a 12B int4 folder is 7 GiB; its export peaked at the artifact's
size plus the converter before, docs/memory.md). The bytes written are the same either way.
"""

from __future__ import annotations

import collections
import functools
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from export.quantize.recipes import Recipe
from models.lazy import LazyTensor, is_lazy, load

MS_DOMAIN = "com.microsoft"
# --onnx-compute -> MatMulNBits' accuracy_level: int8 activations inside the kernel (ORT CPU's
# fast path, the default), or f32 compute (set_compute)
ACCURACY_LEVELS = {"int8": 4, "f32": 1}
ACCURACY_LEVEL = ACCURACY_LEVELS["int8"]
INT8_BLOCK = 128
CHUNK_COLUMNS = 8192  # output channels quantized at a time (bounds the transient f32 copy)
SPILL_MIN_BYTES = 1 << 20  # packed arrays below this stay in memory (scales of small layers, splits)


@functools.cache
def _libc():
    """The C library's symbols, as linked into this process (no `find_library`, which runs
    ldconfig in a subprocess); None where ctypes cannot load them."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free a byte range of a file's disk blocks, keeping its size (Linux fallocate with
    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE). False where the system or file system lacks it."""
    import ctypes
    import sys

    libc = _libc() if sys.platform.startswith("linux") and length > 0 else None
    if libc is None or not hasattr(libc, "fallocate"):
        return False
    return libc.fallocate(ctypes.c_int(fd), ctypes.c_int(0x02 | 0x01), ctypes.c_int64(offset),
                          ctypes.c_int64(length)) == 0


class Spill:
    """A scratch file the packed weights are appended to as they are made; each comes back as a
    LazyTensor that reads its rows from the file (np.fromfile into a fresh buffer, not a
    mapping, so the pages read count against the page cache and not the process). The writes go
    through the page cache too: the packed model is never resident in the exporter.

    `release(tensor)`, once `save` has copied a tensor into model.onnx.data, frees its blocks on
    disk (a hole punched in the file), so the scratch file shrinks as the data file grows and the
    export needs about one artifact of free disk, not two (gemma3-27b dynamic-int8: 27 GiB); a
    released tensor raises if read again. `close()` removes the file; the tensors handed out
    must not be read after it."""

    def __init__(self, path: Path, min_bytes: int | None = None):
        self.path = Path(path)
        self.min_bytes = SPILL_MIN_BYTES if min_bytes is None else min_bytes
        self._f = open(self.path, "wb")
        # id(tensor) -> (tensor, [(offset, nbytes)]): the tensor is held so that its id stays unique
        self._spilled = {}
        self._released = set()  # offsets of released regions

    def release(self, tensor):
        """`tensor` (spilled, or concatenated from spilled parts) has been written where it
        belongs: free its disk blocks. Anything else: nothing to do."""
        _, regions = self._spilled.pop(id(tensor), (None, ()))
        for offset, nbytes in regions:
            self._released.add(offset)
            _punch_hole(self._f.fileno(), offset, nbytes)

    def put(self, name: str, array):
        """`array`, spilled when it is at least `min_bytes`, else returned as is."""
        if array is None or is_lazy(array) or array.nbytes < self.min_bytes:
            return array
        array = np.ascontiguousarray(array)
        pad = (-self._f.tell()) % 64
        self._f.write(b"\0" * pad)
        offset = self._f.tell()
        self._f.write(memoryview(array.reshape(-1).view(np.uint8)))
        self._f.flush()  # readable by np.fromfile from here on
        shape, dtype = array.shape, array.dtype
        row_items = int(np.prod(shape[1:], dtype=np.int64))

        def rows(a: int, b: int) -> np.ndarray:
            b = min(b, shape[0])
            if offset in self._released:
                raise RuntimeError(f"internal error: {name} was read from the spill file after it was released")
            out = np.fromfile(self.path, dtype, count=(b - a) * row_items,
                              offset=offset + a * row_items * dtype.itemsize)
            return out.reshape((b - a, *shape[1:]))

        tensor = LazyTensor(shape, dtype, lambda: rows(0, shape[0]), name=name, rows=rows)
        self._spilled[id(tensor)] = tensor, [(offset, array.nbytes)]
        return tensor

    def concat(self, parts: list, name: str):
        """concat_rows(parts), registered so that releasing it releases its spilled parts."""
        value = concat_rows(parts, name)
        if is_lazy(value):
            self._spilled[id(value)] = value, [r for p in parts for r in self._spilled.get(id(p), (None, []))[1]]
        return value

    def close(self):
        if not self._f.closed:
            self._f.close()
        self.path.unlink(missing_ok=True)


def concat_rows(parts: list, name: str):
    """np.concatenate(parts) along rows; lazy (read part by part, row range by row range) when
    any part is a spilled LazyTensor."""
    if not any(is_lazy(p) for p in parts):
        return np.concatenate(parts)
    starts = np.cumsum([0] + [p.shape[0] for p in parts])
    shape = (int(starts[-1]), *parts[0].shape[1:])

    def rows(a: int, b: int) -> np.ndarray:
        b = min(b, shape[0])
        pieces = []
        for p, s0, s1 in zip(parts, starts[:-1], starts[1:]):
            lo, hi = max(a, s0), min(b, s1)
            if lo < hi:
                pieces.append(p.read_rows(lo - s0, hi - s0) if is_lazy(p) else np.asarray(p[lo - s0:hi - s0]))
        return np.concatenate(pieces)

    return LazyTensor(shape, parts[0].dtype, lambda: rows(0, shape[0]), name=name, rows=rows)


def block_for(recipe: Recipe, k: int) -> int:
    if recipe.block is not None:
        return recipe.block
    for b in (INT8_BLOCK, 64, 32, 16):
        if k % b == 0:
            return b
    raise ValueError(f"width {k} is not a multiple of 16")


def quantize_rows(rows: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """rows [N, K] float -> (B uint8 [N, K/block, block*bits/8], scales f32 [N, K/block]), symmetric.
    `rows` may be a LazyTensor that reads row slices (a checkpoint's table): it is then read
    CHUNK_COLUMNS rows at a time, never whole.

    A block of zeros gets scale 1 (its codes are the zero point either way): runtimes that
    divide by the scale, or reject zero scales, then still load it."""
    from onnxruntime.capi._pybind_state import (
        quantize_matmul_4bits,
        quantize_matmul_8bits,
    )

    n, k = rows.shape
    kb = k // block
    packed = np.zeros((n, kb, block * bits // 8), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    for n0 in range(0, n, CHUNK_COLUMNS):
        n1 = min(n, n0 + CHUNK_COLUMNS)
        part = rows.read_rows(n0, n1) if is_lazy(rows) else rows[n0:n1]
        w = np.ascontiguousarray(part.T, dtype=np.float32)  # [K, cols], as the kernel takes it
        zp = np.zeros((n1 - n0, (kb + 1) // 2), np.uint8)  # unused when symmetric
        kernel(packed[n0:n1], w, scales[n0:n1], zp, block, n1 - n0, k, True)  # contiguous row slices
    scales[~np.isfinite(scales) | (scales == 0)] = 1.0  # symmetric scales may be negative
    return packed, scales


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of quantize_rows (for tests and error measurements)."""
    n, kb, blob = packed.shape
    if bits == 4:
        codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, kb, blob * 2).astype(np.int32) - 8
    else:
        codes = packed.astype(np.int32) - 128
    return (codes * scales[..., None]).reshape(n, -1).astype(np.float32)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _role(node, index: int) -> str | None:
    """How `node` reads a weight at input `index`: 'kn' (MatMul rhs, stored [K, N]), 'nk' (Gemm
    rhs with transB=1, or a Gather table on axis 0: stored [N, K]), None (anything else)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul" and index == 1:
        return "kn"
    if node.op_type == "Gemm" and index == 1 and len(node.input) == 2 and _attr(node, "transB", 0) == 1 \
            and _attr(node, "transA", 0) == 0 and _attr(node, "alpha", 1.0) == 1.0:
        return "nk"
    if node.op_type == "Gather" and index == 0 and _attr(node, "axis", 0) == 0:
        return "gather"
    return None


def quantize_model(model: onnx.ModelProto, weights: dict[str, np.ndarray], recipe: Recipe,
                   blocks: dict | None = None, memo: dict | None = None, progress=None,
                   spill: Spill | None = None) -> dict:
    """Rewrite `model` in place and return its new weights. Returns weights untouched where a
    tensor is not a 2-D float weight read only by MatMul / Gemm(transB) / Gather.

    `blocks` (name -> export.quantize.blocks.BlockQuantized or PendingBlocks, keyed by the
    weight's parameter name, which is its initializer's name) gives the codes and scales of a
    weight exactly (our own quantizer, or a checkpoint's Q4_0 / Q8_0 blocks); its bits and block
    then set the node's. Weights may be lazy (models.lazy.LazyTensor): each is read, quantized
    and dropped in turn, so only the packed result (the artifact's size) is held, and not even
    that with `spill`. `memo`
    (name -> packed, scales, zero points), shared by the graphs of one folder, quantizes a weight
    that two graphs read once, and gives both the same arrays (`save(reuse=)` then writes them once).
    `spill`: where the packed arrays go as they are made (see `Spill`); the returned weights then
    hold LazyTensors reading them back."""
    from export.quantize.ahead import Ahead

    blocks = blocks or {}
    uses = collections.defaultdict(list)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in weights:
                uses[name].append((node, i))
    out = dict(weights)
    new_nodes = {}  # id(old node) -> replacement list
    # matmuls of one input: (x, K, block, bits, has zero points) -> [(node, B, scales, N, zero points)]
    siblings = collections.defaultdict(list)
    # the blocks (ours or the checkpoint's) resolved and packed in the background, in this
    # loop's order (export/quantize/ahead.py)
    ahead = Ahead([n for n in uses if n in blocks and not (memo is not None and n in memo)],
                  lambda n: _nbits(blocks[n]), cost=lambda n: math.prod(blocks[n].shape))
    try:
        for done, (name, users) in enumerate(uses.items()):
            if progress:
                progress(done, len(uses), f"quantize {name}")
            array = weights[name]
            if array.ndim != 2 or array.dtype != np.float32:
                continue
            if name.endswith("_rotation"):  # the input rotations stay f32 MatMuls (export/quantize/rotate.py)
                continue
            roles = {_role(node, i) for node, i in users}
            if None in roles or ("kn" in roles and roles != {"kn"}):
                continue
            rows = array.T if roles == {"kn"} else array  # [N, K]
            n, k = rows.shape
            given = blocks.get(name)
            if given is not None and given.shape != (n, k):
                raise ValueError(f"internal error: blocks for {name} have shape {given.shape}, the weight {(n, k)}")
            if given is not None:
                bits, block = given.bits, given.block
            else:
                bits, block = recipe.bits, block_for(recipe, k)
                if k % block:
                    continue
            if memo is not None and name in memo:
                packed, scales, zero_points, offsets = memo[name]
            else:
                if given is not None:
                    packed, scales, zero_points, offsets = ahead.take(name)
                else:
                    sliced = rows if is_lazy(rows) and rows.reads_rows else load(rows)
                    packed, scales, zero_points, offsets = (*quantize_rows(sliced, bits, block), None, None)
                if spill is not None:
                    packed, scales, zero_points, offsets = (spill.put(f"{name}.q{bits}", packed),
                                                            spill.put(f"{name}.scales", scales),
                                                            spill.put(f"{name}.zero_points", zero_points),
                                                            spill.put(f"{name}.offsets", offsets))
                if memo is not None:
                    memo[name] = packed, scales, zero_points, offsets
            del out[name]
            qname, sname = f"{name}.q{bits}", f"{name}.scales"
            out[qname], out[sname] = packed, scales
            zname = None
            if zero_points is not None:
                if "gather" in roles:
                    raise ValueError(f"internal error: {name} is gathered, and GatherBlockQuantized gets no zero "
                                     "points here")
                zname = f"{name}.zero_points"
                out[zname] = zero_points
            oname = None
            if offsets is not None:
                oname = f"{name}.offsets"
                out[oname] = offsets
            for node, _ in users:
                if node.op_type == "Gather":
                    new_nodes[id(node)] = _gather(node, qname, sname, out, bits, block, k)
                elif oname is not None:
                    new_nodes[id(node)] = _matmul_offsets(node.input[0], qname, sname, zname, oname,
                                                          list(node.output), k, n, bits, block, out)
                elif len(users) == 1 and roles == {"kn"}:
                    siblings[(node.input[0], k, block, bits, zname is not None)].append((node, qname, sname, n, zname))
                else:
                    new_nodes[id(node)] = [_matmul_nbits(node.input[0], qname, sname, list(node.output), k, n,
                                                         bits, block, zname)]
    finally:
        ahead.close()
    if progress:
        progress(len(uses), len(uses), "quantized")
    for (x, k, block, bits, _zp), group in siblings.items():
        _fuse_siblings(x, k, block, group, bits, out, new_nodes, memo, spill)
    nodes = []
    for node in model.graph.node:
        nodes.extend(new_nodes.get(id(node), [node]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out


def set_compute(model: onnx.ModelProto, compute: str) -> int:
    """Set every MatMulNBits' accuracy_level to `compute`'s (ACCURACY_LEVELS); returns how many.
    f32 (level 1): ONNX Runtime packs the 4-bit codes alone and reads scales and zero points from
    the file, where level 4 adds f32 scales and per-block sums for its int8 kernel (~1.2x the
    file); decode is slower (docs/memory.md)."""
    level, n = ACCURACY_LEVELS[compute], 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
            n += 1
    return n


def _nbits(given) -> tuple:
    """MatMulNBits' (B, scales, zero points or None) of a BlockQuantized / PendingBlocks, and the
    offsets' matmul weight (`_matmul_offsets`) or None."""
    from export.quantize.blocks import resolved

    b = resolved(given)
    offsets = None if b.offsets is None else np.ascontiguousarray(-b.offsets.T)
    return (*b.nbits(), b.nbits_zero_points(), offsets)


def _matmul_offsets(x: str, b: str, scales: str, zero_points: str | None, offsets: str, outputs: list[str],
                    k: int, n: int, bits: int, block: int, weights: dict) -> list:
    """A weight with a float offset per block (GGUF Q4_K: value = q * scale - offset), exactly:
    MatMulNBits of the codes and scales, plus the input's sums over each block of `block`
    times -offsets ([K / block, N] f32, `offsets`):

      y = MatMulNBits(x) + MatMul(ReduceSum(Reshape(x, [..., K / block, block]), -1), -offsets^T)

    The second matmul is 1/`block` of the first's size (~25% more bytes than the 4-bit codes)."""
    base = outputs[0]
    blocks = f"{offsets}.block_shape"
    axes = "offsets.reduce_axes"
    weights.setdefault(blocks, np.array([k // block, block], np.int64))
    weights.setdefault(axes, np.array([-1], np.int64))
    return [
        _matmul_nbits(x, b, scales, [base + ".codes"], k, n, bits, block, zero_points),
        helper.make_node("Shape", [x], [base + ".lead"], end=-1),
        helper.make_node("Concat", [base + ".lead", blocks], [base + ".blocked_shape"], axis=0),
        helper.make_node("Reshape", [x, base + ".blocked_shape"], [base + ".blocked"]),
        helper.make_node("ReduceSum", [base + ".blocked", axes], [base + ".block_sums"], keepdims=0),
        helper.make_node("MatMul", [base + ".block_sums", offsets], [base + ".offsets"]),
        helper.make_node("Add", [base + ".codes", base + ".offsets"], outputs),
    ]


def _matmul_nbits(x: str, b: str, scales: str, outputs: list[str], k: int, n: int, bits: int, block: int,
                  zero_points: str | None = None):
    inputs = [x, b, scales] + ([zero_points] if zero_points else [])
    return helper.make_node("MatMulNBits", inputs, outputs, domain=MS_DOMAIN, K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=ACCURACY_LEVEL)


def _fuse_siblings(x: str, k: int, block: int, group: list, bits: int, weights: dict, new_nodes: dict,
                   memo: dict | None = None, spill: Spill | None = None):
    """Matmuls reading the same input (q/k/v, MLP gate/up) become one MatMulNBits over their
    concatenated weights and a Split: a decode step is a few hundred small ops, and one wider
    matmul keeps both cores busy where three narrow ones each pay the launch and sync cost.
    With `memo`, the graphs of one folder get the same concatenated objects (spilled ones are
    matched by identity when `save(reuse=)` looks for shared weights)."""
    if len(group) == 1:
        node, b, s, n, z = group[0]
        new_nodes[id(node)] = [_matmul_nbits(x, b, s, list(node.output), k, n, bits, block, z)]
        return
    first = group[0][0]
    b_name, s_name = f"{group[0][1]}.fused{len(group)}", f"{group[0][2]}.fused{len(group)}"
    def fused(name: str, parts: list):
        key = ("fused", name)
        if memo is not None and key in memo:
            return memo[key]
        value = concat_rows(parts, name) if spill is None else spill.concat(parts, name)
        if memo is not None:
            memo[key] = value
        return value

    weights[b_name] = fused(b_name, [weights.pop(b) for _, b, _, _, _ in group])
    weights[s_name] = fused(s_name, [weights.pop(s) for _, _, s, _, _ in group])
    z_name = None
    if group[0][4] is not None:  # zero points are per row too: rows concatenate
        z_name = f"{group[0][4]}.fused{len(group)}"
        weights[z_name] = fused(z_name, [weights.pop(z) for *_, z in group])
    sizes = [n for _, _, _, n, _ in group]
    split = f"{b_name}.split"
    weights[split] = np.array(sizes, np.int64)
    fused = f"{first.output[0]}.fused"
    new_nodes[id(first)] = [
        _matmul_nbits(x, b_name, s_name, [fused], k, sum(sizes), bits, block, z_name),
        helper.make_node("Split", [fused, split], [node.output[0] for node, *_ in group], axis=-1)]
    for node, *_ in group[1:]:
        new_nodes[id(node)] = []


def _gather(node, qname: str, sname: str, weights: dict, bits: int, block: int, k: int) -> list:
    table_out = node.output[0]
    ids = node.input[1]
    s3 = f"{sname}.as_blocks"
    shape3 = f"{sname}.shape3"
    if shape3 not in weights:
        n, kb = weights[sname].shape
        weights[shape3] = np.array([n, kb, 1], np.int64)
        weights[f"{qname}.row_width"] = np.array([k], np.int64)
    base = table_out
    return [
        helper.make_node("Reshape", [sname, shape3], [s3 + "." + base]),
        helper.make_node("GatherBlockQuantized", [qname, ids, s3 + "." + base], [base + ".blocks"],
                         domain=MS_DOMAIN, bits=bits, block_size=block, gather_axis=0, quantize_axis=2),
        helper.make_node("Shape", [ids], [base + ".ids_shape"]),
        helper.make_node("Concat", [base + ".ids_shape", f"{qname}.row_width"], [base + ".shape"], axis=0),
        helper.make_node("Reshape", [base + ".blocks", base + ".shape"], [table_out]),
    ]
