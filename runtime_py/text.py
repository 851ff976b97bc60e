"""Text in, text out over a session: the tokenizer an artifact needs, the prompt ids (chat template
for instruction-tuned models, `<start_of_image>` markers for images), the stop tokens. Shared by
`runtime_py.generate` and `python -m runtime_py generate`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from contract.prompt import BOI_TEXT, encode_with_images
from contract.tokenizer import Tokenizer


def tokenizer_for(session, artifact, tokenizer=None):
    """The given tokenizer (a path), else the one a .litertlm bundle or an ONNX folder carries;
    checked against the artifact's metadata (`check_tokenizer`)."""
    if tokenizer is not None:
        tok, name = Tokenizer(tokenizer), str(tokenizer)
    elif session.tokenizer_model is not None:  # a .litertlm bundle carries its tokenizer
        tok, name = Tokenizer.from_bytes(session.tokenizer_model), "the bundled tokenizer"
    else:
        bundled = Path(artifact or ".") / "tokenizer.model"  # so does an onnxruntime-genai folder
        if artifact is None or not bundled.exists():
            raise ValueError(f"{artifact} holds no tokenizer.model: pass a tokenizer (--tokenizer PATH)")
        tok, name = Tokenizer(bundled), str(bundled)
    check_tokenizer(tok, session.metadata, name)
    return tok


def check_tokenizer(tok, meta, name: str = "the tokenizer"):
    """Refuse a tokenizer that is not the artifact's model's, in one line naming both: more pieces
    than the model has embedding rows (ids past its table), fewer than half of them (most of the
    vocabulary unreachable: another model's tokenizer), or other BOS / EOS ids. (A model may have
    more rows than pieces: Gemma 3's image tokens.)"""
    model = f"the artifact's model ({meta.model}: {meta.vocab_size} vocabulary rows, bos {meta.bos}, eos {meta.eos})"
    pieces = tok.vocab_size
    if pieces > meta.vocab_size or pieces < meta.vocab_size // 2:
        raise ValueError(f"{name} has {pieces} pieces, which does not fit {model}: pass the tokenizer the model was "
                         "trained with (--tokenizer PATH)")
    if (tok.bos_id, tok.eos_id) != (meta.bos, meta.eos):
        raise ValueError(f"{name} has bos {tok.bos_id} and eos {tok.eos_id}, which do not match {model}: pass the "
                         "tokenizer the model was trained with (--tokenizer PATH)")


def prompt_ids(session, tok, prompt: str, n_images: int = 0, raw: bool = False, crops=None) -> list[int]:
    """Token ids of a user prompt: the chat template for instruction-tuned artifacts (unless raw),
    one BOS; with vision, `<start_of_image>` markers become the image token (images without
    markers go first). `crops`: each picture's pan-and-scan crop count (runtime_py.image.with_crops),
    whose markers become HF's phrase with one marker per view; n_images counts the pictures."""
    meta = session.metadata
    if session.vision is None:
        prompt_text(meta, tok, prompt, n_images, raw)  # the checks
        if meta.instruction_tuned and not raw:
            return tok.encode_chat([{"role": "user", "content": prompt}], family=meta.family)
        return tok.encode(prompt)
    text = prompt_text(meta, tok, prompt, n_images, raw, crops)
    return encode_with_images(tok, text, session.vision, n_images + (sum(crops) if crops and n_images else 0))


def prompt_text(meta, tok, prompt: str, n_images: int = 0, raw: bool = False, crops=None) -> str:
    """The text `prompt_ids` encodes (no BOS): the chat template for instruction-tuned artifacts
    (unless raw), pan-and-scan phrases for `crops`; what the runtimes that take text
    (LiteRT-LM, onnxruntime-genai: runtime_py/litertlm_engine.py, genai_engine.py) are given."""
    if n_images and meta.image is None:
        raise ValueError("this artifact has no vision encoder: it takes no images (export a Gemma 3 4B+ model "
                         "without --no-vision)")
    chat = meta.instruction_tuned and not raw
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], family=meta.family) if chat else prompt
    if meta.image is not None and not n_images and BOI_TEXT in text:
        raise ValueError(f"the prompt has {BOI_TEXT} but no image was given; pass one image (--image PATH) for each")
    if crops is not None and n_images:
        from runtime_py.image import crops_prompt

        text = crops_prompt(text, crops)
    return text


def stop_ids(session, tok) -> list[int]:
    meta = session.metadata
    return list(meta.stop_tokens) if meta.instruction_tuned else [meta.eos]


def stream_text(session, tok, ids: Sequence[int], max_new_tokens: int, *, images: Sequence = (), sampling=None,
                counts: list | None = None, progress=None, draft=None, draft_tokens: int | None = None,
                stats=None) -> Iterator[str]:
    """Yield the generated text piece by piece (each piece is what the new token added); the
    generated ids are appended to `counts` when given; `progress(done, total)` after each
    prefill chunk. With a `draft` session: speculative decoding (runtime_py/speculative.py; text
    only), `stats` a SpeculativeStats to fill."""
    out, printed = [] if counts is None else counts, ""
    if draft is not None:
        from runtime_py.speculative import generate_stream

        if images:
            raise ValueError("speculative decoding takes text prompts only; drop --draft to pass images")
        tokens = generate_stream(session, draft, ids, max_new_tokens, draft_tokens=draft_tokens, sampling=sampling,
                                 stop_tokens=stop_ids(session, tok), stats=stats, progress=progress)
    else:
        tokens = session.generate_stream(ids, max_new_tokens, sampling=sampling, stop_tokens=stop_ids(session, tok),
                                         images=list(images), progress=progress)
    for token in tokens:
        out.append(token)
        text = tok.decode(out)
        yield text[len(printed):]
        printed = text
