"""Post-training quantization recipes for both targets.

`RECIPES` names what the CLI's `--quant` accepts; `support(target, recipe, op_set)` is the table
of which target runs which recipe, and `check(...)` is called before any work starts (unknown
name, unsupported pair, a model whose matmul widths do not divide into the recipe's blocks).
The target-specific work is in `tflite.py` (ai-edge-quantizer on the converted flatbuffer) and
`onnx.py` (onnxruntime's block quantizer, MatMulNBits / GatherBlockQuantized nodes).
Decisions and measurements: docs/quantization.md.
"""

from export.quantize.recipes import (
    RECIPES,
    QuantizationError,
    Recipe,
    check,
    support,
    support_table,
)

__all__ = ["RECIPES", "QuantizationError", "Recipe", "check", "support", "support_table"]
