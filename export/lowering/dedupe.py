"""Equal constants found by content, so that a writer stores each once (the TFLite writer's
buffers, the ONNX writer's initializers): the input rotations (export/quantize/rotate.py) are one
Hadamard matrix per order, repeated for every input they rotate."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable

import numpy as np


def earlier_copies(items: Iterable[tuple[Hashable, Hashable, np.ndarray]]) -> dict:
    """{key: the first key with the same tag and bytes} for every (key, tag, array) after the
    first of its kind, in the order given (the tag: what besides the bytes must match, e.g. dtype
    and shape)."""
    first, copies = {}, {}
    for key, tag, array in items:
        digest = (tag, hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).digest())
        if digest in first:
            copies[key] = first[digest]
        else:
            first[digest] = key
    return copies
