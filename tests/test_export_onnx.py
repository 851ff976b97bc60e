"""ONNX export: all three tiny families in both op sets pass onnx.checker and the parity gate,
generate the JAX model's greedy tokens in onnxruntime-genai, and have the expected graphs
(GroupQueryAttention / model-local functions, the RG-LRU Scan, window-sized local caches, the tied
embedding stored once); determinism, external data, unsupported ops, tokenizer files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import FAMILIES, TINY, full_logits
from export.cli import main as export_main
from export.lowering.onnx.inspect import read
from models import GREEDY, LayerKind, generate, get_config, init_params, load_checkpoint
from runtime_py import ContextFullError, load
from verify.gates import gate_for

MAX_LEN = 64
OP_SETS = ("default", "standard")


def export_args(model, out, *extra):
    return ["--model", model, "--random-init", "0", "--target", "onnx", "--out", str(out),
            "--max-seq-len", str(MAX_LEN), "--prefill-lens", "4,16", "--verify-steps", "40", *extra]


def folder_name(model, op_set="default", dtype="f32"):
    return f"{model}_{dtype}_ctx{MAX_LEN}{'' if op_set == 'default' else '_' + op_set}_onnx"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """{(family, op set): folder}: each tiny family exported once per op set, through the gate."""
    out = tmp_path_factory.mktemp("onnx")
    paths = {}
    for family in FAMILIES:
        for op_set in OP_SETS:
            assert export_main(export_args(TINY[family], out, "--onnx-ops", op_set)) == 0
            paths[family, op_set] = out / folder_name(TINY[family], op_set)
    return paths


def all_nodes(model: onnx.ModelProto):
    yield from model.graph.node
    for f in model.functions:
        yield from f.node


def scan_bodies(model: onnx.ModelProto):
    for node in all_nodes(model):
        if node.op_type == "Scan":
            yield node


@pytest.mark.parametrize("op_set", OP_SETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_gate_passed_and_the_model_checks(artifacts, family, op_set):
    folder = artifacts[family, op_set]
    report = json.loads((folder / "parity.json").read_text())
    assert report["passed"] and report["max_rel_rms"] <= gate_for("onnx", None).max_rel_rms
    assert report["greedy_match"] == [40] * len(report["greedy_match"])
    window = get_config(TINY[family]).sliding_window
    assert max(s["position"] for s in report["steps"]) > 2 * window  # decode wrapped the local caches
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_op_set_graph(artifacts, family):
    cfg = get_config(TINY[family])
    model = onnx.load(str(artifacts[family, "default"] / "model.onnx"))
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    n_attention = sum(k.is_attention for k in cfg.layer_kinds)
    n_recurrent = sum(k is LayerKind.RECURRENT for k in cfg.layer_kinds)
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == n_attention
    assert {op for domain, op in ops if domain == "com.microsoft"} == {"GroupQueryAttention"}
    assert ops.count(("gemma_edge", "LinearRecurrence")) == n_recurrent
    assert len(list(scan_bodies(model))) == (1 if n_recurrent else 0)  # in the one function
    assert ops.count(("", "RMSNormalization")) > 0
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    windows = sorted(next((a.i for a in n.attribute if a.name == "local_window_size"), -1) for n in gqa)
    n_local = sum(k is LayerKind.LOCAL for k in cfg.layer_kinds)
    assert windows.count(cfg.window_span) == n_local
    caps = {next(a.f for a in n.attribute if a.name == "softcap") for n in gqa}
    assert caps == {cfg.attn_softcap or 0.0}


@pytest.mark.parametrize("op_set", OP_SETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_op_table_holds_in_the_graph(artifacts, family, op_set):
    """Every row of export/fused_ops.py: each fused op the family emits has a rule in the op set
    (or is only met inside a lowered decomposition) and becomes the node the table names."""
    from export.fused_ops import FUSED_OPS
    from export.lowering.onnx.fused import OP_SETS as RULES_BY_OP_SET
    from models.fused import AttentionForm

    model = onnx.load(str(artifacts[family, op_set] / "model.onnx"), load_external_data=False)
    names = {f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in all_nodes(model)}
    for op in FUSED_OPS.values():
        assert AttentionForm.CACHE_OWNING in op.forms or op.onnx[op_set] is None, op.name
        expected = op.onnx[op_set]
        if expected is None:
            continue
        assert op.name in RULES_BY_OP_SET[op_set], op.name
        if family in op.families:
            assert any(n == expected or n.startswith(expected) for n in names), (op.name, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_standard_op_set_has_no_contrib_op(artifacts, family):
    cfg = get_config(TINY[family])
    model = onnx.load(str(artifacts[family, "standard"] / "model.onnx"))
    assert not [n for n in all_nodes(model) if n.domain == "com.microsoft"]
    calls = [n.op_type for n in model.graph.node if n.domain == "gemma_edge"]
    kinds = cfg.layer_kinds
    assert sum(c.startswith("GlobalAttention") for c in calls) == kinds.count(LayerKind.GLOBAL)
    assert sum(c.startswith("LocalAttention") for c in calls) == kinds.count(LayerKind.LOCAL)
    assert calls.count("LinearRecurrence") == kinds.count(LayerKind.RECURRENT)
    assert {f.domain for f in model.functions} <= {"gemma_edge"}


@pytest.mark.parametrize("op_set", OP_SETS)
def test_weights_stored_once_and_never_transposed_at_run_time(artifacts, op_set):
    model = onnx.load(str(artifacts["gemma3", op_set] / "model.onnx"))
    initializers = {t.name for t in model.graph.initializer}
    weights = {n for n in initializers if not n.startswith("rope_")}
    cfg = get_config("gemma3-tiny")
    assert weights == set(init_params(cfg, 0))  # each parameter once
    # default: GQA rotates q and k from cos/sin tables, one pair per RoPE setting (local, global)
    assert len(initializers - weights) == (4 if op_set == "default" else 0)
    produced_from_weight = [n for n in all_nodes(model) if n.op_type == "Transpose" and n.input[0] in weights]
    assert not produced_from_weight
    uses = [n.op_type for n in model.graph.node if "embed" in n.input]
    assert sorted(uses) == ["Gather", "Gemm"]  # the tied table: lookup and logits, one copy
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm" and "embed" in n.input)
    assert {a.name: a.i for a in gemm.attribute}.get("transB") == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_caches_and_genai_config(artifacts, family):
    cfg = get_config(TINY[family])
    for op_set in OP_SETS:
        folder = artifacts[family, op_set]
        report = read(folder)
        declared = {n: s for n, s, _ in report.inputs}
        allocated = {s.name("onnx_past"): s.shape for s in report.metadata.states}
        genai = report.genai_config["model"]
        assert genai["context_length"] == MAX_LEN and genai["vocab_size"] == cfg.vocab_size
        assert genai["type"] == {"gemma2": "gemma2", "gemma3": "gemma3_text", "recurrentgemma": "decoder"}[family]
        sliding = genai["decoder"]["sliding_window"]
        assert sliding["layers"] == [i for i, k in enumerate(cfg.layer_kinds) if k is LayerKind.LOCAL]
        for i, kind in enumerate(cfg.layer_kinds):
            if kind is LayerKind.RECURRENT:
                rc = cfg.recurrent
                assert declared[f"past.{i}.conv"] == (1, rc.conv_width - 1, rc.lru_width)
                assert declared[f"past.{i}.recurrent"] == (1, rc.lru_width)
                continue
            rows = allocated[f"past_key_values.{i}.key"][2]
            if kind is LayerKind.GLOBAL:
                assert rows == MAX_LEN
            elif op_set == "default":  # GQA's window: the keys a query sees, itself included
                assert rows == cfg.window_span
                assert sliding["window_size"] == rows and "cache_slack" not in sliding
            else:  # the reference's ring, exactly W rows
                assert rows == cfg.sliding_window
                assert sliding["window_size"] + sliding["cache_slack"] == rows
            symbolic = isinstance(declared[f"past_key_values.{i}.key"][2], str)
            assert symbolic == (op_set == "default")


@pytest.fixture(scope="module")
def hf_exports(hf_checkpoints, tmp_path_factory):
    """Tiny HF checkpoints (weights scaled so that generations vary) exported per op set."""
    out = tmp_path_factory.mktemp("onnx-hf")
    paths = {}
    for family in FAMILIES:
        folder = hf_checkpoints[family][0]
        for op_set in OP_SETS:
            name = f"{family}-{op_set}"
            assert export_main(["--checkpoint", str(folder), "--target", "onnx", "--out", str(out),
                                "--max-seq-len", str(MAX_LEN), "--onnx-ops", op_set, "--no-verify"]) == 0
            produced = next(p for p in out.iterdir() if p.is_dir() and p.name.endswith("_onnx")
                            and p not in paths.values())
            paths[family, op_set] = produced.rename(out / name)
    return paths


@pytest.mark.parametrize("op_set", OP_SETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_genai_generates_the_jax_tokens(hf_checkpoints, hf_exports, family, op_set):
    """A prompt of 2W + 4 tokens, then 2W + 5 generated: crosses the window and wraps the local
    caches. max_length below the context: the global caches are sized by onnxruntime-genai."""
    import onnxruntime_genai as og

    cfg, params = load_checkpoint(hf_checkpoints[family][0])
    window = cfg.sliding_window
    prompt = [cfg.tokens.bos] + np.random.default_rng(1).integers(3, cfg.vocab_size, 2 * window + 3).tolist()
    n_new = 2 * window + 5
    max_length = MAX_LEN if op_set == "standard" else len(prompt) + n_new
    model = og.Model(str(hf_exports[family, op_set]))
    search = og.GeneratorParams(model)
    search.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, search)
    generator.append_tokens(np.array(prompt, np.int32))
    ours, logits = [], []
    while not generator.is_done() and len(ours) < n_new:
        logits.append(np.array(generator.get_logits()).reshape(-1))
        generator.generate_next_token()
        ours.append(int(generator.get_next_tokens()[0]))
    ref = generate(params, cfg, [prompt], n_new, stop_tokens=(), max_len=MAX_LEN).tokens[0]
    assert ours == ref
    # every step's logits, not only their argmax (random models can repeat one token)
    expected = full_logits(params, cfg, np.array([prompt + ref[:-1]]), MAX_LEN)[0, len(prompt) - 1:]
    got = np.stack(logits)
    rel = np.sqrt(((got - expected) ** 2).mean(-1) / (expected ** 2).mean(-1))
    assert rel.max() < 1e-4


def test_runtime_py_session(artifacts):
    cfg = get_config("gemma2-tiny")
    session = load(artifacts["gemma2", "default"])
    prompt = [2] + list(range(10, 31))
    ref = generate(init_params(cfg, 0), cfg, [prompt], 24, stop_tokens=(), max_len=MAX_LEN)
    assert session.generate(prompt, 24, sampling=GREEDY) == ref.tokens[0]
    session.reset()
    session.prefill(list(range(2, 2 + MAX_LEN)))
    with pytest.raises(ContextFullError, match="context full"):
        session.decode(5)


def test_same_input_gives_identical_files(artifacts, tmp_path):
    assert export_main(export_args("gemma2-tiny", tmp_path, "--no-verify")) == 0
    again = tmp_path / folder_name("gemma2-tiny")
    for name in ("model.onnx", "genai_config.json"):
        assert (again / name).read_bytes() == (artifacts["gemma2", "default"] / name).read_bytes()


def test_large_models_use_external_data(tmp_path, monkeypatch):
    import export.lowering.onnx.convert as convert

    monkeypatch.setattr(convert, "EXTERNAL_DATA_BYTES", 0)
    assert export_main(export_args("recurrentgemma-tiny", tmp_path, "--verify-steps", "8")) == 0
    folder = tmp_path / folder_name("recurrentgemma-tiny")
    assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
    assert json.loads((folder / "parity.json").read_text())["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temporary left


def test_16_bit_storage_passes_the_gate(tmp_path):
    assert export_main(export_args("gemma3-tiny", tmp_path, "--dtype", "bf16", "--verify-steps", "16")) == 0
    folder = tmp_path / folder_name("gemma3-tiny", dtype="bf16")
    model = onnx.load(str(folder / "model.onnx"))
    types = {t.data_type for t in model.graph.initializer if t.name != "embed" and not t.name.startswith("rope_")}
    assert types == {onnx.TensorProto.BFLOAT16}
    assert json.loads((folder / "parity.json").read_text())["passed"]


def test_unsupported_op_is_one_line_naming_op_and_source(tmp_path, capsys, monkeypatch):
    from export.lowering.onnx import graph

    monkeypatch.delitem(graph.RULES, "stablehlo.tanh")
    assert export_main(export_args("gemma2-tiny", tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert "unsupported op stablehlo.tanh at models/" in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_jax_still_needs_the_composite_patch():
    """export/stablehlo.py patches jax's composite lowering under shape polymorphism.
    When this test fails, jax lowers such composites itself: remove the patch."""
    import jax
    import jax.numpy as jnp

    from models.fused import rms_norm

    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("1, T, 8"), jnp.float32)
    with pytest.raises(Exception, match="decomposition has 3"):
        jax.export.export(jax.jit(lambda x: rms_norm(x, jnp.ones(8), 1e-6)))(spec)


def test_tokenizer_files_and_runtime_cli(tmp_path, model_path, capsys):
    """An HF folder with a SentencePiece tokenizer: the export writes tokenizer.json and
    tokenizer_config.json, and `python -m runtime_py generate` on the folder uses them."""
    import shutil

    from conftest import hf_model
    from contract.tokenizer import Tokenizer

    folder = tmp_path / "ckpt"
    hf_model("gemma3", vocab_size=360).save_pretrained(folder)
    out = tmp_path / "out"
    assert export_main(["--checkpoint", str(folder), "--target", "onnx", "--out", str(out),
                        "--max-seq-len", "64", "--no-verify"]) == 0
    captured = capsys.readouterr()
    assert "warning: no tokenizer found" in captured.err
    # the summary lists the StableHLO ops and composites the lowering met
    met = next(line for line in captured.out.splitlines() if "StableHLO ops lowered:" in line)
    assert "dot_general" in met and "composite gemma_edge.local_attention" in met
    shutil.copy(model_path, folder / "tokenizer.model")
    assert export_main(["--checkpoint", str(folder), "--target", "onnx", "--out", str(out),
                        "--max-seq-len", "64", "--no-verify"]) == 0
    artifact = next(out.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= {p.name for p in artifact.iterdir()}
    run = subprocess.run([sys.executable, "-m", "runtime_py", "generate", "--artifact", str(artifact),
                          "--prompt", "hello world", "--max-new-tokens", "12"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    tok = Tokenizer(folder)
    cfg, params = load_checkpoint(folder)
    ref = generate(params, cfg, [tok.encode("hello world")], 12, max_len=64)
    assert run.stdout == tok.decode(ref.tokens[0]) + "\n"


def test_list_onnx_ops_prints_the_registry(capsys):
    from export.lowering.onnx.fused import OP_SETS
    from export.lowering.onnx.graph import RULES

    assert export_main(["--list-onnx-ops"]) == 0
    out = capsys.readouterr().out
    for name in [*RULES, *OP_SETS["default"]]:
        assert f"  {name} " in out
    assert all(RULES[name].__doc__ for name in RULES)  # each rule says what it lowers


def test_partial_rotary_inside_group_query_attention(tmp_path):
    """RecurrentGemma rotates half of each head. With 8+ table columns (every released size) GQA
    applies it (do_rotary with a partial table); the tiny config takes the RotaryEmbedding path."""
    import dataclasses

    from export.driver import export
    from export.options import ExportOptions
    from models.fused import AttentionForm
    from verify import parity, reference_session

    cfg = dataclasses.replace(get_config("recurrentgemma-tiny"), num_heads=2, head_dim=32)
    assert cfg.rope_dim // 2 % 8 == 0
    params = {k: np.asarray(v) for k, v in init_params(cfg, 0).items()}
    result = export(cfg, params, "onnx", ExportOptions(out_dir=tmp_path, max_len=MAX_LEN, verify=False))
    model = onnx.load(str(result.path / "model.onnx"))
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all({a.name: a.i for a in gqa[0].attribute}.get("do_rotary") == 1 for _ in gqa)
    assert not [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    reference = reference_session(cfg, result.reference_params, [16], MAX_LEN, AttentionForm.CACHE_OWNING)
    prompts = [[2] + list(range(10, 30)), [2, 7, 9]]
    report = parity(reference, load(result.path), prompts, 24)
    assert gate_for("onnx", None).failures(report) == []


def test_genai_config_of_an_instruction_tuned_model():
    """No export needed: the config of gemma3-1b-it at 4096 with GQA's window-sized local caches."""
    from export.lowering.onnx.genai import genai_config
    from models.cache import state_layout

    cfg = get_config("gemma3-1b-it")
    layout = state_layout(cfg, 4096, local_rows=cfg.sliding_window)
    config = genai_config(cfg, 4096, layout, symbolic_local=True)["model"]
    assert config["type"] == "gemma3_text" and config["context_length"] == 4096
    assert config["eos_token_id"] == [cfg.tokens.eos, cfg.tokens.end_of_turn]  # every stop token
    sliding = config["decoder"]["sliding_window"]
    assert sliding["window_size"] == 512 and len(sliding["layers"]) == 22  # 5 of every 6 of 26 layers


def test_f32_compute_changes_only_the_matmuls_accuracy_level(tmp_path):
    """--onnx-compute f32: every MatMulNBits at accuracy_level 1 (ONNX Runtime packs the codes
    alone: runtime memory ~1x the file, docs/memory.md), the same weights byte for byte, and the
    gate passes on a trained model."""
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "gemma3-tiny-trained"
    models = {}
    for compute in ("int8", "f32"):
        out = tmp_path / compute
        assert export_main(["--checkpoint", str(fixture), "--target", "onnx", "--quant", "int4-b32",
                            "--onnx-compute", compute, "--max-seq-len", "128", "--out", str(out)]) == 0
        folder, = out.iterdir()
        assert folder.name.endswith("_f32compute_ctx128_onnx") == (compute == "f32")
        assert json.loads((folder / "parity.json").read_text())["passed"]
        models[compute] = onnx.load(str(folder / "model.onnx"))
    levels = {c: {a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                  if a.name == "accuracy_level"} for c, m in models.items()}
    assert levels == {"int8": {4}, "f32": {1}}
    weights = {c: {t.name: t.raw_data for t in m.graph.initializer} for c, m in models.items()}
    assert weights["int8"] == weights["f32"]
