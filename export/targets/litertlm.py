"""--target litertlm: the TFLite export (any recipe) bundled with its SentencePiece tokenizer and
LiteRT-LM's metadata (export/litertlm.py, docs/litertlm.md). The model is converted into a scratch
folder beside the output and bundled into the driver's temporary path; the gate also runs the
bundle in LiteRT-LM itself when litert-lm-api is installed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from export.targets.tflite import TFLiteTarget, describe_tflite


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
        from export.litertlm import preflight

        return dataclasses.replace(plan, tokenizer=preflight(plan.cfg, list(plan.lens), plan.options.tokenizer))

    def artifact_name(self, plan) -> str:
        return super().artifact_name(plan).removesuffix(".tflite") + ".litertlm"

    def write(self, plan, weights, signatures, tmp: Path, timer):
        from export.driver import scratch_dir
        from export.litertlm import write_bundle

        with scratch_dir(tmp.parent, tmp.stem) as scratch:
            inner = Path(scratch) / "model.tflite"
            metadata, info = super().write(plan, weights, signatures, inner, timer)
            with timer.stage("bundle"):
                write_bundle(inner, plan.tokenizer, plan.cfg, plan.max_len, tmp, plan.options.kv_cache)
        return metadata, info

    def describe(self, result) -> list[str]:
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
