"""Speculative decoding (runtime_py/speculative.py): verify_{K} signatures, rewindable caches, and
generation that is plain greedy decoding's token for token whatever the draft proposes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY
from contract.sampling import Sampling
from export.cli import main as export_main
from models import get_config, init_params
from runtime_py import load
from runtime_py.session import FeedBackend, Session
from runtime_py.speculative import SpeculativeStats, accept_or_replace, check_pair, generate
from verify.reference import reference_session

MAX_LEN = 128
K = 3  # draft tokens: verify_4
FAMILIES = ("gemma2", "gemma3")


def _export(out, model, seed, *extra):
    args = ["--model", model, "--random-init", str(seed), "--out", str(out), "--max-seq-len", str(MAX_LEN),
            "--prefill-lens", "16", "--speculative", str(K), "--verify-steps", "16", *extra]
    assert export_main(args) == 0
    return out / f"{model}_f32_spec{K}_ctx{MAX_LEN}.tflite"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Per family: (target artifact, gated; draft artifact with other weights, not gated)."""
    made = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(f"spec-{family}")
        target = _export(out / "target", TINY[family], 0)
        draft = _export(out / "draft", TINY[family], 1, "--no-verify")
        made[family] = (target, draft)
    return made


def _prompt(n=20, seed=0):
    return [2] + [int(t) for t in np.random.default_rng(seed).integers(3, 256, n - 1)]


def constant_draft(target: Session, token: int) -> Session:
    """A draft that always proposes `token` (its logits are one-hot there), over the target's
    signatures and metadata: it disagrees with the target almost always."""
    def run(name, feed):
        sig = target.signatures[name]
        logits = np.full(sig.output("logits").shape, -10.0, np.float32)
        logits[..., token] = 10.0
        return {"logits": logits, **{n: feed[n] for n in sig.states}}

    return Session(FeedBackend(target.signatures, run), target.metadata)


def test_gate_checks_the_verify_signature_and_the_rewind(pairs):
    target, _ = pairs["gemma3"]
    report = json.loads(target.with_suffix(".parity.json").read_text())
    assert report["passed"]
    names = [s["signature"] for s in report["steps"]]
    assert names.count(f"verify_{K + 1}") == 2 * (K + 1) and names.count("decode after rewind") == 2
    window = get_config(TINY["gemma3"]).sliding_window
    assert min(s["position"] for s in report["steps"] if s["signature"] == "decode after rewind") > window


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_rows_equal_the_decode_path(pairs, family):
    session = load(pairs[family][0])
    assert session.verify_lengths == [K + 1] and session.max_rewind == K
    prompt = _prompt(40)  # past the window: the rings have wrapped
    tokens = [7, 19, 23, 42]
    session.prefill(prompt)
    rows = session.verify(tokens)
    assert rows.shape == (K + 1, 256) and session.position == len(prompt) + K + 1
    session.reset()
    session.prefill(prompt)
    for row, token in zip(rows, tokens):
        expect = session.decode(token)
        assert np.abs(row - expect).max() <= 1e-5 * np.abs(expect).max()
    # fewer tokens than the signature takes: padded, the real rows only
    session.reset()
    session.prefill(prompt)
    two = session.verify(tokens[:2])
    assert two.shape == (2, 256) and np.allclose(two, rows[:2], rtol=0, atol=1e-5 * np.abs(rows).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculative_is_plain_greedy(pairs, family):
    target_path, draft_path = pairs[family]
    target, other, same = load(target_path), load(draft_path), load(target_path)
    prompt = _prompt()
    plain = target.generate(prompt, 90)
    constant = constant_draft(target, plain[0] ^ 1)
    rates = {}
    for name, draft in (("other weights", other), ("constant", constant), ("same model", same)):
        stats = SpeculativeStats()
        out = generate(target, draft, prompt, 90, stats=stats)
        assert out == plain, name
        rates[name] = stats.acceptance_rate
        assert stats.emitted == 90
    assert rates["other weights"] < 0.5  # the draft disagrees often ...
    assert rates["constant"] < 0.1  # ... or always
    assert rates["same model"] == 1.0  # every token kept: K + 1 per target call
    # with fewer draft tokens per step, and a stop token
    assert generate(target, other, prompt, 90, draft_tokens=1) == plain
    stop = plain[30]
    assert generate(target, other, prompt, 90, stop_tokens=[stop]) == plain[:plain.index(stop)]


def test_rewind_needs_the_extra_ring_rows(monkeypatch):
    """Without the K extra rows per local ring, a rewound sequence reads rows the rejected tokens
    overwrote: the next logits change. With them they are exact."""
    from models.config import LayerKind, ModelConfig

    cfg = get_config(TINY["gemma3"])
    params = init_params(cfg, 0)
    prompt = _prompt(40)

    def after_rewind(c) -> tuple[np.ndarray, np.ndarray]:
        import dataclasses

        session = reference_session(dataclasses.replace(c, rewind=K), params, [16], MAX_LEN)
        session.prefill(prompt)
        start = session.position
        session.verify([5, 6, 7, 8])  # three "rejected" tokens after the first
        session.position = start + 1
        rewound = session.decode(9)
        session.reset()
        session.prefill(prompt)
        session.decode(5)
        return rewound, session.decode(9)

    rewound, fresh = after_rewind(cfg)
    assert np.abs(rewound - fresh).max() <= 1e-5 * np.abs(fresh).max()
    original = ModelConfig.cache_len
    monkeypatch.setattr(ModelConfig, "cache_len", lambda self, kind, max_len: original(self, kind, max_len) - (
        self.rewind if kind is LayerKind.LOCAL else 0))
    rewound, fresh = after_rewind(cfg)
    assert np.abs(rewound - fresh).max() > 1e-3 * np.abs(fresh).max()


def test_rejection_rule_keeps_the_target_distribution():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = np.array([0.05, 0.1, 0.4, 0.05, 0.2, 0.2])
    n = 40000
    counts = np.zeros(p.size)
    for _ in range(n):
        token = int(rng.choice(q.size, p=q))
        replaced = accept_or_replace(p, q, token, rng)
        counts[token if replaced is None else replaced] += 1
    assert np.abs(counts / n - p).max() < 0.01
    assert counts[5] == 0  # a token the target never picks never comes out


def test_sampled_speculative_follows_the_sampling(pairs):
    target_path, draft_path = pairs["gemma2"]
    target, draft = load(target_path), load(draft_path)
    prompt = _prompt()
    top1 = Sampling(temperature=1.0, top_k=1, seed=3)  # one candidate: sampling is greedy
    assert generate(target, draft, prompt, 40, sampling=top1) == target.generate(prompt, 40)
    stats = SpeculativeStats()
    out = generate(target, draft, prompt, 40, sampling=Sampling(temperature=1.0, seed=3), stats=stats)
    assert len(out) == 40 and 0 < stats.accepted < stats.drafted
    assert generate(target, draft, prompt, 40, sampling=Sampling(temperature=1.0, seed=3)) == out  # seeded


def test_pairs_that_cannot_work_are_refused(pairs, tmp_path):
    target_path, draft_path = pairs["gemma3"]
    target, draft = load(target_path), load(draft_path)
    with pytest.raises(ValueError, match="session of its own"):
        check_pair(target, target)
    with pytest.raises(ValueError, match="checks 1 to 3 draft tokens"):
        check_pair(target, draft, 4)
    plain = tmp_path / "plain"
    assert export_main(["--model", TINY["gemma3"], "--random-init", "0", "--out", str(plain), "--max-seq-len",
                        str(MAX_LEN), "--prefill-lens", "16", "--no-verify"]) == 0
    plain_session = load(plain / f"{TINY['gemma3']}_f32_ctx{MAX_LEN}.tflite")
    with pytest.raises(ValueError, match="no verify signature"):
        check_pair(plain_session, draft)
    with pytest.raises(ValueError, match="export the draft with --speculative 3"):
        check_pair(target, plain_session)
    with pytest.raises(ValueError, match="--speculative"):
        plain_session.verify([1, 2])


@pytest.mark.parametrize("model,target,match", [
    (TINY["gemma3"], "onnx", "--speculative is TFLite's"),
    (TINY["recurrentgemma"], "tflite", "recurrent state cannot be rewound"),
])
def test_export_refuses_what_cannot_rewind(tmp_path, capsys, model, target, match):
    rc = export_main(["--model", model, "--random-init", "0", "--target", target, "--out", str(tmp_path),
                      "--speculative", "3"])
    assert rc == 2 and match in capsys.readouterr().err


def test_generate_cli_with_a_draft(pairs, tokenizer_256, capsys):
    from runtime_py.__main__ import main as run_main

    target_path, draft_path = pairs["gemma3"]
    args = ["generate", "--artifact", str(target_path), "--tokenizer", str(tokenizer_256), "--prompt", "the cat",
            "--max-new-tokens", "12", "--raw"]
    assert run_main(args) == 0
    plain = capsys.readouterr().out
    assert run_main(args + ["--draft", str(draft_path), "--draft-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "accepted" in captured.err


def test_a_speculative_bundle_runs_in_litert_lm(tmp_path, tokenizer_256):
    """LiteRT-LM runs the bundle (it ignores verify_{K}; the longer rings are its states) and the
    gate's engine check finds its greedy text identical to the JAX model's."""
    model = TINY["gemma3"]
    assert export_main(["--model", model, "--random-init", "0", "--target", "litertlm", "--out", str(tmp_path),
                        "--max-seq-len", str(MAX_LEN), "--prefill-lens", "16", "--speculative", str(K),
                        "--tokenizer", str(tokenizer_256), "--verify-steps", "24"]) == 0
    report = json.loads((tmp_path / f"{model}_f32_spec{K}_ctx{MAX_LEN}.parity.json").read_text())
    assert report["passed"] and report["litert_lm"]["match"]
    engine = report["litert_lm"]
    # the prompt and the generated text run past the ring's wrap
    assert engine["prompt_tokens"] + engine["reference_tokens"] > get_config(model).sliding_window + K


def test_streamed_gate_checks_the_verify_rows(tmp_path):
    model = TINY["gemma2"]
    path = _export(tmp_path, model, 0, "--gate", "streamed")
    report = json.loads(path.with_suffix(".parity.json").read_text())
    assert report["passed"]
    rows = [s for s in report["steps"] if s["signature"] == f"verify_{K + 1}"]
    assert len(rows) == 2 * (K + 1) and max(s["rel_rms"] for s in rows) < 1e-4


def test_verify_has_context_bucket_variants(tmp_path):
    """With context buckets, ctx{L}_verify_{K} runs below L; its rows are the full-length one's."""
    model = TINY["gemma3"]
    path = _export(tmp_path, model, 0, "--context-buckets", "48", "--no-verify")
    session = load(path)
    assert f"ctx48_verify_{K + 1}" in session.signatures
    prompt = _prompt(30)
    assert session.signature_for(f"verify_{K + 1}", len(prompt) + K + 1) == f"ctx48_verify_{K + 1}"
    rows = {}
    for buckets in (True, False):
        session.use_buckets = buckets
        session.reset()
        session.prefill(prompt)
        rows[buckets] = session.verify([5, 6, 7, 8])
    assert np.abs(rows[True] - rows[False]).max() <= 1e-5 * np.abs(rows[False]).max()
