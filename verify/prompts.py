"""The gate's prompts: token streams built to reach where lowering bugs live (the sliding window,
the ring wrap, prefill chunk boundaries), and for a model with vision an image prompt."""

from __future__ import annotations

import numpy as np


def verify_prompts(cfg, max_len: int, lens: list[int], steps: int) -> list[list[int]]:
    """Prompts that cross the sliding window and wrap the ring during decode: a long one (two
    prefill chunks when they fit), a short one; tokens drawn from the vocabulary after BOS."""
    rng = np.random.default_rng(0)
    window = cfg.sliding_window
    # decode from window - steps/2 onwards crosses the window and wraps the local rings
    long_len = min(max(lens[-1] + lens[0] // 2, window - steps // 2), max_len - steps)
    short_len = min(max(3, window // 2), max_len - steps)
    prompts = []
    for n in (long_len, short_len):
        if n >= 1:
            p = rng.integers(3, cfg.vocab_size, n).tolist()
            p[0] = cfg.tokens.bos
            prompts.append(p)
    return prompts


def verify_images(cfg, max_len: int, lens: list[int], steps: int):
    """(prompts, images) of the gate's image prompt for a model with vision: text, an image, more
    text, a second image, then text reaching past the sliding window; random pixels in [-1, 1]."""
    v = cfg.vision
    rng = np.random.default_rng(1)
    tail = max(2, min(cfg.sliding_window, max_len - steps - 2 * v.image_length - 8))
    prompt = [cfg.tokens.bos, *rng.integers(3, 250, 3).tolist(), v.boi_token, *rng.integers(3, 250, 2).tolist(),
              v.boi_token, *rng.integers(3, 250, tail).tolist()]
    if len(prompt) + 2 * (v.image_length - 1) + steps > max_len:
        return [], []
    s = v.image_size
    images = [rng.uniform(-1.0, 1.0, (1, s, s, 3)).astype(np.float32) for _ in range(2)]
    return [prompt], [images]
