"""The parity gate of an exported artifact: load it with runtime_py, run the gate's prompts through
it and through the JAX reference (the same signatures, the same attention form), judge the report
by the gate table's row for (target, recipe), run a `.litertlm` in LiteRT-LM itself, and write the
report as JSON beside the artifact (`<artifact>.parity.json`, or `parity.json` in an ONNX folder),
atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np

from models.config import ModelConfig
from models.fused import AttentionForm
from verify.engine import EngineCheck
from verify.gates import Gate, gate_for
from verify.parity import ParityReport, parity
from verify.prompts import verify_images, verify_prompts
from verify.reference import reference_session


@dataclasses.dataclass
class GateResult:
    report: ParityReport
    gate: Gate
    failures: list[str]
    path: Path  # the parity JSON
    quant: str | None
    engine: EngineCheck | None = None
    long: ParityReport | None = None  # the long check (--verify-long; verify/long.py)
    long_tokens: int = 0

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def engine_failed(self) -> bool:
        return self.engine is not None and not self.engine.match


def parity_path(artifact: Path) -> Path:
    artifact = Path(artifact)
    return artifact / "parity.json" if artifact.is_dir() else artifact.with_suffix(".parity.json")


def run_gate(artifact: Path, cfg: ModelConfig, reference_params: dict, *, target: str, max_len: int, lens: list[int],
             quant: str | None, attention: AttentionForm, steps: int = 64, tokenizer: Path | None = None,
             engine_check: bool = False, stage=None, drop=None, mode: str = "memory",
             progress=None, method: str | None = None, long: int = 0, kv: str = "f32") -> GateResult:
    """Gate `artifact` against the JAX model on `reference_params` (f32 arrays, or lazy tensors
    read when used).

    mode "memory": the JAX model in memory beside the artifact, stepped in lock step
    (verify/parity.py). `drop()` is called once the reference holds its own (device) copy of the
    weights, so the caller can free the host copies before the runtime loads the artifact.
    mode "streamed": the artifact first, then the reference one layer at a time
    (verify/streamed.py): memory is the artifact's runtime or one layer, not both.
    `tokenizer` and `engine_check`: a .litertlm's LiteRT-LM run. `method`: how an int4 recipe's
    codes were chosen (verify/gates.py has a row per method). `long`: tokens of the long check
    (verify/long.py; memory mode only), judged by the same gate row, its failures prefixed `long N:`."""
    from runtime_py import load

    if mode not in ("memory", "streamed"):
        raise ValueError(f"unknown gate mode '{mode}'; choose memory or streamed")
    if long and mode != "memory":
        raise ValueError("--verify-long runs the JAX model beside the artifact: pass --gate memory")
    stage = stage or (lambda name, record=True: contextlib.nullcontext())
    steps = max(1, min(steps, max_len - 4))
    prompts = verify_prompts(cfg, max_len, lens, steps)
    full = prompts[-1:]  # run again on the full-length signatures when the artifact has context buckets
    images = [None] * len(prompts)
    if cfg.vision is not None:
        more, imgs = verify_images(cfg, max_len, lens, steps)
        prompts, images = prompts + more, images + imgs
    if mode == "streamed":
        report, session = _streamed(artifact, cfg, reference_params, prompts, images, steps, stage, progress,
                                    keep_session=engine_check, full=full)
        reference = None
    else:
        reference = reference_session(cfg, reference_params, lens, max_len, attention)
        reference_params = None
        if drop is not None:
            drop()
        session = load(artifact)
        report = parity(reference, session, prompts, steps, images, progress=progress)
        if session.buckets:  # the gate's prompts ran in the smallest bucket: the full-length ones too
            session.use_buckets = False
            _merge(report, parity(reference, session, full, steps))
            session.use_buckets = True
    long_report = None
    if long:
        from verify.long import long_parity, long_prompt

        with stage(f"verify: long check ({long} tokens)", record=False):
            long_report = long_parity(reference, session, long_prompt(cfg, long), steps, cfg.sliding_window,
                                      progress=progress)
    engine = None
    if engine_check:
        # float bundles against the JAX model; quantized ones (whose gate above measured them
        # against JAX) against runtime_py running the same bundle
        against_jax = quant is None and kv == "f32" and reference is not None
        engine = litert_lm_check(artifact, reference if against_jax else session, cfg, tokenizer, max_len, lens,
                                 steps, "the JAX model" if against_jax else "runtime_py", stage)
    del session
    gate = gate_for(target, quant, method, kv)
    if kv != "f32" and quant is None:  # judged like a recipe, against the f32-cache model
        quant = f"{kv} KV"
    failures = gate.failures(report)
    long_failures = [] if long_report is None else gate.failures(long_report)
    failures += [f"long {long}: {f}" for f in long_failures]
    path = parity_path(artifact)
    result = GateResult(report, gate, failures, path, quant, engine, long_report, long)
    body = {"quantization": quant, **({"quant_method": method} if method else {}), **gate.as_dict()} \
        if quant is not None else gate.as_dict()
    if kv != "f32":
        body["kv_cache"] = kv
    extra = {"litert_lm": engine.as_dict()} if engine is not None else {}
    if long_report is not None:
        from verify.long import summary

        extra["long"] = summary(long_report, long, long_failures)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report.to_json(artifact=Path(artifact).name, gate=body, passed=result.passed, **extra))
    os.replace(tmp, path)
    return result


def _merge(report: ParityReport, more: ParityReport):
    """Append `more` (a run on the full-length signatures) to `report`: its prompts numbered after
    report's, its signatures labelled `full-length`."""
    offset = len(report.greedy_match)
    for s in more.steps:
        report.steps.append(dataclasses.replace(s, prompt=s.prompt + offset, signature=f"full-length {s.signature}"))
    report.greedy_match += more.greedy_match


def _streamed(artifact: Path, cfg: ModelConfig, params: dict, prompts, images, steps: int, stage, progress,
              keep_session: bool, full=()):
    """(report, the artifact's session if `keep_session` else None): the artifact's runs, then the
    layer-streamed reference (verify/streamed.py)."""
    from runtime_py import load as load_artifact
    from verify.streamed import run_artifact, streamed_parity

    with stage("verify: artifact", record=False):
        session = load_artifact(artifact)
        recorded = run_artifact(session, prompts, steps, images)
        if session.buckets and full:  # as the in-memory gate: the full-length signatures too
            session.use_buckets = False
            more = run_artifact(session, full, steps)
            session.use_buckets = True
            for r in more:
                r.steps = [(f"full-length {name}", step, pos) for name, step, pos in r.steps]
            recorded += more
        layout = session.vision
    if not keep_session:
        session = None
    encode = None if cfg.vision is None else _jax_encoder(cfg, params)
    with stage("verify: reference, layer by layer", record=False):
        report = streamed_parity(cfg, params, recorded, steps, encode, layout, progress)
    return report, session


def _jax_encoder(cfg: ModelConfig, params: dict):
    """image (preprocessed, [1, S, S, 3]) -> soft tokens [N, E] by the JAX vision tower."""
    import jax

    from models.lazy import load
    from models.vision import encode_images

    tower = {k: load(v) for k, v in params.items() if k.startswith(("vision.", "mm."))}
    fn = jax.jit(lambda p, x: encode_images(p, cfg.vision, cfg.embed_dim, x))

    def encode(image):
        return np.asarray(fn(tower, np.asarray(image, np.float32).reshape(1, *np.shape(image)[-3:])))[0]

    return encode


def litert_lm_check(bundle: Path, reference, cfg: ModelConfig, tokenizer: Path, max_len: int, lens: list[int],
                    steps: int, reference_name: str, stage) -> EngineCheck | None:
    """Run the bundle in LiteRT-LM: greedy text from a prompt that crosses the sliding window must
    equal the reference session's. None (with a note) when litert-lm-api is not installed."""
    from contract.tokenizer import Tokenizer
    from runtime_py import litertlm_engine
    from verify.engine import check_greedy, window_crossing_prompt

    if not litertlm_engine.available():
        print("note: litert-lm-api is not installed, so the bundle was not run in LiteRT-LM itself "
              "(pip install litert-lm-api, or pass --no-engine-check to silence this)")
        return None
    tok = Tokenizer(tokenizer)
    n = max(2, min(steps, max_len // 4))
    target = min(cfg.sliding_window + lens[0] // 2 + 1, max_len - n - 1)
    prompt = window_crossing_prompt(tok, target, max_len - n - 1)
    stops = cfg.tokens.stop_ids() if cfg.instruction_tuned else (cfg.tokens.eos,)
    from contract.bundle import read_bundle

    vision = cfg.vision is not None and read_bundle(bundle).embedded
    with stage("LiteRT-LM"):
        engine = None
        try:
            engine = litertlm_engine.Engine(bundle, max_num_images=1 if vision else 0)
            check = check_greedy(bundle, reference, tok, prompt, n, stops, reference_name=reference_name,
                                 engine=engine)
            if vision:
                _image_check(check, engine, reference, tok, cfg, lens, max_len, n, stops, reference_name)
            return check
        except RuntimeError as e:  # the engine's own log above says why
            return EngineCheck(len(tok.encode(prompt)), False, 0, "", "", reference_name, error=str(e))
        finally:
            if engine is not None:
                engine.close()


def _image_check(check: EngineCheck, engine, reference, tok, cfg: ModelConfig, lens, max_len: int, n: int, stops,
                 reference_name: str):
    """A vision bundle's run with an image (verify/engine.check_image), attached to `check`."""
    import tempfile

    from PIL import Image

    from contract.metadata import ImageLayout
    from runtime_py.image import preprocess
    from verify.engine import check_image, gate_image, image_prompt

    layout = ImageLayout.of(cfg.vision)
    prompt = image_prompt(tok, layout, lens, max_len - n - 1)
    if prompt is None:
        check.note = (f"no image run: no prompt with an image fits one LiteRT-LM prefill chunk (prefill lengths "
                      f"{list(lens)}, an image takes {layout.image_length} positions)")
        return
    with tempfile.TemporaryDirectory(prefix="gate-image-") as folder:
        path = f"{folder}/image.png"
        Image.fromarray(gate_image(layout.image_size)).save(path)
        check.image = check_image(engine, reference, tok, layout, prompt, path, preprocess(path, layout.image_size),
                                  n, stops, reference_name)
