"""genai_config.json: what onnxruntime-genai needs to run our decoder folder unmodified.

Measured with onnxruntime-genai 0.18 (docs/onnx.md has the experiments):
  * model.type must be registered: Gemma 2 -> "gemma2", Gemma 3 -> "gemma3_text"; RecurrentGemma
    has no type of its own and runs as "decoder", with its states bound through
    past_conv_names / past_recurrent_names (layers are discovered from the graph's input names).
  * past_present_share_buffer = true: one buffer per state, bound as both past and present.
    Global layers get [1, K, search.max_length, D] buffers, so max_length is the context.
  * sliding_window.layers get [1, K, window_size + cache_slack, D] buffers (cache_slack 0 means
    the default, 16 on CPU). Default op set: the local caches' rows are symbolic, window_size is
    the window GroupQueryAttention keeps and the slack is left to onnxruntime-genai (it spares GQA
    a compaction at every step). Standard op set: the graph's ring caches are exactly W rows, so
    window_size = W - 1 and cache_slack = 1 make onnxruntime-genai allocate exactly that.
  * onnxruntime-genai's tokenizer does not add BOS: prompts must start with it (the chat template
    and runtime_py do).
"""

from __future__ import annotations

from contract.layout import LayerKind, StateKind, StateLayout, genai_templates
from models.config import Family, ModelConfig

MODEL_TYPES = {Family.GEMMA2: "gemma2", Family.GEMMA3: "gemma3_text", Family.RECURRENTGEMMA: "decoder"}


def genai_config(cfg: ModelConfig, max_len: int, layout: StateLayout, *, symbolic_local: bool,
                 filename: str = "model.onnx") -> dict:
    """The config for a decoder whose states are `layout` (as the folder's runtimes allocate them)."""
    kinds = cfg.layer_kinds
    local_rows = {s.rows for s in layout if s.layer_kind is LayerKind.LOCAL and s.rows is not None}
    local_layers = [i for i, k in enumerate(kinds) if k is LayerKind.LOCAL]
    if len(local_rows) > 1:
        raise ValueError(f"local layers with different cache sizes: {sorted(local_rows)}")
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    outputs = {"logits": "logits"}
    for kind in sorted({s.kind for s in layout}, key=list(StateKind).index):
        templates = genai_templates(kind)
        inputs.update([templates["inputs"]])
        outputs.update([templates["outputs"]])
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename, "head_size": cfg.head_dim, "hidden_size": cfg.embed_dim,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "num_hidden_layers": cfg.num_layers, "inputs": inputs, "outputs": outputs,
    }
    rows = next(iter(local_rows), None)
    if local_layers and rows is not None and rows < max_len:
        sizing = {"window_size": rows} if symbolic_local else {"window_size": rows - 1, "cache_slack": 1}
        decoder["sliding_window"] = {**sizing, "slide_key_value_cache": False, "slide_inputs": False,
                                     "layers": local_layers}
    stop = list(cfg.tokens.stop_ids())
    return {
        "model": {"type": MODEL_TYPES[cfg.family], "context_length": max_len, "vocab_size": cfg.vocab_size,
                  "bos_token_id": cfg.tokens.bos, "eos_token_id": stop if len(stop) > 1 else stop[0],
                  "pad_token_id": cfg.tokens.pad, "decoder": decoder},
        "search": {"do_sample": False, "max_length": max_len, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "repetition_penalty": 1.0, "early_stopping": True,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }
