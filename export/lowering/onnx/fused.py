"""Composite rules: what each fused op (models/fused.py) becomes in ONNX, per op set.

  op set     | attention (gemma_edge.{global,local}_attention)    | RG-LRU                | rms_norm
  -----------+----------------------------------------------------+-----------------------+------------------
  default    | com.microsoft::GroupQueryAttention, caches shared  | gemma_edge.Linear-    | RMSNormalization
             | in place; local layers: local_window_size +        | Recurrence (a Scan)   | (opset 23)
             | sliding_window_cache (a window-sized cache)        |                       |
  standard   | gemma_edge.GlobalAttention / LocalAttention:       | same                  | same
             | model-local functions lowered from the composite's |                       |
             | decomposition (ring caches, standard ops only)     |                       |

odml.embedding_lookup is a Gather in both; the inner odml.scaled_dot_product_attention only occurs
inside attention decompositions, which are lowered op by op. gemma_edge.bidirectional_attention
(the vision tower's) is the standard Attention op (opset 23) in both.

GroupQueryAttention (default op set), per attention layer (shapes in models/__init__.py's legend):

    q [1,T,H,D] -> Reshape [1,T,H*D] --+
    k [1,T,K,D] -> Reshape [1,T,K*D] --+--> GroupQueryAttention --> out [1,T,H*D] -> Reshape [1,T,H,D]
    v [1,T,K,D] -> Reshape [1,T,K*D] --+     num_heads=H, kv_num_heads=K, scale, softcap,
    past_key / past_value [1,K,R,D] ---+     do_rotary=1 (RoPE on the first rope_dim features,
    seqlens_k = start + num_valid - 1 -+     rotate-half), local_window_size=window and
    total_sequence_length = start + nv +     sliding_window_cache=1 (local layers)
    cos/sin caches [context, rope_dim/2] +--> present_key / present_value (the same buffers)

Cache rows R: the context for global layers; for local layers at least the window the query sees
(its `window` attribute, itself included: W for Gemma, W + 1 for RecurrentGemma) unless that
reaches the context, in which case the layer keeps the whole context and needs no window. Both
are symbolic dimensions in the graph (GLOBAL_ROWS, LOCAL_ROWS): onnxruntime-genai allocates
max_length rows for global layers and window + cache_slack rows (16 on CPU) for local ones, and
GQA compacts a local cache only every cache_slack + 1 steps; runtime_py allocates exactly R. GQA keeps a
local cache's rows in its own order (the newest positions packed at the front), so these
caches are not the reference's ring: only the logits are comparable, which is what the parity
gate compares. The standard op set keeps the reference's ring layout exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.lowering.onnx.graph import Lowering, UnsupportedOpError, tensor_type

DOMAIN = "gemma_edge"
MS_DOMAIN = "com.microsoft"
OPSET = 23  # RMSNormalization

# symbolic cache rows (default op set): the runtime sizes these buffers
GLOBAL_ROWS, LOCAL_ROWS = "max_sequence_length", "sliding_window_cache_length"

DEFAULT: dict = {}
STANDARD: dict = {}
OP_SETS = {"default": DEFAULT, "standard": STANDARD}


def composite(name: str, *op_sets: dict):
    def register(fn):
        for table in op_sets:
            table[name] = fn
        return fn

    return register


@composite("odml.embedding_lookup", DEFAULT, STANDARD)
def lower_embedding_lookup(lw: Lowering, op):
    """odml.embedding_lookup(ids int32 [N], table [V, D]) -> Gather(table, clip(ids), axis=0)."""
    ids, table = lw.composite_operands(op)
    v = tensor_type(lw.composite_operand_values(op)[1])[0][0]
    ids = lw.node1("Max", [lw.node1("Min", [ids, lw.const(np.array(v - 1, np.int32))]),
                          lw.const(np.array(0, np.int32))])
    out = lw.node1("Gather", [table, ids], axis=0)
    out_dtype = tensor_type(op.results[0])[1]
    if lw.weight_source(table) is not None and lw.weights[lw.weight_source(table)].dtype != out_dtype:
        from export.lowering.onnx.graph import NUMPY_TO_ONNX

        out = lw.node1("Cast", [out], to=NUMPY_TO_ONNX[out_dtype])
    return [out]


@composite("odml.rms_norm", DEFAULT, STANDARD)
def lower_rms_norm(lw: Lowering, op):
    """odml.rms_norm(x [..., D], gain [D]) {epsilon} -> RMSNormalization(axis=-1) (ONNX opset 23)."""
    x, gain = lw.composite_operands(op)
    eps = float(lw.composite_attributes(op)["epsilon"])
    return [lw.node1("RMSNormalization", [x, gain], axis=-1, epsilon=eps)]


@composite("gemma_edge.bidirectional_attention", DEFAULT, STANDARD)
def lower_bidirectional_attention(lw: Lowering, op):
    """gemma_edge.bidirectional_attention(q, k, v [B, T, H, D]) {scale} -> the standard Attention
    op (opset 23) on [B, T, H*D] views. On Gemma 3's tower (16 heads, 4096 patches) it takes
    0.3-0.4 s a layer on 2 threads where MatMul-Softmax-MatMul took 2.4 s (docs/vision.md).
    ONNX Runtime's kernel holds all heads' [T, T] logits at once (1 GiB there), so the heads go
    in groups whose logits fit SCORE_BYTES (4 Attention ops of 4 heads: 0.5 GiB less peak
    memory, the same time)."""
    q, k, v = lw.composite_operands(op)
    b, t, h, d = tensor_type(lw.composite_operand_values(op)[0])[0]
    scale = float(lw.composite_attributes(op)["scale"])
    groups = next(g for g in range(1, h + 1) if h % g == 0 and (h // g) * t * t * 4 <= SCORE_BYTES or g == h)
    flat = lw.const(np.array([b, t, h * d], np.int64))
    q, k, v = (lw.node1("Reshape", [x, flat]) for x in (q, k, v))
    if groups == 1:
        out = lw.node1("Attention", [q, k, v], q_num_heads=h, kv_num_heads=h, scale=scale)
    else:
        parts = [lw.node("Split", [x], n_out=groups, axis=2, num_outputs=groups) for x in (q, k, v)]
        outs = [lw.node1("Attention", [qi, ki, vi], q_num_heads=h // groups, kv_num_heads=h // groups, scale=scale)
                for qi, ki, vi in zip(*parts)]
        out = lw.node1("Concat", outs, axis=2)
    return [lw.node1("Reshape", [out, lw.const(np.array([b, t, h, d], np.int64))])]


SCORE_BYTES = 256 * 2**20  # f32 attention logits one Attention op of the vision tower may hold


def _linear_recurrence_function() -> onnx.FunctionProto:
    """gemma_edge.LinearRecurrence(a [B,T,C], x [B,T,C], h0 [B,C]) -> h [B,T,C]:
    h_t = a_t * h_{t-1} + x_t, as a Scan over axis 1 (one step for decode). The final state is
    h[:, -1], sliced by the graph outside (the composite has one output; models/fused.py)."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["a_t", "h_prev"], ["ah"]),
         helper.make_node("Add", ["ah", "x_t"], ["h_next"]),
         helper.make_node("Identity", ["h_next"], ["h_out"])],
        "linear_recurrence_step",
        [helper.make_tensor_value_info("h_prev", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("a_t", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("h_next", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None)])
    scan = helper.make_node("Scan", ["h0", "a", "x"], ["h_last", "h"], num_scan_inputs=2,
                            scan_input_axes=[1, 1], scan_output_axes=[1], body=body)
    return helper.make_function(DOMAIN, "LinearRecurrence", ["a", "x", "h0"], ["h"], [scan],
                                [helper.make_opsetid("", OPSET)])


@composite("gemma_edge.linear_recurrence", DEFAULT, STANDARD)
def lower_linear_recurrence(lw: Lowering, op):
    """gemma_edge.linear_recurrence(a, x, h0) -> gemma_edge.LinearRecurrence (a Scan)."""
    lw.add_function(_linear_recurrence_function())
    return lw.node("LinearRecurrence", lw.composite_operands(op), n_out=1, domain=DOMAIN, hint="rg_lru")


def gqa_local_rows(window_span: int, max_len: int) -> int:
    """Rows of a local layer's cache when GroupQueryAttention owns it: the keys a query sees
    (local_window_size), or the whole context when the window spans it (a plain causal cache).
    The ONNX target's state layout takes its local rows from here."""
    return window_span if window_span < max_len else max_len


def _gqa(lw: Lowering, op, local: bool):
    operands, values = lw.composite_operands(op), lw.composite_operand_values(op)
    # past the seventh operand (models.fused.cached_attention): the positions in use (rank 1, `total`;
    # GQA reads the valid length itself, from seqlens_k), RoPE's frequency table (rank 1: GQA's cos/sin
    # tables are built from the same frequencies, below) and the image prefill's block ids (rank 2:
    # GQA masks causally, images need more)
    if any(len(tensor_type(v)[0]) == 2 for v in values[7:]):
        raise UnsupportedOpError(
            "com.microsoft::GroupQueryAttention cannot express the bidirectional attention inside an image's "
            "soft tokens: export a model with vision with --onnx-ops standard (or --no-vision)")
    q, k, v, cache_k, cache_v, start, num_valid = operands[:7]
    attrs = lw.composite_attributes(op)
    _, n, h = tensor_type(values[0])[0][1:]
    kv = tensor_type(values[1])[0][2]
    cache_shape = tensor_type(values[3])[0]
    max_len = lw.options["max_len"]
    gqa_attrs = dict(num_heads=n, kv_num_heads=kv, scale=float(attrs["scale"]),
                     softcap=float(attrs.get("logit_cap", 0.0)))
    rope_dim = int(attrs["rope_dim"])
    cos, sin = _rope_tables(lw, max_len, float(attrs["rope_base"]), float(attrs["rope_scale"]), rope_dim)
    rope_inputs = [cos, sin]
    if (rope_dim // 2) % 8 == 0:  # GQA's rotary kernel takes tables of a multiple of 8 columns
        gqa_attrs.update(do_rotary=1, rotary_interleaved=0)
    else:  # ONNX's RotaryEmbedding (opset 23) on q and k, then GQA without rotary
        rope_inputs = []
        t = lw.node1("Shape", [q], start=1, end=2)
        first = lw.node1("Cast", [start], to=TensorProto.INT64)  # [1]
        pos = lw.node1("Range", [lw.node1("Squeeze", [first]), lw.node1("Squeeze", [lw.node1("Add", [first, t])]),
                                 lw.const(np.array(1, np.int64))])
        pos = lw.node1("Unsqueeze", [pos, lw.const(np.array([0], np.int64))])  # [1, T]
    flat = lw.const(np.array([0, 0, -1], np.int64))
    q, k, v = (lw.node1("Reshape", [x, flat]) for x in (q, k, v))  # [1, T, heads * H]
    if not rope_inputs:
        q, k = (lw.node1("RotaryEmbedding", [x, cos, sin, pos], interleaved=0, rotary_embedding_dim=rope_dim,
                         num_heads=heads) for x, heads in ((q, n), (k, kv)))
    rows, symbol = cache_shape[2], GLOBAL_ROWS
    if local:
        window = int(attrs["window"])
        rows = gqa_local_rows(window, max_len)
        if window < max_len:
            symbol = LOCAL_ROWS
            gqa_attrs.update(local_window_size=window, sliding_window_cache=1)
    for name in (cache_k, cache_v):
        lw.declare_state_rows(name, rows, symbol)
    total = lw.node1("Add", [start, num_valid])  # [1] int32
    seqlens = lw.node1("Sub", [total, lw.const(np.array([1], np.int32))])
    total_scalar = lw.node1("Reshape", [total, lw.const(np.array([], np.int64))])
    out, present_k, present_v = lw.node(
        "GroupQueryAttention",
        [q, k, v, cache_k, cache_v, seqlens, total_scalar, *rope_inputs],
        n_out=3, domain=MS_DOMAIN, hint="gqa", **gqa_attrs)
    out = lw.node1("Reshape", [out, lw.const(np.array([0, 0, n, h], np.int64))])
    for name in (present_k, present_v):
        lw.declare_state_rows(name, rows, symbol)
    return [out, present_k, present_v]


def _rope_tables(lw: Lowering, max_len: int, base: float, scale: float, rope_dim: int) -> tuple[str, str]:
    """GQA's cos/sin caches [max_len, rope_dim / 2] (initializers). Each angle is one float32
    product, position x frequency (models.layers.rope_frequencies: the frequency computed in
    float64 and rounded once), as the JAX model computes it (the composite's `rope_freqs`
    operand, which GQA does not read: these tables carry it). Evaluating `position / scale /
    timescale` division by division instead rounds differently by an ulp of the angle, which
    grows with the position: 2e-3 rad at 32K, enough to fail the gate's 32K long check (rel RMS
    1.7e-4 at position 27647)."""
    import jax.numpy as jnp

    from models.layers import rope_frequencies

    name = f"rope_{base:g}_{scale:g}_{rope_dim}"
    if f"{name}.cos" not in lw.initializers:
        angle = np.arange(max_len, dtype=np.float32)[:, None] * rope_frequencies(base, scale, rope_dim)
        lw.initializers[f"{name}.cos"] = np.asarray(jnp.cos(angle))
        lw.initializers[f"{name}.sin"] = np.asarray(jnp.sin(angle))
    return f"{name}.cos", f"{name}.sin"


@composite("gemma_edge.global_attention", DEFAULT)
def lower_global_attention_gqa(lw: Lowering, op):
    """gemma_edge.global_attention(q, k, v, cache_k, cache_v, start, num_valid) {scale, logit_cap}
    -> com.microsoft::GroupQueryAttention over a context-sized cache."""
    return _gqa(lw, op, local=False)


@composite("gemma_edge.local_attention", DEFAULT)
def lower_local_attention_gqa(lw: Lowering, op):
    """gemma_edge.local_attention(...) {scale, logit_cap, window} -> GroupQueryAttention with
    local_window_size and a window-sized cache (sliding_window_cache=1)."""
    return _gqa(lw, op, local=True)


@composite("gemma_edge.global_attention", STANDARD)
def lower_global_attention_function(lw: Lowering, op):
    """gemma_edge.global_attention -> gemma_edge.GlobalAttention, a model-local function whose
    body is the composite's decomposition in standard ops."""
    return lw.call_as_function(op, "GlobalAttention", DOMAIN)


@composite("gemma_edge.local_attention", STANDARD)
def lower_local_attention_function(lw: Lowering, op):
    """gemma_edge.local_attention -> gemma_edge.LocalAttention (model-local function, ring cache)."""
    return lw.call_as_function(op, "LocalAttention", DOMAIN)
