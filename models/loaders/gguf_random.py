"""A GGUF file of random weights in llama.cpp's Gemma 2 / Gemma 3 layout, written tensor by tensor.

What `tools/bench_scale.py --checkpoint-format gguf-q4_0` exports from: the matmul weights and the
table as Q4_0 blocks (32 random 4-bit codes and a float16 scale each), like the
quantization-aware-trained Gemma 3 GGUFs Google publishes, so a 27B checkpoint takes 15 GB of disk
where bf16 safetensors take 54 GB. Norms are F32, stored as llama.cpp stores Gemma's: w + 1.
The metadata follows llama.cpp's converter (the keys `config_from_gguf` reads), and the vocabulary
is a placeholder of the config's size (Gemma's special pieces at their ids, the 256 byte pieces,
`<unusedN>` elsewhere): enough for the tokenizer files to be rebuilt and for any text to tokenize
(byte by byte, for the calibrations), not for meaningful text.

One tensor is generated and written at a time (the largest, gemma3-27b's table, is 0.8 GB as Q4_0);
nothing is read back. Deterministic for a seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from models.config import Family, LayerKind, ModelConfig
from models.loaders.gguf import gguf_name
from models.params import param_shapes

Q4_0_BLOCK, Q4_0_BYTES = 32, 18


def _q4_0(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_0 blocks [rows, cols / 32 * 18] uint8: uniform codes, scales around
    1 / (4.6 sqrt(cols)) so the weights' spread is a trained layer's (~1 / sqrt(cols))."""
    nb = cols // Q4_0_BLOCK
    blocks = np.frombuffer(rng.bytes(rows * nb * Q4_0_BYTES), np.uint8).reshape(rows, nb, Q4_0_BYTES).copy()
    scale = (rng.uniform(0.7, 1.3, (rows, nb)) / (4.6 * math.sqrt(cols))).astype("<f2")
    blocks[..., :2] = scale[..., None].view(np.uint8).reshape(rows, nb, 2)
    return blocks.reshape(rows, nb * Q4_0_BYTES)


def _vocabulary(cfg: ModelConfig) -> tuple[list[str], list[float], list[int]]:
    import gguf

    tokens = [f"<unused{i}>" for i in range(cfg.vocab_size)]
    types = [gguf.TokenType.NORMAL] * cfg.vocab_size
    special = {cfg.tokens.pad: "<pad>", cfg.tokens.eos: "<eos>", cfg.tokens.bos: "<bos>", 3: "<unk>",
               cfg.tokens.end_of_turn: "<end_of_turn>", cfg.tokens.end_of_turn - 1: "<start_of_turn>"}
    for i, piece in special.items():
        tokens[i] = piece
        types[i] = gguf.TokenType.UNKNOWN if piece == "<unk>" else gguf.TokenType.CONTROL
    # the 256 byte pieces (where Gemma's vocabulary has them): with byte fallback any text
    # tokenizes, one piece per UTF-8 byte, so the smoothing and GPTQ calibrations have tokens
    first = 238  # ids after every special piece; a tiny test vocabulary has no room and goes without
    if first + 256 <= cfg.vocab_size:
        for b in range(256):
            tokens[first + b] = f"<0x{b:02X}>"
            types[first + b] = gguf.TokenType.BYTE
    return tokens, [0.0] * cfg.vocab_size, [int(t) for t in types]


def save_random_gguf(cfg: ModelConfig, path, seed: int = 0) -> Path:
    """Write `cfg`'s text decoder (Gemma 2 or Gemma 3) as a GGUF of random Q4_0 weights to `path`.
    Returns the path. `config_from_gguf` of the file gives back cfg's architecture."""
    import gguf

    if cfg.family not in (Family.GEMMA2, Family.GEMMA3):
        raise ValueError(f"{cfg.name}: a GGUF holds Gemma 2 or Gemma 3 (llama.cpp has no RecurrentGemma "
                         "architecture); write a safetensors checkpoint instead")
    path = Path(path)
    arch = cfg.family.value
    rng = np.random.default_rng(seed)
    wr = gguf.GGUFWriter(str(path), arch=arch)
    wr.add_name(cfg.name)
    wr.add_context_length(cfg.max_seq_len)
    wr.add_embedding_length(cfg.embed_dim)
    wr.add_block_count(cfg.num_layers)
    wr.add_feed_forward_length(cfg.mlp_dim)
    wr.add_head_count(cfg.num_heads)
    wr.add_head_count_kv(cfg.num_kv_heads)
    wr.add_key_length(cfg.head_dim)
    wr.add_value_length(cfg.head_dim)
    wr.add_layer_norm_rms_eps(cfg.norm_eps)
    wr.add_sliding_window(cfg.sliding_window)
    kinds = [cfg.layer_pattern[i % len(cfg.layer_pattern)] for i in range(cfg.num_layers)]
    wr.add_array(f"{arch}.attention.sliding_window_pattern", [k is LayerKind.LOCAL for k in kinds])
    if cfg.attn_softcap:
        wr.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.final_softcap:
        wr.add_final_logit_softcapping(cfg.final_softcap)
    if cfg.family is Family.GEMMA3:
        wr.add_rope_freq_base(cfg.global_rope_base)
        wr.add_float32(f"{arch}.rope.freq_base_swa", cfg.local_rope_base)
        if cfg.global_rope_scale != 1.0:
            wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            wr.add_rope_scaling_factor(cfg.global_rope_scale)
    else:
        wr.add_rope_freq_base(cfg.global_rope_base)
    wr.add_float32(f"{arch}.attention.scale", cfg.query_scale)
    wr.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    tokens, scores, types = _vocabulary(cfg)
    wr.add_tokenizer_model("llama")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(tokens)
    wr.add_token_scores(scores)
    wr.add_token_types(types)
    wr.add_bos_token_id(cfg.tokens.bos)
    wr.add_eos_token_id(cfg.tokens.eos)
    wr.add_unk_token_id(3)
    wr.add_pad_token_id(cfg.tokens.pad)
    wr.add_add_bos_token(True)
    wr.add_add_eos_token(False)

    shapes = {gguf_name(ours): shape for ours, shape in param_shapes(cfg).items()}
    for name, shape in shapes.items():
        if len(shape) == 2:
            if shape[1] % Q4_0_BLOCK:
                raise ValueError(f"{cfg.name}: {name} is {shape[1]} wide, not a multiple of {Q4_0_BLOCK}")
            wr.add_tensor_info(name, (shape[0], shape[1] // Q4_0_BLOCK * Q4_0_BYTES), np.dtype(np.uint8),
                               shape[0] * shape[1] // Q4_0_BLOCK * Q4_0_BYTES, gguf.GGMLQuantizationType.Q4_0)
        else:
            wr.add_tensor_info(name, shape, np.dtype(np.float32), 4 * math.prod(shape))
    tmp = path.with_name(path.name + ".tmp")
    try:  # under a temporary name, renamed once complete
        wr.write_header_to_file(tmp)
        wr.write_kv_data_to_file()
        wr.write_ti_data_to_file()
        for name, shape in shapes.items():
            if len(shape) == 2:
                wr.write_tensor_data(_q4_0(shape[0], shape[1], rng))
            else:
                w = rng.normal(0.0, 0.1, shape).astype(np.float32)
                wr.write_tensor_data(w + np.float32(1))  # llama.cpp stores Gemma's norms as w + 1
        wr.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["save_random_gguf"]
