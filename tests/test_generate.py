"""Reference generation: greedy, seeded sampling, top-k/top-p, stop tokens, batching, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_tokens
from models import GREEDY, Sampling, generate, get_config, init_params, sample


@pytest.fixture(scope="module")
def model():
    cfg = get_config("gemma3-tiny")
    return cfg, init_params(cfg, seed=2)


def prompt(n, seed=0):
    return [2] + random_tokens(n - 1, seed=seed)[0].tolist()


def test_batch_of_different_lengths_equals_one_by_one(model):
    cfg, params = model
    prompts = [prompt(5, 1), prompt(13, 2), prompt(9, 3)]
    together = generate(params, cfg, prompts, 12, stop_tokens=())
    for p, out in zip(prompts, together.tokens):
        assert generate(params, cfg, [p], 12, stop_tokens=()).tokens[0] == out


def test_chunked_prefill_gives_the_same_tokens(model):
    cfg, params = model
    p = prompt(19, 4)
    whole = generate(params, cfg, [p], 10, stop_tokens=()).tokens
    assert generate(params, cfg, [p], 10, stop_tokens=(), prefill_chunk=4).tokens == whole


def test_seeded_sampling_is_reproducible(model):
    cfg, params = model
    p = [prompt(6, 5)]
    hot = Sampling(temperature=1.5, seed=7)
    a = generate(params, cfg, p, 16, sampling=hot, stop_tokens=()).tokens
    assert generate(params, cfg, p, 16, sampling=hot, stop_tokens=()).tokens == a
    other = Sampling(temperature=1.5, seed=8)
    assert generate(params, cfg, p, 16, sampling=other, stop_tokens=()).tokens != a
    assert generate(params, cfg, p, 16, stop_tokens=()).tokens != a  # greedy differs at 1.5


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    cfg, params = model
    p = [prompt(7, 6)]
    greedy = generate(params, cfg, p, 12, sampling=GREEDY, stop_tokens=()).tokens
    for s in (Sampling(temperature=2.0, top_k=1, seed=1), Sampling(temperature=2.0, top_p=1e-6, seed=1)):
        assert generate(params, cfg, p, 12, sampling=s, stop_tokens=()).tokens == greedy


def test_sample_respects_top_k_top_p_and_vocab_limit():
    logits = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.15, 0.1]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draw = lambda s, limit=None: {int(sample(logits, k, s, limit)[0]) for k in keys}  # noqa: E731
    assert draw(Sampling(temperature=1.0, top_k=2)) == {1, 2}
    assert draw(Sampling(temperature=1.0, top_p=0.8)) == {1, 2, 3}  # 0.4 + 0.3 < 0.8 <= 0.85
    assert draw(Sampling(temperature=1.0)) == {0, 1, 2, 3, 4}
    assert draw(Sampling(temperature=1.0), limit=3) == {0, 1, 2}
    assert int(sample(logits, keys[0], GREEDY, 1)[0]) == 0


def test_stop_tokens_end_a_row(model):
    cfg, params = model
    p = [prompt(8, 7)]
    free = generate(params, cfg, p, 10, stop_tokens=()).tokens[0]
    stop_at = free[3]
    first = free.index(stop_at)
    out = generate(params, cfg, p, 10, stop_tokens=(stop_at,))
    assert out.tokens[0] == free[:first] and out.stopped == [True]
    assert generate(params, cfg, p, 10, stop_tokens=()).stopped == [False]


def test_context_overflow_is_a_clear_error(model):
    cfg, params = model
    with pytest.raises(ValueError, match="prompt of 20 tokens \\+ 20 new tokens exceeds the context of 32"):
        generate(params, cfg, [prompt(20)], 20, max_len=32)
    with pytest.raises(ValueError, match="at least one token"):
        generate(params, cfg, [[]], 4)


def test_generation_fills_the_context_exactly(model):
    cfg, params = model
    out = generate(params, cfg, [prompt(20, 9)], 12, max_len=32, stop_tokens=())
    assert len(out.tokens[0]) == 12
    np.testing.assert_equal(out.stopped, [False])
