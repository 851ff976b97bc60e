"""Read an ONNX artifact (a `.onnx` file, or an onnxruntime-genai folder holding model.onnx,
genai_config.json and the tokenizer files) without the `onnx` package: our metadata sits in the
ModelProto's `metadata_props`, which a short protobuf walk finds without parsing the graph.

Folder layout (docs/onnx.md): model.onnx (+ model.onnx.data), genai_config.json, tokenizer.json,
tokenizer_config.json, tokenizer.model; with vision also vision.onnx (the tower over N images),
embedding.onnx, image_prefill.onnx (whose text weights are references into model.onnx.data) and
processor_config.json: onnxruntime-genai's Gemma 3 vision-language layout
(export/lowering/onnx/multimodal.py).
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

from contract.metadata import METADATA_KEY, ArtifactMetadata

MODEL, VISION_ENCODER, IMAGE_PREFILL = "model.onnx", "vision.onnx", "image_prefill.onnx"
# ModelProto.metadata_props = 14; StringStringEntryProto.key = 1, .value = 2 (onnx.proto)
_METADATA_PROPS, _KEY, _VALUE = 14, 1, 2


def model_file(path) -> Path:
    """The decoder graph of an ONNX artifact: the file itself, or a folder's model.onnx."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / MODEL] if (path / MODEL).exists() else sorted(path.glob("*.onnx"))
        if not candidates:
            raise FileNotFoundError(f"no .onnx model in {path}")
        return candidates[0]
    return path


def _varint(buf, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[at]
        at += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, at
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, value bytes or int) of a protobuf message's top-level fields."""
    at = start
    while at < end:
        tag, at = _varint(buf, at)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, at = _varint(buf, at)
            yield field, value
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            n, at = _varint(buf, at)
            if at + n > end:
                raise ValueError(f"field {field} ends at byte {at + n}, past its message's end at {end}")
            yield field, (at, at + n)
            at += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def metadata_props(path) -> dict[str, str]:
    """The ModelProto's metadata_props, read from the file mapped (the graph is skipped)."""
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{path} is empty: copy or export it again")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        props = {}
        try:
            for field, span in _fields(buf, 0, len(buf)):
                if field != _METADATA_PROPS:
                    continue
                entry = dict(_fields(buf, *span))
                key, value = entry.get(_KEY), entry.get(_VALUE)
                if key is not None:
                    props[bytes(buf[key[0]:key[1]]).decode()] = \
                        "" if value is None else bytes(buf[value[0]:value[1]]).decode()
        except (ValueError, IndexError) as e:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"{path} is not a complete ONNX model ({e}): cut short or corrupt; copy or export it "
                             "again") from None
        return props


def read_metadata(path) -> ArtifactMetadata | None:
    """Our metadata of an ONNX artifact (file or folder), None when it carries none."""
    file = model_file(path)
    text = metadata_props(file).get(METADATA_KEY)
    return None if text is None else ArtifactMetadata.from_json(text, where=str(file))


def genai_config(path) -> dict | None:
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    file = folder / "genai_config.json"
    return json.loads(file.read_text()) if file.exists() else None


def vision_files(path) -> tuple[Path, Path] | None:
    """(vision.onnx, image_prefill.onnx) beside the decoder, when both are there."""
    folder = model_file(path).parent
    enc, pre = folder / VISION_ENCODER, folder / IMAGE_PREFILL
    return (enc, pre) if enc.exists() and pre.exists() else None
