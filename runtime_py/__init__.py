"""Load exported artifacts, run prefill/decode with static caches, generate.

  session = runtime_py.load("artifacts/gemma3-270m_f32_ctx4096.tflite")
  ids = session.generate(prompt_ids, max_new_tokens=32)            # ids in, ids out (images=[...])
  text = runtime_py.generate("artifact.litertlm", "Hi", images=["cat.jpg"])   # text in, text out

Runs without JAX or any converter: it imports the artifact contract (contract/), numpy,
sentencepiece, Pillow and the runtime it runs (ai-edge-litert, onnxruntime; litert-lm-api for
LiteRT-LM itself). Parity against the JAX model is the `verify` package's.
"""

from __future__ import annotations

from pathlib import Path

from runtime_py.session import ContextFullError, Session


def load(path, num_threads: int | None = None, tflite_api: str = "compiled") -> Session:
    """A session for an artifact: a `.tflite` file, a `.litertlm` bundle (its TFLite model, run by
    LiteRT from Python; `session.tokenizer_model` holds the bundled tokenizer), a `.onnx` file, or
    an onnxruntime-genai folder (holding model.onnx and genai_config.json). `tflite_api`:
    "compiled" (LiteRT's CompiledModel with an XNNPACK weight cache) or "interpreter"
    (runtime_py/tflite_backend.py)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact not found: {path}")
    if path.suffix in (".tflite", ".litertlm"):
        from runtime_py.tflite_backend import load_tflite

        session = load_tflite(path, num_threads, api=tflite_api)
    elif path.suffix == ".onnx" or (path.is_dir() and any(path.glob("*.onnx"))):
        from runtime_py.onnx_backend import load_onnx

        session = load_onnx(path, num_threads)
    else:
        session = None
    if session is not None:
        session.path = path
        return session
    raise ValueError(f"{path}: unknown artifact type (supported: .tflite, .litertlm, .onnx, an "
                     "onnxruntime-genai folder)")


def generate(artifact, prompt: str, *, images=(), tokenizer=None, max_new_tokens: int = 64, sampling=None,
             raw: bool = False, pan_and_scan=False) -> str:
    """Text in, text out: load `artifact` (a path, or a Session already loaded), encode the prompt
    (the chat template for instruction-tuned models unless raw; one `<start_of_image>` per image,
    or the images first), generate, decode. images: paths, PIL images, uint8 arrays or
    preprocessed float32 [1, S, S, 3] arrays (Gemma 3 with vision). tokenizer: a path; default the
    one a .litertlm bundle or an ONNX folder carries. pan_and_scan: True (HF's default settings)
    or a runtime_py.image.PanAndScan: wide and tall pictures are also shown as crops, as HF's
    `do_pan_and_scan` does (runtime_py/image.py)."""
    from runtime_py.text import prompt_ids, stream_text, tokenizer_for

    session = artifact if isinstance(artifact, Session) else load(artifact)
    tok = tokenizer_for(session, getattr(session, "path", artifact), tokenizer)
    crops = None
    if pan_and_scan and images:
        from runtime_py.image import PanAndScan, with_crops

        n_pictures = len(images)
        images, crops = with_crops(images, PanAndScan() if pan_and_scan is True else pan_and_scan)
        ids = prompt_ids(session, tok, prompt, n_pictures, raw, crops=crops)
    else:
        ids = prompt_ids(session, tok, prompt, len(images), raw)
    return "".join(stream_text(session, tok, ids, max_new_tokens, images=images, sampling=sampling))


__all__ = ["ContextFullError", "Session", "generate", "load"]
