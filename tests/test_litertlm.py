"""`.litertlm` bundles: their sections and metadata, the bundled tokenizer, and LiteRT-LM itself
(`litert_lm.Engine`) generating the same greedy text as the JAX model; the CLI's errors;
`runtime_py` on a bundle; `python -m export inspect` on each target's artifact."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from contract.bundle import BundleError, read_bundle
from contract.layout import StateKind
from contract.tokenizer import Tokenizer, apply_chat_template
from export.cli import main as export_main
from export.driver import export
from export.litertlm import chat_template, write_bundle
from export.options import ExportOptions
from models import get_config, init_params, load_checkpoint
from models.cache import state_layout
from models.config import LayerKind
from runtime_py import litertlm_engine, load
from verify import reference_session
from verify.engine import check_greedy, window_crossing_prompt

FIXTURES = Path(__file__).parent / "fixtures"
TRAINED = FIXTURES / "gemma3-tiny-trained"
TRAINED_RG = FIXTURES / "recurrentgemma-tiny-trained"
MAX_LEN = 128
# prefill signatures per bundle: gemma2's one length right-pads every prompt chunk
LENS = {"gemma2-tiny": [64], "gemma3-tiny": [16, 64], "recurrentgemma-tiny": [16, 64]}


def _f32(params):
    return {k: np.asarray(v, np.float32) for k, v in params.items()}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tokenizer_256):
    """{name: (bundle path, cfg, params, tokenizer path, prefill lens)} for the tiny random models
    and the trained tiny Gemma 3 and RecurrentGemma."""
    out = tmp_path_factory.mktemp("litertlm")
    made = {}
    for name, lens in LENS.items():
        cfg = get_config(name)
        params = init_params(cfg, 0)
        r = export(cfg, params, "litertlm", ExportOptions(out_dir=out, max_len=MAX_LEN, prefill_lens=tuple(lens),
                                                          tokenizer=tokenizer_256, verify=False))
        made[name] = (r.path, cfg, params, Path(tokenizer_256), lens)
    for name, folder in (("trained", TRAINED), ("trained-rg", TRAINED_RG)):
        cfg, params = load_checkpoint(folder)
        r = export(cfg, params, "litertlm", ExportOptions(out_dir=out, max_len=256, prefill_lens=(32, 128),
                                                          tokenizer=folder, verify=False))
        made[name] = (r.path, cfg, params, folder / "tokenizer.model", [32, 128])
    return made


def test_bundle_sections_and_metadata(bundles):
    path, cfg, _, tok_path, lens = bundles["gemma3-tiny"]
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no scratch left
    b = read_bundle(path)
    assert [s.data_type for s in b.sections] == ["TFLiteModel", "SP_Tokenizer", "LlmMetadataProto",
                                                 "ExecutorMetadataProto"]
    model = b.tflite()
    assert model.items == {"model_type": "tf_lite_prefill_decode", "prefer_activation_type": "fp32"}
    assert b.tokenizer_bytes() == tok_path.read_bytes()

    llm = b.llm_metadata()
    assert list(llm.start_token.token_ids.ids) == [cfg.tokens.bos]
    assert [list(t.token_ids.ids) for t in llm.stop_tokens] == [[cfg.tokens.eos]]
    assert llm.max_num_tokens == MAX_LEN
    assert llm.llm_model_type.WhichOneof("model_type") == "gemma3"
    assert not llm.HasField("jinja_prompt_template")  # a base model: no chat template

    ex = b.executor_metadata().llm_executor_metadata
    assert ex.max_history_size == MAX_LEN
    layout = state_layout(cfg, MAX_LEN)
    assert [sb.decode_input_name for sb in ex.state_buffers] == layout.names()
    for sb, spec in zip(ex.state_buffers, layout):
        name = spec.name()
        assert sb.prefill_input_name == sb.prefill_output_name == sb.decode_output_name == name
        kind = "LOCAL" if spec.layer_kind is LayerKind.LOCAL else "GLOBAL"
        assert type(sb).Type.Name(sb.type) == f"TYPE_{kind}_{'KEY' if spec.kind is StateKind.KEY else 'VALUE'}_CACHE"
        assert sb.sequence_axis == 2 and sb.maximum_sequence_length == spec.shape[2]
    assert {sb.maximum_sequence_length for sb in ex.state_buffers} == {cfg.sliding_window, MAX_LEN}

    # the model inside is the TFLite export, with its signatures and our metadata
    session = load(path)
    assert sorted(session.signatures) == sorted(["decode", *(f"prefill_{t}" for t in lens)])
    assert session.metadata.model == cfg.name and session.max_len == MAX_LEN


def test_bundled_tokenizer_round_trip(bundles):
    path, cfg, _, tok_path, _ = bundles["trained"]
    ours = Tokenizer(tok_path)
    bundled = Tokenizer.from_bytes(read_bundle(path).tokenizer_bytes())
    text = 'Once upon a time, a little rabbit named Emma said "Hello!" to 42 friends.'
    assert bundled.encode(text) == ours.encode(text)
    assert bundled.decode(ours.encode(text)) == text
    engine = litertlm_engine.Engine(path)
    try:
        assert engine.tokenize(text) == ours.encode(text, add_bos=False)
        assert engine.engine.bos_token_id == cfg.tokens.bos
        assert engine.engine.eos_token_ids == [[cfg.tokens.eos]]
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["gemma2-tiny", "gemma3-tiny", "recurrentgemma-tiny", "trained", "trained-rg"])
def test_litert_lm_greedy_matches_jax(bundles, name):
    """A prompt longer than the window and than a prefill chunk (LiteRT-LM right-pads the last
    chunk), then a generation that wraps the local ring buffers: LiteRT-LM's greedy text must be
    the JAX model's, token for token (RecurrentGemma: its conv and RG-LRU states carried too)."""
    path, cfg, params, tok_path, lens = bundles[name]
    tok = Tokenizer(tok_path)
    steps = 80 if name.startswith("trained") else 40
    prompt_len = cfg.sliding_window + lens[0] // 2 + 5
    prompt = window_crossing_prompt(tok, prompt_len, prompt_len + 8)
    n_prompt = len(tok.encode(prompt))
    assert n_prompt > cfg.sliding_window and all(n_prompt % t for t in lens)
    ref = reference_session(cfg, _f32(params), lens, read_bundle(path).llm_metadata().max_num_tokens)
    engine = litertlm_engine.Engine(path)
    try:
        check = check_greedy(path, ref, tok, prompt, steps, (cfg.tokens.eos,), engine=engine)
        assert check.tokenize_match
        assert check.engine_text == check.reference_text, check
        assert n_prompt + check.reference_tokens > cfg.sliding_window * 2  # the ring wrapped while decoding
        # a second, shorter conversation on the same engine: LiteRT-LM does not zero the states
        # between sessions, so the first one's cache rows must stay masked and its recurrent
        # states be reset at position 0
        short = " ".join(prompt.split()[:5])
        again = check_greedy(path, ref, tok, short, steps, (cfg.tokens.eos,), engine=engine)
        assert again.engine_text == again.reference_text, again
        assert again.reference_tokens >= 4
    finally:
        engine.close()


def test_instruction_tuned_bundle_carries_the_chat_format(tmp_path, tokenizer_256):
    tok = Tokenizer(tokenizer_256)
    for name in ("gemma2-tiny", "gemma3-tiny"):
        cfg = get_config(name)
        cfg = dataclasses.replace(cfg, instruction_tuned=True,
                                  tokens=dataclasses.replace(cfg.tokens, end_of_turn=tok.end_of_turn_id))
        tfl = export(cfg, init_params(cfg, 0), "tflite",
                     ExportOptions(out_dir=tmp_path, max_len=64, prefill_lens=(16,), verify=False)).path
        path = write_bundle(tfl, Path(tokenizer_256), cfg, 64, tmp_path / f"{name}-it.litertlm")
        llm = read_bundle(path).llm_metadata()
        assert [list(t.token_ids.ids) for t in llm.stop_tokens] == [[1], [tok.end_of_turn_id]]
        assert llm.prompt_templates.user.prefix == "<start_of_turn>user\n"
        assert llm.prompt_templates.model.prefix == "<start_of_turn>model\n"
        assert llm.jinja_prompt_template == chat_template(cfg)

        import litert_lm

        litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
        engine = litert_lm.Engine(str(path))
        try:
            assert engine.eos_token_ids == [[1], [tok.end_of_turn_id]]
            message = {"role": "user", "content": "  hello world  "}
            conv = engine.create_conversation()
            assert conv.render_message_to_string(message) == apply_chat_template([message], family=cfg.family)
            conv = engine.create_conversation(system_message="Be brief.")
            rendered = conv.render_message_to_string(message)
            if name == "gemma3-tiny":  # Gemma 3 folds a system message into the first user turn
                assert rendered == apply_chat_template([{"role": "system", "content": "Be brief."}, message],
                                                       family=cfg.family)
            else:  # Gemma 2 has no system role: the template raises, LiteRT-LM renders nothing
                assert rendered == ""
        finally:
            engine.close()


def test_missing_or_wrong_tokenizer_is_a_clear_error(tmp_path, capsys, model_path):
    out = tmp_path / "out"
    rc = export_main(["--model", "gemma3-tiny", "--random-init", "0", "--target", "litertlm", "--out", str(out),
                      "--max-seq-len", "64", "--prefill-lens", "16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "no tokenizer" in err and "--tokenizer PATH" in err
    rc = export_main(["--model", "gemma3-tiny", "--random-init", "0", "--target", "litertlm", "--out", str(out),
                      "--tokenizer", str(tmp_path), "--max-seq-len", "64", "--prefill-lens", "16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "holds no tokenizer.model" in err
    # a tokenizer with more pieces (360) than the model's vocabulary (256) is not its tokenizer
    rc = export_main(["--model", "gemma3-tiny", "--random-init", "0", "--target", "litertlm", "--out", str(out),
                      "--tokenizer", str(model_path), "--max-seq-len", "64", "--prefill-lens", "16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "360 pieces" in err and "256" in err
    assert list(out.iterdir()) == []  # nothing written, not even a scratch folder


def test_a_tokenizer_far_smaller_than_the_vocabulary_is_warned_about(tokenizer_256, capsys):
    """LiteRT-LM stops decoding at a sampled id the bundled tokenizer cannot detokenize: a
    tokenizer thousands of pieces short of the table is another model's, and the export says so
    (a few spare rows, as gemma3-4b has, pass quietly)."""
    from export.litertlm import SPARE_ROWS, check_tokenizer

    cfg = get_config("gemma3-tiny")  # 256 rows, as the tokenizer's 256 pieces
    check_tokenizer(Path(tokenizer_256), cfg)
    check_tokenizer(Path(tokenizer_256), dataclasses.replace(cfg, vocab_size=256 + SPARE_ROWS))
    assert capsys.readouterr().err == ""
    check_tokenizer(Path(tokenizer_256), dataclasses.replace(cfg, vocab_size=262144))
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning:") and "256 pieces" in err and "262144" in err and len(err.splitlines()) == 1


def test_prime_prefill_length_is_refused(tmp_path, capsys):
    """LiteRT-LM reads a prime input_pos length above 10 as a placeholder and fails to prefill."""
    rc = export_main(["--checkpoint", str(TRAINED), "--target", "litertlm", "--out", str(tmp_path),
                      "--max-seq-len", "256", "--prefill-lens", "16,31"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "prefill length 31" in err and "--prefill-lens" in err
    assert list(tmp_path.iterdir()) == []


def test_engine_disagreement_fails_the_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(litertlm_engine.Engine, "greedy", lambda self, prompt, n: " something else")
    rc = export_main(["--checkpoint", str(TRAINED), "--target", "litertlm", "--out", str(tmp_path),
                      "--max-seq-len", "256", "--verify-steps", "16"])
    captured = capsys.readouterr()
    assert rc == 1 and "greedy text DIFFERENT" in captured.err and "parity: " in captured.out
    parity = json.loads((tmp_path / "gemma3-tiny-trained_f32_ctx256.FAILED.parity.json").read_text())
    assert not (tmp_path / "gemma3-tiny-trained_f32_ctx256.litertlm").exists()
    assert parity["passed"] and not parity["litert_lm"]["match"]


def test_runtime_maps_the_bundles_model_from_a_section_file(bundles, tmp_path, monkeypatch):
    """runtime_py loads a bundle's TFLite model from a copy of its section beside the weight
    cache (mapped, not read into a second resident copy): the file holds the section's bytes,
    the logits equal the in-memory load's, a second load reuses the file, a re-exported bundle
    replaces it."""
    from runtime_py import tflite_backend

    monkeypatch.setenv("GEMMA_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tflite_backend, "WEIGHT_CACHE_MIN_BYTES", 0)  # the tiny bundles get caches too
    path, _, _, _, _ = bundles["trained"]
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    prompt = [2, 17, 99, 5, 42, 7, 63]
    mapped = tflite_backend.load_tflite(copy, num_threads=1)
    files = sorted((tmp_path / "cache" / "xnnpack").glob("*" + tflite_backend.SECTION_SUFFIX))
    assert len(files) == 1
    bundle = read_bundle(copy)
    assert files[0].read_bytes() == bundle.read(bundle.tflite())
    in_memory = tflite_backend.load_tflite(copy, num_threads=1, weight_cache=False)
    a, b = mapped.prefill(prompt), in_memory.prefill(prompt)
    assert np.array_equal(a, b)
    assert np.array_equal(mapped.decode(11), in_memory.decode(11))
    before = files[0].stat().st_ino
    tflite_backend.load_tflite(copy, num_threads=1)
    assert files[0].stat().st_ino == before  # reused, not copied again
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # as a re-export
    tflite_backend.load_tflite(copy, num_threads=1)
    again = sorted((tmp_path / "cache" / "xnnpack").glob("*" + tflite_backend.SECTION_SUFFIX))
    assert len(again) == 1 and again[0] != files[0]


def test_recurrentgemma_bundle_declares_its_states(bundles):
    path, cfg, _, _, _ = bundles["recurrentgemma-tiny"]
    ex = read_bundle(path).executor_metadata().llm_executor_metadata
    kinds = {sb.decode_input_name: type(sb).Type.Name(sb.type) for sb in ex.state_buffers}
    layout = state_layout(cfg, MAX_LEN)
    assert list(kinds) == layout.names()
    for spec in layout:
        name = spec.name()
        assert name.startswith("kv_cache_")  # LiteRT-LM carries no other state between calls
        if spec.layer_kind is LayerKind.RECURRENT:
            assert kinds[name] == "TYPE_LINEAR_ATTENTION"
        else:
            assert kinds[name] == f"TYPE_LOCAL_{'KEY' if spec.kind is StateKind.KEY else 'VALUE'}_CACHE"
    assert read_bundle(path).llm_metadata().max_num_tokens == MAX_LEN
    # one output per composite: LiteRT-LM 0.18 cannot run a multi-output composite
    from ai_edge_litert import schema_py_generated as S

    bundle = read_bundle(path)
    model = S.Model.GetRootAs(bundle.read(bundle.tflite()), 0)
    composite = S.BuiltinOperator.STABLEHLO_COMPOSITE
    outputs = [op.OutputsLength() for g in range(model.SubgraphsLength())
               for op in (model.Subgraphs(g).Operators(i) for i in range(model.Subgraphs(g).OperatorsLength()))
               if model.OperatorCodes(op.OpcodeIndex()).BuiltinCode() == composite]
    assert len(outputs) > 0 and set(outputs) == {1}


def test_cli_exports_gates_and_runs_a_quantized_bundle(tmp_path, capsys):
    """The CLI path a user takes: export the trained model at dynamic-int8, the parity gate against
    JAX, LiteRT-LM against our interpreter on the same bundle, then generate from the bundle
    alone with runtime_py (its tokenizer comes from the bundle)."""
    rc = export_main(["--checkpoint", str(TRAINED), "--target", "litertlm", "--quant", "dynamic-int8",
                      "--out", str(tmp_path), "--max-seq-len", "256", "--verify-steps", "48"])
    out = capsys.readouterr().out
    assert rc == 0, out
    bundle = tmp_path / "gemma3-tiny-trained_dynamic-int8_ctx256.litertlm"
    assert "greedy text identical" in out
    parity = json.loads(bundle.with_suffix(".parity.json").read_text())
    assert parity["passed"] and parity["litert_lm"]["match"]
    assert parity["litert_lm"]["reference"] == "runtime_py"
    assert sorted(p.name for p in tmp_path.iterdir()) == [bundle.name, bundle.with_suffix(".parity.json").name,
                                                          bundle.with_suffix(".parity.png").name]

    from runtime_py.__main__ import main as runtime_main

    assert runtime_main(["generate", "--artifact", str(bundle), "--prompt", "There once was a brave horse. His name",
                         "--max-new-tokens", "12"]) == 0
    text = capsys.readouterr().out.strip()
    tok = Tokenizer(TRAINED)
    session = load(bundle)
    expected = tok.decode(session.generate(tok.encode("There once was a brave horse. His name"), 12,
                                           stop_tokens=(tok.eos_id,)))
    assert text == expected.strip() and len(text.split()) >= 6


def test_inspect_each_target(bundles, tmp_path, capsys):
    path, cfg, params, tok_path, lens = bundles["gemma3-tiny"]
    options = ExportOptions(out_dir=tmp_path, max_len=MAX_LEN, prefill_lens=tuple(lens), verify=False)
    tfl = export(cfg, params, "tflite", dataclasses.replace(options, quant="int4-b32")).path
    onnx_dir = export(cfg, params, "onnx", dataclasses.replace(options, tokenizer=tok_path)).path

    assert export_main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    for expected in ("TFLiteModel tf_lite_prefill_decode", f"max_num_tokens {MAX_LEN}", "model type gemma3",
                     f"max_history_size {MAX_LEN}", "signature decode", "signature prefill_16",
                     f"x local [1, {cfg.num_kv_heads}, {cfg.sliding_window}, {cfg.head_dim}]",
                     f"x global [1, {cfg.num_kv_heads}, {MAX_LEN}, {cfg.head_dim}]",
                     "FULLY_CONNECTED weight", "FLOAT32", "composites: odml.rms_norm",
                     "tokenizer: SentencePiece"):
        assert expected in text, (expected, text)

    assert export_main(["inspect", str(tfl)]) == 0
    text = capsys.readouterr().out
    assert "FULLY_CONNECTED weight         INT4 blockwise-32" in text
    assert "EMBEDDING_LOOKUP table         INT4 blockwise-32" in text
    assert "quantization int4-b32" in text and "tokenizer: none" in text

    assert export_main(["inspect", str(onnx_dir)]) == 0
    text = capsys.readouterr().out
    for expected in ("(onnx,", "inputs: input_ids", "com.microsoft::GroupQueryAttention", "genai_config: type gemma3",
                     f"x local [1, {cfg.num_kv_heads}, {cfg.sliding_window}, {cfg.head_dim}]",
                     f"x global [1, {cfg.num_kv_heads}, {MAX_LEN}, {cfg.head_dim}]", "MatMul weight",
                     "tokenizer files: tokenizer.json", "tokenizer: SentencePiece"):
        assert expected in text, (expected, text)

    assert export_main(["inspect", str(path), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["llm_metadata"]["maxNumTokens"] == MAX_LEN and len(body["states"]) == 2 * cfg.num_layers

    assert export_main(["inspect", str(tmp_path / "missing.litertlm")]) == 2
    assert "artifact not found" in capsys.readouterr().err


def test_reading_a_non_bundle_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.litertlm"
    bad.write_bytes(b"NOTABUNDLE" + bytes(64))
    with pytest.raises(BundleError, match="not a .litertlm file"):
        read_bundle(bad)
