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


def is_quantized_weight(name: str, shape: tuple) -> bool:
    """A matmul weight or the embedding (2-D, both sides at least 16; not the convolution)."""
    return len(shape) == 2 and min(shape) >= 16 and not name.endswith("conv_w")


def ideal_bytes(params: dict, quant: str, target: str) -> int:
    recipe = RECIPES[quant]
    total = 0
    for name, value in params.items():
        shape = tuple(np.shape(value))
        n = int(np.prod(shape))
        if not is_quantized_weight(name, shape):
            total += 4 * n
            continue
        total += n * recipe.bits // 8
        if recipe.bits == 16:
            continue
        rows, width = shape  # [N, K]: one scale per output row and block of inputs
        if target == "onnx":
            total += 4 * rows * (width // block_for(recipe, width))
        elif recipe.block:
            total += 2 * rows * (width // recipe.block)
        else:
            total += 4 * rows
    return total
