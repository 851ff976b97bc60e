"""LiteRT-LM bundles (`.litertlm`): the TFLite model, its SentencePiece tokenizer and the metadata
LiteRT-LM reads, in one file (DESIGN section 5).

Sections, written with the `litert-lm-builder` package:
  TFLiteModel      our prefill_{T}/decode model, model_type prefill_decode, prefer_activation_type
                   fp32 (LiteRT-LM's default for a text decoder is fp16 activations, which overflow
                   in Gemma's residual stream; DESIGN section 6)
  SP_Tokenizer     the checkpoint's tokenizer.model, byte for byte
  LlmMetadata      start token (BOS), stop tokens (EOS; and <end_of_turn> for -it models),
                   max_num_tokens = the exported context, llm_model_type (gemma3 for Gemma 3, the
                   generic type otherwise), and for -it models the Gemma turn format as
                   prompt_templates (Session API) and a Jinja chat template (Conversation API)
  ExecutorMetadata max_history_size = the context, and every state as a state buffer: KV caches
                   with their type (global/local key/value), sequence axis and row count;
                   RecurrentGemma's conv and RG-LRU states as LINEAR_ATTENTION buffers

Why ExecutorMetadata: without it LiteRT-LM takes the context from dimension 2 of the first key
cache. Gemma 3's first layer is local, its cache window-sized, so the runtime would cap every
conversation at the window (it logs "max_num_tokens ... is larger than what the static model
supports"). With ExecutorMetadata it sees the true context; it then requires every state tensor
to be declared, which is what the state_buffers list does.

RecurrentGemma runs too, given two things of the TFLite model (docs/litertlm.md): its state names
start with `kv_cache_` (LiteRT-LM carries no other state between calls), and the RG-LRU composite
has one output (LiteRT-LM 0.18.1 fails to run a composite with several: "Input tensor N lacks
data").

The prefill lengths a bundle may use are checked too (`check_prefill_lengths`): LiteRT-LM reads
a prime dimension above 10 as a placeholder.

Gemma 3 with images (docs/litertlm.md, "Gemma 3 with images"): the bundle holds four TFLite
models (contract/bundle.py: the decoder taking flagged embeddings, the embedder, the vision
encoder and adapter), LlmMetadata's gemma3 type names the image markers and the encoder's input
size, and the chat templates render image items as `<start_of_image>`. LiteRT-LM on CPU chunks a
prompt greedily over the prefill lengths (largest first, the rest cascading to smaller ones), and
an image split across two chunks loses its bidirectional attention; such a bundle therefore gets
one prefill length by default (`vision_prefill_length`), so a prompt up to that length is never
split.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

from contract.bundle import EMBEDDER, RAW_TEMPLATE, VISION_ADAPTER, VISION_ENCODER, BundleError
from contract.layout import LayerKind, Naming, StateKind
from models.cache import state_layout
from models.config import Family, ModelConfig


# ---- the tokenizer ---------------------------------------------------------------------------------
def find_tokenizer(source: Path | None) -> Path:
    """The SentencePiece model to bundle: `source` itself (a .model file), or the tokenizer.model
    of a folder (a checkpoint folder, or --tokenizer)."""
    hint = ("pass --tokenizer PATH (a SentencePiece tokenizer.model, or a folder holding one); a "
            ".litertlm bundle must carry its tokenizer")
    if source is None:
        raise BundleError(f"no tokenizer for the bundle: {hint}")
    source = Path(source)
    path = source / "tokenizer.model" if source.is_dir() else source
    if not path.is_file():
        where = f"{source} holds no tokenizer.model" if source.is_dir() else f"tokenizer not found: {source}"
        raise BundleError(f"{where}: {hint}")
    return path


SPARE_ROWS = 1024  # vocabulary rows past the tokenizer's pieces that pass without a warning


def check_tokenizer(path: Path, cfg: ModelConfig):
    """The tokenizer must load and fit the model: its pieces index the embedding table, and its
    BOS/EOS are the ones the model was trained with."""
    from contract.tokenizer import Tokenizer

    try:
        tok = Tokenizer(path)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError, long messages
        raise BundleError(f"{path} is not a SentencePiece model ({str(e).splitlines()[0]}); pass "
                          "--tokenizer PATH to the checkpoint's tokenizer.model") from None
    if tok.vocab_size > cfg.vocab_size:
        raise BundleError(f"{path} has {tok.vocab_size} pieces but {cfg.name}'s vocabulary has "
                          f"{cfg.vocab_size} rows: it is not this model's tokenizer; pass --tokenizer PATH")
    checks = [("BOS", cfg.tokens.bos, tok.bos_id), ("EOS", cfg.tokens.eos, tok.eos_id)]
    if cfg.instruction_tuned:  # the chat template's turn marker is also a stop token
        checks.append(("<end_of_turn>", cfg.tokens.end_of_turn, tok.end_of_turn_id))
    for what, ours, theirs in checks:
        if theirs is not None and ours != theirs:
            raise BundleError(f"{path}: {what} is id {theirs} but {cfg.name} uses {ours}: it is not "
                              "this model's tokenizer; pass --tokenizer PATH")
    if cfg.vocab_size - tok.vocab_size > SPARE_ROWS:
        # Gemma's tables may have a few rows past the tokenizer (gemma3-4b: 64), which a trained
        # model never samples; far more means another model's tokenizer, and LiteRT-LM stops its
        # decode at the first sampled id the tokenizer cannot detokenize ("Token id ... is out of range")
        print(f"warning: {path} has {tok.vocab_size} pieces for {cfg.name}'s {cfg.vocab_size} vocabulary rows: "
              "LiteRT-LM stops decoding at a sampled id past the tokenizer; pass the model's own --tokenizer",
              file=sys.stderr)
    return tok


# ---- what LiteRT-LM can run ------------------------------------------------------------------------
def check_prefill_lengths(lens: list[int]):
    """LiteRT-LM reads a prime dimension above 10 in `input_pos` as a placeholder to be filled in
    at load time (its "magic number" handling), and then cannot run that prefill signature: the
    prefill fails. Refuse such lengths up front."""
    primes = [t for t in lens if t > 10 and is_prime(t)]
    if primes:
        raise BundleError(f"prefill length{'s' if len(primes) > 1 else ''} {', '.join(map(str, primes))}: LiteRT-LM "
                          "treats a prime dimension above 10 as a placeholder and cannot run it; pick other "
                          "--prefill-lens (e.g. 32,128)")


def is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


VISION_PREFILL = 1024  # a vision bundle's default prefill length (one image of Gemma 3 is 260 tokens)


def vision_prefill_length(max_len: int, image_tokens: int) -> int:
    """A vision bundle's one default prefill length: VISION_PREFILL, or the context if smaller (the
    largest length LiteRT-LM can run, at least an image's `image_tokens` positions). One length,
    because LiteRT-LM's CPU executor chunks greedily: with lengths {32, 1024} a 300-token prompt
    runs as 9 x 32 + 12, and an image is split. BundleError when the context holds no image."""
    for t in range(min(VISION_PREFILL, max_len), image_tokens - 1, -1):
        if not (t > 10 and is_prime(t)):
            return t
    raise BundleError(f"a context of {max_len} cannot hold an image's {image_tokens} positions in one prefill; "
                      "raise --max-seq-len or pass --no-vision")


def preflight(cfg: ModelConfig, prefill_lens: list[int], tokenizer_source: Path | None) -> Path:
    """Every check a bundle needs before any export work; returns the tokenizer to bundle."""
    check_prefill_lengths(prefill_lens)
    path = find_tokenizer(tokenizer_source)
    tok = check_tokenizer(path, cfg)
    if cfg.vision is not None:
        check_image_pieces(tok, path, cfg)
    return path


def check_image_pieces(tok, path: Path, cfg: ModelConfig):
    """LiteRT-LM writes an image's markers as text ("\n\n<start_of_image>", then "\n\n") and
    tokenizes them with the bundled tokenizer: each must be one piece, the model's id."""
    v = cfg.vision
    for text, want in (("<start_of_image>", v.boi_token), ("<end_of_image>", v.eoi_token), ("\n\n", v.newline_token)):
        got = tok.encode(text, add_bos=False)
        if got != [want]:
            raise BundleError(f"{path} tokenizes {text!r} as {got}, but {cfg.name}'s image layout needs [{want}]: it "
                              "is not this model's tokenizer; pass --tokenizer PATH, or --no-vision for a text bundle")


# ---- metadata --------------------------------------------------------------------------------------
# The Gemma turn format (MODEL_SPEC section 7), as LiteRT-LM's Jinja renderer sees it: messages
# with role user/assistant/model/system and content a string or a list of {"type": "text"} items
# (and {"type": "image"} items, rendered as `<start_of_image>` as Hugging Face's Gemma 3 template does).
# Gemma 3 folds a leading system message into the first user turn; Gemma 2 and RecurrentGemma
# have no system role and refuse one, as contract/tokenizer.apply_chat_template does.
_JINJA = r"""{{ bos_token }}
{%- set ns = namespace(prefix='') -%}
{%- set turns = messages -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- if not SYSTEM_OK -%}{{ raise_exception('System role not supported') }}{%- endif -%}
{%- set c = messages[0]['content'] -%}
{%- if c is string -%}{%- set ns.prefix = c | trim -%}{%- else -%}
{%- for item in c -%}{%- if item['type'] == 'text' -%}{%- set ns.prefix = ns.prefix + (item['text'] | trim) -%}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- set ns.prefix = ns.prefix + '\n\n' -%}
{%- set turns = messages[1:] -%}
{%- endif -%}
{%- for message in turns -%}
{%- set role = 'model' if message['role'] in ['assistant', 'model'] else message['role'] -%}
{{ '<start_of_turn>' + role + '\n' }}
{%- if loop.first -%}{{ ns.prefix }}{%- endif -%}
{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}
{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}
{%- elif item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- endif -%}{%- endfor -%}
{%- endif -%}
{{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}
"""


def chat_template(cfg: ModelConfig) -> str:
    system_ok = "true" if cfg.family is Family.GEMMA3 else "false"
    return _JINJA.replace("SYSTEM_OK", system_ok)


def llm_metadata(cfg: ModelConfig, max_len: int):
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    m = llm_metadata_pb2.LlmMetadata()
    m.start_token.token_ids.ids.append(cfg.tokens.bos)
    for stop in cfg.tokens.stop_ids() if cfg.instruction_tuned else (cfg.tokens.eos,):
        m.stop_tokens.add().token_ids.ids.append(stop)
    m.max_num_tokens = max_len
    m.pad_token.token_ids.ids.append(cfg.tokens.pad)  # what LiteRT-LM pads prefill chunks with
    if cfg.family is Family.GEMMA3:
        g = m.llm_model_type.gemma3
        g.SetInParent()
        if cfg.vision is not None:  # LiteRT-LM's Gemma 3 processor: the markers, the encoder's input size
            g.start_of_image_token.token_str = "<start_of_image>"
            g.end_of_image_token.token_str = "<end_of_image>"
            g.image_tensor_height = g.image_tensor_width = cfg.vision.image_size
            if not cfg.instruction_tuned:  # conversations with image items need a template that has them
                m.jinja_prompt_template = RAW_TEMPLATE
    else:
        m.llm_model_type.generic_model.SetInParent()
    if cfg.instruction_tuned:
        t = m.prompt_templates
        t.user.prefix, t.user.suffix = "<start_of_turn>user\n", "<end_of_turn>\n"
        t.model.prefix, t.model.suffix = "<start_of_turn>model\n", "<end_of_turn>\n"
        if cfg.family is Family.GEMMA3:
            t.system.prefix, t.system.suffix = "<start_of_turn>user\n", "\n\n"
        m.jinja_prompt_template = chat_template(cfg)
    return m


def executor_metadata(cfg: ModelConfig, max_len: int, kv: str = "f32"):
    """Every state tensor declared, so LiteRT-LM knows the context and each cache's layout.
    RecurrentGemma's conv and RG-LRU states are LINEAR_ATTENTION buffers (fixed size, no sequence
    axis); with no global cache LiteRT-LM takes no context limit from the buffers, and
    LlmMetadata.max_num_tokens sets it."""
    from litert_lm_builder.runtime.proto import executor_metadata_pb2 as E

    e = E.ExecutorMetadata()
    x = e.llm_executor_metadata
    x.max_history_size = max_len
    types = {(LayerKind.GLOBAL, StateKind.KEY): E.StateBuffer.TYPE_GLOBAL_KEY_CACHE,
             (LayerKind.GLOBAL, StateKind.VALUE): E.StateBuffer.TYPE_GLOBAL_VALUE_CACHE,
             (LayerKind.LOCAL, StateKind.KEY): E.StateBuffer.TYPE_LOCAL_KEY_CACHE,
             (LayerKind.LOCAL, StateKind.VALUE): E.StateBuffer.TYPE_LOCAL_VALUE_CACHE}
    # an int8 cache's scales (one per row and head) are declared as their cache's kind
    types.update({(k, StateKind.KEY_SCALE): types[k, StateKind.KEY] for k in (LayerKind.GLOBAL, LayerKind.LOCAL)})
    types.update({(k, StateKind.VALUE_SCALE): types[k, StateKind.VALUE] for k in (LayerKind.GLOBAL, LayerKind.LOCAL)})
    for spec in state_layout(cfg, max_len, kv=kv):
        name = spec.name(Naming.TFLITE)
        sb = x.state_buffers.add()
        sb.prefill_input_name = sb.prefill_output_name = name
        sb.decode_input_name = sb.decode_output_name = name
        if spec.layer_kind is LayerKind.RECURRENT:
            sb.type = E.StateBuffer.TYPE_LINEAR_ATTENTION
            continue
        sb.type = types[spec.layer_kind, spec.kind]
        sb.sequence_axis = 2  # [1, kv_heads, rows, head_dim]
        sb.maximum_sequence_length = spec.rows
    return e


# ---- writing ---------------------------------------------------------------------------------------
_SECTION_TYPES = (EMBEDDER, VISION_ENCODER, VISION_ADAPTER)


def write_bundle(tflite_path: Path, tokenizer_path: Path, cfg: ModelConfig, max_len: int, out: Path, kv: str = "f32",
                 sections: dict[str, Path] | None = None):
    """Write `out` (.litertlm) atomically: built under a temporary name, then renamed. `sections`:
    a vision bundle's other TFLite models by LiteRT-LM model type (contract/bundle.py)."""
    from litert_lm_builder import litertlm_builder as B

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".litertlm-") as scratch:
        llm, executor = Path(scratch) / "llm_metadata.pb", Path(scratch) / "executor_metadata.pb"
        llm.write_bytes(llm_metadata(cfg, max_len).SerializeToString())
        executor.write_bytes(executor_metadata(cfg, max_len, kv).SerializeToString())
        b = B.LitertLmFileBuilder()
        b.add_system_metadata(B.Metadata(key="Authors", value="gemma-edge", dtype=B.DType.STRING))
        with contextlib.redirect_stdout(io.StringIO()):  # the builder prints this option
            b.add_tflite_model(str(tflite_path), B.TfLiteModelType.PREFILL_DECODE, prefer_activation_type="fp32")
            for model_type, path in (sections or {}).items():
                if model_type not in _SECTION_TYPES:
                    raise BundleError(f"internal error: no bundle section of type {model_type}")
                b.add_tflite_model(str(path), B.TfLiteModelType(model_type))
        b.add_sentencepiece_tokenizer(str(tokenizer_path))
        b.add_llm_metadata(str(llm))
        b.add_executor_metadata(str(executor))
        try:
            with open(tmp, "wb") as f:
                b.build(f)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
    return out
