"""Read a `.litertlm` bundle (LiteRT-LM's container): its header, its sections (the TFLite model,
the SentencePiece tokenizer, LlmMetadata, ExecutorMetadata) and their bytes, memory-mapped.

The header is a flatbuffer whose schema ships with the `litert-lm-builder` package (a small
pure-Python package: flatbuffers and protobuf), imported only here.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path


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

    def tflite(self) -> Section:
        s = self.section("TFLiteModel", "tf_lite_prefill_decode")
        if s is None:
            raise BundleError(f"{self.path} holds no prefill_decode TFLite model")
        return s

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
    return Bundle(path, version, system, sections)
