"""Gemma 3 prompts with images (MODEL_SPEC 4): the token layout, the soft-token splice and the
bidirectional image-block mask, shared by the JAX reference, the export signatures and runtime_py.

Token layout. The user marks where an image goes with one `<start_of_image>` token (boi); it
expands to `image_length` positions:

    newline, boi, soft x tokens_per_image, eoi, newline        (Gemma 3: "\\n\\n" 108, 255999, 262144 x 256, 256000, 108)

as the reference implementation expands it at the token level (a boi already followed by a soft
token is left as is, so expanding twice changes nothing). Every position is consumed, so text after
an image continues at position + 260. Soft-token positions take the vision tower's output rows, in
order, *unscaled* (the text embedding's sqrt(E) applies to text tokens only); the soft token's own
embedding row is never read.

Attention. Causal everywhere, and bidirectional inside each contiguous run of soft tokens (an
image's 256 tokens see each other; boi, eoi and the newlines stay causal). Local layers AND this
with their window. Blocks are numbered within a forward call, so a call must hold every image it
touches whole: runtimes never split a run of soft tokens across two prefill chunks
(`chunk_bounds`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from models.config import VisionConfig

BOI_TEXT = "<start_of_image>"


def expand_image_tokens(vcfg: VisionConfig, ids: Sequence[int]) -> list[int]:
    """Expand each bare boi token to the image's full layout (see the module docstring)."""
    ids = [int(t) for t in ids]
    out = []
    for i, t in enumerate(ids):
        if t == vcfg.boi_token and not (i + 1 < len(ids) and ids[i + 1] == vcfg.soft_token):
            out += [vcfg.newline_token, vcfg.boi_token, *[vcfg.soft_token] * vcfg.tokens_per_image,
                    vcfg.eoi_token, vcfg.newline_token]
        else:
            out.append(t)
    return out


def soft_runs(vcfg: VisionConfig, ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of soft tokens: one per image."""
    runs, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == vcfg.soft_token and start is None:
            start = i
        elif t != vcfg.soft_token and start is not None:
            runs.append((start, i))
            start = None
    return runs


def check_images(vcfg: VisionConfig, ids: Sequence[int], n_images: int):
    """One-line ValueError unless the (expanded) prompt holds exactly n_images whole images."""
    runs = soft_runs(vcfg, ids)
    if len(runs) != n_images:
        raise ValueError(f"the prompt has {len(runs)} image place(s) ({BOI_TEXT} tokens) but {n_images} "
                         f"image(s) were given; put one {BOI_TEXT} where each image goes")
    bad = [e - s for s, e in runs if e - s != vcfg.tokens_per_image]
    if bad:
        raise ValueError(f"an image run has {bad[0]} soft tokens, expected {vcfg.tokens_per_image}")


def image_inputs(vcfg: VisionConfig, prompt: Sequence[int], images: Sequence, encode, dim: int
                 ) -> tuple[list[int], np.ndarray]:
    """(expanded prompt ids, embeddings [T, dim]) for a prompt with one boi token per image:
    `encode(image) -> soft tokens [tokens_per_image, dim]` runs on each image (the JAX tower, or an
    artifact's vision encoder), after the image count is checked against the prompt."""
    ids = expand_image_tokens(vcfg, prompt)
    check_images(vcfg, ids, len(images))
    embeddings = np.zeros((len(ids), dim), np.float32)  # read at soft-token positions only
    for (s, e), image in zip(soft_runs(vcfg, ids), images):
        embeddings[s:e] = np.asarray(encode(image), np.float32).reshape(e - s, dim)
    return ids, embeddings


def with_vision(cfg, params: dict):
    """`cfg` as the params describe it: without its vision tower when they hold no vision weights
    (a text-only checkpoint, `--no-vision`, or text-only random init)."""
    import dataclasses

    if cfg.vision is not None and "mm.proj.w" not in params:
        return dataclasses.replace(cfg, vision=None)
    return cfg


def chunk_bounds(vcfg: VisionConfig | None, ids: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """Chunk sizes covering `ids` with chunks of at most max(lengths) tokens, none splitting an
    image's soft tokens: a chunk that would end inside a run ends before it instead. Raises
    ValueError if an image cannot fit one chunk."""
    longest = max(lengths)
    runs = soft_runs(vcfg, ids) if vcfg is not None else []
    if runs and longest < vcfg.tokens_per_image:
        raise ValueError(f"an image's {vcfg.tokens_per_image} soft tokens need a prefill length of at least "
                         f"{vcfg.tokens_per_image} (the longest is {longest}); re-export with a longer "
                         "--prefill-lens")
    sizes, at, n = [], 0, len(ids)
    while at < n:
        end = min(n, at + longest)
        for s, e in runs:
            if s < end < e:
                end = s
        sizes.append(end - at)
        at = end
    return sizes


def image_blocks(is_soft):
    """[B, T] bool (soft-token positions) -> [B, T] int32: 1, 2, ... for the tokens of each run of
    soft tokens, 0 for every other token."""
    is_soft = is_soft.astype(jnp.int32)
    # concatenate, not pad: the ONNX lowering has no rule for stablehlo.pad
    prev = jnp.concatenate([jnp.zeros_like(is_soft[:, :1]), is_soft[:, :-1]], axis=1)
    starts = is_soft * (1 - prev)
    # a running count of run starts, as a masked sum rather than cumsum (whose reduce_window has no
    # ONNX rule); computed once per call, [T, T] int32
    t = jnp.arange(is_soft.shape[1], dtype=jnp.int32)
    upto = (t[None, :] <= t[:, None]).astype(jnp.int32)  # [query t, start s]: s <= t
    return jnp.sum(starts[:, None, :] * upto[None], axis=-1) * is_soft


def encode_with_images(tokenizer, text: str, vcfg: VisionConfig, n_images: int = 0) -> list[int]:
    """Token ids of prompt text (chat template already applied, if any) whose `<start_of_image>`
    markers become the boi token, with one BOS. The text between markers is encoded piece by
    piece, so the marker needs no piece of its own in the tokenizer. Without markers, `n_images`
    markers go first (the images lead the prompt)."""
    if n_images and BOI_TEXT not in text:
        text = BOI_TEXT * n_images + text
    ids: list[int] = []
    for i, piece in enumerate(text.split(BOI_TEXT)):
        if i:
            ids.append(vcfg.boi_token)
        ids += tokenizer.encode(piece, add_bos=i == 0) if piece or i == 0 else []
    return ids
