"""--target onnx: an onnxruntime-genai folder: model.onnx (+ model.onnx.data for large models),
genai_config.json, the tokenizer files; with vision also vision.onnx, embedding.onnx,
image_prefill.onnx and processor_config.json, onnxruntime-genai's Gemma 3 vision-language layout
(export/lowering/onnx/multimodal.py, docs/onnx.md, docs/vision.md).

The decoder is one graph for every chunk length, traced in the cache-owning attention form
(ONNX Runtime's GroupQueryAttention owns RoPE and the KV cache) and lowered by our own rules
(export/lowering/onnx). Op set `default` uses ONNX Runtime's contrib ops; `standard` only standard
ONNX (attention as model-local functions), which a model with vision needs: GroupQueryAttention
cannot express the bidirectional attention inside an image.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

from contract.layout import Naming
from contract.metadata import METADATA_KEY
from export.targets import Target
from models.cache import state_layout
from models.fused import AttentionForm
from models.signatures import build_vision_signature, decoder_signature

OP_SET_DEFAULT, OP_SET_STANDARD = "default", "standard"
SPILL_FILE = ".packed.spill"  # quantized weights waiting for model.onnx.data; removed before the rename


GENAI_NO_INT8_KV = ("onnxruntime-genai cannot run an int8 KV cache: it allocates past_key_values in the "
                    "activation type and feeds no scale inputs")


def own_attention(plan) -> bool:
    """Whether the export needs the standard op set's attention (model-local functions) rather
    than GroupQueryAttention: images (their bidirectional blocks) or int8 KV caches (codes and
    per-row scales written by the graph)."""
    return plan.cfg.vision is not None or plan.options.kv_cache != "f32"


def genai_runs(plan) -> bool:
    """Whether onnxruntime-genai can run the folder: not with int8 KV caches (their codes and
    scales are states of our own attention; GENAI_NO_INT8_KV), so such a folder gets no
    genai_config.json and runs in runtime_py."""
    return plan.options.kv_cache == "f32"


class OnnxTarget(Target):
    name = "onnx"
    help = "an onnxruntime-genai folder (model.onnx, genai_config.json, tokenizer)"
    integer_block = 128  # int8 MatMulNBits quantizes in blocks (export/quantize/onnx.py: INT8_BLOCK)
    quant_table = "onnx"
    attention = AttentionForm.CACHE_OWNING
    writes_folder = True
    embed_16bit = False

    def default_prefill_lens(self, max_len: int) -> list[int]:
        """ONNX takes any chunk length: these only shape the gate's prompts."""
        from export.options import DEFAULT_PREFILL_LENS

        return [t for t in DEFAULT_PREFILL_LENS if t <= max_len] or [max(2, max_len // 2)]

    def preflight(self, plan):
        from export.quantize import QuantizationError, check

        cfg, options = plan.cfg, plan.options
        needs_standard = own_attention(plan)
        op_set = options.onnx_ops or (OP_SET_STANDARD if needs_standard else OP_SET_DEFAULT)
        if cfg.vision is not None and op_set != OP_SET_STANDARD:
            raise ValueError("images need the bidirectional attention inside each image, which ONNX Runtime's "
                             "GroupQueryAttention cannot express: pass --onnx-ops standard, or --no-vision for a "
                             "text-only export with GroupQueryAttention")
        if options.kv_cache != "f32" and op_set != OP_SET_STANDARD:
            raise ValueError(f"--kv-cache {options.kv_cache} needs the standard op set's attention on ONNX: ONNX "
                             "Runtime's GroupQueryAttention keeps its CPU cache in the activation type (its "
                             "quantized-cache options are CUDA's, with fixed scales); drop --onnx-ops default, or "
                             "drop --kv-cache")
        if options.onnx_ops is None and needs_standard:
            why = ("GroupQueryAttention cannot express the bidirectional attention inside an image; --no-vision "
                   "keeps it for text" if cfg.vision is not None else
                   "GroupQueryAttention has no int8 CPU cache; onnxruntime-genai cannot run the folder")
            if options.verbose:
                print(f"note: this export's attention is in standard ops (--onnx-ops standard: {why})")
            if options.quant is not None:  # contrib quantized matmuls, as the default op set has them
                try:
                    check("onnx", options.quant, OP_SET_DEFAULT, dtype=options.dtype)
                except QuantizationError as e:
                    what = "a model with vision" if cfg.vision is not None else f"--kv-cache {options.kv_cache}"
                    raise QuantizationError(f"{e} ({what})") from None
        tokenizer = options.tokenizer
        if tokenizer is not None and not Path(tokenizer).exists():
            raise ValueError(f"tokenizer not found: {tokenizer}")
        return dataclasses.replace(plan, op_set=op_set, tokenizer=tokenizer)

    def quant_column(self, plan) -> str:
        """A model with vision, or int8 KV caches, gets the standard op set's attention by itself
        (preflight: `own_attention`); unless the user asked for `--onnx-ops standard` (no contrib op
        anywhere), its recipes are the default op set's: quantized matmuls and embedding as ONNX
        Runtime's contrib ops (MatMulNBits, GatherBlockQuantized). The attention stays standard."""
        if own_attention(plan) and plan.options.onnx_ops is None:
            return OP_SET_DEFAULT
        return plan.op_set

    def artifact_name(self, plan) -> str:
        suffix = "" if plan.op_set == OP_SET_DEFAULT else f"_{plan.op_set}"
        kv = "_kv8" if plan.options.kv_cache == "int8" else ""
        compute = "_f32compute" if plan.options.onnx_compute == "f32" else ""
        return f"{plan.cfg.name}_{plan.quant or plan.options.dtype}{kv}{compute}_ctx{plan.max_len}{suffix}_onnx"

    def layout(self, plan):
        """The states as the folder's runtimes allocate them: GroupQueryAttention (op set default)
        owns the local caches and sizes them to its window (export/lowering/onnx/fused.py)."""
        from export.lowering.onnx.fused import gqa_local_rows

        local_rows = gqa_local_rows(plan.cfg.window_span, plan.max_len) if plan.op_set == OP_SET_DEFAULT else None
        return state_layout(plan.cfg, plan.max_len, local_rows=local_rows, kv=plan.options.kv_cache)

    def signatures(self, plan):
        return [decoder_signature(plan.cfg, plan.max_len, attention=self.attention, kv=plan.options.kv_cache)]

    def write(self, plan, weights, signatures, tmp: Path, timer):
        from onnx import helper

        from export.lowering.onnx.convert import assemble, external_table, lower_to_graph, save, state_shapes
        from export.lowering.onnx.genai import genai_config

        cfg, sig = plan.cfg, signatures[0]
        with timer.stage("lower"):
            lw = lower_to_graph(sig, weights.stored, op_set=plan.op_set, max_len=plan.max_len,
                                compute=weights.compute)
        layout = self.layout(plan)
        allocated = state_shapes(sig, lw)
        expected = {s.name(Naming.ONNX_PAST): s.shape for s in layout}
        if allocated != expected:  # the lowering and the contract must agree on every state
            raise RuntimeError(f"internal error: the ONNX graph's states {allocated} differ from the state layout "
                               f"{expected}")
        metadata = plan.metadata(layout, onnx_op_set=plan.op_set)
        props = {METADATA_KEY: metadata.to_json()}
        info = {"stablehlo_ops": dict(lw.ops_seen), "tokenizer_files": None}
        with timer.stage("write"):
            model, tensors = assemble(sig, lw, {})
            del lw
            recipe = self._integer_recipe(plan)
            memo = {} if cfg.vision is not None else None  # packed weights, shared with the image prefill graph
            spill = None
            try:
                if recipe is not None:
                    from export.quantize.onnx import Spill, quantize_model, set_compute

                    # the packed weights wait on disk, not in memory, until save copies them in
                    spill = Spill(tmp / SPILL_FILE)
                    tensors = quantize_model(model, tensors, recipe, weights.blocks, memo, progress=timer.progress,
                                             spill=spill)
                    set_compute(model, plan.options.onnx_compute)
                helper.set_model_props(model, props)
                save(model, tensors, tmp / "model.onnx", progress=timer.progress,
                     on_written=spill.release if spill is not None else None)
                if cfg.vision is not None:
                    t0 = time.perf_counter()
                    self._vision_graphs(plan, weights, tmp, props, reuse=external_table(model, tensors), memo=memo,
                                        spill=spill)
                    timer.seconds["vision graphs"] = time.perf_counter() - t0
            finally:
                if spill is not None:
                    spill.close()
            del tensors
            if genai_runs(plan):
                config = genai_config(cfg, plan.max_len, layout, symbolic_local=plan.op_set == OP_SET_DEFAULT)
                if cfg.vision is not None:
                    from export.lowering.onnx.multimodal import PROCESSOR, processor_config, vision_sections

                    config["model"].update(type="gemma3", **vision_sections(config["model"]["decoder"]))
                    (tmp / PROCESSOR).write_text(json.dumps(processor_config(cfg.vision), indent=2))
                (tmp / "genai_config.json").write_text(json.dumps(config, indent=2))
            if plan.tokenizer is not None:
                from export.tokenizer_files import write_tokenizer_files

                info["tokenizer_files"] = write_tokenizer_files(Path(plan.tokenizer), tmp)
                if cfg.vision is not None and info["tokenizer_files"]:
                    from export.tokenizer_files import add_image_tokens

                    add_image_tokens(tmp, cfg.vision)  # onnxruntime-genai's processor writes them as text
        if not info["tokenizer_files"] and plan.options.verbose and genai_runs(plan):
            where = f" in {plan.tokenizer}" if plan.tokenizer else ""
            print(f"warning: no tokenizer found{where}: {plan.path} has the model and genai_config.json but "
                  "onnxruntime-genai also needs tokenizer.json and tokenizer_config.json; pass --tokenizer PATH "
                  "(a folder with tokenizer.json or a SentencePiece tokenizer.model)", file=sys.stderr)
        return metadata, info

    @staticmethod
    def _integer_recipe(plan):
        return None if plan.recipe is None or plan.recipe.bits == 16 else plan.recipe

    def _vision_graphs(self, plan, weights, folder: Path, props: dict, reuse: dict, memo: dict, spill=None):
        """vision.onnx (pixel_values [N, 3, S, S] -> image_features [N, I, E]), embedding.onnx
        and image_prefill.onnx (the decoder with an `inputs_embeds` input; its weights are
        referenced in model.onnx.data when the decoder's are external): the graphs of
        onnxruntime-genai's Gemma 3 pipeline (export/lowering/onnx/multimodal.py)."""
        from onnx import helper

        from contract.onnx import IMAGE_PREFILL, VISION_ENCODER
        from export.lowering.onnx.convert import IR_VERSION, assemble, lower_to_graph, save
        from export.lowering.onnx.multimodal import EMBEDDING, embedding_model, scan_over_images

        cfg, recipe = plan.cfg, self._integer_recipe(plan)
        for sig, file, share in ((build_vision_signature(cfg), VISION_ENCODER, None),
                                 (decoder_signature(cfg, plan.max_len, image=True, attention=self.attention,
                                                    kv=plan.options.kv_cache),
                                  IMAGE_PREFILL, reuse)):
            lw = lower_to_graph(sig, weights.stored, op_set=plan.op_set, max_len=plan.max_len, compute=weights.compute)
            model, tensors = assemble(sig, lw, {})
            del lw
            if recipe is not None:
                from export.quantize.onnx import quantize_model, set_compute

                tensors = quantize_model(model, tensors, recipe, weights.blocks, memo, spill=spill)
                set_compute(model, plan.options.onnx_compute)
            if file == VISION_ENCODER:
                scan_over_images(model, cfg.vision, cfg.embed_dim)
            helper.set_model_props(model, props)
            save(model, tensors, folder / file, reuse=share, on_written=spill.release if spill is not None else None)
        save(embedding_model(cfg.vision, cfg.embed_dim, IR_VERSION), {}, folder / EMBEDDING)

    def describe(self, result) -> list[str]:
        from export.lowering.onnx.inspect import read

        report = read(result.path)
        kind = "onnxruntime-genai folder" if genai_runs(result.plan) else "ONNX folder"
        lines = [f"artifact: {result.path}/ ({kind}, op set '{result.plan.op_set}')",
                 result.size_line(report.file_bytes)]
        if not genai_runs(result.plan):
            lines.append(f"  no genai_config.json: {GENAI_NO_INT8_KV}; runtime_py runs this folder")
        n = len(result.metadata.states)
        lines.append(f"  inputs: input_ids, attention_mask + {n} states -> logits + {n} states")
        ops = result.info.get("stablehlo_ops", {})
        met = ", ".join(f"{op.replace('stablehlo.', '')} {k}" for op, k in sorted(ops.items()))
        lines.append(f"  StableHLO ops lowered: {met}")
        histogram = collections.Counter(report.op_histogram)
        top = ", ".join(f"{op} {k}" for op, k in histogram.most_common(12))
        lines.append(f"  ONNX ops ({sum(histogram.values())} nodes): {top}")
        if report.function_ops:
            lines.append("  functions: " + ", ".join(sorted(report.function_ops)))
        extra = [f"{f.name} {f.stat().st_size / 2**20:.2f} MiB" for f in sorted(result.path.glob("*.onnx*"))
                 if f.name.startswith(("vision.", "embedding.", "image_prefill."))]
        if extra:
            config = "; processor_config.json" if genai_runs(result.plan) else ""
            lines.append("  vision: " + ", ".join(extra) + " (onnxruntime-genai's gemma3 pipeline: pixel_values "
                         "[N, 3, S, S] -> image_features; input_ids + image_features -> inputs_embeds; the decoder "
                         f"with inputs_embeds{config})")
        files = result.info.get("tokenizer_files")
        lines.append("  tokenizer: " + (", ".join(files) if files else "none"))
        return lines
