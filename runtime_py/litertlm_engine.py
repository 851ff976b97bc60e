"""Run a .litertlm bundle in LiteRT-LM itself (`litert_lm.Engine`, package litert-lm-api).

LiteRT-LM's Python API takes and returns text, not token ids: it tokenizes the prompt with the
bundled tokenizer (adding the start token from LlmMetadata), prefills in chunks over our
prefill_{T} signatures (right-padding the last one), decodes and detokenizes. verify/engine.py
compares its greedy text with a reference's.

litert-lm-api is an optional dependency (the `litertlm` and `test` extras); `available()` says
whether it is here.
"""

from __future__ import annotations

from pathlib import Path


def available() -> bool:
    try:
        import litert_lm  # noqa: F401
    except ImportError:
        return False
    return True


class Engine:
    """A loaded bundle in LiteRT-LM (CPU backend). LiteRT-LM writes an XNNPACK weight cache beside
    the model unless told otherwise; a check must not leave files in the user's output folder,
    so the cache goes to a temporary folder removed by close()."""

    def __init__(self, path, threads: int | None = None):
        import tempfile

        import litert_lm

        litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
        backend = litert_lm.Backend.CPU(thread_count=threads) if threads else litert_lm.Backend.CPU()
        self._lm = litert_lm
        self._cache = tempfile.TemporaryDirectory(prefix="litertlm-cache-")
        self.engine = litert_lm.Engine(str(Path(path)), backend=backend, cache_dir=self._cache.name)

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def greedy(self, prompt: str, max_new_tokens: int) -> str:
        """Greedy continuation of `prompt`, raw text (no prompt template)."""
        lm = self._lm
        session = self.engine.create_session(apply_prompt_template=False, max_output_tokens=max_new_tokens,
                                             sampler_config=lm.SamplerConfig(top_k=1, temperature=1.0))
        try:
            session.run_prefill([prompt])
            return "".join(session.run_decode().texts)
        finally:
            session.close()

    def close(self):
        self.engine.close()
        self._cache.cleanup()
