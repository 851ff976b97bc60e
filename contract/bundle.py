"""Read a `.litertlm` bundle (LiteRT-LM's container): its header, its sections (the TFLite model,
the SentencePiece tokenizer, LlmMetadata, ExecutorMetadata) and their bytes, memory-mapped.

The header is a flatbuffer whose schema ships with the `litert-lm-builder` package (a small
pure-Python package: flatbuffers and protobuf), imported only here.

A Gemma 3 bundle with images (docs/litertlm.md, "Gemma 3 with images") holds four TFLite models,
each a section with LiteRT-LM's model type, with these signatures and tensors:

  tf_lite_prefill_decode  prefill_{T}, decode (and any verify_{K}, ctx{L}_*): embeddings
                          f32[1, T, E + 1] + input_pos int32[T] + states -> logits + states;
                          no token ids (channel E is the image flag: models/multimodal.with_flag)
  tf_lite_embedder        embedder: token_ids int32[1, 1] -> embeddings f32[1, 1, E + 1]
                          (the sqrt(E)-scaled row, flag 0)
  tf_lite_vision_encoder  vision_encoder: image f32[1, S, S, 3] in [0, 1] (LiteRT-LM's
                          preprocessing) -> features f32[1, P, Ev]
  tf_lite_vision_adapter  vision_adapter: features -> mm_embeddings f32[1, N + 1, E + 1]: the N
                          soft tokens (flag 1), then <end_of_image>'s own row (flag 0), which
                          LiteRT-LM's Gemma 3 processor does not add itself
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path


# LiteRT-LM's model types of a bundle's TFLite sections
PREFILL_DECODE = "tf_lite_prefill_decode"
EMBEDDER = "tf_lite_embedder"
VISION_ENCODER = "tf_lite_vision_encoder"
VISION_ADAPTER = "tf_lite_vision_adapter"
# the signatures and tensors of a vision bundle's other sections (the module docstring)
EMBEDDER_SIGNATURE, ADAPTER_SIGNATURE = "embedder", "vision_adapter"
TOKEN_IDS, FEATURES, MM_EMBEDDINGS = "token_ids", "features", "mm_embeddings"

# A chat template that renders a conversation as its raw text: the start token, then every
# message's content in order, an image item as the marker LiteRT-LM's Gemma 3 processor splits
# at. Vision bundles of base models carry it; runtime_py's LiteRT-LM engine passes it to
# conversations whose prompt text is already final (runtime_py/litertlm_engine.py).
RAW_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}{%- if message['content'] is string -%}"
    "{{ message['content'] }}{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- elif item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endfor -%}")


class BundleError(ValueError):
    """A bundle cannot be written or read (one line naming the problem and the fix)."""


@dataclasses.dataclass
class Section:
    data_type: str  # TFLiteModel, SP_Tokenizer, LlmMetadataProto, ExecutorMetadataProto, ...
    begin: int
    end: int
    items: dict  # the section's key/value metadata (model_type, prefer_activation_type, ...)

    @property
    def size(self) -> int:
        return self.end - self.begin


@dataclasses.dataclass
class Bundle:
    path: Path
    version: tuple[int, int, int]
    system: dict
    sections: list[Section]

    def section(self, data_type: str, model_type: str | None = None) -> Section | None:
        for s in self.sections:
            if s.data_type == data_type and (model_type is None or s.items.get("model_type") == model_type):
                return s
        return None

    def read(self, section: Section) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(section.begin)
            return f.read(section.size)

    def tflite(self, model_type: str = PREFILL_DECODE) -> Section:
        """The TFLite model of `model_type` (default: the decoder, prefill_decode)."""
        s = self.section("TFLiteModel", model_type)
        if s is None:
            raise BundleError(f"{self.path} holds no {model_type.removeprefix('tf_lite_')} TFLite model")
        return s

    @property
    def embedded(self) -> bool:
        """A vision bundle: its decoder takes embeddings from an embedder section, not token ids."""
        return self.section("TFLiteModel", EMBEDDER) is not None

    def tokenizer_bytes(self) -> bytes | None:
        s = self.section("SP_Tokenizer")
        return None if s is None else self.read(s)

    def llm_metadata(self):
        from litert_lm_builder.runtime.proto import llm_metadata_pb2

        s = self.section("LlmMetadataProto")
        return None if s is None else llm_metadata_pb2.LlmMetadata.FromString(self.read(s))

    def executor_metadata(self):
        from litert_lm_builder.runtime.proto import executor_metadata_pb2

        s = self.section("ExecutorMetadataProto")
        return None if s is None else executor_metadata_pb2.ExecutorMetadata.FromString(self.read(s))


def read_bundle(path) -> Bundle:
    from litert_lm_builder import litertlm_core as core
    from litert_lm_builder import litertlm_header_schema_py_generated as schema
    from litert_lm_builder.litertlm_peek import kvp_to_dict

    path = Path(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        size = len(buf)
        if buf[:8] != core.HEADER_MAGIC_BYTES:
            raise BundleError(f"{path} is not a .litertlm file (magic {bytes(buf[:8])!r})")
        version = struct.unpack("<III", buf[8:20])
        end = struct.unpack("<Q", buf[core.HEADER_END_LOCATION_BYTE_OFFSET:core.HEADER_END_LOCATION_BYTE_OFFSET + 8])[0]
        header = schema.LiteRTLMMetaData.GetRootAs(bytes(buf[core.HEADER_BEGIN_BYTE_OFFSET:end]), 0)
    finally:
        buf.close()

    def items(table, n):
        return {d["key"]: d["value"] for d in (kvp_to_dict(table(i)) for i in range(n))}

    sm = header.SystemMetadata()
    system = items(sm.Entries, sm.EntriesLength()) if sm is not None else {}
    sections = []
    meta = header.SectionMetadata()
    for i in range(meta.ObjectsLength() if meta is not None else 0):
        obj = meta.Objects(i)
        sections.append(Section(core.any_section_data_type_to_string(obj.DataType()), obj.BeginOffset(),
                                obj.EndOffset(), items(obj.Items, obj.ItemsLength())))
    cut = [sec for sec in sections if sec.end > size]
    if cut:
        raise BundleError(f"{path} is cut short: its {cut[0].data_type} section ends at byte {cut[0].end}, the file at "
                          f"{size}; copy or export it again")
    return Bundle(path, version, system, sections)
