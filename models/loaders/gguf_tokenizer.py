"""A SentencePiece `tokenizer.model` rebuilt from a GGUF's `tokenizer.ggml.*` vocabulary
(docs/notes/gguf.md §3.5).

llama.cpp writes the SentencePiece pieces, scores and types, then overwrites the tokens of
`added_tokens_decoder` (score -1000, CONTROL or USER_DEFINED, spaces in user-defined pieces written
as ' '). Five fixes give back a Gemma-style model that contract/tokenizer.py and
export/tokenizer_files accept:
  1. `<unk>` (CONTROL in the GGUF) becomes the one UNKNOWN piece SentencePiece needs;
  2. CONTROL pieces other than pad/eos/bos (`<start_of_turn>`, `<end_of_turn>`, `<mask>`,
     `<unused…>`) become USER_DEFINED, so the turn markers encode from text as single ids;
  3. spaces in USER_DEFINED pieces go back to '▁' (else the whitespace-run pieces never match);
  4. the -1000.0 scores of UNKNOWN/CONTROL/USER_DEFINED pieces go back to 0.0;
  5. a Gemma-style trainer/normalizer spec: BPE, identity normalization, no dummy prefix (unless
     tokenizer.ggml.add_space_prefix), no whitespace removal, escaped whitespace, byte fallback
     when the vocabulary has the 256 byte pieces.
"""

from __future__ import annotations

from pathlib import Path

from models.errors import CheckpointError
from models.loaders.gguf import GGUFFile, _open

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_model(file_or_path) -> bytes:
    """The serialized sentencepiece ModelProto of a GGUF's vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    f: GGUFFile = _open(file_or_path)
    where = str(f.path)
    kind = f.get("tokenizer.ggml.model")
    if kind != "llama":
        raise CheckpointError(
            f"{where}: tokenizer.ggml.model is '{kind}'; only SentencePiece ('llama') vocabularies "
            "can be rebuilt as a tokenizer.model")
    tokens = f.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{where}: no tokenizer.ggml.tokens in the GGUF")
    n = len(tokens)
    scores = f.get("tokenizer.ggml.scores")
    types = f.get("tokenizer.ggml.token_type")
    scores = [0.0] * n if scores is None else [float(x) for x in scores]
    types = [NORMAL] * n if types is None else [int(x) for x in types]
    if len(scores) != n or len(types) != n:
        raise CheckpointError(f"{where}: tokenizer.ggml tokens/scores/token_type lengths differ "
                              f"({n}/{len(scores)}/{len(types)})")

    def special(key, default, piece):
        v = f.get(f"tokenizer.ggml.{key}")
        if v is None:
            v = tokens.index(piece) if piece in tokens else default
        v = int(v)
        if not 0 <= v < n:
            raise CheckpointError(f"{where}: tokenizer.ggml.{key} {v} is outside the vocabulary")
        return v

    unk = special("unknown_token_id", 3, "<unk>")
    bos = special("bos_token_id", 2, "<bos>")
    eos = special("eos_token_id", 1, "<eos>")
    pad = special("padding_token_id", 0, "<pad>")
    if len({unk, bos, eos, pad}) != 4:
        raise CheckpointError(f"{where}: unk/bos/eos/pad ids {unk}/{bos}/{eos}/{pad} are not distinct")

    m = pb.ModelProto()
    n_bytes = 0
    for i, (tok, score, ty) in enumerate(zip(tokens, scores, types)):
        if i == unk:
            ty = UNKNOWN
        elif i in (bos, eos, pad):
            ty = CONTROL
        elif ty in (CONTROL, UNKNOWN):
            ty = USER_DEFINED
        elif ty not in (NORMAL, USER_DEFINED, UNUSED, BYTE):
            ty = NORMAL
        if ty == USER_DEFINED:
            tok = tok.replace(" ", "\u2581")
        if ty in (UNKNOWN, CONTROL, USER_DEFINED):
            score = 0.0
        n_bytes += ty == BYTE
        p = m.pieces.add()
        p.piece = tok.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        p.score = score
        p.type = ty
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = n_bytes == 256
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk, bos, eos, pad
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = (tokens[x] for x in (unk, bos, eos, pad))
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", False))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m.SerializeToString()


def write_tokenizer(path_or_file, out_path) -> Path:
    """Write the rebuilt tokenizer.model to `out_path` (via a temporary name, then a rename)."""
    from contract.files import write_atomic

    return write_atomic(out_path, sentencepiece_model(path_or_file))


__all__ = ["sentencepiece_model", "write_tokenizer"]
