"""Gemma 3 vision tower (SigLIP So400m/14 + multimodal projector) as pure JAX (MODEL_SPEC 4).

Shapes follow the legend in models/__init__.py.
Its vision letters: P patches, Ev, Hv, Dv, Fv, I; E is the text model's width (text_dim). Sizes in
lower case: p = patch_size, g = image_size / p patches per side, k the pooling window's side.

`encode_images(params, vcfg, text_dim, images)` maps preprocessed images to soft tokens, matching
Hugging Face `Gemma3ForConditionalGeneration.get_image_features(...).pooler_output`:

  images [B, image_size, image_size, 3] f32 in [-1, 1], channels last (rescale 1/255, mean/std 0.5)
  patches  = the g x g grid of p x p patches, each flattened row-major in (kh, kw, c)
             order -> [B, P, p*p*3]                               (P = g*g = num_patches)
  x = patches @ patch_embed.w.T + patch_embed.b + pos_embed       # the stride-p conv as one matmul
  depth x:  x = x + MHA(LN1(x));  x = x + fc2(gelu_tanh(fc1(LN2(x))))
            pre-LayerNorm (with bias), bidirectional multi-head attention (no mask), scale
            Dv**-0.5, biases on q/k/v/o and fc1/fc2
  x = post_LN(x)                                                  # [B, P, Ev]
  s = avg_pool(reshape(x, [B, g, g, Ev]), k x k, stride k)        # k = g / sqrt(I)
  s = rms_norm(s) * (1 + mm.norm.scale)                           # Gemma RMSNorm, eps = layer_norm_eps
  s = s @ mm.proj.w.T                                             # [B, I, E]

Everything runs in float32 (the official implementation keeps the vision and projector weights in
f32), whatever the dtype of the stored parameters. Attention is the fused op
`gemma_edge.bidirectional_attention` (models/fused.py: unmasked, so no mask operand; ONNX runs it
as the standard Attention op, other runtimes its einsum decomposition), and the patch embedding
and pooling are reshapes, so the tower lowers to matmuls, reductions and elementwise ops.

Parameters are a flat dict (`vision_param_shapes` is the table). Matmul weights are stored
[out, in], like the text model's (models/params.py), so they lower to FULLY_CONNECTED without a
transpose; `.b` are biases; LayerNorm has `.scale` (used as is) and `.bias`; `mm.norm.scale` is a
Gemma RMSNorm scale, used as (1 + scale).

  ours                                  Hugging Face (under vision_tower. / multi_modal_projector.)
  vision.patch_embed.w  [Ev, p*p*3]     embeddings.patch_embedding.weight [Ev, 3, p, p] (out, c, kh, kw)
                                        -> transposed to (out, kh, kw, c), flattened
  vision.patch_embed.b  [Ev]            embeddings.patch_embedding.bias
  vision.pos_embed      [P, Ev]         embeddings.position_embedding.weight
  vision.layers.{i}.ln1.scale/bias      encoder.layers.{i}.layer_norm1.weight/bias
  vision.layers.{i}.attn.{q,k,v}.w/b    encoder.layers.{i}.self_attn.{q,k,v}_proj.weight/bias
  vision.layers.{i}.attn.o.w/b          encoder.layers.{i}.self_attn.out_proj.weight/bias
  vision.layers.{i}.ln2.scale/bias      encoder.layers.{i}.layer_norm2.weight/bias
  vision.layers.{i}.mlp.fc1.w/b [Fv, Ev] encoder.layers.{i}.mlp.fc1.weight/bias
  vision.layers.{i}.mlp.fc2.w/b [Ev, Fv] encoder.layers.{i}.mlp.fc2.weight/bias
  vision.post_ln.scale/bias             post_layernorm.weight/bias
  mm.norm.scale         [Ev]            multi_modal_projector.mm_soft_emb_norm.weight
  mm.proj.w             [E, Ev]         multi_modal_projector.mm_input_projection_weight [Ev, E]
                                        (stored [in, out] by HF: transposed)

HF key layouts accepted by `hf_vision_to_params` (one optional prefix each):
  `vision_tower.vision_model.…`, `multi_modal_projector.…`          released checkpoints (4.50)
  `model.vision_tower.vision_model.…`, `model.multi_modal_projector.…` transformers 4.52+ state dicts
  `model.vision_tower.…` / `vision_tower.…` (no `vision_model.`)    transformers 5 state dicts / saves
SigLIP's attention-pooling head (`vision_tower.head.…`, present when `vision_use_head` is true, the
SiglipVisionConfig default) is never used by Gemma 3 and is skipped; Gemma 3's configs set it false.

Official Flax/Orbax checkpoints (MODEL_SPEC 6.1), `official_vision_to_params`. Names are '/'-joined
`path/leaf` strings, as models/loaders/official.py reads them (`{path: {leaf: array}}` dicts, nested
trees and tuple keys are joined the same way). <tower> = `SigLiPFromPatches_0/siglip_encoder/`,
or `vision_encoder/siglip_encoder/` in the nested layout; <block> = <tower>
`Transformer/encoderblock_{i}/`; <emb> = `transformer/embedder/`, or `embedder/` in the nested
layout; all optionally under `rlx_networks/policy_network/` (and/or `params/`). Other names (the
text model) are ignored.
  ours                                  official (shape; -> conversion)
  vision.patch_embed.w/b                <tower> embedding/kernel [p, p, 3, Ev] (HWIO)
                                        -> reshape [p*p*3, Ev].T; <tower> embedding/bias [Ev]
  vision.pos_embed                      <tower> pos_embedding [1, P, Ev] -> [P, Ev]
  vision.layers.{i}.ln1.scale/bias      <block> LayerNorm_0/scale, bias
  vision.layers.{i}.attn.{q,k,v}.w/b    <block> MultiHeadDotProductAttention_0/{query,key,value}/kernel
                                        [Ev, Hv, Dv] -> reshape [Ev, Ev].T; bias [Hv, Dv] -> [Ev]
  vision.layers.{i}.attn.o.w/b          <block> MultiHeadDotProductAttention_0/out/kernel
                                        [Hv, Dv, Ev] -> reshape [Ev, Ev].T; bias [Ev]
  vision.layers.{i}.ln2.scale/bias      <block> LayerNorm_1/scale, bias
  vision.layers.{i}.mlp.fc1.w/b         <block> MlpBlock_0/Dense_0/kernel [Ev, Fv] -> .T; bias [Fv]
  vision.layers.{i}.mlp.fc2.w/b         <block> MlpBlock_0/Dense_1/kernel [Fv, Ev] -> .T; bias [Ev]
  vision.post_ln.scale/bias             <tower> Transformer/encoder_norm/scale, bias
  mm.norm.scale                         <emb> mm_soft_embedding_norm/scale [Ev]
  mm.proj.w                             <emb> mm_input_projection/w [Ev, E] -> .T
Extra embedder leaves (`mm_input_embedding_extra`, `mm_output_embedding`) are ignored, as HF's
converter drops them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import VisionConfig
from models.fused import bidirectional_attention
from models.layers import Params, dense, gelu_tanh, rms_norm

F32 = jnp.float32
CHANNELS = 3


# ---- geometry and the parameter table ------------------------------------------------------------
def grid_size(vcfg: VisionConfig) -> int:
    """Patches per side of the image (64 for 896 / 14)."""
    return vcfg.image_size // vcfg.patch_size


def pool_size(vcfg: VisionConfig) -> int:
    """Side of the average-pooling window (4: 64 x 64 patches -> 16 x 16 tokens).

    HF derives it as patches_per_side // int(sqrt(mm_tokens_per_image)); we also require that it
    tiles the grid exactly and yields tokens_per_image tokens (true of every Gemma 3 config)."""
    g = grid_size(vcfg)
    side = math.isqrt(vcfg.tokens_per_image)
    if side * side != vcfg.tokens_per_image or side == 0 or g % side or vcfg.image_size % vcfg.patch_size:
        raise ValueError(
            f"unsupported vision geometry: image {vcfg.image_size}, patch {vcfg.patch_size} "
            f"({g}x{g} patches) cannot be average-pooled to {vcfg.tokens_per_image} tokens")
    return g // side


def vision_param_shapes(vcfg: VisionConfig, text_dim: int) -> dict[str, tuple[int, ...]]:
    """Every vision/projector parameter's name and shape, in a stable order."""
    ev, fv, p = vcfg.width, vcfg.mlp_dim, vcfg.patch_size
    shapes = {
        "vision.patch_embed.w": (ev, p * p * CHANNELS),
        "vision.patch_embed.b": (ev,),
        "vision.pos_embed": (vcfg.num_patches, ev),
    }
    for i in range(vcfg.depth):
        layer = {"ln1.scale": (ev,), "ln1.bias": (ev,), "ln2.scale": (ev,), "ln2.bias": (ev,)}
        for proj in ("q", "k", "v", "o"):
            layer.update({f"attn.{proj}.w": (ev, ev), f"attn.{proj}.b": (ev,)})
        layer.update({"mlp.fc1.w": (fv, ev), "mlp.fc1.b": (fv,), "mlp.fc2.w": (ev, fv), "mlp.fc2.b": (ev,)})
        shapes.update({f"vision.layers.{i}.{n}": s for n, s in layer.items()})
    shapes.update({
        "vision.post_ln.scale": (ev,), "vision.post_ln.bias": (ev,),
        "mm.norm.scale": (ev,), "mm.proj.w": (text_dim, ev),
    })
    return shapes


def init_vision_params(vcfg: VisionConfig, text_dim: int, seed: int = 0,
                       dtype=np.float32) -> dict[str, np.ndarray]:
    """Random parameters (tests, dry runs): matmul weights ~ N(0, 1/fan_in), position embeddings
    ~ N(0, 1/Ev), LayerNorm scales ~ 1 + N(0, 0.1), the RMSNorm scale and biases ~ N(0, 0.1 / 0.02)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in vision_param_shapes(vcfg, text_dim).items():
        if name == "mm.norm.scale":
            value = rng.normal(0.0, 0.1, size=shape)
        elif name.endswith(".scale"):
            value = 1.0 + rng.normal(0.0, 0.1, size=shape)
        elif name.endswith((".b", ".bias")):
            value = rng.normal(0.0, 0.02, size=shape)
        elif name == "vision.pos_embed":
            value = rng.normal(0.0, 1.0 / math.sqrt(shape[-1]), size=shape)
        else:
            value = rng.standard_normal(size=shape) / math.sqrt(shape[-1])
        params[name] = np.asarray(value, dtype=dtype)
    return params


def pad_for_blocks(params: dict, vcfg: VisionConfig, block: int) -> dict:
    """Zero-pad the tower's matmul contraction widths to multiples of `block`, for blockwise
    quantization (int4-b32/b128): the patch embedding's p*p*3 inputs (588 for Gemma 3) and the MLP's
    hidden width (4304). Exact: padded patch features are zero, and padded hidden units have a zero
    fc1 row and bias (gelu(0) = 0) and a zero fc2 column. Other params are returned as they are."""
    def up(n):
        return -(-n // block) * block

    out = dict(params)
    w = out["vision.patch_embed.w"]
    out["vision.patch_embed.w"] = np.pad(w, ((0, 0), (0, up(w.shape[1]) - w.shape[1])))
    for i in range(vcfg.depth):
        pre = f"vision.layers.{i}.mlp."
        extra = up(out[pre + "fc1.w"].shape[0]) - out[pre + "fc1.w"].shape[0]
        if extra:
            out[pre + "fc1.w"] = np.pad(out[pre + "fc1.w"], ((0, extra), (0, 0)))
            out[pre + "fc1.b"] = np.pad(out[pre + "fc1.b"], (0, extra))
            out[pre + "fc2.w"] = np.pad(out[pre + "fc2.w"], ((0, 0), (0, extra)))
    return out


# ---- the computation -----------------------------------------------------------------------------
def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis (biased variance, like torch), in f32."""
    x = x.astype(F32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(var + eps) * scale.astype(F32) + bias.astype(F32)


def patchify(images, patch: int):
    """[B, image_size, image_size, 3] -> [B, P, p*p*3] (p = patch): patches in row-major grid
    order, pixels in (kh, kw, c)."""
    b, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, gh, patch, gw, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, gh, gw, p, p, 3]
    return x.reshape(b, gh * gw, patch * patch * c)


def _attention(p: Params, x, num_heads: int):
    """Bidirectional multi-head self-attention. x [B, P, Ev] f32; q, k, v [B, P, Hv, Dv] (einsum
    letters: t the query patch, s the key patch, h the head, d its width)."""
    b, n, w = x.shape
    d = w // num_heads
    q, k, v = (dense(x, p[f"{t}.w"], p[f"{t}.b"]).reshape(b, n, num_heads, d) for t in "qkv")
    out = bidirectional_attention(q, k, v, scale=d ** -0.5).reshape(b, n, w)
    return dense(out, p["o.w"], p["o.b"])


def _encoder_layer(p: Params, x, vcfg: VisionConfig):
    eps = vcfg.layer_norm_eps
    h = layer_norm(x, p["ln1.scale"], p["ln1.bias"], eps)
    x = x + _attention(p.scope("attn."), h, vcfg.num_heads)
    h = layer_norm(x, p["ln2.scale"], p["ln2.bias"], eps)
    h = gelu_tanh(dense(h, p["mlp.fc1.w"], p["mlp.fc1.b"]))
    return x + dense(h, p["mlp.fc2.w"], p["mlp.fc2.b"])


def encode_patches(params: dict, vcfg: VisionConfig, images) -> jax.Array:
    """The SigLIP encoder: images [B, image_size, image_size, 3] -> post-LayerNorm patch features
    [B, P, Ev] f32."""
    p = Params(params, "vision.")
    patches = patchify(images.astype(F32), vcfg.patch_size)
    extra = p["patch_embed.w"].shape[1] - patches.shape[-1]
    if extra:  # a weight padded by `pad_for_blocks`: zero features
        patches = jnp.concatenate([patches, jnp.zeros((*patches.shape[:-1], extra), F32)], axis=-1)
    x = dense(patches, p["patch_embed.w"], p["patch_embed.b"])
    x = x + p["pos_embed"].astype(F32)[None]
    for i in range(vcfg.depth):
        x = _encoder_layer(p.scope(f"layers.{i}."), x, vcfg)
    return layer_norm(x, p["post_ln.scale"], p["post_ln.bias"], vcfg.layer_norm_eps)


def project(params: dict, vcfg: VisionConfig, features) -> jax.Array:
    """The multimodal projector: [B, P, Ev] -> soft tokens [B, I, E] f32.
    Order as in HF `Gemma3MultiModalProjector`: average pool, RMSNorm, matmul."""
    b, _, ev = features.shape
    g, k = grid_size(vcfg), pool_size(vcfg)
    side = g // k  # soft tokens per side: I = side * side
    pooled = features.reshape(b, side, k, side, k, ev).mean(axis=(2, 4)).reshape(b, side * side, ev)
    normed = rms_norm(pooled, params["mm.norm.scale"], vcfg.layer_norm_eps)
    return dense(normed, params["mm.proj.w"])


def encode_images(params: dict, vcfg: VisionConfig, text_dim: int, images: jax.Array) -> jax.Array:
    """Preprocessed images f32 [B, image_size, image_size, 3] (channels last, in [-1, 1]) -> soft
    tokens [B, I, E] f32 (E = text_dim). Jit with vcfg and text_dim static."""
    s = vcfg.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (s, s, CHANNELS):
        raise ValueError(f"images must be [B, {s}, {s}, {CHANNELS}] (channels last), got {images.shape}")
    if params["mm.proj.w"].shape != (text_dim, vcfg.width):
        raise ValueError(f"mm.proj.w has shape {params['mm.proj.w'].shape}, expected "
                         f"{(text_dim, vcfg.width)} for text_dim {text_dim}")
    return project(params, vcfg, encode_patches(params, vcfg, images))


# ---- Hugging Face checkpoints --------------------------------------------------------------------
def hf_vision_names(vcfg: VisionConfig) -> dict[str, str]:
    """{canonical HF name: our name}. Canonical HF names are `vision_tower.<SigLIP name without
    vision_model.>` and `multi_modal_projector.<name>`; see `_canonical` for the accepted layouts."""
    tower = {
        "embeddings.patch_embedding.weight": "vision.patch_embed.w",
        "embeddings.patch_embedding.bias": "vision.patch_embed.b",
        "embeddings.position_embedding.weight": "vision.pos_embed",
        "post_layernorm.weight": "vision.post_ln.scale",
        "post_layernorm.bias": "vision.post_ln.bias",
    }
    per_layer = {"layer_norm1": "ln1", "layer_norm2": "ln2"}
    projs = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
             "self_attn.out_proj": "attn.o", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(vcfg.depth):
        hf, ours = f"encoder.layers.{i}.", f"vision.layers.{i}."
        for a, b in per_layer.items():
            tower.update({f"{hf}{a}.weight": f"{ours}{b}.scale", f"{hf}{a}.bias": f"{ours}{b}.bias"})
        for a, b in projs.items():
            tower.update({f"{hf}{a}.weight": f"{ours}{b}.w", f"{hf}{a}.bias": f"{ours}{b}.b"})
    names = {f"vision_tower.{k}": v for k, v in tower.items()}
    names["multi_modal_projector.mm_soft_emb_norm.weight"] = "mm.norm.scale"
    names["multi_modal_projector.mm_input_projection_weight"] = "mm.proj.w"
    return names


def _canonical(key: str) -> tuple[str, str, str] | None:
    """Split an HF key into (outer prefix, tower prefix, canonical name); None for non-vision keys.
    `model.vision_tower.vision_model.x` -> ("model.", "vision_model.", "vision_tower.x")."""
    outer = "model." if key.startswith("model.") else ""
    rest = key[len(outer):]
    if rest.startswith("multi_modal_projector."):
        return outer, "", rest
    if not rest.startswith("vision_tower."):
        return None
    rest = rest[len("vision_tower."):]
    inner = "vision_model." if rest.startswith("vision_model.") else ""
    return outer, inner, "vision_tower." + rest[len(inner):]


def _skipped(canonical: str) -> bool:
    # SigLIP's unused attention-pooling head, and the non-persistent position_ids buffer
    return canonical.startswith("vision_tower.head.") or canonical.endswith(".position_ids")


def _hf_shape(our_name: str, shape: tuple[int, ...], vcfg: VisionConfig) -> tuple[int, ...]:
    """The HF shape of the tensor that becomes `our_name` of `shape`."""
    if our_name == "vision.patch_embed.w":
        return (shape[0], CHANNELS, vcfg.patch_size, vcfg.patch_size)
    return shape[::-1] if our_name == "mm.proj.w" else shape


def _convert(our_name: str, value: np.ndarray) -> np.ndarray:
    if our_name == "vision.patch_embed.w":  # [Ev, 3, kh, kw] -> [Ev, kh*kw*3], matching `patchify`
        return value.transpose(0, 2, 3, 1).reshape(value.shape[0], -1)
    if our_name == "mm.proj.w":  # HF [Ev, E] (in, out) -> ours [E, Ev] (out, in)
        return value.T
    return value


def _claim(found: dict, names, canonical: str, key: str):
    """Record that the caller's `key` holds the tensor named `canonical` (each exactly once)."""
    if canonical not in names:
        raise ValueError(f"unexpected vision tensor '{key}' (is the vision config right?)")
    if canonical in found:
        raise ValueError(f"vision tensor given twice: '{found[canonical]}' and '{key}'")
    found[canonical] = key


def hf_vision_to_params(state: dict, vcfg: VisionConfig, text_dim: int,
                        dtype=np.float32) -> dict[str, np.ndarray]:
    """Vision + projector tensors of an HF Gemma 3 state dict {name: array} -> our flat params.

    Keys outside the vision tower and projector (the language model, lm_head) are ignored. Raises
    ValueError (one line) on a missing, unexpected, duplicated (two layouts at once) or mis-shaped
    vision tensor."""
    names = hf_vision_names(vcfg)
    shapes = vision_param_shapes(vcfg, text_dim)
    found: dict[str, str] = {}  # canonical -> the caller's key
    outer, inner = "", "vision_model."  # how to spell a missing key: the caller's layout, once seen
    for key in state:
        split = _canonical(key)
        if split is None:
            continue
        outer, key_inner, canonical = split
        if _skipped(canonical):
            continue
        if canonical.startswith("vision_tower."):
            inner = key_inner
        _claim(found, names, canonical, key)

    params = {}
    for canonical, ours in names.items():
        if canonical not in found:
            spelled = (outer + canonical if canonical.startswith("multi_modal_projector.")
                       else f"{outer}vision_tower.{inner}{canonical[len('vision_tower.'):]}")
            raise ValueError(f"missing vision tensor '{spelled}'")
        key = found[canonical]
        value = np.asarray(state[key])
        want = _hf_shape(ours, shapes[ours], vcfg)
        if tuple(value.shape) != want:
            raise ValueError(f"vision tensor '{key}' has shape {tuple(value.shape)}, expected {want}")
        params[ours] = np.ascontiguousarray(_convert(ours, value), dtype=dtype)
    return params


# ---- official (google-deepmind/gemma Flax/Orbax) checkpoints -------------------------------------
_OFFICIAL_OUTER = ("params/", "rlx_networks/policy_network/")
_OFFICIAL_TOWERS = ("SigLiPFromPatches_0/siglip_encoder/", "vision_encoder/siglip_encoder/")
_OFFICIAL_EMBEDDERS = ("transformer/embedder/", "embedder/")
_OFFICIAL_MM = ("mm_soft_embedding_norm/", "mm_input_projection/")


def official_vision_names(vcfg: VisionConfig, text_dim: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{canonical official name: (our name, official shape)}. Canonical names are the flat layout's
    `path/leaf` with `SigLiPFromPatches_0/siglip_encoder/` shortened to `siglip_encoder/` and
    `transformer/embedder/` to `embedder/`; see `_official_canonical` for the accepted layouts."""
    ev, fv, p, hv = vcfg.width, vcfg.mlp_dim, vcfg.patch_size, vcfg.num_heads
    dv = ev // hv
    names = {
        "siglip_encoder/embedding/kernel": ("vision.patch_embed.w", (p, p, CHANNELS, ev)),
        "siglip_encoder/embedding/bias": ("vision.patch_embed.b", (ev,)),
        "siglip_encoder/pos_embedding": ("vision.pos_embed", (1, vcfg.num_patches, ev)),
    }
    for i in range(vcfg.depth):
        blk, ours = f"siglip_encoder/Transformer/encoderblock_{i}/", f"vision.layers.{i}."
        for ln, our_ln in (("LayerNorm_0", "ln1"), ("LayerNorm_1", "ln2")):
            names[f"{blk}{ln}/scale"] = (f"{ours}{our_ln}.scale", (ev,))
            names[f"{blk}{ln}/bias"] = (f"{ours}{our_ln}.bias", (ev,))
        for proj, our_proj in (("query", "q"), ("key", "k"), ("value", "v")):
            names[f"{blk}MultiHeadDotProductAttention_0/{proj}/kernel"] = (f"{ours}attn.{our_proj}.w", (ev, hv, dv))
            names[f"{blk}MultiHeadDotProductAttention_0/{proj}/bias"] = (f"{ours}attn.{our_proj}.b", (hv, dv))
        names[f"{blk}MultiHeadDotProductAttention_0/out/kernel"] = (f"{ours}attn.o.w", (hv, dv, ev))
        names[f"{blk}MultiHeadDotProductAttention_0/out/bias"] = (f"{ours}attn.o.b", (ev,))
        names[f"{blk}MlpBlock_0/Dense_0/kernel"] = (f"{ours}mlp.fc1.w", (ev, fv))
        names[f"{blk}MlpBlock_0/Dense_0/bias"] = (f"{ours}mlp.fc1.b", (fv,))
        names[f"{blk}MlpBlock_0/Dense_1/kernel"] = (f"{ours}mlp.fc2.w", (fv, ev))
        names[f"{blk}MlpBlock_0/Dense_1/bias"] = (f"{ours}mlp.fc2.b", (ev,))
    names.update({
        "siglip_encoder/Transformer/encoder_norm/scale": ("vision.post_ln.scale", (ev,)),
        "siglip_encoder/Transformer/encoder_norm/bias": ("vision.post_ln.bias", (ev,)),
        "embedder/mm_soft_embedding_norm/scale": ("mm.norm.scale", (ev,)),
        "embedder/mm_input_projection/w": ("mm.proj.w", (ev, text_dim)),
    })
    return names


def _flatten_official(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """{path: {leaf: array}} / fully nested dicts / tuple keys -> {'path/leaf': array}."""
    flat = {}
    for key, value in tree.items():
        key = "/".join(map(str, key)) if isinstance(key, tuple) else str(key)
        if isinstance(value, dict):
            flat.update(_flatten_official(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat


def is_vision_name(key: str, official: bool) -> bool:
    """Whether a checkpoint tensor name belongs to the vision tower or projector (an official
    '/'-joined name, or a Hugging Face key)."""
    return (_official_canonical(key) if official else _canonical(key)) is not None


def _official_canonical(key: str) -> tuple[str, str, str] | None:
    """Split an official name into (outer prefix, layout prefix, canonical name); None for names
    outside the vision tower and projector. `rlx_networks/policy_network/vision_encoder/siglip_encoder/x`
    -> ("rlx_networks/policy_network/", "vision_encoder/", "siglip_encoder/x")."""
    outer = ""
    for w in _OFFICIAL_OUTER:
        if key[len(outer):].startswith(w):
            outer += w
    rest = key[len(outer):]
    for tower in _OFFICIAL_TOWERS:
        if rest.startswith(tower):
            layout = tower[:-len("siglip_encoder/")]
            return outer, layout, rest[len(layout):]
    for emb in _OFFICIAL_EMBEDDERS:
        if rest.startswith(emb) and rest[len(emb):].startswith(_OFFICIAL_MM):
            layout = emb[:-len("embedder/")]
            return outer, layout, rest[len(layout):]
    return None  # the text model, and extra embedder leaves (mm_input_embedding_extra, ...)


def _official_convert(our_name: str, value: np.ndarray, vcfg: VisionConfig) -> np.ndarray:
    ev = vcfg.width
    if our_name == "vision.patch_embed.w":  # HWIO [kh, kw, c, Ev] -> [Ev, kh*kw*c], matching `patchify`
        return value.reshape(-1, ev).T
    if our_name == "vision.pos_embed":  # [1, P, Ev] -> [P, Ev]
        return value.reshape(-1, ev)
    if our_name.endswith(("attn.q.w", "attn.k.w", "attn.v.w")):  # [Ev, Hv, Dv] -> [Hv*Dv, Ev]
        return value.reshape(ev, -1).T
    if our_name.endswith("attn.o.w"):  # [Hv, Dv, Ev] -> [Ev, Hv*Dv]
        return value.reshape(-1, ev).T
    if our_name.endswith(".b"):  # q/k/v biases [Hv, Dv] -> [Hv*Dv]; others unchanged
        return value.reshape(-1)
    if our_name.endswith((".fc1.w", ".fc2.w")) or our_name == "mm.proj.w":  # [in, out] -> [out, in]
        return value.T
    return value


def official_vision_to_params(flat: dict, vcfg: VisionConfig, text_dim: int,
                              dtype=np.float32) -> dict[str, np.ndarray]:
    """Vision + projector tensors of an official Gemma 3 checkpoint -> our flat params.

    `flat` is keyed like models/loaders/official.py's names: '/'-joined `path/leaf` strings
    (`SigLiPFromPatches_0/siglip_encoder/embedding/kernel`); dict values ({path: {leaf: array}}, as
    Orbax stores the flat layout, or a fully nested tree) and tuple keys are joined the same way.
    Text-model names are ignored. Raises ValueError (one line) on a missing, unexpected, duplicated
    (two layouts at once) or mis-shaped vision tensor."""
    names = official_vision_names(vcfg, text_dim)
    flat = _flatten_official(flat)
    found: dict[str, str] = {}  # canonical -> the caller's key
    outer, layouts = "", {"siglip_encoder/": "SigLiPFromPatches_0/", "embedder/": "transformer/"}
    for key in flat:
        split = _official_canonical(key)
        if split is None:
            continue
        outer, layout, canonical = split
        layouts["siglip_encoder/" if canonical.startswith("siglip_encoder/") else "embedder/"] = layout
        _claim(found, names, canonical, key)

    params = {}
    for canonical, (ours, want) in names.items():
        if canonical not in found:
            layout = layouts[canonical[:canonical.index("/") + 1]]
            raise ValueError(f"missing vision tensor '{outer}{layout}{canonical}'")
        key = found[canonical]
        value = np.asarray(flat[key])
        if tuple(value.shape) != want:
            raise ValueError(f"vision tensor '{key}' has shape {tuple(value.shape)}, expected {want}")
        params[ours] = np.ascontiguousarray(_official_convert(ours, value, vcfg), dtype=dtype)
    return params
