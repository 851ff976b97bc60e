"""Load exported artifacts, run prefill/decode with static caches, generate, check parity.

  session = runtime_py.load("artifacts/gemma3-270m.tflite")
  ids = session.generate(prompt_ids, max_new_tokens=32)
"""

from __future__ import annotations

from pathlib import Path

from runtime_py.session import ContextFullError, Session


def load(path, num_threads: int | None = None) -> Session:
    """A session for an artifact: `.tflite` (more formats come with their exporters)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact not found: {path}")
    if path.suffix == ".tflite":
        from runtime_py.tflite_backend import load_tflite

        return load_tflite(path, num_threads)
    raise ValueError(f"{path}: unknown artifact type '{path.suffix}' (supported: .tflite)")


__all__ = ["ContextFullError", "Session", "load"]
