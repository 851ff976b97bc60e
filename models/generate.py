"""Reference generation in JAX: chunked prefill into static caches, then one-token decode steps.

Shapes follow the legend in models/__init__.py.

Sampling: greedy (temperature 0), or temperature with optional top-k and top-p, reproducible from
a seed. Prompts of different lengths share a batch: each row is right-padded and decodes at its
own position, so no row ever sees padding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from contract.sampling import GREEDY, Sampling
from models.cache import init_cache
from models.config import ModelConfig
from models.model import activation_dtype, forward


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, without the stop token
    stopped: list[bool]  # True where a stop token ended the row (else max_new_tokens did)


@functools.partial(jax.jit, static_argnums=(1,))
def _forward(params, cfg, tokens, start, cache, num_valid, embeddings=None):
    return forward(params, cfg, tokens, start, cache, num_valid, embeddings=embeddings)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _encode(params, vcfg, text_dim, images):
    from models.vision import encode_images

    return encode_images(params, vcfg, text_dim, images)


def image_prompt(params: dict, cfg: ModelConfig, prompt: Sequence[int], images) -> tuple[list[int], np.ndarray]:
    """(expanded prompt ids, embeddings [T, E]) for a prompt with one `<start_of_image>` token
    (cfg.vision.boi_token) per image; images: preprocessed [image_size, image_size, 3] or
    [1, image_size, image_size, 3] arrays (runtime_py.image.preprocess), in prompt order.
    contract/prompt.py has the layout."""
    from contract.prompt import image_inputs

    if cfg.vision is None:
        raise ValueError(f"{cfg.name} has no vision tower: it takes no images")
    s = cfg.vision.image_size

    def encode(image):
        pixels = jnp.asarray(np.asarray(image, np.float32).reshape(1, s, s, 3))
        return np.asarray(_encode(params, cfg.vision, cfg.embed_dim, pixels))[0]

    return image_inputs(cfg.vision, prompt, images, encode, cfg.embed_dim)


def sample(logits, key, sampling: Sampling, vocab_limit: int | None = None):
    """logits [B, V] -> token ids [B]. Rows past vocab_limit (placeholder rows) are never picked."""
    logits = logits.astype(jnp.float32)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[:, :vocab_limit]
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        sorted_logits = jnp.where(before < sampling.top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(
            sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(params: dict, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, sampling: Sampling = GREEDY, stop_tokens: Sequence[int] | None = None,
             max_len: int | None = None, prefill_chunk: int | None = None,
             images: Sequence[Sequence] | None = None) -> Generation:
    """Generate up to `max_new_tokens` after each prompt (lists of token ids, BOS included).

    max_len: the context (global cache length); default the config's max_seq_len. A prompt plus
    max_new_tokens beyond it is an error. prefill_chunk: prefill in chunks of this many tokens
    (default: the whole prompt at once). stop_tokens default to the config's (EOS, and
    <end_of_turn> for instruction-tuned models). images (Gemma 3 with vision): per prompt, the
    preprocessed images its `<start_of_image>` tokens stand for (see `image_prompt`); the prompt is
    prefilled in one chunk (a chunk must hold an image's soft tokens whole).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    max_len = cfg.max_seq_len if max_len is None else max_len
    embeds = None
    if images is not None and any(len(i) for i in images):
        if len(images) != len(prompts):
            raise ValueError(f"images: one list per prompt ({len(prompts)}), got {len(images)}")
        if prefill_chunk is not None:
            raise ValueError("prefill_chunk with images: the JAX reference prefills an image prompt in one chunk")
        pairs = [image_prompt(params, cfg, p, ims) for p, ims in zip(prompts, images)]
        prompts = [ids for ids, _ in pairs]
        embeds = [e for _, e in pairs]
    lengths = np.array([len(p) for p in prompts], np.int32)
    longest = int(lengths.max())
    if longest + max_new_tokens > max_len:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context of "
            f"{max_len}; shorten the prompt, lower max_new_tokens or raise max_len"
        )
    if stop_tokens is None:
        stop_tokens = cfg.tokens.stop_ids() if cfg.instruction_tuned else (cfg.tokens.eos,)
    stop = np.array(sorted(set(stop_tokens)), np.int32)
    batch = len(prompts)
    params = jax.device_put(params)  # once: numpy arguments would be copied on every step
    cache = init_cache(cfg, batch, min(max_len, longest + max_new_tokens), activation_dtype(params))

    # prefill: right-padded chunks; each row keeps the logits of its last prompt token
    chunk = longest if prefill_chunk is None else prefill_chunk
    padded = np.zeros((batch, -(-longest // chunk) * chunk), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    if embeds is not None:
        embeddings = np.zeros((*padded.shape, cfg.embed_dim), np.float32)
        for i, e in enumerate(embeds):
            embeddings[i, : len(e)] = e
        embeds = jnp.asarray(embeddings)
    last_logits = np.zeros((batch, cfg.vocab_size), np.float32)
    for s in range(0, longest, chunk):
        valid = np.clip(lengths - s, 0, chunk)
        logits, cache = _forward(params, cfg, jnp.asarray(padded[:, s:s + chunk]),
                                 jnp.full((batch,), s, jnp.int32), cache, jnp.asarray(valid),
                                 None if embeds is None else embeds[:, s:s + chunk])
        ends = (lengths > s) & (lengths <= s + chunk)
        if ends.any():  # copy back only the rows of last prompt tokens, not [B, T, V]
            at = logits[jnp.arange(batch), jnp.asarray(np.clip(lengths - 1 - s, 0, chunk - 1))]
            last_logits[ends] = np.asarray(at)[ends]

    key = jax.random.PRNGKey(sampling.seed)
    out = [[] for _ in prompts]
    done = np.zeros(batch, bool)
    stopped = np.zeros(batch, bool)
    pos = lengths.copy()
    logits = jnp.asarray(last_logits)
    for step in range(max_new_tokens):
        token = np.asarray(sample(logits, jax.random.fold_in(key, step), sampling, cfg.sample_vocab_size))
        hit = np.isin(token, stop) & ~done
        for i in np.flatnonzero(~done & ~hit):
            out[i].append(int(token[i]))
        stopped |= hit
        done |= hit
        if done.all() or step == max_new_tokens - 1:
            break
        step_logits, cache = _forward(params, cfg, jnp.asarray(token[:, None]), jnp.asarray(pos), cache,
                                      jnp.ones((batch,), jnp.int32))
        logits = step_logits[:, 0]
        pos = pos + 1
    return Generation(tokens=out, stopped=stopped.tolist())

