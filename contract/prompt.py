"""Gemma 3 prompts with images: the token layout shared by the JAX reference (models/), the
export signatures and runtime_py. Pure Python and numpy; `layout` is an ImageLayout, or any object
with its fields (models.config.VisionConfig).

Token layout. The user marks where an image goes with one `<start_of_image>` token (boi); it
expands to `image_length` positions:

    newline, boi, soft x tokens_per_image, eoi, newline        (Gemma 3: "\\n\\n" 108, 255999, 262144 x 256, 256000, 108)

as the reference implementation expands it at the token level (a boi already followed by a soft
token is left as is, so expanding twice changes nothing). Every position is consumed, so text after
an image continues at position + 260. Soft-token positions take the vision tower's output rows, in
order, *unscaled*; the soft token's own embedding row is never read.

Attention is bidirectional inside each contiguous run of soft tokens (models/multimodal.py), and
blocks are numbered within a forward call, so a call must hold every image it touches whole:
runtimes never split a run of soft tokens across two prefill chunks (`chunk_bounds`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.metadata import ImageLayout

BOI_TEXT = "<start_of_image>"


def expand_image_tokens(layout: ImageLayout, ids: Sequence[int]) -> list[int]:
    """Expand each bare boi token to the image's full layout (see the module docstring)."""
    ids = [int(t) for t in ids]
    out = []
    for i, t in enumerate(ids):
        if t == layout.boi_token and not (i + 1 < len(ids) and ids[i + 1] == layout.soft_token):
            out += [layout.newline_token, layout.boi_token, *[layout.soft_token] * layout.tokens_per_image,
                    layout.eoi_token, layout.newline_token]
        else:
            out.append(t)
    return out


def soft_runs(layout: ImageLayout, ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of soft tokens: one per image."""
    runs, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == layout.soft_token and start is None:
            start = i
        elif t != layout.soft_token and start is not None:
            runs.append((start, i))
            start = None
    return runs


def check_images(layout: ImageLayout, ids: Sequence[int], n_images: int):
    """One-line ValueError unless the (expanded) prompt holds exactly n_images whole images."""
    runs = soft_runs(layout, ids)
    if len(runs) != n_images:
        raise ValueError(f"the prompt has {len(runs)} image place(s) ({BOI_TEXT} tokens) but {n_images} "
                         f"image(s) were given; put one {BOI_TEXT} where each image goes")
    bad = [e - s for s, e in runs if e - s != layout.tokens_per_image]
    if bad:
        raise ValueError(f"an image run has {bad[0]} soft tokens, expected {layout.tokens_per_image}")


def image_inputs(layout: ImageLayout, prompt: Sequence[int], images: Sequence, encode, dim: int
                 ) -> tuple[list[int], np.ndarray]:
    """(expanded prompt ids, embeddings [T, dim]) for a prompt with one boi token per image:
    `encode(image) -> soft tokens [tokens_per_image, dim]` runs on each image (the JAX tower, or an
    artifact's vision encoder), after the image count is checked against the prompt."""
    ids = expand_image_tokens(layout, prompt)
    check_images(layout, ids, len(images))
    embeddings = np.zeros((len(ids), dim), np.float32)  # read at soft-token positions only
    for (s, e), image in zip(soft_runs(layout, ids), images):
        embeddings[s:e] = np.asarray(encode(image), np.float32).reshape(e - s, dim)
    return ids, embeddings


def chunk_bounds(layout: ImageLayout | None, ids: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """Chunk sizes covering `ids` with chunks of at most max(lengths) tokens, none splitting an
    image's soft tokens: a chunk that would end inside a run ends before it instead. Raises
    ValueError if an image cannot fit one chunk."""
    longest = max(lengths)
    runs = soft_runs(layout, ids) if layout is not None else []
    if runs and longest < layout.tokens_per_image:
        raise ValueError(f"an image's {layout.tokens_per_image} soft tokens need a prefill length of at least "
                         f"{layout.tokens_per_image} (the longest is {longest}); re-export with a longer "
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


def encode_with_images(tokenizer, text: str, layout: ImageLayout, n_images: int = 0) -> list[int]:
    """Token ids of prompt text (chat template already applied, if any) whose `<start_of_image>`
    markers become the boi token, with one BOS. The text between markers is encoded piece by
    piece, so the marker needs no piece of its own in the tokenizer. Without markers, `n_images`
    markers go first (the images lead the prompt)."""
    if n_images and BOI_TEXT not in text:
        text = BOI_TEXT * n_images + text
    ids: list[int] = []
    for i, piece in enumerate(text.split(BOI_TEXT)):
        if i:
            ids.append(layout.boi_token)
        ids += tokenizer.encode(piece, add_bos=i == 0) if piece or i == 0 else []
    return ids
