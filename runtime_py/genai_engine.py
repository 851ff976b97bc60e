"""Run an ONNX folder in onnxruntime-genai itself (`onnxruntime_genai`, package onnxruntime-genai),
text and images, as an application would: its tokenizer, its Gemma 3 multimodal processor (image
decoding, resizing and the expansion of each `<start_of_image>` into the image's tokens), its
generator. `python -m runtime_py generate --engine genai` and the tests use it to show the same
answer from onnxruntime-genai as from runtime_py.

onnxruntime-genai is an optional dependency (the `genai` and `test` extras). Its tokenizer adds no BOS: prompts get `<bos>` in front unless they start with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class Engine:
    """An ONNX folder loaded by onnxruntime-genai (CPU)."""

    def __init__(self, folder, threads: int | None = None):
        import onnxruntime_genai as og

        folder = Path(folder)
        if not (folder / "genai_config.json").exists():
            raise ValueError(f"{folder} is not an onnxruntime-genai folder (no genai_config.json): pass the folder "
                             "python -m export --target onnx wrote (an export with --kv-cache int8 has none: "
                             "onnxruntime-genai cannot feed its int8 caches; run it with runtime_py)")
        self._og = og
        self._config = json.loads((folder / "genai_config.json").read_text())
        config = og.Config(str(folder))
        if threads:  # every graph's session options (decoder, embedding, vision)
            options = {"session_options": {"intra_op_num_threads": int(threads)}}
            config.overlay(json.dumps({"model": {k: options for k in ("decoder", "embedding", "vision")
                                                 if k in self._config["model"]}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.folder = folder
        self._processor = None

    @property
    def multimodal(self) -> bool:
        return "vision" in self._config["model"]

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def _inputs(self, prompt: str, images: Sequence):
        og = self._og
        if not prompt.startswith("<bos>"):
            prompt = "<bos>" + prompt
        if not images:
            return None, prompt
        if not self.multimodal:
            raise ValueError(f"{self.folder} has no vision graphs: it takes no images (export a Gemma 3 4B+ model "
                             "without --no-vision)")
        missing = [str(p) for p in images if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: no such image file")
        if self._processor is None:
            self._processor = self.model.create_multimodal_processor()
        return self._processor(prompt, images=og.Images.open(*[str(p) for p in images])), prompt

    def generate(self, prompt: str, images: Sequence = (), max_new_tokens: int = 64,
                 logits: list | None = None, on_token=None) -> list[int]:
        """Greedy tokens after `prompt` (text with one `<start_of_image>` per image, the chat
        template already applied if wanted) and the image files, until a stop token or
        max_new_tokens; each step's logits are appended to `logits` when given, and `on_token()`
        is called as each token comes (benchmarks time them)."""
        og = self._og
        inputs, prompt = self._inputs(prompt, images)
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=self._config["search"]["max_length"])
        generator = og.Generator(self.model, params)
        if inputs is not None:
            generator.set_inputs(inputs)
        else:
            generator.append_tokens(np.array(self.tokenize(prompt), np.int32))
        out: list[int] = []
        while not generator.is_done() and len(out) < max_new_tokens:
            generator.generate_next_token()
            if logits is not None:
                logits.append(np.array(generator.get_output("logits"), np.float32).reshape(-1).copy())
            out.append(int(generator.get_next_tokens()[0]))
            if on_token is not None:
                on_token()
        return out

    def prompt_tokens(self, prompt: str, images: Sequence = ()) -> list[int]:
        """The ids onnxruntime-genai feeds for `prompt` and its images (each image expanded)."""
        og = self._og
        inputs, prompt = self._inputs(prompt, images)
        if inputs is None:
            return self.tokenize(prompt)
        params = og.GeneratorParams(self.model)
        generator = og.Generator(self.model, params)
        generator.set_inputs(inputs)
        return [int(t) for t in np.array(generator.get_input("input_ids")).reshape(-1)]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(np.array(tokens, np.int32))
