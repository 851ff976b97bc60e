"""GGUF checkpoints (llama.cpp) of Gemma 2 and Gemma 3: architectures `gemma2` and `gemma3`.

Research notes: docs/notes/gguf.md. In short:
  - our own header parser (`GGUFFile`): struct + np.frombuffer, ~0.3 s on a 262144-token vocabulary
    where gguf's GGUFReader takes ~20 s; each tensor's bytes are read when asked (a positioned
    read, like the safetensors reader: a memory map's pages would stay in the resident set) and
    dequantized tensor by tensor with `gguf.quants.dequantize`;
  - the numpy shape of a tensor is its reversed GGUF dims, which is HF's (and our) [out, in]
    layout: no transposes, no q/k permutation (Gemma uses NEOX, half-split RoPE);
  - llama.cpp stores every `*norm.weight` as w + 1 (f32); we load w = x - 1;
  - the config follows llama.cpp's hparams rules (`config_from_gguf`), since the file carries
    neither the layer pattern nor the query scale.
Gemma 1 (`gemma`) is rejected: its blocks have no post-attention/post-FFW norms.
"""

from __future__ import annotations

import dataclasses
import mmap
import re
import struct
from pathlib import Path

import numpy as np

from models.config import Family, LayerKind, ModelConfig, SpecialTokens
from models.errors import CheckpointError
from models.loaders.common import Source
from models.params import param_shapes

MAGIC = b"GGUF"
SUPPORTED_ARCHS = ("gemma2", "gemma3")
GEMMA3_TEXT_VOCAB = 262_144

# ggml type id -> (name, block elements, block bytes) for the types we read
_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
SUPPORTED_TYPES = tuple(v[0] for v in _TYPES.values())
F32, F16, BF16, Q4_0, Q8_0, Q4_K, Q6_K = 0, 1, 30, 2, 8, 12, 14
# what a tensor's type says about its precision in a mixed file (`mix_kept`): the 4- and 5-bit
# families a 4-bit mix (Q4_K_M, Q4_K_S, ...) is made of, and the wider types it keeps some layers in
NARROW_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K")
WIDE_TYPES = ("Q6_K", "Q8_0")

# GGUF metadata value types: id -> struct format (scalars)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
          11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


def _type_name(type_id: int) -> str:
    if type_id in _TYPES:
        return _TYPES[type_id][0]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return f"type {type_id}"


def _block(type_id: int) -> tuple[int, int] | None:
    if type_id in _TYPES:
        return _TYPES[type_id][1:]
    try:
        from gguf import GGMLQuantizationType
        from gguf.constants import GGML_QUANT_SIZES

        return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ImportError, ValueError, KeyError):
        return None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    type: int  # ggml type id
    shape: tuple[int, ...]  # numpy (logical) shape: the reversed GGUF dims
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


class _Cursor:
    """Sequential little-endian reads from a buffer; running off its end is a truncated file."""

    def __init__(self, buf, where: str):
        self.buf, self.pos, self.where = buf, 0, where
        self.size = len(buf)

    def need(self, n: int):
        if self.pos + n > self.size:
            raise CheckpointError(f"{self.where}: truncated GGUF header (the file ends at byte "
                                  f"{self.size}); re-download it")

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "surrogateescape")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub, n = self.unpack("<I"), self.unpack("<Q")
            if sub in _NUMPY:
                dt = np.dtype(_NUMPY[sub])
                self.need(n * dt.itemsize)
                arr = np.frombuffer(self.buf, dt, n, self.pos).copy()
                self.pos += n * dt.itemsize
                return arr
            if sub == _STRING:
                return self._strings(n)
            if sub == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
        raise CheckpointError(f"{self.where}: unknown GGUF metadata value type {vtype}; "
                              "is this a GGUF file?")

    def _strings(self, n: int) -> list[str]:
        out, buf, pos, size = [], self.buf, self.pos, self.size
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.need(8)
            k = unpack(buf, pos)[0]
            pos += 8
            if pos + k > size:
                self.pos = pos
                self.need(k)
            out.append(bytes(buf[pos:pos + k]).decode("utf-8", "surrogateescape"))
            pos += k
        self.pos = pos
        return out


class GGUFFile:
    """A parsed GGUF file: `.fields` (metadata), `.tensors` (name -> TensorInfo), `read(name)`
    (float32) and `raw(name)` (the stored bytes).

    Tensor bytes are read with a positioned read into a fresh buffer, not viewed through a
    memory map: pages of a mapping stay in the process's resident set once touched, so a
    streamed export of a 27B Q4_0 file (15 GB) peaked ~6 GiB higher (10.15 vs 3.76 GiB); read, they sit in the page cache, where the kernel can drop them."""

    def __init__(self, path):
        self.path = Path(path)
        where = str(self.path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file not found: {self.path}")
        size = self.path.stat().st_size
        if size == 0:
            raise CheckpointError(f"{where}: empty file, not a GGUF checkpoint")
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(self._mm, where)
        if size < 4 or self._mm[:4] != MAGIC:
            raise CheckpointError(f"{where}: not a GGUF file (no 'GGUF' magic at the start)")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            if swapped in (2, 3):
                raise CheckpointError(f"{where}: big-endian GGUF files are not supported; "
                                      "convert it to little-endian")
            raise CheckpointError(f"{where}: GGUF version {version} is not supported (2 and 3 are)")
        self.version = version
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        if n_tensors > size or n_kv > size:
            raise CheckpointError(f"{where}: corrupt GGUF header (tensor/metadata counts "
                                  f"{n_tensors}/{n_kv}); re-download it")
        fields: dict = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I")
            if key in fields:
                raise CheckpointError(f"{where}: duplicate GGUF metadata key '{key}'")
            fields[key] = cur.value(vtype)
        self.fields = fields
        if int(fields.get("split.count", 1) or 1) > 1:
            raise CheckpointError(
                f"{where}: split GGUF shard ({fields.get('split.no', 0) + 1} of "
                f"{fields['split.count']}); merge the shards first (llama-gguf-split --merge)")
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > 8:
                raise CheckpointError(f"{where}: corrupt GGUF tensor info for '{name}' "
                                      f"({n_dims} dims)")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        align = int(fields.get("general.alignment", 32))
        if align <= 0 or align % 8:
            raise CheckpointError(f"{where}: invalid general.alignment {align}")
        self.alignment = align
        self.data_offset = -(-cur.pos // align) * align
        tensors = {}
        for name, dims, type_id, offset in infos:
            if name in tensors:
                raise CheckpointError(f"{where}: duplicate tensor '{name}'")
            shape = tuple(int(d) for d in reversed(dims))
            block = _block(type_id)
            if block is None:
                raise CheckpointError(
                    f"{where}: tensor '{name}' has unknown ggml type {_type_name(type_id)}; "
                    f"supported: {', '.join(SUPPORTED_TYPES)}")
            n = int(np.prod(shape, dtype=np.int64)) if shape else 1
            row = shape[-1] if shape else 1
            if row % block[0]:
                raise CheckpointError(f"{where}: tensor '{name}' ({_type_name(type_id)}) has rows "
                                      f"of {row}, not a multiple of its block size {block[0]}")
            nbytes = n // block[0] * block[1]
            start = self.data_offset + offset
            if start + nbytes > size:
                raise CheckpointError(f"{where}: truncated GGUF file: tensor '{name}' needs bytes "
                                      f"up to {start + nbytes}, the file has {size}; re-download it")
            tensors[name] = TensorInfo(name, type_id, shape, start, nbytes)
        self.tensors = tensors
        self._closed = False

    def _bytes(self, t: TensorInfo) -> np.ndarray:
        if self._closed:
            raise ValueError(f"{self.path}: read after close")
        return np.fromfile(self.path, np.uint8, count=t.nbytes, offset=t.offset)

    # -- metadata --------------------------------------------------------------------------------
    @property
    def architecture(self) -> str | None:
        return self.fields.get("general.architecture")

    def get(self, key: str, default=None):
        """The metadata value of `key` (e.g. "general.name"), or `default`."""
        return self.fields.get(key, default)

    def arch_get(self, key: str, default=None):
        """The value of the architecture's key: arch_get("block_count") -> gemma3.block_count."""
        return self.fields.get(f"{self.architecture}.{key}", default)

    # -- tensors ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes: uint8 [*shape[:-1], row_bytes] (as GGUFReader gives quantized data),
        read from the file into a fresh array."""
        t = self.tensors[name]
        be, bb = _block(t.type)
        row_bytes = (t.shape[-1] if t.shape else 1) // be * bb
        flat = self._bytes(t)
        return flat.reshape(*t.shape[:-1], row_bytes) if t.shape else flat

    def read_rows(self, name: str, start: int, stop: int, dtype=None) -> np.ndarray:
        """Rows start..stop of a 2-D tensor, dequantized to float32 (cast to `dtype` if given),
        reading only their bytes: a streamed export quantizes a 27B model's table (5.6 GiB in
        f32) a slice at a time."""
        t = self._supported(name)
        if len(t.shape) != 2:
            return self.read(name, dtype)[start:stop]
        if self._closed:
            raise ValueError(f"{self.path}: read after close")
        be, bb = _block(t.type)
        row_bytes = t.shape[1] // be * bb
        stop = min(stop, t.shape[0])
        raw = np.fromfile(self.path, np.uint8, count=(stop - start) * row_bytes, offset=t.offset + start * row_bytes)
        return self._dequantize(t, raw.reshape(stop - start, row_bytes), (stop - start, t.shape[1]), dtype)

    def read(self, name: str, dtype=None) -> np.ndarray:
        """The tensor dequantized to float32 (a copy), cast to `dtype` if given."""
        t = self._supported(name)
        return self._dequantize(t, self.raw(name), t.shape, dtype)

    def _supported(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        t = self.tensors[name]
        if t.type not in _TYPES:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' is stored as {t.type_name}, which is not supported; "
                f"supported: {', '.join(SUPPORTED_TYPES)}")
        return t

    @staticmethod
    def _dequantize(t: TensorInfo, raw: np.ndarray, shape: tuple, dtype) -> np.ndarray:
        """Stored bytes (uint8 [rows, row_bytes], or flat) of `t` -> float32 `shape` (or `dtype`)."""
        if t.type == F32:
            out = raw.reshape(-1).view("<f4").reshape(shape).astype(np.float32, copy=False)
        elif t.type == F16:
            out = raw.reshape(-1).view("<f2").reshape(shape).astype(np.float32)
        else:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            out = np.asarray(dequantize(raw, GGMLQuantizationType(t.type)), np.float32).reshape(shape)
        return out if dtype is None or np.dtype(dtype) == np.float32 else out.astype(dtype)

    def close(self):
        self._closed = True
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open(path_or_file) -> GGUFFile:
    return path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)


def is_gguf(path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


# ---- config ---------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")


def _round(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
    return float(f"{float(x):.7g}") if x is not None else None


def _shortest_period(kinds: tuple) -> tuple:
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return kinds[:p]
    return kinds


def config_from_gguf(path_or_file, name: str | None = None) -> ModelConfig:
    """A ModelConfig from a GGUF's metadata, by llama.cpp's rules (docs/notes/gguf.md §3)."""
    f = _open(path_or_file)
    where = str(f.path)
    arch = f.architecture
    if arch == "gemma":
        raise CheckpointError(
            f"{where}: Gemma 1 GGUF (architecture 'gemma') is not supported: our Gemma model always "
            "has post-attention/post-FFW norms, which Gemma 1 lacks; use a Gemma 2 or 3 checkpoint")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"{where}: unsupported GGUF architecture '{arch}'; supported: "
                              f"{', '.join(SUPPORTED_ARCHS)}")
    family = Family(arch)
    a = f.arch_get

    def need(key):
        v = a(key)
        if v is None:
            raise CheckpointError(f"{where}: GGUF metadata key '{arch}.{key}' is missing")
        return v

    e, layers = int(need("embedding_length")), int(need("block_count"))
    heads = int(need("attention.head_count"))
    kv = a("attention.head_count_kv", heads)
    if isinstance(kv, np.ndarray):
        if len(set(kv.tolist())) != 1:
            raise CheckpointError(f"{where}: per-layer KV head counts are not supported")
        kv = kv[0]
    kv = int(kv)
    head_dim = int(a("attention.key_length", e // heads))
    ff = a("feed_forward_length")
    if isinstance(ff, np.ndarray):
        if len(set(ff.tolist())) != 1:
            raise CheckpointError(f"{where}: per-layer feed-forward widths are not supported")
        ff = ff[0]
    mlp = int(ff if ff is not None else need("feed_forward_length"))
    max_len = int(a("context_length", 8192 if family is Family.GEMMA2 else 131_072))
    eps = _round(a("attention.layer_norm_rms_epsilon", 1e-6))

    window = a("attention.sliding_window")
    pattern_key = a("attention.sliding_window_pattern")
    if pattern_key is not None:
        if isinstance(pattern_key, (np.ndarray, list)):
            local = [bool(x) for x in pattern_key][:layers]
        else:
            n = int(pattern_key)
            local = [n > 1 and i % n < n - 1 for i in range(layers)]
    elif family is Family.GEMMA2:
        local = [i % 2 == 0 for i in range(layers)]
    else:
        local = [window is not None and i % 6 < 5 for i in range(layers)]
    if window is None:
        window = 4096 if family is Family.GEMMA2 else max_len
    kinds = tuple(LayerKind.LOCAL if x else LayerKind.GLOBAL for x in local)
    pattern = _shortest_period(kinds)

    if family is Family.GEMMA2:
        attn_cap = _round(a("attn_logit_softcapping", 50.0))
        final_cap = _round(a("final_logit_softcapping", 30.0))
        base = float(a("rope.freq_base", 10_000.0))
        local_base = global_base = base
    else:
        attn_cap = _round(a("attn_logit_softcapping"))
        final_cap = _round(a("final_logit_softcapping"))
        global_base = float(a("rope.freq_base", 10_000.0))
        local_base = float(a("rope.freq_base_swa", 10_000.0))
    attn_cap = attn_cap or None
    final_cap = final_cap or None
    scale_type = a("rope.scaling.type")
    global_scale = 1.0
    if scale_type not in (None, "none", "linear"):
        raise CheckpointError(f"{where}: rope scaling '{scale_type}' is not supported (Gemma uses "
                              "linear)")
    if scale_type == "linear":
        global_scale = _round(a("rope.scaling.factor", 1.0))
    elif a("rope.scale_linear") is not None:
        global_scale = _round(a("rope.scale_linear"))

    attn_scale = a("attention.scale")
    if attn_scale:
        query_scale = _round(attn_scale)
    elif (family is Family.GEMMA2 and layers == 46) or (family is Family.GEMMA3 and layers == 62):
        query_scale = float(e // heads) ** -0.5  # llama.cpp's 27B rule: 1/sqrt(n_embd/n_head)
    else:
        query_scale = float(head_dim) ** -0.5

    if "token_embd.weight" not in f.tensors:
        raise CheckpointError(f"{where}: missing tensor 'token_embd.weight'")
    vocab = f.tensors["token_embd.weight"].shape[0]
    tokens = f.get("tokenizer.ggml.tokens") or []
    default_eot = 107 if family is Family.GEMMA2 else 106
    try:
        eot = tokens.index("<end_of_turn>")
    except ValueError:
        eot = default_eot
    special = SpecialTokens(
        pad=int(f.get("tokenizer.ggml.padding_token_id", 0) or 0),
        eos=int(f.get("tokenizer.ggml.eos_token_id", 1)),
        bos=int(f.get("tokenizer.ggml.bos_token_id", 2)),
        end_of_turn=eot,
    )
    if name is None:
        label = f.get("general.name")
        name = _slug(label) if label else f.path.stem
        name = name or f.path.stem
    return ModelConfig(
        name=name, family=family, vocab_size=vocab, embed_dim=e, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, mlp_dim=mlp, layer_pattern=pattern,
        sliding_window=int(window), max_seq_len=max_len, query_scale=query_scale,
        attn_softcap=attn_cap, final_softcap=final_cap, qk_norm=family is Family.GEMMA3,
        local_rope_base=local_base, global_rope_base=global_base, global_rope_scale=global_scale,
        norm_eps=eps, tokens=special, instruction_tuned="tokenizer.chat_template" in f.fields,
        sample_vocab_size=GEMMA3_TEXT_VOCAB if family is Family.GEMMA3 and vocab > GEMMA3_TEXT_VOCAB
        else None,
    )


# ---- tensors ---------------------------------------------------------------------------------------
_LAYER = {
    "pre_attn_norm": "attn_norm",
    "post_attn_norm": "post_attention_norm",
    "pre_ffw_norm": "ffn_norm",
    "post_ffw_norm": "post_ffw_norm",
    "attn.q": "attn_q",
    "attn.k": "attn_k",
    "attn.v": "attn_v",
    "attn.o": "attn_output",
    "attn.q_norm": "attn_q_norm",
    "attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate",
    "mlp.up": "ffn_up",
    "mlp.down": "ffn_down",
}


def _minus_one(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32) - np.float32(1)


def gguf_name(ours: str) -> str:
    """The GGUF tensor name of one of our parameters."""
    if ours == "embed":
        return "token_embd.weight"
    if ours == "final_norm":
        return "output_norm.weight"
    _, i, leaf = ours.split(".", 2)
    return f"blk.{i}.{_LAYER[leaf]}.weight"


def gguf_sources(cfg: ModelConfig) -> dict[str, Source]:
    sources = {}
    for ours in param_shapes(cfg):
        name = gguf_name(ours)
        sources[ours] = Source(name, _minus_one if name.endswith("norm.weight") else None)
    return sources


class _Reader:
    """common.TensorReader over a GGUFFile; reads in float32 first (norms are undone in f32)."""

    def __init__(self, f: GGUFFile):
        self.f = f

    def names(self):
        return self.f.names()

    def shape(self, name):
        return self.f.shape(name)

    def read(self, name, dtype=None):
        return self.f.read(name)

    def read_rows(self, name, start, stop, dtype=None):
        return self.f.read_rows(name, start, stop)


def _is_ignored(name: str) -> bool:
    return name == "output.weight"


def check_output_head(f: GGUFFile):
    """A separate `output.weight` must equal token_embd (we always tie the head)."""
    if "output.weight" not in f.tensors:
        return
    out, emb = f.tensors["output.weight"], f.tensors["token_embd.weight"]
    same = out.shape == emb.shape and (
        (out.type == emb.type and np.array_equal(f.raw("output.weight"), f.raw("token_embd.weight")))
        or np.array_equal(f.read("output.weight"), f.read("token_embd.weight")))
    if not same:
        raise CheckpointError(
            f"{f.path}: 'output.weight' differs from 'token_embd.weight'; untied output heads are "
            "not supported (our Gemma ties the LM head to the embedding)")


def load_gguf(path, model: ModelConfig | None = None, dtype=np.float32, lazy: bool = False):
    """(config, params) from a GGUF file; `lazy`: LazyTensor params, dequantized tensor by tensor
    when loaded (the file stays open while they live)."""
    from models.loaders.common import assemble

    f = GGUFFile(path)
    try:
        cfg = model if model is not None else config_from_gguf(f)
        if cfg.vision is not None:  # a GGUF holds the text decoder only
            cfg = dataclasses.replace(cfg, vision=None)
        for name, t in f.tensors.items():
            if t.type not in _TYPES:
                raise CheckpointError(
                    f"{path}: tensor '{name}' is stored as {t.type_name}, which is not supported; "
                    f"supported: {', '.join(SUPPORTED_TYPES)}")
        check_output_head(f)
        params = assemble(cfg, _Reader(f), gguf_sources(cfg), dtype=dtype, ignore=_is_ignored,
                          where=str(path), lazy=lazy)
    except BaseException:
        f.close()
        raise
    if not lazy:
        f.close()
    return cfg, params


# ---- raw blocks (Q4_0, Q8_0, Q4_K, Q6_K) ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SourceBlocks:
    """A matmul weight as stored: integer codes [N, K], one scale per `block` of them
    [N, K / block] and, for Q4_K, one offset per block: value = code * scale - offset (exactly the
    file's dequantization, computed the same way in float32).

    q4_0: the nibbles minus 8, in [-8, 7], blocks of 32, float16 scales (the stored d).
    q8_0: the stored int8 values, blocks of 32, float16 scales.
    q4_k: the nibbles, in [0, 15], blocks of 32 (a super-block's eight sub-blocks); float32 scales
          d * sc and offsets dmin * m (the super-block's float16 d, dmin times its 6-bit sc, m).
    q6_k: the 6-bit values minus 32, in [-32, 31], blocks of 16; float32 scales d * sc (sc int8)."""

    kind: str  # "q4_0" | "q8_0" | "q4_k" | "q6_k"
    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None = None

    @property
    def block(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]


KINDS = {Q4_0: "q4_0", Q8_0: "q8_0", Q4_K: "q4_k", Q6_K: "q6_k"}


def _decode_blocks(raw: np.ndarray, type_id: int) -> SourceBlocks:
    n = raw.shape[0]
    kind = KINDS[type_id]
    if type_id == Q8_0:
        blocks = raw.reshape(n, -1, 34)
        scales = blocks[..., :2].copy().view("<f2")[..., 0]
        codes = blocks[..., 2:].copy().view(np.int8)
        return SourceBlocks(kind, codes.reshape(n, -1), scales.astype(np.float16))
    if type_id == Q4_0:
        blocks = raw.reshape(n, -1, 18)
        scales = blocks[..., :2].copy().view("<f2")[..., 0]
        q = blocks[..., 2:]
        codes = np.concatenate([q & 0x0F, q >> 4], axis=-1).astype(np.int8) - np.int8(8)
        return SourceBlocks(kind, codes.reshape(n, -1), scales.astype(np.float16))
    if type_id == Q4_K:
        # 144 bytes per 256 values: d, dmin (float16), 12 bytes of packed 6-bit (sc, m) for the eight
        # sub-blocks of 32, then 128 bytes of nibbles: byte i of each 32-byte group holds sub-block
        # 2g's value i in its low nibble and sub-block 2g+1's in its high one
        from gguf.quants import Q4_K as layout

        blocks = raw.reshape(-1, 144)
        d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
        dmin = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
        sc, m = layout.get_scale_min(blocks[:, 4:16].copy())
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & np.uint8(0x0F)).astype(np.int8).reshape(n, -1)
        scales = (d * sc.astype(np.float32)).reshape(n, -1)
        offsets = (dmin * m.astype(np.float32)).reshape(n, -1)
        return SourceBlocks(kind, codes, scales, offsets)
    if type_id == Q6_K:
        # 210 bytes per 256 values: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales
        # (one per 16 values), d (float16) last
        blocks = raw.reshape(-1, 210)
        ql = blocks[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        qh = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        low = (ql & np.uint8(0x0F)).reshape(-1, 8, 32)
        high = (qh & np.uint8(0x03)).reshape(-1, 8, 32)
        codes = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(n, -1)
        sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = blocks[:, 208:210].copy().view("<f2").astype(np.float32)
        return SourceBlocks(kind, codes, (d * sc).reshape(n, -1))
    raise ValueError(f"internal error: no raw blocks for type {_type_name(type_id)}")


def _matmul_params(cfg: ModelConfig):
    """(our name, shape, GGUF name) of every matmul parameter (embed, attn.q/k/v/o, mlp.gate/up/down)."""
    for ours, shape in param_shapes(cfg).items():
        leaf = ours.split(".", 2)[-1]
        if len(shape) == 2 and leaf in ("embed", "attn.q", "attn.k", "attn.v", "attn.o",
                                        "mlp.gate", "mlp.up", "mlp.down"):
            yield ours, tuple(shape), gguf_name(ours)


def source_blocks(path_or_file, cfg: ModelConfig, lazy: bool = False) -> dict[str, SourceBlocks]:
    """The matmul parameters (embed, attn.q/k/v/o, mlp.gate/up/down) the file stores as Q4_0, Q8_0,
    Q4_K or Q6_K, as codes and scales (embedding rows trimmed to cfg.vocab_size, as the params are).
    `lazy`: {name: (kind, shape, decode)} instead, `decode()` giving the SourceBlocks when called
    (the file stays open while they live): a streamed export decodes one tensor at a time."""
    f = _open(path_or_file)
    out = {}
    for ours, shape, name in _matmul_params(cfg):
        t = f.tensors.get(name)
        if t is None or t.type not in KINDS:
            continue
        kind = KINDS[t.type]

        def decode(name=name, rows=shape[0], type_id=t.type):
            return _decode_blocks(np.asarray(f.raw(name))[:rows], type_id)

        out[ours] = (kind, shape, decode) if lazy else decode()
    return out


def mix_kept(path_or_file, cfg: ModelConfig) -> set[str]:
    """The layer matmuls a mixed-precision file keeps wider than the rest: those stored as Q6_K or
    Q8_0 in a file whose other layer matmuls are 4- or 5-bit types (llama.cpp's Q4_K_M gives its
    attn_v and half of its ffn_down Q6_K, or Q8_0 where a width is not a multiple of 256: the
    layers its recipe judged sensitive). Empty for a file of one precision (an all-Q8_0 file is
    not a mix: exported to int4, all of it is int4). The table is not counted: its precision is
    the recipe's (int4-b32 vs int4-b32-e8)."""
    f = _open(path_or_file)
    types = {ours: f.tensors[name].type_name for ours, _, name in _matmul_params(cfg)
             if ours != "embed" and name in f.tensors}
    if not any(t in NARROW_TYPES for t in types.values()):
        return set()
    return {n for n, t in types.items() if t in WIDE_TYPES}


__all__ = ["GGUFFile", "TensorInfo", "SourceBlocks", "config_from_gguf", "source_blocks", "mix_kept",
           "load_gguf", "is_gguf", "gguf_sources", "gguf_name", "SUPPORTED_TYPES", "SUPPORTED_ARCHS"]
