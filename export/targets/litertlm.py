"""--target litertlm: the TFLite export (any recipe) bundled with its SentencePiece tokenizer and
LiteRT-LM's metadata (export/litertlm.py, docs/litertlm.md). The model is converted into a scratch
folder beside the output and bundled into the driver's temporary path; the gate also runs the
bundle in LiteRT-LM itself when litert-lm-api is installed.

A model with vision becomes a bundle LiteRT-LM runs with images: its text signatures in their
embedded form and three more TFLite models, one per section (models/signatures.py,
contract/bundle.py), each over its own weights (the embedding table is in the decoder, for the
tied LM head, and in the embedder), with one prefill length by default
(export/litertlm.vision_prefill_length). The plain `.tflite` target keeps the token form.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from contract.bundle import EMBEDDER, EMBEDDER_SIGNATURE, PREFILL_DECODE, VISION_ADAPTER, VISION_ENCODER
from export.targets.tflite import TFLiteTarget, describe_tflite, write_model
from models.cache import state_layout
from models.signatures import all_signatures

# a vision bundle's TFLite models: signature name -> section (the rest is the decoder's)
_SECTION_OF = {EMBEDDER_SIGNATURE: EMBEDDER, "vision_encoder": VISION_ENCODER, "vision_adapter": VISION_ADAPTER}


class LitertlmTarget(TFLiteTarget):
    name = "litertlm"
    help = "that model bundled with its tokenizer and LiteRT-LM's metadata, for LiteRT-LM"
    quant_table = "tflite"  # a bundle holds a TFLite model
    engine_check = True

    def check_options(self, options):
        """A missing tokenizer is refused before the weights load."""
        from export.litertlm import find_tokenizer

        find_tokenizer(options.tokenizer)

    def preflight(self, plan):
        """Every check a bundle needs before any export work: LiteRT-LM's prefill lengths, a
        tokenizer that fits the model."""
        from export.litertlm import preflight, vision_prefill_length

        lens = plan.lens
        if plan.cfg.vision is not None and plan.options.prefill_lens is None:
            lens = (vision_prefill_length(plan.max_len, plan.cfg.vision.image_length),)
        return dataclasses.replace(plan, lens=lens, tokenizer=preflight(plan.cfg, list(lens), plan.options.tokenizer))

    def signatures(self, plan):
        if plan.cfg.vision is None:
            return super().signatures(plan)
        return all_signatures(plan.cfg, list(plan.lens), plan.max_len, attention=self.attention, buckets=plan.buckets,
                              kv=plan.options.kv_cache, embedded=True)

    def artifact_name(self, plan) -> str:
        return super().artifact_name(plan).removesuffix(".tflite") + ".litertlm"

    def write(self, plan, weights, signatures, tmp: Path, timer):
        from export.driver import scratch_dir
        from export.litertlm import write_bundle

        with scratch_dir(tmp.parent, tmp.stem) as scratch:
            inner = Path(scratch) / "model.tflite"
            if plan.cfg.vision is None:
                metadata, info = super().write(plan, weights, signatures, inner, timer)
                sections = {}
            else:
                metadata, info = self._metadata(plan), {}
                sections = self._write_sections(plan, weights, signatures, Path(scratch), timer)
                write_model(plan, weights, [s for s in signatures if s.name not in _SECTION_OF], inner, timer,
                            params=_section_params(PREFILL_DECODE, weights.stored, plan.cfg),
                            metadata=metadata.to_json())
            with timer.stage("bundle"):
                write_bundle(inner, plan.tokenizer, plan.cfg, plan.max_len, tmp, plan.options.kv_cache, sections)
        return metadata, info

    @staticmethod
    def _metadata(plan):
        return plan.metadata(state_layout(plan.cfg, plan.max_len, kv=plan.options.kv_cache))

    @staticmethod
    def _write_sections(plan, weights, signatures, scratch: Path, timer) -> dict[str, Path]:
        """The embedder, vision encoder and adapter, each a .tflite over its own weights."""
        out = {}
        for sig in signatures:
            section = _SECTION_OF.get(sig.name)
            if section is not None:
                out[section] = write_model(plan, weights, [sig], scratch / f"{sig.name}.tflite", timer,
                                           params=_section_params(section, weights.stored, plan.cfg))
        return out

    def describe(self, result) -> list[str]:
        lines = self._describe(result)
        bundle_models = [s for s in result.signatures if s.name in _SECTION_OF]
        for i, sig in enumerate(bundle_models):  # a vision bundle's other models
            ins = ", ".join(f"{t.name}{list(t.shape)}" for t in sig.inputs)
            outs = ", ".join(f"{t.name}{list(t.shape)}" for t in sig.outputs)
            lines.insert(3 + i, f"  section {_SECTION_OF[sig.name]}: {sig.name}({ins}) -> {outs}")
        return lines

    def _describe(self, result) -> list[str]:
        from contract.bundle import read_bundle

        lines = describe_tflite(result.path, result)
        bundle = read_bundle(result.path)
        llm = bundle.llm_metadata()
        sections = ", ".join(f"{s.data_type} {s.size / 2**20:.2f} MiB" for s in bundle.sections)
        lines.insert(1, f"  LiteRT-LM bundle v{'.'.join(map(str, bundle.version))}: {sections}")
        stops = [list(t.token_ids.ids) for t in llm.stop_tokens]
        lines.insert(2, f"  LlmMetadata: start {list(llm.start_token.token_ids.ids)}, stop {stops}, max_num_tokens "
                        f"{llm.max_num_tokens}, model type {llm.llm_model_type.WhichOneof('model_type')}, chat "
                        f"template {'yes' if llm.HasField('jinja_prompt_template') else 'no'}; tokenizer "
                        f"{result.plan.tokenizer}")
        return lines


def _section_params(section: str, stored: dict, cfg) -> dict:
    """The weights one TFLite model of a vision bundle reads (models/signatures.py)."""
    from models.lazy import load
    from models.signatures import EOI_EMBEDDING, eoi_embedding

    if section == PREFILL_DECODE:
        return {k: v for k, v in stored.items() if not k.startswith(("vision.", "mm."))}
    if section == EMBEDDER:
        return {"embed": stored["embed"]}
    if section == VISION_ENCODER:
        return {k: v for k, v in stored.items() if k.startswith("vision.")}
    table = load(stored["embed"])
    return {**{k: v for k, v in stored.items() if k.startswith("mm.")}, EOI_EMBEDDING: eoi_embedding(table, cfg)}
