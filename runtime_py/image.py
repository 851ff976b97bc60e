"""Image preprocessing for the Gemma 3 vision tower: a picture -> float32 [1, S, S, 3] in [-1, 1].

`preprocess(source, image_size)` gives what `models.vision.encode_images` and
`models.generate.image_prompt` take (S = `VisionConfig.image_size`: 896 for released models, 28 or
56 for the tiny test models). The steps are those of Hugging Face's `Gemma3ImageProcessor`:

1. `load_image`: decode to uint8 RGB [H, W, 3]. Files get their EXIF orientation applied
   (`PIL.ImageOps.exif_transpose`, as a photo viewer shows them); every Pillow mode is converted with
   `convert("RGB")` (alpha is dropped, not composited), except 16-bit grayscale (`I;16*`, e.g. a
   16-bit PNG), which is scaled to 8 bits (x / 257, rounded) instead of being clipped at 255.
   Multi-frame files (GIF, TIFF) give their first frame.
2. Resize to S x S with Pillow's `Image.resize((S, S), resample=BILINEAR)`, exactly as the HF
   processor does (Pillow's bilinear widens its support when it shrinks, i.e. it is antialiased, like
   the reference `jax.image.resize(..., "bilinear", antialias=True)`). The aspect ratio is not kept:
   the picture is squashed to a square, as in HF and the reference.
3. `(x.astype(float32) * (1/255) - 0.5) / 0.5`: HF's rescale 1/255 and normalisation with mean and
   std 0.5, in float32. It maps 0 -> -1.0 and 255 -> 1.0 exactly, so the result lies in [-1, 1]
   (the reference's `(x - 127.5) / 127.5` clipped to [-1, 1] agrees to float32 rounding).

Pan-and-scan (HF's `do_pan_and_scan`, off by default as there): a picture much wider or taller than
square is also shown as 2-4 crops side by side along its long axis, each resized to S x S like a
picture of its own, so the model sees detail the squashed view loses. `pan_and_scan` computes the
crops with HF's rule (`PanAndScan` holds its three settings, HF's defaults); `with_crops` turns a
list of pictures into the views the vision tower encodes (each picture, then its crops) and
`crops_prompt` rewrites the prompt as HF's processor does: the picture's marker becomes

    "Here is the original image <start_of_image> and here are some crops to help you see better "
    + " ".join(["<start_of_image>"] * n_crops)

(a picture that gets no crops keeps its single marker). Each marker then expands to its 260
positions as usual, so one picture with 3 crops takes 4 x 260 positions plus the phrase.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N")


def _pil():
    """Pillow, imported when an image is first decoded: text generation runs without it."""
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError:
        raise ImportError("decoding images needs Pillow: pip install pillow") from None
    return Image, ImageOps, UnidentifiedImageError


def _pil_to_rgb(img: Image.Image, what: str) -> np.ndarray:
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{what}: empty image ({img.width}x{img.height}); pass a picture with pixels")
    if img.mode in _SIXTEEN_BIT_GRAY:
        wide = np.asarray(img).astype(np.uint32)
        gray = ((wide * 2 + 257) // 514).astype(np.uint8)  # round(x / 257): 65535 -> 255
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode != "RGB":
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # Pillow's advice for palette images with transparency
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"image array has dtype {arr.dtype}; pass uint8 pixels in [0, 255] "
                             "(e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1])")
        raise ValueError(f"image array has dtype {arr.dtype}; pass uint8 pixels in [0, 255] (arr.astype(np.uint8))")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[:, :, :3]
    else:
        hint = " (channels first? transpose to [H, W, C])" if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) else ""
        raise ValueError(f"image array has shape {arr.shape}{hint}; pass [H, W, 3] RGB, [H, W, 4] RGBA or [H, W] gray")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image array has shape {arr.shape}: empty; pass a picture with pixels")
    return np.ascontiguousarray(arr)


def load_image(source: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """A file path, a PIL image or a uint8 array -> uint8 RGB [H, W, 3].

    Arrays: [H, W, 3] RGB, [H, W, 4] RGBA (alpha dropped), [H, W] or [H, W, 1] gray; uint8 only.
    EXIF orientation is applied to files only: PIL images and arrays are taken as the pixels given."""
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    Image, ImageOps, UnidentifiedImageError = _pil()
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, "PIL image")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such image file")
        if not path.is_file():
            raise ValueError(f"{path}: not a file; pass the path of an image file")
        try:
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: not an image Pillow can read ({type(e).__name__}: {e}); "
                             "pass a PNG, JPEG, WebP, GIF, BMP or TIFF file") from e
        return _pil_to_rgb(img, str(path))
    raise TypeError(f"image source of type {type(source).__name__}; pass a file path, a PIL.Image or a uint8 array")


def preprocess(source: str | os.PathLike | Image.Image | np.ndarray, image_size: int) -> np.ndarray:
    """One image -> float32 [1, S, S, 3] (S = image_size), channels last, in [-1, 1] (module docstring)."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size {image_size!r}: pass a positive int (the vision config's image_size, e.g. 896)")
    s = int(image_size)
    rgb = load_image(source)
    Image = _pil()[0]
    resized = np.asarray(Image.fromarray(rgb).resize((s, s), resample=Image.Resampling.BILINEAR))
    x = (resized.astype(np.float32) * np.float32(1 / 255) - np.float32(0.5)) / np.float32(0.5)
    return x[None]


@dataclasses.dataclass(frozen=True)
class PanAndScan:
    """Pan-and-scan settings, named and defaulted as Hugging Face's Gemma3ImageProcessor's
    `pan_and_scan_*` arguments: crops are at least `min_crop_size` pixels on their short side, at
    most `max_crops` of them, and only for pictures whose long side is `min_ratio` times the short."""

    min_crop_size: int = 256
    max_crops: int = 4
    min_ratio: float = 1.2


def pan_and_scan(source, settings: PanAndScan = PanAndScan()) -> list[np.ndarray]:
    """The crops of one picture (uint8 RGB [h, w, 3] each, in reading order), or [] when it is
    too close to square or too small. HF's rule: n = round(long / short) crops along the long side
    (half up), at most long // min_crop_size, then clamped to [2, max_crops]; crops of
    ceil(long / n) pixels (the last one may be shorter); none if a crop's short side would be
    under min_crop_size."""
    if isinstance(source, np.ndarray) and source.dtype == np.float32 and source.ndim == 4:
        raise ValueError("pan-and-scan needs the original picture, not a preprocessed [1, S, S, 3] array: pass a "
                         "file path, a PIL image or a uint8 array")
    rgb = load_image(source)
    h, w = rgb.shape[:2]
    long, short = max(h, w), min(h, w)
    if long / short < settings.min_ratio:
        return []
    n = min(int(math.floor(long / short + 0.5)), long // settings.min_crop_size)
    n = min(settings.max_crops, max(2, n))
    size = int(math.ceil(long / n))
    if min(size, short) < settings.min_crop_size:
        return []
    if w >= h:
        return [np.ascontiguousarray(rgb[:, i * size:(i + 1) * size]) for i in range(n)]
    return [np.ascontiguousarray(rgb[i * size:(i + 1) * size]) for i in range(n)]


def with_crops(sources, settings: PanAndScan = PanAndScan()) -> tuple[list, list[int]]:
    """The views the vision tower encodes for pictures with pan-and-scan: each picture (as given)
    followed by its crops; and each picture's crop count (for `crops_prompt`)."""
    views, counts = [], []
    for src in sources:
        crops = pan_and_scan(src, settings)
        views += [src, *crops]
        counts.append(len(crops))
    return views, counts


def crops_prompt(text: str, counts, marker: str = "<start_of_image>") -> str:
    """`text` with the marker of each picture that has crops replaced by HF's pan-and-scan phrase
    (module docstring); `counts` from `with_crops`. A text without markers gets one per picture
    first, as `contract.prompt.encode_with_images` would place them."""
    counts = list(counts)
    if marker not in text:
        text = marker * len(counts) + text
    pieces = text.split(marker)
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"the prompt has {len(pieces) - 1} {marker} markers for {len(counts)} images; "
                         f"put one {marker} where each image goes")
    out = pieces[0]
    for n, piece in zip(counts, pieces[1:]):
        if n:
            out += (f"Here is the original image {marker} and here are some crops to help you see better "
                    + " ".join([marker] * n))
        else:
            out += marker
        out += piece
    return out


def preprocess_many(sources: Iterable[str | os.PathLike | Image.Image | np.ndarray], image_size: int) -> list[np.ndarray]:
    """`preprocess` for each source, in order: a list of float32 [1, S, S, 3] arrays."""
    return [preprocess(src, image_size) for src in sources]
