"""runtime_py/image.py: Gemma 3 image preprocessing against Pillow + numpy and HF's Gemma3ImageProcessor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime_py.image import load_image, preprocess, preprocess_many


def _pixels(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mode(path) -> str:
    with Image.open(path) as img:
        return img.mode


def _by_hand(rgb: np.ndarray, s: int) -> np.ndarray:
    """Independent reference: Pillow bilinear resize, then x/255*2-1 in float64, as NHWC."""
    resized = np.asarray(Image.fromarray(rgb).resize((s, s), Image.BILINEAR), np.float64)
    return (resized / 255 * 2 - 1)[None]


@pytest.mark.parametrize("s", [28, 56, 896])
def test_shape_dtype_range(s):
    out = preprocess(_pixels(37, 53), s)
    assert out.shape == (1, s, s, 3) and out.dtype == np.float32 and out.flags.c_contiguous
    assert out.min() >= -1.0 and out.max() <= 1.0


@pytest.mark.parametrize("value", [0, 1, 51, 127, 128, 200, 254, 255])
def test_constant_colour(value):
    out = preprocess(np.full((37, 53, 3), value, np.uint8), 28)
    np.testing.assert_allclose(out, value / 255 * 2 - 1, rtol=0, atol=1e-6)
    if value in (0, 255):
        assert np.all(out == (1.0 if value else -1.0))  # the ends are exact


@pytest.mark.parametrize(("h", "w", "s"), [(37, 53, 28), (300, 200, 56), (56, 56, 56), (37, 53, 896)])
def test_matches_pillow_and_numpy(h, w, s):
    rgb = _pixels(h, w, seed=h)
    # float32 arithmetic vs float64: at most 1 ulp near 1.0
    np.testing.assert_allclose(preprocess(rgb, s), _by_hand(rgb, s), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("h", "w", "s"), [(37, 53, 28), (300, 200, 56), (1000, 700, 896)])
def test_matches_hf_gemma3_image_processor(h, w, s):
    # The PIL-backend processor by name: plain `Gemma3ImageProcessor` is the torchvision one when
    # torchvision is installed (it falls back to this class when it is not).
    transformers = pytest.importorskip("transformers")
    proc_cls = getattr(transformers, "Gemma3ImageProcessorPil", None)
    if proc_cls is None:
        pytest.skip("transformers has no Gemma3ImageProcessorPil")
    rgb = _pixels(h, w, seed=w)
    proc = proc_cls(do_pan_and_scan=False, size={"height": s, "width": s})
    hf = proc(images=Image.fromarray(rgb), return_tensors="np")["pixel_values"]
    assert hf.shape == (1, 3, s, s)
    ours = preprocess(rgb, s)
    # Same Pillow resize, so the same uint8 pixels; HF rescales in float64 and casts to float32
    # before normalising, we stay in float32: the difference is float32 rounding (measured 1.2e-7).
    assert np.abs(ours - hf.transpose(0, 2, 3, 1)).max() <= 1e-6


def test_file_pil_and_array_sources_agree(tmp_path):
    rgb = _pixels(37, 53, seed=3)
    want = preprocess(rgb, 28)

    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.random.default_rng(4).integers(0, 256, (37, 53, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for src in (tmp_path / "rgb.png", str(tmp_path / "rgb.png"), tmp_path / "rgba.png", Image.fromarray(rgb),
                Image.fromarray(rgba), rgb, rgba):
        assert np.array_equal(preprocess(src, 28), want), src

    gray = rgb[:, :, 0].copy()
    Image.fromarray(gray).save(tmp_path / "gray.png")
    want_gray = preprocess(np.repeat(gray[:, :, None], 3, axis=2), 28)
    for src in (tmp_path / "gray.png", Image.fromarray(gray), gray, gray[:, :, None]):
        assert np.array_equal(preprocess(src, 28), want_gray), src
    assert _mode(tmp_path / "gray.png") == "L"

    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "pal.png")
    assert _mode(tmp_path / "pal.png") == "P"
    want_pal = preprocess(np.asarray(pal.convert("RGB")), 28)
    for src in (tmp_path / "pal.png", pal):
        assert np.array_equal(preprocess(src, 28), want_pal), src

    many = preprocess_many([rgb, tmp_path / "gray.png"], 28)
    assert len(many) == 2 and np.array_equal(many[0], want) and np.array_equal(many[1], want_gray)


def test_load_image_modes(tmp_path):
    rgb = _pixels(5, 7)
    loaded = load_image(rgb)
    assert loaded.dtype == np.uint8 and loaded.shape == (5, 7, 3) and np.array_equal(loaded, rgb)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert np.array_equal(load_image(cmyk), np.asarray(cmyk.convert("RGB")))
    # 16-bit grayscale PNG: scaled to 8 bits (x / 257, rounded), not clipped at 255
    wide = np.array([[0, 256, 257, 385, 386, 40000, 65535]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "g16.png")
    assert _mode(tmp_path / "g16.png") == "I;16"
    assert load_image(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 1, 1, 1, 2, 156, 255]


def _with_orientation(img: Image.Image, orientation: int) -> Image.Exif:
    exif = img.getexif()
    exif[0x0112] = orientation  # Orientation
    return exif


def test_exif_orientation_applied_to_files(tmp_path):
    rgb = _pixels(4, 6)  # stored 4 tall, 6 wide
    img = Image.fromarray(rgb)
    img.save(tmp_path / "rot.png", exif=_with_orientation(img, 6))  # 6: display rotated 90 degrees clockwise
    loaded = load_image(tmp_path / "rot.png")
    assert loaded.shape == (6, 4, 3)
    assert np.array_equal(loaded, np.rot90(rgb, k=-1))

    img.save(tmp_path / "rot.jpg", exif=_with_orientation(img, 6), quality=100)
    assert load_image(tmp_path / "rot.jpg").shape == (6, 4, 3)

    img.save(tmp_path / "plain.png")
    assert np.array_equal(load_image(tmp_path / "plain.png"), rgb)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        preprocess(tmp_path / "missing.png", 28)
    (tmp_path / "notes.txt").write_text("not pixels\n")
    with pytest.raises(ValueError, match="not an image"):
        preprocess(tmp_path / "notes.txt", 28)
    with pytest.raises(ValueError, match="not a file"):
        preprocess(tmp_path, 28)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.random.default_rng(0).random((8, 8, 3)), 28)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), np.int64), 28)
    with pytest.raises(ValueError, match="channels first"):
        preprocess(np.zeros((3, 8, 8), np.uint8), 28)
    with pytest.raises(ValueError, match="shape"):
        preprocess(np.zeros((8, 8, 2), np.uint8), 28)
    with pytest.raises(ValueError, match="empty"):
        preprocess(np.zeros((0, 8, 3), np.uint8), 28)
    with pytest.raises(ValueError, match="image_size"):
        preprocess(_pixels(8, 8), 0)
    with pytest.raises(TypeError, match="file path"):
        preprocess([[1, 2, 3]], 28)


@pytest.mark.parametrize(("h", "w", "n"), [(300, 1000, 3), (1000, 300, 3), (500, 560, 0), (300, 700, 2),
                                           (260, 2000, 4), (200, 600, 0)])
def test_pan_and_scan_matches_hf(h, w, n):
    """Crops (count, pixels after preprocessing) equal Hugging Face's Gemma3ImageProcessor with
    do_pan_and_scan on wide, tall, near-square, small and very wide pictures (HF's defaults)."""
    from runtime_py.image import PanAndScan, pan_and_scan, with_crops

    transformers = pytest.importorskip("transformers")
    proc_cls = getattr(transformers, "Gemma3ImageProcessorPil", None)
    if proc_cls is None:
        pytest.skip("transformers has no Gemma3ImageProcessorPil")
    rgb = _pixels(h, w, seed=h + w)
    s = 56
    defaults = transformers.Gemma3Processor.images_kwargs
    settings = PanAndScan()
    assert (settings.min_crop_size, settings.max_crops, settings.min_ratio) == (
        defaults["pan_and_scan_min_crop_size"], defaults["pan_and_scan_max_num_crops"],
        defaults["pan_and_scan_min_ratio_to_activate"])
    hf = proc_cls(do_pan_and_scan=True, size={"height": s, "width": s}, **{
        k: v for k, v in defaults.items() if k.startswith("pan_and_scan_")})(images=Image.fromarray(rgb), return_tensors="np")
    views, counts = with_crops([rgb])
    assert counts == [int(hf["num_crops"][0])] == [len(pan_and_scan(rgb))]
    assert len(views) == 1 + counts[0] == hf["pixel_values"].shape[0]
    ours = np.concatenate(preprocess_many(views, s))
    assert np.abs(ours - hf["pixel_values"].transpose(0, 2, 3, 1)).max() <= 1e-6
    assert counts == [n]  # none for near-square pictures, nor where a crop would be under 256 pixels


def test_pan_and_scan_prompt_matches_hf_phrase():
    """The marker of a cropped picture becomes HF's phrase (Gemma3Processor.replace_image_token,
    with the marker standing for HF's expanded image sequence); uncropped pictures keep theirs;
    a prompt without markers gets them first; a count mismatch is one line."""
    from runtime_py.image import crops_prompt

    transformers = pytest.importorskip("transformers")
    proc = transformers.Gemma3Processor.__new__(transformers.Gemma3Processor)
    proc.full_image_sequence = "<start_of_image>"
    phrase = proc.replace_image_token({"num_crops": [3, 0]}, 0)
    assert crops_prompt("A <start_of_image> B <start_of_image> C", [3, 0]) == f"A {phrase} B <start_of_image> C"
    assert crops_prompt("What is it?", [2]) == proc.replace_image_token({"num_crops": [2]}, 0) + "What is it?"
    assert crops_prompt("x <start_of_image>", [0]) == "x <start_of_image>"
    with pytest.raises(ValueError, match="1 <start_of_image> markers for 2 images"):
        crops_prompt("x <start_of_image>", [0, 2])


def test_pan_and_scan_refuses_preprocessed_arrays():
    from runtime_py.image import pan_and_scan

    with pytest.raises(ValueError, match="original picture"):
        pan_and_scan(preprocess(_pixels(30, 90), 28))
