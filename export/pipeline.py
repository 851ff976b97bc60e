"""The export pipeline, target-independent up to the artifact writer: build signatures, choose the
stored weight dtype, write the artifact with its metadata, describe it.

Weight storage: `f32`, or `bf16` / `f16` with f32 compute (the casts are graph ops; 16-bit compute
does not legalize and f16 activations overflow in Gemma). The embedding table stays f32 in every
case: LiteRT's EMBEDDING_LOOKUP and GATHER_ND do not take 16-bit tables (its quantized forms come
with the quantization recipes).
The parity reference is the source model with the stored weights (rounded to the stored dtype,
computing in f32), so the gate measures the lowering; the cost of 16-bit storage itself is
measured by the quantization tooling.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from export.signatures import Signature, all_signatures, state_names, state_specs
from models.config import ModelConfig
from models.multimodal import with_vision

STORED = {"f32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16), "f16": np.dtype(np.float16)}
FORMAT_VERSION = 1


@dataclasses.dataclass
class ExportResult:
    path: Path
    cfg: ModelConfig
    signatures: list[Signature]
    stored_params: dict
    reference_params: dict
    max_len: int
    dtype: str
    seconds: dict
    quant: str | None = None  # the quantization recipe, None for float storage

    def size_line(self, file_bytes: int, target: str) -> str:
        if self.quant is None:
            return size_line(file_bytes, self.stored_params, self.dtype)
        from export.quantize.sizes import ideal_bytes

        ideal = ideal_bytes(self.stored_params, self.quant, target)
        f32 = sum(v.size for v in self.stored_params.values()) * 4
        return (f"  size {file_bytes / 2**20:.1f} MiB ({self.quant}; {f32 / file_bytes:.2f}x smaller than f32, "
                f"{file_bytes / ideal:.3f}x the ideal {ideal / 2**20:.1f} MiB of parameters x bits + scales)")

    def summary(self) -> str:
        from export.lowering.tflite.inspect import read

        report = read(self.path)
        lines = [f"artifact: {self.path}", self.size_line(report.file_bytes, "tflite")]
        for name, sig in report.signatures.items():
            ins = {n: list(s) for n, s, _ in sig["inputs"]}
            outs = {n: list(s) for n, s, _ in sig["outputs"]}
            if "tokens" not in ins:  # the vision encoder
                lines.append(f"  signature {name}: " + ", ".join(f"{k}{v}" for k, v in ins.items()) + " -> "
                             + ", ".join(f"{k}{v}" for k, v in outs.items()))
                continue
            embeds = f" embeddings{ins.pop('embeddings')}" if "embeddings" in ins else ""
            lines.append(f"  signature {name}: tokens{ins.pop('tokens')} input_pos{ins.pop('input_pos')}{embeds} "
                         f"+ {len(ins)} states -> logits{outs.pop('logits')} + {len(outs)} states")
        decode = report.op_histogram.get("decode", {})
        top = ", ".join(f"{op} {n}" for op, n in decode.most_common(12))
        lines.append(f"  decode ops: {top}")
        lines.append("  composites: " + ", ".join(f"{k} x{v}" for k, v in sorted(report.composites.items())))
        if report.custom_ops:
            lines.append(f"  CUSTOM ops: {dict(report.custom_ops)}")
        lines.append("  state bytes by layer kind (context %d): %s" % (self.max_len, ", ".join(
            f"{k} {v / 2**20:.2f} MiB" for k, v in state_bytes(self.cfg, self.max_len).items())))
        lines.append("  times: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def size_line(file_bytes: int, stored: dict, dtype: str) -> str:
    weights = sum(v.nbytes for v in stored.values())
    return (f"  size {file_bytes / 2**20:.1f} MiB, stored weights {weights / 2**20:.1f} MiB "
            f"({dtype}; ratio {file_bytes / weights:.3f})")


def state_bytes(cfg: ModelConfig, max_len: int) -> dict[str, int]:
    """Bytes of the state tensors per layer kind (f32)."""
    kinds = cfg.layer_kinds
    out = collections.Counter()
    for (layer, _, _), spec in zip(state_names(cfg), state_specs(cfg, max_len)):
        out[kinds[layer].value] += int(np.prod(spec.shape)) * spec.dtype.itemsize
    return dict(out)


def stored_params(params: dict, dtype: str, embed_16bit: bool = False) -> dict:
    """The weights as stored; the embedding table stays f32 unless `embed_16bit` (ONNX's Gather
    takes any dtype; LiteRT's lookup ops do not)."""
    target = STORED[dtype]
    return {k: np.asarray(v) if (k == "embed" and not embed_16bit) or target == np.float32
            else np.asarray(v).astype(target) for k, v in params.items()}


def metadata(cfg: ModelConfig, max_len: int, lens: list[int], dtype: str, quant: str | None = None) -> str:
    kinds = cfg.layer_kinds
    states = [{"name": spec.name, "layer": layer, "kind": kinds[layer].value, "shape": list(spec.shape),
               "dtype": str(spec.dtype)}
              for (layer, _, _), spec in zip(state_names(cfg), state_specs(cfg, max_len))]
    body = {
        "format": FORMAT_VERSION, "model": cfg.name, "family": cfg.family.value,
        "max_seq_len": max_len, "prefill_lengths": lens, "weight_dtype": dtype, "quantization": quant,
        "vocab_size": cfg.vocab_size, "sample_vocab_size": cfg.sample_vocab_size,
        "sliding_window": cfg.sliding_window, "instruction_tuned": cfg.instruction_tuned,
        "bos": cfg.tokens.bos, "eos": cfg.tokens.eos, "stop_tokens": list(cfg.tokens.stop_ids()),
        "states": states, "config": _config_dict(cfg),
    }
    return json.dumps(body, sort_keys=True)


def _config_dict(cfg: ModelConfig) -> dict:
    raw = dataclasses.asdict(cfg)
    raw["layer_pattern"] = [k.value for k in cfg.layer_pattern]
    raw["family"] = cfg.family.value
    return raw


def export_tflite(cfg: ModelConfig, params: dict, *, out_dir: Path, max_len: int, prefill_lens: list[int],
                  dtype: str = "f32", stage=None, progress=None, name: str | None = None,
                  quant: str | None = None) -> ExportResult:
    """Write one .tflite. With `quant`, the f32 model is converted to a temporary file and
    quantized by ai-edge-quantizer into the artifact (export/quantize/tflite.py)."""
    import time

    from export.lowering.tflite.convert import convert

    cfg = with_vision(cfg, params)
    recipe, storage, stored = _storage(cfg, params, "tflite", None, quant, dtype)
    seconds = {}
    signatures = all_signatures(cfg, prefill_lens, max_len)
    compute = None if storage == "f32" else _upcast
    path = Path(out_dir) / (name or f"{cfg.name}_{quant or dtype}_ctx{max_len}.tflite")
    float_path = path if recipe is None else path.with_name(path.name + ".float.tmp")
    t0 = time.perf_counter()
    try:
        with stage("convert") if stage else _null():
            convert(signatures, stored, float_path, compute=compute, progress=progress,
                    metadata=metadata(cfg, max_len, prefill_lens, storage, quant))
        seconds["convert"] = time.perf_counter() - t0
        if recipe is not None:
            from export.quantize.tflite import quantize_file

            t0 = time.perf_counter()
            with stage(f"quantize {quant}") if stage else _null():
                quantize_file(float_path, path, recipe)
            seconds["quantize"] = time.perf_counter() - t0
    finally:
        if recipe is not None and float_path.exists():
            float_path.unlink()
    stored, reference = _gate_weights(params, stored, quant)
    return ExportResult(path, cfg, signatures, stored, reference, max_len, storage, seconds, quant=quant)


@dataclasses.dataclass
class LitertlmExportResult(ExportResult):
    """path is the .litertlm bundle: the TFLite model, the tokenizer, LiteRT-LM's metadata."""

    tokenizer: Path | None = None

    def summary(self) -> str:
        from export.litertlm import read_bundle

        lines = ExportResult.summary(self).splitlines()
        bundle = read_bundle(self.path)
        llm = bundle.llm_metadata()
        sections = ", ".join(f"{s.data_type} {s.size / 2**20:.2f} MiB" for s in bundle.sections)
        lines.insert(1, f"  LiteRT-LM bundle v{'.'.join(map(str, bundle.version))}: {sections}")
        stops = [list(t.token_ids.ids) for t in llm.stop_tokens]
        lines.insert(2, f"  LlmMetadata: start {list(llm.start_token.token_ids.ids)}, stop {stops}, max_num_tokens "
                        f"{llm.max_num_tokens}, model type {llm.llm_model_type.WhichOneof('model_type')}, chat "
                        f"template {'yes' if llm.HasField('jinja_prompt_template') else 'no'}; tokenizer {self.tokenizer}")
        return "\n".join(lines)


def export_litertlm(cfg: ModelConfig, params: dict, *, out_dir: Path, max_len: int, prefill_lens: list[int],
                    tokenizer: Path | None, dtype: str = "f32", stage=None, progress=None,
                    name: str | None = None, quant: str | None = None) -> LitertlmExportResult:
    """Write a .litertlm bundle: the TFLite export (any recipe) with the SentencePiece tokenizer and
    LiteRT-LM's metadata (export/litertlm.py). The model is converted into a scratch folder beside
    the output, bundled under a temporary name and renamed; nothing partial is left behind."""
    import shutil
    import tempfile
    import time

    from export.litertlm import preflight, write_bundle

    tok_path = preflight(cfg, prefill_lens, tokenizer)
    path = Path(out_dir) / (name or f"{cfg.name}_{quant or dtype}_ctx{max_len}.litertlm")
    scratch = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{path.stem}-"))
    try:
        inner = export_tflite(cfg, params, out_dir=scratch, max_len=max_len, prefill_lens=prefill_lens,
                              dtype=dtype, stage=stage, progress=progress, quant=quant)
        t0 = time.perf_counter()
        with stage("bundle") if stage else _null():
            write_bundle(inner.path, tok_path, cfg, max_len, path)
        inner.seconds["bundle"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fields = {f.name: getattr(inner, f.name) for f in dataclasses.fields(ExportResult)}
    return LitertlmExportResult(**{**fields, "path": path}, tokenizer=tok_path)


def _storage(cfg: ModelConfig, params: dict, target: str, op_set: str | None, quant: str | None, dtype: str):
    """(integer recipe to apply to the lowered artifact or None, stored dtype, stored weights).

    `fp16` is 16-bit storage on both targets, the embedding table included (TFLite: its casts
    become DEQUANTIZE ops, run once at load); the integer recipes lower the f32 weights and
    quantize the result."""
    if quant is None:
        return None, dtype, stored_params(params, dtype)
    from export.quantize import check

    recipe = check(target, quant, op_set, cfg, dtype)
    if recipe.bits == 16:
        return None, "f16", stored_params(params, "f16", embed_16bit=True)
    if recipe.block and cfg.vision is not None and "vision.patch_embed.w" in params:
        from models.vision import pad_for_blocks  # the tower's odd widths (588, 4304), exactly

        params = pad_for_blocks(params, cfg.vision, recipe.block)
    return recipe, "f32", stored_params(params, "f32")


def _gate_weights(params: dict, stored: dict, quant: str | None) -> tuple[dict, dict]:
    """(weights the result describes, f32 weights of the parity reference): the stored weights for
    float storage (the gate measures the lowering), the source for a recipe (it measures the
    quantization too)."""
    if quant is not None:
        stored = {k: np.asarray(v) for k, v in params.items()}
    return stored, {k: np.asarray(v, np.float32) for k, v in stored.items()}


@dataclasses.dataclass
class OnnxExportResult(ExportResult):
    """path is the onnxruntime-genai folder (model.onnx, genai_config.json, tokenizer files)."""

    op_set: str = "default"
    tokenizer_files: list[str] | None = None
    stablehlo_ops: dict = dataclasses.field(default_factory=dict)  # ops (and composites) met -> count

    def summary(self) -> str:
        from export.lowering.onnx.inspect import read

        report = read(self.path)
        lines = [f"artifact: {self.path}/ (onnxruntime-genai folder, op set '{self.op_set}')",
                 self.size_line(report.file_bytes, "onnx")]
        states = [(t["name"], t["shape"]) for t in report.metadata["states"]]
        lines.append(f"  inputs: input_ids, attention_mask + {len(states)} states -> logits + {len(states)} states")
        met = ", ".join(f"{op.replace('stablehlo.', '')} {n}" for op, n in sorted(self.stablehlo_ops.items()))
        lines.append(f"  StableHLO ops lowered: {met}")
        top = ", ".join(f"{op} {n}" for op, n in report.op_histogram.most_common(12))
        lines.append(f"  ONNX ops ({sum(report.op_histogram.values())} nodes): {top}")
        if report.function_ops:
            lines.append("  functions: " + ", ".join(sorted(report.function_ops)))
        kinds = self.cfg.layer_kinds
        by_kind = collections.Counter()
        for name, shape in states:
            by_kind[kinds[int(name.split(".")[1])].value] += int(np.prod(shape)) * 4
        lines.append("  state bytes by layer kind (context %d): %s" % (self.max_len, ", ".join(
            f"{k} {v / 2**20:.2f} MiB" for k, v in by_kind.items())))
        extra = [f"{f.name} {f.stat().st_size / 2**20:.2f} MiB" for f in sorted(self.path.glob("*.onnx*"))
                 if f.name.startswith(("vision_encoder.", "image_prefill."))]
        if extra:
            lines.append("  vision: " + ", ".join(extra) + " (image [1, S, S, 3] -> soft_tokens; the decoder with "
                         "inputs_embeds)")
        lines.append("  tokenizer: " + (", ".join(self.tokenizer_files) if self.tokenizer_files else "none"))
        lines.append("  times: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def export_onnx(cfg: ModelConfig, params: dict, *, out_dir: Path, max_len: int, dtype: str = "f32",
                op_set: str = "default", tokenizer_source: Path | None = None, stage=None,
                name: str | None = None, lens: list[int] | None = None,
                quant: str | None = None) -> OnnxExportResult:
    """Write an onnxruntime-genai folder: model.onnx (+ model.onnx.data for large models),
    genai_config.json and the tokenizer files. The folder is built under a temporary name and renamed into place."""
    import shutil
    import time

    from export.lowering.onnx.convert import assemble, external_table, lower_to_graph, save, state_shapes
    from export.lowering.onnx.genai import genai_config
    from export.signatures import build_decoder_signature

    cfg = with_vision(cfg, params)
    if cfg.vision is not None and op_set != "standard":
        raise ValueError("images need the bidirectional attention inside each image, which ONNX Runtime's "
                         "GroupQueryAttention cannot express: pass --onnx-ops standard, or --no-vision for a "
                         "text-only export with GroupQueryAttention")
    recipe, storage, stored = _storage(cfg, params, "onnx", op_set, quant, dtype)
    seconds = {}
    compute = None if storage == "f32" else _upcast
    sig = build_decoder_signature(cfg, max_len)
    suffix = "" if op_set == "default" else f"_{op_set}"
    folder = Path(out_dir) / (name or f"{cfg.name}_{quant or dtype}_ctx{max_len}{suffix}_onnx")
    tmp = folder.with_name(folder.name + ".tmp")
    t0 = time.perf_counter()
    with stage("lower") if stage else _null():
        lw = lower_to_graph(sig, stored, op_set=op_set, max_len=max_len, compute=compute)
    seconds["lower"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with stage("write") if stage else _null():
        body = json.loads(metadata(cfg, max_len, lens or [], storage, quant))
        model, weights = assemble(sig, lw, {})
        if recipe is not None:
            from export.quantize.onnx import quantize_model

            weights = quantize_model(model, weights, recipe)
        shapes = state_shapes(sig, lw)
        kinds = cfg.layer_kinds
        body.update(onnx_op_set=op_set, states=[
            {"name": k, "shape": list(v), "layer": int(k.split(".")[1]), "kind": kinds[int(k.split(".")[1])].value}
            for k, v in shapes.items()])
        body.pop("prefill_lengths")
        from onnx import helper

        helper.set_model_props(model, {"gemma_edge": json.dumps(body, sort_keys=True)})
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            save(model, weights, tmp / "model.onnx")
            if cfg.vision is not None:
                seconds["vision graphs"] = _onnx_vision_graphs(
                    cfg, stored, tmp, max_len=max_len, op_set=op_set, compute=compute, recipe=recipe,
                    props={"gemma_edge": json.dumps(body, sort_keys=True)}, reuse=external_table(model, weights))
            del weights
            config = genai_config(cfg, max_len, shapes, symbolic_local=op_set == "default")
            (tmp / "genai_config.json").write_text(json.dumps(config, indent=2))
            files = None
            if tokenizer_source is not None:
                from export.tokenizer_files import write_tokenizer_files

                files = write_tokenizer_files(Path(tokenizer_source), tmp)
            old = folder.with_name(folder.name + ".old")
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds["write"] = time.perf_counter() - t0
    stored, reference = _gate_weights(params, stored, quant)
    return OnnxExportResult(folder, cfg, [sig], stored, reference, max_len, storage, seconds, quant=quant,
                            op_set=op_set, tokenizer_files=files, stablehlo_ops=dict(lw.ops_seen))


def _onnx_vision_graphs(cfg: ModelConfig, stored: dict, folder: Path, *, max_len: int, op_set: str, compute,
                        recipe, props: dict, reuse: dict) -> float:
    """Write vision_encoder.onnx (image [1, S, S, 3] -> soft_tokens [1, N, E]) and image_prefill.onnx
    (the decoder with an `inputs_embeds` input; its weights are referenced in model.onnx.data when
    the decoder's are external) into `folder`. Returns the seconds taken."""
    import time

    from onnx import helper

    from export.lowering.onnx.convert import assemble, lower_to_graph, save
    from export.signatures import build_decoder_signature, build_vision_signature

    t0 = time.perf_counter()
    for sig, file, share in ((build_vision_signature(cfg), "vision_encoder.onnx", None),
                             (build_decoder_signature(cfg, max_len, image=True), "image_prefill.onnx", reuse)):
        lw = lower_to_graph(sig, stored, op_set=op_set, max_len=max_len, compute=compute)
        model, weights = assemble(sig, lw, {})
        del lw
        if recipe is not None:
            from export.quantize.onnx import quantize_model

            weights = quantize_model(model, weights, recipe)
        helper.set_model_props(model, props)
        save(model, weights, folder / file, reuse=share)
    return time.perf_counter() - t0


def _upcast(params: dict) -> dict:
    import jax.numpy as jnp

    return {k: v.astype(jnp.float32) for k, v in params.items()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["ExportResult", "LitertlmExportResult", "OnnxExportResult", "export_litertlm", "export_onnx",
           "export_tflite", "state_bytes", "stored_params"]
