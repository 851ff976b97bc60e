"""The artifact contract (contract/) and the house it holds up: signature names parse and format
one way, the metadata record round-trips through JSON and refuses formats it does not know, the
ONNX metadata reader equals onnx's own, the state layout computed from each tiny family's config
equals the one read back from each target's artifact (names, layers, kinds, shapes: no name is
parsed), the runtime runs every target's artifact with JAX unimportable, and the runtime's
requirements hold no exporter dependency."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import FAMILIES, TINY
from contract.layout import LayerKind, Naming, StateKind, StateLayout
from contract.metadata import FORMAT_VERSION, ArtifactMetadata, MetadataError
from contract.signatures import SignatureKind, parse_signature, signature_name
from export.driver import export
from export.options import ExportOptions
from models import get_config, init_params, load_checkpoint
from models.cache import state_layout

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "tests" / "fixtures" / "gemma3-tiny-trained"
MAX_LEN = 64
TARGETS = ("tflite", "litertlm", "onnx")
# what the edge runtime must never import
EXPORTER_MODULES = ("jax", "jaxlib", "flax", "orbax", "litert_converter", "ai_edge_quantizer", "models", "export",
                    "verify", "torch", "transformers")


# ---- names and records ---------------------------------------------------------------------------
def test_signature_names_round_trip():
    for kind, length in ((SignatureKind.PREFILL, 32), (SignatureKind.IMAGE_PREFILL, 256), (SignatureKind.DECODE, 1),
                         (SignatureKind.VISION_ENCODER, 0)):
        assert parse_signature(signature_name(kind, length)) == (kind, length)
    assert signature_name("prefill", 128) == "prefill_128"
    with pytest.raises(ValueError, match="unexpected signature 'prefil_3'"):
        parse_signature("prefil_3")


def test_state_names_per_target():
    cfg = get_config("recurrentgemma-tiny")
    layout = state_layout(cfg, MAX_LEN)
    by_kind = {s.kind: s for s in layout}
    rec, key = by_kind[StateKind.RECURRENT], by_kind[StateKind.KEY]
    assert (rec.name(Naming.TFLITE), rec.name(Naming.ONNX_PAST), rec.name(Naming.ONNX_PRESENT)) == \
        (f"kv_cache_lru_{rec.layer}", f"past.{rec.layer}.recurrent", f"present.{rec.layer}.recurrent")
    assert (key.name(Naming.TFLITE), key.name(Naming.ONNX_PAST), key.name(Naming.ONNX_PRESENT)) == \
        (f"kv_cache_k_{key.layer}", f"past_key_values.{key.layer}.key", f"present.{key.layer}.key")
    assert rec.dtype == np.float32 and rec.shape == (1, cfg.recurrent.lru_width)
    assert len(set(layout.names())) == len(layout) == 2 * cfg.num_layers


def test_metadata_json_round_trip_and_versions():
    from models.signatures import artifact_metadata

    cfg = get_config("gemma3-vision-tiny")
    meta = artifact_metadata(cfg, MAX_LEN, state_layout(cfg, MAX_LEN), prefill_lengths=(8, 16), quantization="int8")
    back = ArtifactMetadata.from_json(meta.to_json())
    assert back == meta and back.states == meta.states and back.image == meta.image
    assert back.image.image_length == cfg.vision.tokens_per_image + 4
    old = json.loads(meta.to_json())
    old["format"] = 1
    with pytest.raises(MetadataError, match=f"format 1 is not the {FORMAT_VERSION}.*re-export"):
        ArtifactMetadata.from_json(json.dumps(old), where="x.tflite")
    extra = {**json.loads(meta.to_json()), "surprise": 1}
    with pytest.raises(MetadataError, match="unknown metadata fields"):
        ArtifactMetadata.from_json(json.dumps(extra))


def test_onnx_metadata_reader_equals_onnx(tmp_path):
    """contract/onnx.py walks the protobuf itself (no onnx package at run time)."""
    import onnx
    from onnx import helper

    from contract.onnx import metadata_props

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 300])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 300])],
                              [onnx.numpy_helper.from_array(np.ones((300, 300), np.float32), "w")])
    model = helper.make_model(graph)
    props = {"gemma_edge": json.dumps({"a": "é" * 200}), "empty": "", "other": "x" * 70000}
    helper.set_model_props(model, props)
    onnx.save(model, tmp_path / "m.onnx")
    assert metadata_props(tmp_path / "m.onnx") == props


# ---- every tiny family on every target ------------------------------------------------------------
@pytest.fixture(scope="module")
def family_artifacts(tmp_path_factory, tokenizer_256):
    """{(family, target): artifact}: each tiny family exported to every target (no gate: the
    export tests gate them)."""
    out = tmp_path_factory.mktemp("contract")
    made = {}
    for family in FAMILIES:
        cfg = get_config(TINY[family])
        params = init_params(cfg, 0)
        for target in TARGETS:
            options = ExportOptions(out_dir=out, max_len=MAX_LEN, prefill_lens=(16,), tokenizer=Path(tokenizer_256),
                                    verify=False)
            made[family, target] = export(cfg, params, target, options).path
    return made


def _artifact_layout(path: Path, target: str) -> tuple[StateLayout, dict]:
    """(layout from the artifact's metadata, {state name: shape} as the artifact's own tensors
    declare them)."""
    if target == "onnx":
        import onnx

        from contract.onnx import model_file, read_metadata

        graph = onnx.load(str(model_file(path)), load_external_data=False).graph
        dims = {v.name: tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                              for d in v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.output]}
        return read_metadata(path).states, dims
    from contract.tflite import read_tflite

    flat, meta = read_tflite(path)
    declared = {}
    for sig in flat.values():
        for name, shape, _ in (*sig.inputs, *sig.outputs):
            declared.setdefault(name, shape)
    return meta.states, declared


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_state_layout_round_trip(family_artifacts, family, target):
    from export.lowering.onnx.fused import gqa_local_rows

    cfg = get_config(TINY[family])
    path = family_artifacts[family, target]
    expected = state_layout(cfg, MAX_LEN)
    if target == "onnx":  # GroupQueryAttention owns the local caches, sized to the window it keeps
        expected = state_layout(cfg, MAX_LEN, local_rows=gqa_local_rows(cfg.window_span, MAX_LEN))
    layout, declared = _artifact_layout(path, target)
    assert layout == expected
    assert [s.layer for s in layout] == [s.layer for s in expected]
    assert [s.layer_kind for s in layout] == [cfg.layer_kinds[s.layer] for s in layout]
    for spec in layout:  # the artifact's own tensors carry exactly these names and shapes
        names = ((Naming.ONNX_PAST, Naming.ONNX_PRESENT) if target == "onnx" else (Naming.TFLITE,))
        for naming in names:
            shape = declared[spec.name(naming)]
            assert all(d == s for d, s in zip(shape, spec.shape) if isinstance(d, int)), (spec, shape)
            assert len(shape) == len(spec.shape)
    if target == "litertlm":  # and LiteRT-LM's own description of the states agrees
        from contract.bundle import read_bundle

        buffers = read_bundle(path).executor_metadata().llm_executor_metadata.state_buffers
        assert [b.decode_input_name for b in buffers] == layout.names(Naming.TFLITE)
        assert [b.maximum_sequence_length or None for b in buffers] == [s.rows for s in layout]
    if target == "onnx":  # onnxruntime-genai's templates name the same tensors
        genai = json.loads((path / "genai_config.json").read_text())["model"]["decoder"]
        for spec in layout:
            templates = [v for k, v in genai["inputs"].items() if k.startswith("past_")]
            assert any(t % spec.layer == spec.name(Naming.ONNX_PAST) for t in templates)
        local = {s.rows for s in layout if s.layer_kind is LayerKind.LOCAL}
        if "sliding_window" in genai:
            assert local == {genai["sliding_window"]["window_size"]}


# ---- the runtime without JAX ----------------------------------------------------------------------
BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {EXPORTER_MODULES!r}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is not importable here (the edge runtime must not need it)")
    sys.meta_path.insert(0, Block())
""")


def _run_without_exporter(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def trained_artifacts(tmp_path_factory):
    """The trained tiny Gemma 3 on every target, and the JAX model's greedy text for the prompt."""
    from contract.tokenizer import Tokenizer
    from models import generate

    out = tmp_path_factory.mktemp("no_jax")
    cfg, params = load_checkpoint(TRAINED)
    paths = {t: export(cfg, params, t, ExportOptions(out_dir=out, max_len=256, prefill_lens=(32,), tokenizer=TRAINED,
                                                     verify=False)).path for t in TARGETS}
    tok = Tokenizer(TRAINED)
    ids = tok.encode(PROMPT)
    want = generate(params, cfg, [ids], 16, max_len=256)
    return paths, tok.decode(want.tokens[0])


PROMPT = "There once was a brave horse. His name"


def test_runtime_generates_text_without_jax(trained_artifacts):
    """runtime_py.load + generate, text in and text out, on a .tflite, a .litertlm and an ONNX
    folder, in a process where importing jax (or any exporter package) raises: the same text as
    the JAX model. Fails the day an exporter import creeps back into the runtime."""
    paths, want = trained_artifacts
    code = """
        import json, sys
        import runtime_py
        out = {}
        for target, path in json.loads(sys.argv[1]).items():
            tok = sys.argv[2] if target == "tflite" else None  # bundles and ONNX folders carry theirs
            out[target] = runtime_py.generate(path, sys.argv[3], tokenizer=tok, max_new_tokens=16, raw=True)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "models", "export", "verify"))
        print(json.dumps({"text": out, "loaded": loaded}))
    """
    run = _run_without_exporter(code, json.dumps({t: str(p) for t, p in paths.items()}),
                                str(TRAINED / "tokenizer.model"), PROMPT)
    assert run.returncode == 0, run.stderr[-2000:]
    body = json.loads(run.stdout.strip().splitlines()[-1])
    assert body["loaded"] == []
    assert body["text"] == {t: want for t in TARGETS}
    assert len(want.split()) >= 6


def test_runtime_cli_without_jax(trained_artifacts):
    paths, want = trained_artifacts
    code = """
        import runpy, sys
        sys.argv = ["runtime_py", *sys.argv[1:]]
        runpy.run_module("runtime_py", run_name="__main__")
    """
    for target, path in paths.items():
        run = _run_without_exporter(code, "generate", "--artifact", str(path), "--prompt", PROMPT, "--raw",
                                    "--max-new-tokens", "16",
                                    *(["--tokenizer", str(TRAINED)] if target == "tflite" else []))
        assert run.returncode == 0, (target, run.stderr[-2000:])
        assert run.stdout == want + "\n", target


def test_every_runtime_module_imports_without_the_exporter_or_pillow():
    """Each module of runtime_py and contract imports where the exporter, Pillow and sentencepiece
    are not importable (an edge box that feeds token ids): Pillow is imported when an image is
    first decoded, sentencepiece when a tokenizer is first built."""
    code = """
        import importlib, json, pkgutil
        import runtime_py, contract
        names = []
        for pkg in (runtime_py, contract):
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                importlib.import_module(info.name)
                names.append(info.name)
        print(json.dumps(names))
    """
    blocker = BLOCKER.replace("BLOCKED = (", "BLOCKED = ('PIL', 'sentencepiece', ", 1)
    assert blocker != BLOCKER
    run = subprocess.run([sys.executable, "-c", blocker + textwrap.dedent(code)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    names = json.loads(run.stdout.strip().splitlines()[-1])
    assert "runtime_py.image" in names and "runtime_py.session" in names
    run = subprocess.run([sys.executable, "-c", blocker + "import runtime_py.image as m\nm.preprocess('x.png', 28)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode != 0 and "decoding images needs Pillow: pip install pillow" in run.stderr
    tokenize = "from contract.tokenizer import Tokenizer\nTokenizer.from_bytes(b'x')"
    run = subprocess.run([sys.executable, "-c", blocker + tokenize], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert run.returncode != 0 and "tokenizing text needs sentencepiece: pip install sentencepiece" in run.stderr


def test_a_blocked_import_really_fails():
    """The blocker itself: importing jax under it raises (so the tests above would notice)."""
    run = _run_without_exporter("import jax")
    assert run.returncode != 0 and "not importable here" in run.stderr


# ---- packaging ----------------------------------------------------------------------------------
def _requirement_name(req: str) -> str:
    import re

    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


EXPORTER_DISTRIBUTIONS = {"jax", "jaxlib", "flax", "orbax-checkpoint", "litert-converter", "ai-edge-quantizer",
                          "torch", "transformers"}


def test_runtime_requirements_hold_no_exporter():
    """From the package metadata: the base install (the runtime) requires none of the exporter's
    packages, directly or through its own requirements as installed here; the export extra does."""
    import importlib.metadata as md
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    assert not base & EXPORTER_DISTRIBUTIONS, base & EXPORTER_DISTRIBUTIONS
    export_extra = {_requirement_name(r) for r in project["optional-dependencies"]["export"]}
    assert {"jax", "flax", "orbax-checkpoint", "litert-converter", "ai-edge-quantizer"} <= export_extra

    try:
        installed = md.requires("gemma-edge") or []
    except md.PackageNotFoundError:
        pytest.fail("gemma-edge is not installed: pip install '.[test]' first (as .ci/run does)")
    runtime = [r for r in installed if "extra ==" not in r]
    assert {_requirement_name(r) for r in runtime} == base  # the installed metadata is this pyproject's
    seen, todo = set(), list(base)
    while todo:  # the runtime's requirements, transitively, as installed
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [_requirement_name(r) for r in reqs if "extra ==" not in r]
    assert not seen & EXPORTER_DISTRIBUTIONS, seen & EXPORTER_DISTRIBUTIONS


def test_test_extra_holds_every_other_extra():
    """The test extra spells out the others (no self-reference, which sends pip's resolver to the
    index for other releases of this project)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    test = set(extras["test"])
    for name in ("export", "litertlm", "genai"):
        assert set(extras[name]) <= test, name
    assert not any(_requirement_name(r) == "gemma-edge" for r in test)
