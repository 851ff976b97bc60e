"""Image preprocessing of the runtimes against ours: onnxruntime-genai's Gemma 3 processor (our
exported processor_config.json, run by onnxruntime-extensions inside onnxruntime-genai) and Hugging
Face's Gemma3ImageProcessor (Pillow backend), each against runtime_py.image.preprocess on the
same files, at the model's image size.

    python tools/bench_preprocess.py [--size 896]

Pictures (deterministic, smooth photo-like gradients with noise, so resampling matters): a PNG
smaller than the input (upscaled), a PNG larger (downscaled), a wide PNG, and a JPEG (quality 90).
Columns: max |difference| and relative RMS of the preprocessed pixels (range [-1, 1]; one uint8
level is 2/255 = 7.8e-3), and the share of values that differ at all.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pictures(folder: Path) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(5)
    out = []
    for name, (h, w) in [("up.png", (480, 640)), ("down.png", (1200, 900)), ("wide.png", (700, 2100)),
                         ("photo.jpg", (900, 1200))]:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([128 + 100 * np.sin(x / (37 + 11 * c) + y / (53 + 7 * c)) for c in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / name
        Image.fromarray(pixels).save(path, **({"quality": 90} if name.endswith(".jpg") else {}))
        out.append(path)
    return out


def genai_processor(size: int, folder: Path):
    """A function path -> pixel_values [1, 3, S, S] from onnxruntime-genai's processor with our
    processor_config.json (the tiny vision model's folder, resized to `size`)."""
    import dataclasses

    import onnxruntime_genai as og

    from export.driver import export
    from export.options import ExportOptions
    from models import get_config, init_params
    from models.vision import init_vision_params

    base = get_config("gemma3-vision-tiny")
    # the processor needs tokenizer files: the trained tiny fixture's tokenizer (768 pieces)
    tokenizer = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gemma3-tiny-trained" / "tokenizer.model"
    cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, image_size=112, tokens_per_image=256),
                              max_seq_len=640, vocab_size=768)
    params = {**init_params(cfg, 0), **init_vision_params(cfg.vision, cfg.embed_dim, 0)}
    path = export(cfg, params, "onnx", ExportOptions(out_dir=folder, max_len=640, prefill_lens=(16, 640),
                                                     verify=False, verbose=False, tokenizer=tokenizer)).path
    from export.lowering.onnx.multimodal import processor_config

    config = processor_config(dataclasses.replace(cfg.vision, image_size=size))
    (path / "processor_config.json").write_text(json.dumps(config))
    processor = og.Model(str(path)).create_multimodal_processor()
    return lambda p: processor("<start_of_image>", images=og.Images.open(str(p)))["pixel_values"].as_numpy()


def hf_processor(size: int):
    import transformers

    proc = transformers.Gemma3ImageProcessorPil(size={"height": size, "width": size}, do_pan_and_scan=False)
    from PIL import Image

    def run(p):
        with Image.open(p) as img:
            return np.asarray(proc(images=img.convert("RGB"), return_tensors="np")["pixel_values"])
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=896)
    a = ap.parse_args(argv)
    from runtime_py.image import preprocess

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = pictures(tmp)
        runners = {"onnxruntime-genai": genai_processor(a.size, tmp / "export"), "HF Gemma3ImageProcessor": hf_processor(a.size)}
        print(f"preprocessed pixels vs runtime_py.image.preprocess, {a.size} x {a.size}")
        head = f"{'runtime':>24}  {'picture':>10}  {'source':>11}  {'max abs':>9}  {'rel RMS':>9}  {'differ':>7}"
        print(head)
        print("-" * len(head))
        from PIL import Image

        for name, run in runners.items():
            for path in files:
                ours = preprocess(path, a.size).transpose(0, 3, 1, 2)
                theirs = np.asarray(run(path), np.float32).reshape(ours.shape)
                d = theirs - ours
                with Image.open(path) as img:
                    source = f"{img.width}x{img.height}"
                rel = np.sqrt((d ** 2).mean() / (ours ** 2).mean())
                print(f"{name:>24}  {path.name:>10}  {source:>11}  {np.abs(d).max():9.2e}  {rel:9.2e}  "
                      f"{(np.abs(d) > 1e-6).mean():7.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
