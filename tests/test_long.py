"""Long context: the gate's long check (--verify-long, verify/long.py) far past the window on every
family and both targets, and that it catches what a long-context export gets wrong."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAMILIES, TINY
from export.cli import main as export_main
from models import LayerKind, get_config, init_params
from models.fused import AttentionForm
from runtime_py import load
from verify.gates import gate_for
from verify.long import long_parity, long_prompt, probe_positions
from verify.reference import reference_session

MAX_LEN = 640
LONG = 600
LENS = "16,64"


def _args(model, out, target, *extra):
    return ["--model", model, "--random-init", "0", "--out", str(out), "--target", target, "--max-seq-len",
            str(MAX_LEN), "--untrained-context", "--prefill-lens", LENS, "--verify-steps", "24", *extra]


def test_probe_positions_reach_every_window_wrap_and_chunk_boundary():
    probes = probe_positions(600, 8, 64, max_probes=1000)
    for b in (*range(8, 600, 8), *range(64, 600, 64)):
        assert {b - 1, b, b + 1} <= set(probes)
    assert probes[-1] == 599 and probes == sorted(set(probes))
    thinned = probe_positions(32768, 512, 128, max_probes=48)
    assert len(thinned) <= 3 * 48 + 1 and thinned[-1] == 32767
    # thinned, each kind keeps its first two boundaries and its last
    assert {511, 512, 513, 1023, 1024, 1025, 127, 128, 129, 255, 256, 257} <= set(thinned)
    assert {32255, 32256, 32257, 32639, 32640, 32641} <= set(thinned)


@pytest.mark.parametrize("target", ["tflite", "onnx"])
@pytest.mark.parametrize("family", FAMILIES)
def test_long_check_passes_far_past_the_window(tmp_path, family, target):
    model = TINY[family]
    assert export_main(_args(model, tmp_path, target, "--verify-long", str(LONG))) == 0
    name = f"{model}_f32_ctx{MAX_LEN}"
    parity = tmp_path / (f"{name}_onnx/parity.json" if target == "onnx" else f"{name}.parity.json")
    long = json.loads(parity.read_text())["long"]
    window = get_config(model).sliding_window
    assert long["passed"] and long["tokens"] == LONG and long["max_rel_rms"] <= gate_for(target, None).max_rel_rms
    assert long["greedy_match"] == long["decode_steps"] == 24
    positions = [s["position"] for s in long["steps"]]
    assert max(positions) >= LONG + 23 and min(positions) < window  # from the first window to past the prompt
    assert long["probes"] >= 2 * LONG // 64  # every chunk boundary at least


def _broken_ring_positions(start, rows: int):
    """models.cache.ring_positions with an off-by-one in the wrap: exact until the ring first
    wraps, then every row is taken for a position one ring-length-plus-one back."""
    last = start[:, None] - 1
    pos = last - jnp.mod(last - jnp.arange(rows, dtype=start.dtype)[None, :], rows + 1)
    return jnp.where(pos >= 0, pos, -1)


def test_long_check_fails_on_a_ring_broken_at_the_wrap(tmp_path, monkeypatch):
    model = TINY["gemma3"]
    cfg = get_config(model)
    with monkeypatch.context() as m:
        m.setattr("models.attention.ring_positions", _broken_ring_positions)
        assert export_main(_args(model, tmp_path, "tflite", "--no-verify")) == 0
    artifact = load(tmp_path / f"{model}_f32_ctx{MAX_LEN}.tflite")
    reference = reference_session(cfg, init_params(cfg, 0), [16, 64], MAX_LEN)
    prompt = long_prompt(cfg, LONG)
    # before the first wrap the broken ring is exact (the decode at position W - 1 writes the
    # ring's last row; a decode writes before it attends, so the one at W wraps) ...
    short = long_parity(reference, artifact, prompt[:cfg.sliding_window - 1], 1, cfg.sliding_window)
    assert not gate_for("tflite", None).failures(short)
    # ... after it the long check fails, at a probe past the window
    report = long_parity(reference, artifact, prompt, 8, cfg.sliding_window)
    assert gate_for("tflite", None).failures(report)
    assert report.worst().position >= cfg.sliding_window
    bad = [s.position for s in report.steps if s.rel_rms > 1e-4]
    assert min(bad) >= cfg.sliding_window


def test_verify_long_bad_input_is_one_line(tmp_path, capsys):
    model = TINY["gemma3"]
    assert export_main(_args(model, tmp_path, "tflite", "--verify-long", str(MAX_LEN))) == 2
    err = capsys.readouterr().err
    assert "--verify-long 640 needs a context of at least 641" in err
    assert export_main(_args(model, tmp_path, "tflite", "--verify-long", "100", "--no-verify")) == 2
    assert "drop --no-verify" in capsys.readouterr().err
    assert export_main(_args(model, tmp_path, "onnx", "--verify-long", "100", "--gate", "streamed")) == 2
    assert "--gate memory" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()) or not list(tmp_path.glob("*.tflite"))


def test_long_prompt_is_seeded_and_starts_with_bos():
    cfg = get_config(TINY["gemma3"])
    a, b = long_prompt(cfg, 300), long_prompt(cfg, 300)
    assert a == b and a[0] == cfg.tokens.bos and len(a) == 300
    assert np.all((np.array(a[1:]) >= 3) & (np.array(a[1:]) < cfg.vocab_size))


# ---- context buckets (TFLite) ------------------------------------------------------------------
BUCKETS = (64, 256)


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    """gemma3-tiny at 640 tokens with buckets 64 and 256, exported once (with its gate)."""
    out = tmp_path_factory.mktemp("bucketed")
    model = TINY["gemma3"]
    assert export_main(_args(model, out, "tflite", "--context-buckets", "64,256")) == 0
    return out / f"{model}_f32_ctx{MAX_LEN}.tflite"


def _recording(session):
    calls = []
    call = session.backend.call

    def wrapped(name, *a, **kw):
        calls.append(name)
        return call(name, *a, **kw)

    session.backend.call = wrapped
    return calls


def test_context_buckets_are_signatures_over_the_same_states(bucketed):
    session = load(bucketed)
    assert session.buckets == list(BUCKETS) and session.metadata.context_buckets == BUCKETS
    names = set(session.signatures)
    assert {"ctx64_prefill_16", "ctx64_prefill_64", "ctx64_decode", "ctx256_prefill_16", "ctx256_prefill_64",
            "ctx256_decode", "prefill_16", "prefill_64", "decode"} <= names
    assert not any(n.startswith("prefill") and n.count("_") > 1 for n in names)  # LiteRT-LM's prefill* match
    for name in names:
        assert session.signatures[name].states == session.signatures["decode"].states
    # the global caches are updated in place by every signature, the local rings by the decode
    # signatures (one row written before attention reads the ring; a prefill chunk may wrap it)
    layout = session.metadata.states
    global_states = {s.name() for s in layout if s.layer_kind is LayerKind.GLOBAL}
    for name, states in session.backend.in_place.items():
        assert states == (set(session.signatures[name].states) if name.endswith("decode") else global_states), name


def test_bucketed_logits_equal_the_full_length_ones_at_every_bucket_boundary(bucketed):
    cfg = get_config(TINY["gemma3"])
    full, bucket = load(bucketed), load(bucketed)
    full.use_buckets = False
    calls = _recording(bucket)
    report = long_parity(full, bucket, long_prompt(cfg, 300), 8, cfg.sliding_window)
    assert report.max_rel_rms < 1e-5 and report.greedy_match == [8]
    assert {63, 64, 65, 255, 256, 257} <= {s.position for s in report.steps}
    assert any(c.startswith("ctx64_") for c in calls) and any(c.startswith("ctx256_") for c in calls)
    assert "decode" in calls  # past the last bucket: full length
    # the gate ran the buckets and the full-length signatures
    gate = json.loads(bucketed.with_suffix(".parity.json").read_text())
    assert gate["passed"] and any(s["signature"].startswith("full-length") for s in gate["steps"])


def test_long_check_fails_on_a_broken_bucket_switch(bucketed, monkeypatch):
    from runtime_py.session import Session
    from contract.signatures import bucket_name

    cfg = get_config(TINY["gemma3"])
    reference = reference_session(cfg, init_params(cfg, 0), [16, 64], MAX_LEN)

    def off_by_one(self, name, end):  # keeps a bucket one position too long
        for span in self.buckets:
            if end <= span + 1 and bucket_name(name, span) in self.signatures:
                return bucket_name(name, span)
        return name

    good = long_parity(reference, load(bucketed), long_prompt(cfg, 300), 8, cfg.sliding_window)
    assert not gate_for("tflite", None).failures(good)
    monkeypatch.setattr(Session, "signature_for", off_by_one)
    bad = long_parity(reference, load(bucketed), long_prompt(cfg, 300), 8, cfg.sliding_window)
    assert gate_for("tflite", None).failures(bad)
    assert {s.position for s in bad.steps if s.rel_rms > 1e-4} & {64, 256}


def test_in_place_states_equal_the_banked_ones(bucketed):
    from runtime_py.tflite_backend import load_tflite

    prompt = long_prompt(get_config(TINY["gemma3"]), 200)
    runs = []
    for in_place in (True, False):
        s = load_tflite(bucketed, in_place=in_place)
        logits = [s.prefill(prompt)] + [s.decode(t) for t in (5, 6, 7)]
        runs.append((np.stack(logits), s.states))
    assert not any(load_tflite(bucketed, in_place=False).backend.in_place.values())
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for name in runs[0][1]:
        np.testing.assert_array_equal(runs[0][1][name], runs[1][1][name])


def test_default_context_buckets():
    from models.signatures import context_buckets

    g3 = get_config("gemma3-1b")
    assert context_buckets(g3, 1024) == [] and context_buckets(g3, 1025) == [512]
    assert context_buckets(g3, 4096) == [512] and context_buckets(g3, 8192) == [512, 4096]
    assert context_buckets(g3, 32768) == [512, 4096, 16384]
    assert context_buckets(g3, 131072) == [512, 4096, 16384, 65536]
    assert context_buckets(get_config("recurrentgemma-2b"), 32768) == []
    assert context_buckets(g3, 4096, (1024, 512)) == [512, 1024]
    with pytest.raises(ValueError, match="below the context"):
        context_buckets(g3, 4096, (4096,))
    with pytest.raises(ValueError, match="no global attention"):
        context_buckets(get_config("recurrentgemma-2b"), 32768, (1024,))


def test_context_buckets_bad_input_is_one_line(tmp_path, capsys):
    model = TINY["gemma3"]
    assert export_main(_args(model, tmp_path, "onnx", "--context-buckets", "64")) == 2
    assert "--context-buckets are TFLite's" in capsys.readouterr().err
    assert export_main(_args(model, tmp_path, "tflite", "--context-buckets", "64,x")) == 2
    assert "not a comma-separated list" in capsys.readouterr().err
    assert export_main(_args(model, tmp_path, "tflite", "--context-buckets", str(MAX_LEN))) == 2
    assert "below the context" in capsys.readouterr().err


def test_generate_reads_a_long_prompt_file_with_progress_and_refuses_past_the_context(tmp_path, capsys):
    from pathlib import Path

    from runtime_py.__main__ import main as runtime_main

    trained = Path(__file__).parent / "fixtures" / "gemma3-tiny-trained"
    assert export_main(["--checkpoint", str(trained), "--target", "tflite", "--out", str(tmp_path), "--max-seq-len",
                        "512", "--untrained-context", "--prefill-lens", "16,64", "--no-verify"]) == 0
    artifact = next(tmp_path.glob("*.tflite"))
    story = "Once upon a time, there was a little girl named Lily. She liked to play in the park. "
    (tmp_path / "long.txt").write_text(story * 14)  # ~340 tokens: several chunks
    capsys.readouterr()
    args = ["generate", "--artifact", str(artifact), "--tokenizer", str(trained), "--prompt-file",
            str(tmp_path / "long.txt"), "--max-new-tokens", "4", "--raw"]
    assert runtime_main(args) == 0
    err = capsys.readouterr().err
    n = int(err.split(" prompt tokens")[0].rsplit("[", 1)[1])
    assert n > 256 and f"{n}/{n} tokens" in err and "prefill [" in err  # the bar reached the end
    (tmp_path / "long.txt").write_text(story * 30)
    assert runtime_main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: prompt of ") and "exceeds the context of 512" in line
    assert runtime_main(["generate", "--artifact", str(artifact), "--tokenizer", str(trained)]) == 2
    assert "--prompt TEXT or --prompt-file PATH" in capsys.readouterr().err


def test_litert_lm_runs_a_bucketed_bundle_unmodified(tmp_path):
    """LiteRT-LM takes the full-length prefill_*/decode signatures of a bundle that also holds
    ctx{L}_* ones: the gate's LiteRT-LM run gives the JAX model's greedy text."""
    from pathlib import Path

    trained = Path(__file__).parent / "fixtures" / "gemma3-tiny-trained"
    assert export_main(["--checkpoint", str(trained), "--target", "litertlm", "--out", str(tmp_path), "--max-seq-len",
                        "512", "--untrained-context", "--prefill-lens", "16,64", "--context-buckets", "64,128",
                        "--verify-steps", "16"]) == 0
    bundle = next(tmp_path.glob("*.litertlm"))
    report = json.loads(bundle.with_suffix(".parity.json").read_text())
    assert report["passed"] and report["litert_lm"]["match"]
    assert load(bundle).buckets == [64, 128]


# ---- int8 KV caches ----------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["gemma3-tiny-trained", "recurrentgemma-tiny-trained"])
def test_int8_kv_cache_meets_its_gate_on_the_trained_tiny_models(tmp_path, fixture):
    from pathlib import Path

    from verify.gates import KV_INT8

    trained = Path(__file__).parent / "fixtures" / fixture
    assert export_main(["--checkpoint", str(trained), "--target", "tflite", "--out", str(tmp_path), "--kv-cache",
                        "int8", "--verify-steps", "40"]) == 0
    artifact = next(tmp_path.glob("*_kv8_*.tflite"))
    report = json.loads(artifact.with_suffix(".parity.json").read_text())
    assert report["passed"] and report["gate"]["kv_cache"] == "int8"
    assert report["gate"]["mean_rel_rms"] == KV_INT8.mean_rel_rms and report["gate"]["quantization"] == "int8 KV"
    assert 0 < report["mean_rel_rms"] <= KV_INT8.mean_rel_rms  # quantized (not exact), within the row
    session = load(artifact)
    attention = [s for s in session.metadata.states if s.kind.value in ("k", "v")]
    assert attention and all(s.dtype == np.int8 for s in attention)
    scales = [s for s in session.metadata.states if s.kind.value in ("k_scale", "v_scale")]
    assert len(scales) == len(attention) and all(s.shape[-1] == 1 for s in scales)


def test_int8_kv_cache_is_4x_smaller_and_updated_in_place(tmp_path):
    from contract.layout import LayerKind as LK
    from models.cache import state_layout

    cfg = get_config("gemma3-1b")
    f32, int8 = state_layout(cfg, 131072), state_layout(cfg, 131072, kv="int8")
    assert f32.kv_bytes_per_token() / int8.kv_bytes_per_token() == pytest.approx(4 * 256 / (256 + 4))
    assert int8.nbytes < 0.6 * 2**30 < f32.nbytes  # 128K gemma3-1b: 0.26 GiB vs 1.02 GiB
    model = TINY["gemma3"]
    assert export_main(_args(model, tmp_path, "tflite", "--kv-cache", "int8", "--context-buckets", "64")) == 0
    session = load(tmp_path / f"{model}_f32_kv8_ctx{MAX_LEN}.tflite")
    global_states = {s.name() for s in session.metadata.states if s.layer_kind is LK.GLOBAL}
    assert len(global_states) == 4  # codes and scales of k and v
    for name, states in session.backend.in_place.items():
        assert states == global_states, name


def test_int8_kv_cache_bad_input_is_one_line(tmp_path, capsys):
    """GroupQueryAttention (the ONNX default op set) has no int8 CPU cache: asking for both is
    refused, naming the fix."""
    model = TINY["gemma3"]
    assert export_main(_args(model, tmp_path, "onnx", "--kv-cache", "int8", "--onnx-ops", "default")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kv-cache int8 needs the standard op set's attention" in err[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fixture", ["gemma3-tiny-trained", "recurrentgemma-tiny-trained"])
def test_int8_kv_cache_on_onnx_standard_ops(tmp_path, fixture, capsys):
    """--onnx-ops standard --kv-cache int8: codes and scales are states of the ONNX graph's own
    attention; the folder meets the int8 KV gate against the f32-cache model, runs in runtime_py,
    and has no genai_config.json (onnxruntime-genai cannot feed int8 caches: refused in one line).
    Without recurrent layers (whose f32 rounding differs from JAX's in the last bits and can flip
    a code), runtime_py's logits equal the JAX model's with int8 caches, chunked prefill past the
    window and decode included."""
    from pathlib import Path

    import jax

    from models import load_checkpoint
    from models.cache import init_cache
    from models.model import forward
    from runtime_py.genai_engine import Engine as GenaiEngine
    from verify.gates import KV_INT8

    trained = Path(__file__).parent / "fixtures" / fixture
    assert export_main(["--checkpoint", str(trained), "--target", "onnx", "--onnx-ops", "standard", "--out",
                        str(tmp_path), "--kv-cache", "int8", "--verify-steps", "40"]) == 0
    (folder,) = tmp_path.glob("*_kv8_*_standard_onnx")
    report = json.loads((folder / "parity.json").read_text())
    assert report["passed"] and report["gate"]["kv_cache"] == "int8"
    assert 0 < report["mean_rel_rms"] <= KV_INT8.mean_rel_rms
    assert not (folder / "genai_config.json").exists()
    assert "no genai_config.json: onnxruntime-genai cannot run an int8 KV cache" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--kv-cache int8 has none"):
        GenaiEngine(folder)
    session = load(folder)
    attention = [s for s in session.metadata.states if s.kind.value in ("k", "v")]
    assert attention and all(s.dtype == np.int8 for s in attention)
    if fixture.startswith("recurrentgemma"):
        return
    cfg, params = load_checkpoint(trained)
    step = jax.jit(forward, static_argnums=(1,))
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, 3 * cfg.window_span + 5).astype(np.int32)
    cache, done = init_cache(cfg, 1, session.max_len, kv="int8"), 0
    for take in (40, 1, len(tokens) - 41):  # chunks of several lengths, the last one wrapping the rings
        got = session.prefill(tokens[done:done + take])
        logits, cache = step(params, cfg, jnp.asarray(tokens[None, done:done + take]), jnp.array([done], jnp.int32),
                             cache, jnp.array([take], jnp.int32))
        np.testing.assert_allclose(got, np.asarray(logits[0, -1]), rtol=0, atol=1e-4 * np.abs(got).max())
        done += take
    for _ in range(24):
        token = int(np.argmax(got))
        got = session.decode(token)
        logits, cache = step(params, cfg, jnp.array([[token]], jnp.int32), jnp.array([done], jnp.int32), cache,
                             jnp.array([1], jnp.int32))
        np.testing.assert_allclose(got, np.asarray(logits[0, -1]), rtol=0, atol=1e-4 * np.abs(got).max())
        done += 1


def test_streamed_gate_checks_buckets_and_full_length(bucketed, tmp_path):
    import shutil

    from verify.gate import run_gate

    cfg = get_config(TINY["gemma3"])
    artifact = tmp_path / bucketed.name
    shutil.copy(bucketed, artifact)
    result = run_gate(artifact, cfg, init_params(cfg, 0), target="tflite", max_len=MAX_LEN, lens=[16, 64],
                      quant=None, attention=AttentionForm.SDPA, steps=8, mode="streamed")
    assert result.passed
    names = {s.signature for s in result.report.steps}
    assert any(n.startswith("full-length") for n in names) and "decode" in names


@pytest.mark.parametrize("target,ops", [("tflite", None), ("onnx", "default"), ("onnx", "standard")])
def test_rope_angles_agree_with_jax_far_into_the_context(tmp_path, target, ops):
    """Decode at position ~30000 of a 32K export equals the JAX model's on every target and op set:
    the rotation angle is one float32 product with a float32 frequency table
    (models.layers.rope_frequencies), in the graph as the JAX model has it (TFLite: a constant the
    converter keeps; the ONNX standard op set: an operand of the attention composite;
    GroupQueryAttention: cos/sin tables from the same frequencies). A chain of divisions rounds
    differently on each runtime (the TFLite converter folds it into one multiply, ONNX Runtime
    evaluates it as written): the error grew with the position, ~1e-4 of the logits at 27K on
    Gemma 3 270M, 2e-5 here."""
    model = TINY["gemma3"]
    cfg = get_config(model)
    argv = ["--model", model, "--random-init", "0", "--out", str(tmp_path), "--max-seq-len", "32768",
            "--untrained-context", "--prefill-lens", "16", "--no-verify", "--target", target]
    argv += ["--context-buckets", "none"] if target == "tflite" else ["--onnx-ops", ops]
    assert export_main(argv) == 0
    artifact = load(next(tmp_path.glob("*.tflite" if target == "tflite" else "*_onnx")))
    reference = reference_session(cfg, init_params(cfg, 0), [16], 32768, AttentionForm(artifact.metadata.attention))
    worst = 0.0
    for session in (artifact, reference):
        session.reset()
        session.position = 30000
    for token in long_prompt(cfg, 24)[1:]:
        a, r = artifact.decode(token), reference.decode(token)
        worst = max(worst, float(np.sqrt(np.mean((a - r) ** 2) / np.mean(r ** 2))))
    assert worst < 1e-5


def test_int8_kv_cache_on_onnx_with_an_int4_recipe(tmp_path):
    """Without --onnx-ops, --kv-cache int8 on ONNX takes the standard op set's attention by itself
    and the recipe's contrib matmuls (MatMulNBits), as a model with vision does, and the gate
    measures it (random weights: the recipe's gate only warns)."""
    import onnx

    model = TINY["gemma3"]
    assert export_main(_args(model, tmp_path, "onnx", "--kv-cache", "int8", "--quant", "int4-b32")) == 0
    (folder,) = tmp_path.glob("*_int4-b32_kv8_*_standard_onnx")
    ops = {n.op_type for n in onnx.load(folder / "model.onnx", load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "GroupQueryAttention" not in ops
    report = json.loads((folder / "parity.json").read_text())
    assert report["gate"]["kv_cache"] == "int8" and report["mean_rel_rms"] > 0


def test_int8_kv_cache_on_onnx_with_images(tmp_path):
    """A Gemma 3 model with vision on ONNX (standard op set by itself) with int8 KV caches: the
    image prefill graph writes the same int8 states, and the gate's image prompt passes."""
    from verify.gates import KV_INT8

    assert export_main(["--model", "gemma3-vision-tiny", "--random-init", "0", "--target", "onnx", "--kv-cache", "int8",
                        "--out", str(tmp_path), "--max-seq-len", "128", "--verify-steps", "16"]) == 0
    (folder,) = tmp_path.glob("*_kv8_*_onnx")
    report = json.loads((folder / "parity.json").read_text())
    assert report["passed"] and report["mean_rel_rms"] <= KV_INT8.mean_rel_rms
    assert any(s["signature"].startswith("image_prefill") for s in report["steps"]) and report["encoder"]
    assert (folder / "image_prefill.onnx").exists() and not (folder / "genai_config.json").exists()


def test_standard_op_set_prefills_in_bounded_chunks():
    """runtime_py feeds the standard op set's attention (which materialises its scores) chunks
    whose scores stay within SCORE_BYTES; GroupQueryAttention takes the whole prompt."""
    from types import SimpleNamespace

    from runtime_py.onnx_backend import SCORE_BYTES, prefill_length

    def meta(ops, ctx, heads):
        return SimpleNamespace(onnx_op_set=ops, max_seq_len=ctx, config={"num_heads": heads})

    assert prefill_length(meta("default", 131072, 4)) == 131072
    assert (prefill_length(meta("standard", 32768, 4)), prefill_length(meta("standard", 131072, 4))) == (512, 128)
    assert prefill_length(meta("standard", 512, 4)) == 512
    for ctx in (4096, 32768, 131072, 1 << 20):
        t = prefill_length(meta("standard", ctx, 8))
        assert t >= 16 and (4 * 8 * t * ctx <= SCORE_BYTES or t == 16)


@pytest.mark.parametrize("ops", ["standard", "default"])
def test_onnx_attention_reads_only_the_positions_in_use(tmp_path, ops):
    """Both op sets' global attention read only the positions in use (the standard op set slices its
    cache to the attention mask's length; GroupQueryAttention reads seqlens_k): NaN planted in the
    global caches' rows past the current position changes nothing (a graph that read every row, even
    masked, would return NaN: 0 x NaN)."""
    from pathlib import Path

    from contract.layout import Naming

    trained = Path(__file__).parent / "fixtures" / "gemma3-tiny-trained"
    assert export_main(["--checkpoint", str(trained), "--target", "onnx", "--onnx-ops", ops, "--out",
                        str(tmp_path), "--no-verify"]) == 0
    session = load(next(tmp_path.glob("*_onnx")))
    tokens = np.arange(3, 43, dtype=np.int32)
    session.prefill(tokens)
    want = session.decode(7)
    session.reset()
    session.prefill(tokens)
    values = session.backend._values
    poisoned = 0
    for spec in session.metadata.states:
        if spec.layer_kind is LayerKind.GLOBAL:
            value = values[spec.name(Naming.ONNX_PAST)]
            rows = value.numpy().copy()
            rows[:, :, len(tokens) + 1:] = np.nan
            value.update_inplace(rows)
            poisoned += 1
    assert poisoned
    got = session.decode(7)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)
