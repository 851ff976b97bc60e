"""The ideal size of a quantized model: parameters x bits / 8 plus the scales the target stores.

Quantized: every 2-D matmul weight and the embedding table (stored once). Not quantized (f32):
norm scales, biases, RG-LRU parameters, the convolution and the block-diagonal gate weights.
Scales are what each target's kernels read: TFLite blockwise int4 keeps float16 scales, its
per-channel int8 f32 scales; MatMulNBits takes scales of the activation type (f32).
"""

from __future__ import annotations

import numpy as np

from export.quantize.onnx import block_for
from export.quantize.recipes import RECIPES
from models.layers import OFFSETS


def is_quantized_weight(name: str, shape: tuple) -> bool:
    """A matmul weight or the embedding (2-D, both sides at least 16; not the convolution, nor
    an input rotation, export/quantize/rotate.py, which stays f32 ahead of a dynamic-int8 matmul,
    nor a weight's block offsets, models.layers.dense, which stay f32)."""
    return len(shape) == 2 and min(shape) >= 16 and not name.endswith(("conv_w", "_rotation", OFFSETS))


TABLE = "embed"  # the tied embedding table, also the LM head


def table_block(width: int, fallback: int) -> int:
    """The block of an 8-bit table in an int4 recipe: 128 (a quarter bit of f32 scale per weight)
    where it divides the width."""
    return 128 if width % 128 == 0 else fallback


def ideal_bytes(params: dict, quant: str, target: str) -> int:
    """Parameters x bits / 8 plus scales, as `quant` stores them on `target` (an int4 recipe's
    table at its table_bits; a checkpoint's carried Q4_0 table would be smaller)."""
    recipe = RECIPES[quant]
    total = 0
    for name, value in params.items():
        shape = tuple(np.shape(value))
        n = int(np.prod(shape))
        if not is_quantized_weight(name, shape):
            total += 4 * n
            continue
        table = name == TABLE and recipe.table_bits is not None
        total += n * (recipe.table_bits if table else recipe.bits) // 8
        if recipe.bits == 16:
            continue
        rows, width = shape  # [N, K]: one scale per output row and block of inputs
        if target == "onnx":
            if not table and recipe.block is None and width % 16:  # the vision tower's, padded to 128
                width = -(-width // 128) * 128
            block = table_block(width, recipe.block) if table else block_for(recipe, width)
            total += 4 * rows * (width // block)
        elif recipe.block and not table:
            total += 2 * rows * (width // recipe.block)
        else:  # TFLite int8: per output channel
            total += 4 * rows
    return total
