"""Activation smoothing for TFLite's dynamic-int8 (export/quantize/smooth.py): the fold leaves the
f32 model's function unchanged on every family, stays lazy on streamed weights, its statistics are
the matmul inputs' channel maxima, it lowers the error of per-row int8 activations, and the CLI
applies it where it belongs (TFLite dynamic-int8 with a tokenizer) and records it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from export.quantize import smooth as S
from models import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "tests" / "fixtures" / "gemma3-tiny-trained"
TRAINED_RG = ROOT / "tests" / "fixtures" / "recurrentgemma-tiny-trained"


def _f32(params):
    return {k: np.asarray(v, np.float32) for k, v in params.items()}


@pytest.fixture(scope="module")
def trained():
    cfg, params = load_checkpoint(TRAINED)
    return cfg, _f32(params)


def _random_folds(params, cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {g: np.exp(rng.uniform(-2, 2, np.shape(params[g.readers[0]])[1])).astype(np.float32)
            for g in S.groups(params, cfg)}


def _gemma2_tiny():
    from models.params import init_params
    from models.registry import get_config

    cfg = get_config("gemma2-tiny")
    params = _f32(init_params(cfg, seed=3))
    rng = np.random.default_rng(4)
    for k in params:  # norms away from zero, as trained ones are
        if k.endswith("norm"):
            params[k] = rng.uniform(-0.5, 3.0, params[k].shape).astype(np.float32)
    return cfg, params


@pytest.mark.parametrize("which", ["gemma3", "recurrentgemma", "gemma2"])
def test_fold_leaves_the_f32_model_unchanged(which):
    """Factors over e^-2..e^2 on every fold: logits equal the unfolded model's to float rounding."""
    from tests.conftest import full_logits

    if which == "gemma2":
        cfg, params = _gemma2_tiny()
    else:
        cfg, params = load_checkpoint(TRAINED if which == "gemma3" else TRAINED_RG)
        params = _f32(params)
    folds = _random_folds(params, cfg)
    kinds = {g.kind for g in folds}
    assert kinds == {"norm", "down", "head"}
    readers = {r for g in folds for r in g.readers}
    assert any(r.endswith("mlp.gate") for r in readers) and any(r.endswith("mlp.down") for r in readers)
    if which == "recurrentgemma":
        assert any(r.endswith("linear_x") for r in readers) and any(r.endswith("attn.q") for r in readers)
    folded = S.fold(params, folds)
    changed = [k for k in params if not np.array_equal(np.asarray(folded[k]), params[k])]
    assert len(changed) >= 3 * cfg.num_layers and "embed" in changed and "final_norm" in changed
    np.testing.assert_allclose(folded["embed_channel_scale"] * folds[S.Group("head", "final_norm", ("embed",))], 1,
                               rtol=1e-6)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 40))
    want = full_logits(params, cfg, ids)
    got = full_logits({k: np.asarray(v) for k, v in folded.items()}, cfg, ids)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_fold_keeps_streamed_weights_lazy(trained):
    from models.lazy import LazyTensor

    cfg, params = trained

    def lazy(name, a):
        return LazyTensor(a.shape, a.dtype, lambda: a.copy(), name, rows=lambda s, e: a[s:e].copy())

    streamed = {k: lazy(k, v) if v.ndim == 2 else v for k, v in params.items()}
    folds = _random_folds(params, cfg)
    eager, late = S.fold(params, folds), S.fold(streamed, folds)
    assert set(late) == set(eager) == set(params) | {"embed_channel_scale"}
    for k, v in late.items():
        if isinstance(streamed.get(k), LazyTensor) and v is not streamed[k]:
            assert isinstance(v, LazyTensor) and v.reads_rows, k
            np.testing.assert_array_equal(v.load(), eager[k])
            np.testing.assert_array_equal(v.read_rows(3, 9), eager[k][3:9])
        else:
            np.testing.assert_array_equal(np.asarray(v), np.asarray(eager[k]))
    # the source weights were not written
    np.testing.assert_array_equal(streamed["layers.0.mlp.up"].load(), params["layers.0.mlp.up"])


def test_statistics_are_the_inputs_channel_maxima(trained):
    """max |x_j| of the q/k/v group's input is that of the normed layer input, computed here."""
    from models.layers import rms_norm

    cfg, params = trained
    stats = S.calibrate(params, cfg, TRAINED, windows=2)
    assert {f"layers.0.{n}" for n in ("attn.q", "attn.o", "mlp.gate", "mlp.down")} <= set(stats)
    from export.quantize.gptq import _embed, calibration_ids

    ids = calibration_ids(cfg, TRAINED)[:2]
    x = _embed(params, cfg, ids)
    h = np.asarray(rms_norm(x, jnp.asarray(params["layers.0.pre_attn_norm"]), cfg.norm_eps))
    h = h.reshape(-1, h.shape[-1])
    absmax, sample = stats["layers.0.attn.q"]
    np.testing.assert_allclose(absmax, np.abs(h).max(0), rtol=1e-5)
    assert sample.shape == (64, h.shape[1])
    np.testing.assert_allclose(sample[[0, -1]], h[[0, -1]], rtol=1e-5, atol=1e-6)
    # the LM head's input: its sampled rows times the table are the model's logits at those tokens
    from tests.conftest import full_logits

    logits = full_logits(params, cfg, ids, max_len=ids.shape[1]).reshape(-1, cfg.vocab_size)
    head_max, head_rows = stats["embed"]
    picked = np.linspace(0, len(logits) - 1, 64).astype(np.int64)
    np.testing.assert_allclose(head_rows @ params["embed"].T, logits[picked], rtol=1e-4, atol=1e-3)
    assert (head_max >= np.abs(head_rows).max(0)).all()
    folds = S.factors(params, cfg, stats)
    assert all(np.isfinite(s).all() and (s > 0).all() for s in folds.values())


def _int8_error(w, x, s=None):
    """Squared error of x @ w.T under dynamic int8 (rows of x asymmetric, rows of w symmetric)."""
    xs, ws = (x, w) if s is None else (x / s, w * s)
    lo, hi = np.minimum(xs.min(1, keepdims=True), 0), np.maximum(xs.max(1, keepdims=True), 0)
    sc = (hi - lo) / 255
    zp = np.round(-lo / sc) - 128
    xq = (np.clip(np.round(xs / sc) + zp, -128, 127) - zp) * sc
    wsc = np.abs(ws).max(1, keepdims=True) / 127
    return float(np.square(xq @ (np.round(ws / wsc) * wsc).T - x @ w.T).sum())


def test_a_fold_is_chosen_by_the_output_error():
    """A fold is made only where it takes enough of the readers' int8 output error away (an even
    input keeps its weights); with outlier channels in the input it takes most of it away."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(96, 64)).astype(np.float32)
    x = rng.normal(size=(64, 64)).astype(np.float32)
    for outliers in (False, True):
        if outliers:
            x[:, [3, 40]] *= 60
        alpha, s = S.choose([w[:50], w[50:]], np.abs(x).max(0), x)  # two readers of one input
        plain = _int8_error(w, x)
        if not outliers:
            assert alpha is None and s is None
            continue
        assert alpha in S.ALPHAS and _int8_error(w, x, s) <= S.WORTH * plain
        if outliers:
            assert _int8_error(w, x, s) < 0.3 * plain
            assert s[3] > 5 * np.median(s) and s[40] > 5 * np.median(s)


@contextlib.contextmanager
def _dynamic_int8():
    """Every matmul as XNNPACK's dynamic int8 computes it: the input quantized per row (asymmetric
    int8 over the row's channels), the weight per output channel (symmetric); the tied table per
    row for the lookup and the logits."""
    import models.attention
    import models.gemma
    import models.griffin
    import models.model as M
    from models.layers import dense

    def rows8(x):
        x32 = x.astype(jnp.float32)
        lo = jnp.minimum(x32.min(-1, keepdims=True), 0)
        hi = jnp.maximum(x32.max(-1, keepdims=True), 0)
        s = jnp.maximum(hi - lo, 1e-12) / 255
        zp = jnp.round(-lo / s) - 128
        return ((jnp.clip(jnp.round(x32 / s) + zp, -128, 127) - zp) * s).astype(x.dtype)

    def channels8(w):
        ws = jnp.maximum(jnp.abs(w).max(-1, keepdims=True), 1e-12) / 127
        return jnp.round(w / ws) * ws

    def fake(x, w, bias=None):
        return dense(rows8(x), channels8(w), bias)

    def fake_linear(p, name, x, bias=None):  # models.layers.linear (no offsets in these models)
        return fake(x, p[name], None if bias is None else p.get(bias))

    def fake_embed(params, cfg, tokens):
        return embed_tokens(dict(params, embed=channels8(jnp.asarray(params["embed"], jnp.float32))), cfg, tokens)

    def fake_unembed(params, cfg, x):
        table = channels8(jnp.asarray(params["embed"], jnp.float32))
        x = M.rotated(params, M.HEAD_ROTATION, M.head_input(params, cfg, x))  # export/quantize/rotate.py
        logits = jnp.einsum("bte,ve->btv", rows8(x), table)
        cap = cfg.final_softcap
        return logits if cap is None else cap * jnp.tanh(logits)

    mods = (models.attention, models.gemma, models.griffin)
    embed_tokens, unembed = M.embed_tokens, M.unembed
    jax.clear_caches()  # no trace of the plain matmuls is reused, and none of these is kept
    saved = [(m, n, getattr(m, n)) for m in mods for n in ("dense", "linear") if hasattr(m, n)]
    for m, n, _ in saved:
        setattr(m, n, fake if n == "dense" else fake_linear)
    M.embed_tokens, M.unembed = fake_embed, fake_unembed
    try:
        yield
    finally:
        for m, n, real in saved:
            setattr(m, n, real)
        M.embed_tokens, M.unembed = embed_tokens, unembed
        jax.clear_caches()


def _outliers(params, cfg, factor=40.0, count=3, seed=0):
    """The same f32 model with outlier channels in the matmul inputs, as trained Gemmas have them
    (the tiny fixtures' activations are even): `count` channels of each norm's output and of each
    down projection's input made `factor` times larger, their readers' columns as much smaller
    (an inverse fold: the function is unchanged)."""
    rng = np.random.default_rng(seed)
    folds = {}
    for g in S.groups(params, cfg):
        s = np.ones(np.shape(params[g.readers[0]])[1], np.float32)
        s[rng.choice(len(s), count, replace=False)] = 1 / factor
        folds[g] = s
    return {k: np.asarray(v) for k, v in S.fold(params, folds).items()}


def test_smoothing_lowers_the_error_of_int8_activations(trained):
    """Emulated dynamic int8 on the trained tiny model given Gemma-like outlier channels: mean KL
    to f32 on held-out stories is lower with the fold (printed; the real Gemma 3 270M's exports:
    docs/quantization.md#smoothing-tflite-dynamic-int8)."""
    from contract.tokenizer import Tokenizer
    from tests.conftest import full_logits
    from tools.train_tiny import generate_stories

    cfg, params = trained
    params = _outliers(params, cfg)
    tok = Tokenizer(TRAINED)
    held = generate_stories(30, seed=999)
    ids = [tok.encode(" ".join(held[i * 10:(i + 1) * 10]))[:200] for i in range(3)]

    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref = [logsoftmax(full_logits(params, cfg, [row], max_len=256)[0]) for row in ids]
    folded = {k: np.asarray(v) for k, v in S.fold(params, S.factors(params, cfg, S.calibrate(params, cfg, TRAINED))).items()}

    def kl(p):
        out = []
        for row, r in zip(ids, ref):
            q = logsoftmax(full_logits(p, cfg, [row], max_len=256)[0])
            out.append((np.exp(r) * (r - q)).sum(-1).mean())
        return float(np.mean(out))

    with _dynamic_int8():
        plain, smoothed = kl(params), kl(folded)
    print(f"emulated dynamic int8 KL: plain {plain:.5f}, smoothed {smoothed:.5f}")
    assert plain > 1e-4  # the emulation quantizes
    assert smoothed < 0.2 * plain  # measured 0.0045 -> 0.0001


def _meta(path: Path) -> dict:
    from export.inspect import describe

    return describe(path)["metadata"]


def test_cli_smooths_tflite_dynamic_int8_only(tmp_path, capsys):
    """TFLite dynamic-int8 with the checkpoint's tokenizer calibrates (a stage, a line saying how
    many inputs were folded: none on the tiny model, whose activations are even, so its weights and
    metadata are the plain recipe's), and the gate passes; --no-smoothing skips the calibration;
    --calibration-text is taken; ONNX's dynamic-int8 does not calibrate. The real model's folds:
    tests/test_real_gemma.py."""
    from export.cli import main

    def run(*extra, target="tflite"):
        out = tmp_path / "_".join([target, *[e.strip("-") for e in extra if e.startswith("--")]])
        rc = main(["--checkpoint", str(TRAINED), "--target", target, "--quant", "dynamic-int8",
                   "--max-seq-len", "128", "--prefill-lens", "32", "--out", str(out), *extra])
        assert rc == 0
        made = [p for p in out.iterdir() if p.suffix in (".tflite", "") and not p.name.startswith(".")
                and not p.name.endswith(".json")]
        assert len(made) == 1, made
        return made[0], capsys.readouterr().out

    smoothed, said = run()
    assert "calibrate (smoothing)" in said and "smoothing: 0 of 19 matmul inputs folded" in said
    assert "rotation: 25 of 25 matmul inputs rotated" in said  # 4 per layer and the head: tests/test_rotate.py
    plain, said = run("--no-smoothing")
    assert "calibrate (smoothing)" not in said and "inputs folded" not in said
    assert _meta(smoothed).get("quant_method") == _meta(plain).get("quant_method") == "rotated"
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(__import__("tools.train_tiny", fromlist=["x"]).generate_stories(200, seed=5)),
                    encoding="utf-8")
    _, said = run("--calibration-text", str(text))
    assert "matmul inputs folded" in said
    onnx, said = run(target="onnx")
    assert "calibrate (smoothing)" not in said and not _meta(onnx).get("quant_method")
