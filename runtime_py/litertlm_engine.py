"""Run a .litertlm bundle in LiteRT-LM itself (`litert_lm.Engine`, package litert-lm-api).

LiteRT-LM's Python API takes and returns text, not token ids: it tokenizes the prompt with the
bundled tokenizer (adding the start token from LlmMetadata), prefills in chunks over our
prefill_{T} signatures (right-padding the last one), decodes and detokenizes. verify/engine.py
compares its greedy text with a reference's.

Images (a vision bundle: contract/bundle.py): `generate(prompt, images, n)` runs LiteRT-LM's
Conversation API, the only one of its Python APIs that takes images, with a template that renders
the prompt text as it is (contract/bundle.RAW_TEMPLATE): each `<start_of_image>` of the text
becomes an image item, in order. LiteRT-LM then decodes each file, resizes it to the encoder's size
(stb's Catmull-Rom filter, not Pillow's bilinear: docs/litertlm.md), scales it to [0, 1] and
splices the adapter's rows after "\n\n<start_of_image>".

litert-lm-api is an optional dependency (the `litertlm` and `test` extras); `available()` says
whether it is here.
"""

from __future__ import annotations

from pathlib import Path

from contract.bundle import RAW_TEMPLATE
from contract.prompt import BOI_TEXT


def available() -> bool:
    try:
        import litert_lm  # noqa: F401
    except ImportError:
        return False
    return True


class Engine:
    """A loaded bundle in LiteRT-LM (CPU backend). LiteRT-LM writes an XNNPACK weight cache beside
    the model unless told otherwise; a check must not leave files in the user's output folder,
    so by default the cache goes to a temporary folder removed by close(). `cache_dir` keeps it
    in a folder of the caller's choosing instead, as an app does: a later Engine on the same
    file then skips repacking the weights (the first image prompt of a fresh cache pays for
    packing the vision encoder's)."""

    def __init__(self, path, threads: int | None = None, max_num_images: int = 0, benchmark: bool = False,
                 cache_dir=None):
        """`max_num_images`: images one conversation may hold (0: text only; a vision bundle then
        runs without its vision models). `benchmark`: LiteRT-LM times its prefill and decode
        (`generate(..., timings=)` returns them)."""
        import tempfile

        import litert_lm

        litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
        backend = litert_lm.Backend.CPU(thread_count=threads) if threads else litert_lm.Backend.CPU()
        self._lm = litert_lm
        self.max_num_images = int(max_num_images)
        self._cache = None if cache_dir else tempfile.TemporaryDirectory(prefix="litertlm-cache-")
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache = str(cache_dir) if cache_dir else self._cache.name
        vision = dict(vision_backend=backend, max_num_images=self.max_num_images) if self.max_num_images else {}
        extra = dict(enable_benchmark=True) if benchmark else {}
        self.engine = litert_lm.Engine(str(Path(path)), backend=backend, cache_dir=cache, **vision, **extra)

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

    def generate(self, prompt: str, images=(), max_new_tokens: int = 64, timings: dict | None = None,
                 on_token=None) -> str:
        """Greedy continuation of `prompt` (raw text, its template already applied, with one
        `<start_of_image>` where each image goes; none: the images go first) with `images` (paths
        of image files), as LiteRT-LM runs it; returns the generated text. `timings` (an engine
        made with benchmark=True) gets LiteRT-LM's own BenchmarkInfo fields. `on_token()` is
        called as each streamed piece of text arrives (the reply is then streamed, so the first
        call marks the time to the first token; benchmarks time it)."""
        content = self.message_content(prompt, images)
        lm = self._lm
        conversation = self.engine.create_conversation(
            sampler_config=lm.SamplerConfig(top_k=1, temperature=1.0), max_output_tokens=max_new_tokens,
            chat_template=RAW_TEMPLATE)
        message = {"role": "user", "content": content}
        try:
            if on_token is None:
                replies = [conversation.send_message(message)]
            else:
                replies = []
                for reply in conversation.send_message_async(message):
                    on_token()
                    replies.append(reply)
            if timings is not None:
                timings.update(vars(conversation.get_benchmark_info()))
        finally:
            conversation.close()
        return "".join(reply_text(reply) for reply in replies)

    def message_content(self, prompt: str, images=()) -> list[dict]:
        """`image_content`, refused in one line when it holds more images than the engine was
        loaded for."""
        content = image_content(prompt, images)
        n = sum(item["type"] == "image" for item in content)
        if n > self.max_num_images:
            raise ValueError(f"{n} image(s) but this engine was loaded for {self.max_num_images}; "
                             f"create it with Engine(path, max_num_images={n})")
        return content

    def conversation(self, system: str | None = None, max_new_tokens: int = 512):
        """LiteRT-LM's own multi-turn conversation (greedy) over the bundle's chat template, as an
        app on a device holds one: `say(text, images) -> text pieces`, `token_count()`, `close()`."""
        return LiteRTLMConversation(self, system, max_new_tokens)

    def close(self):
        self.engine.close()
        if self._cache is not None:
            self._cache.cleanup()


class LiteRTLMConversation:
    """A LiteRT-LM Conversation with the bundle's own template: each `say` sends one user message
    (text and images, `image_content`) and yields the reply's text as LiteRT-LM streams it."""

    def __init__(self, runner: Engine, system: str | None, max_new_tokens: int):
        lm = runner._lm
        self.runner = runner
        kw = {} if system is None else {"system_message": system}
        self.conversation = runner.engine.create_conversation(
            sampler_config=lm.SamplerConfig(top_k=1, temperature=1.0), max_output_tokens=max_new_tokens, **kw)

    def say(self, text: str, images=()):
        content = self.runner.message_content(text, images)
        for reply in self.conversation.send_message_async({"role": "user", "content": content}):
            yield reply_text(reply)

    def token_count(self) -> int:
        return int(self.conversation.token_count)  # a property of LiteRT-LM's Conversation

    def close(self):
        self.conversation.close()


def reply_text(reply: dict) -> str:
    """The text items of one LiteRT-LM reply (or streamed piece of one), joined."""
    return "".join(item.get("text", "") for item in reply["content"] if item.get("type", "text") == "text")


def image_content(prompt: str, images=()) -> list[dict]:
    """LiteRT-LM message content for prompt text with `<start_of_image>` markers: text and image
    items in order (an image item per marker; without markers the images lead). One-line
    ValueError when the markers and the images disagree."""
    images = [str(Path(p).resolve()) for p in images]
    if images and BOI_TEXT not in prompt:
        prompt = BOI_TEXT * len(images) + prompt
    pieces = prompt.split(BOI_TEXT)
    if len(pieces) - 1 != len(images):
        raise ValueError(f"the prompt has {len(pieces) - 1} {BOI_TEXT} marker(s) but {len(images)} image(s) were "
                         f"given; put one {BOI_TEXT} where each image goes")
    for p in images:
        if not Path(p).is_file():
            raise ValueError(f"image not found: {p}")
    content = []
    for i, piece in enumerate(pieces):
        if i:
            content.append({"type": "image", "path": images[i - 1]})
        if piece:
            content.append({"type": "text", "text": piece})
    return content
