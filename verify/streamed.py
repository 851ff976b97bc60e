"""The parity gate in bounded memory: the artifact first, then the JAX reference layer by layer.

The in-memory gate (verify/parity.py) steps the JAX model and the artifact in lock step, so it
holds the f32 model and the artifact's runtime at once (about 1.5x the f32 weights plus the
runtime's resident size). This one never holds more than one of them, and of the JAX model one
layer at a time:

  1. the artifact runs every prompt with its own chunking, then `steps` greedy decode steps fed
     its own argmax (then, exported with --speculative, one verify_{K} call whose rows extend the
     stream); the logits of every prefill call, decode step and verify row are kept, with the
     token stream they came from. The artifact's session is then released.
  2. `streamed_logits` scores all streams teacher-forced through the JAX model: embed, then for
     each layer in turn its weights are read from the checkpoint (models/lazy.py), every
     stream's activations go through it, and the weights are dropped; the final norm and the tied
     head run at the kept positions only, a slice of the vocabulary at a time. Memory: the larger
     of one f32 layer and the f32 embedding table (read twice: for the rows the streams use, and
     for the head), or the artifact's runtime, plus the activations [T, E] per stream.
  3. the same comparison (compare_logits) as the in-memory gate, step by step.

The checks are the in-memory gate's, on streams the artifact chose: until the first decode step
whose argmax differs, both gates feed the same tokens; after it, this gate follows the artifact
(the in-memory one follows the reference), which the greedy-match count does not see and the
per-step errors see only as a different continuation. A full-sequence forward at position 0
gives the logits a chunked prefill and decode give (causal attention, the same window), to f32
rounding: tests/test_streamed_gate.py holds it to 1e-5 against the in-memory reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from models.config import ModelConfig
from models.lazy import load
from verify.parity import ParityReport, StepReport, compare_logits, verify_tokens

HEAD_ROWS = 32768  # vocabulary rows of the tied head copied to JAX at a time


@dataclasses.dataclass
class Recorded:
    """One prompt's run through the artifact: the token stream, and per checked call its name,
    chunk index, the position of its last token, and its logits."""

    ids: list[int]
    steps: list[tuple[str, int, int]]  # (signature, step, position)
    logits: list[np.ndarray]
    embeddings: np.ndarray | None = None  # the artifact's image embeddings [T, E] (prompts with images)
    images: Sequence | None = None
    greedy: list[int] = dataclasses.field(default_factory=list)  # the decoded tokens


def run_artifact(session, prompts: Sequence[Sequence[int]], steps: int,
                 images: Sequence[Sequence] | None = None, progress: Callable | None = None) -> list[Recorded]:
    """Each prompt through the artifact, then `steps` greedy tokens (its own argmax)."""
    out = []
    for pi, prompt in enumerate(prompts):
        session.reset()
        emb = None
        imgs = images[pi] if images is not None else None
        if imgs:
            prompt, emb = session.image_inputs(prompt, imgs)
        plan = session.chunks(len(prompt)) if emb is None else session.image_chunks(prompt)
        ids, rec, done = list(prompt), [], 0
        logits = []
        for ci, (name, take) in enumerate(plan):
            chunk = ids[done:done + take]
            art = session.prefill(chunk) if emb is None else session.prefill(chunk, emb[done:done + take])
            done += take
            rec.append((name, ci, done - 1))
            logits.append(np.asarray(art, np.float32))
        greedy = []
        for d in range(steps):
            token = int(art.argmax())
            greedy.append(token)
            ids.append(token)
            art = session.decode(token)
            rec.append(("decode", d, session.position - 1))
            logits.append(np.asarray(art, np.float32))
        tokens = verify_tokens(session, prompt) if emb is None else []
        if tokens:  # speculative decoding's verify_{K}: its rows are the stream's next positions
            for i, row in enumerate(session.verify(tokens)):
                ids.append(tokens[i])
                rec.append((f"verify_{session.verify_lengths[-1]}", i, len(ids) - 1))
                logits.append(np.asarray(row, np.float32))
        out.append(Recorded(ids, rec, logits, emb, imgs, greedy))
        if progress:
            progress(pi + 1, len(prompts), "artifact")
    return out


def _layer(params: dict, i: int) -> dict:
    """Layer i's weights, read now (f32), under their names without the `layers.{i}.` prefix."""
    prefix = f"layers.{i}."
    return {k[len(prefix):]: np.asarray(load(v), np.float32) for k, v in params.items() if k.startswith(prefix)}


def _layer_cache(cfg: ModelConfig, i: int, max_len: int) -> dict:
    import jax.numpy as jnp

    from models.cache import state_layout

    return {s.kind.value: jnp.zeros((1, *s.shape[1:]), jnp.float32)
            for s in state_layout(cfg, max_len) if s.layer == i}


def streamed_logits(cfg: ModelConfig, params: dict, streams: Sequence[Sequence[int]],
                    positions: Sequence[Sequence[int]], embeddings: Sequence | None = None,
                    progress: Callable | None = None) -> list[np.ndarray]:
    """Teacher-forced logits [len(positions[j]), V] of each token stream j at the given positions,
    through the JAX model with f32 weights `params` (arrays or lazy tensors), one layer's weights
    in memory at a time. `embeddings[j]`: the image embeddings [T, E] of a stream with images."""
    import jax
    import jax.numpy as jnp

    from models.fused import AttentionForm
    from models.layers import Params
    from models.model import _LAYER_FNS, embed_tokens, unembed
    from models.multimodal import image_blocks

    embeddings = list(embeddings) if embeddings is not None else [None] * len(streams)
    layer_fn = _LAYER_FNS[cfg.family]
    n_layers = len(cfg.layer_kinds)
    # the table is the largest tensor: only the rows the streams use go to JAX (ids renumbered)
    table = np.asarray(load(params["embed"]), np.float32)
    xs, extras = [], []
    for ids, emb in zip(streams, embeddings):
        tokens = np.asarray([list(ids)], np.int32)
        extra = {}
        if emb is not None:
            is_soft = jnp.asarray(tokens == cfg.vision.soft_token)
            tokens = np.where(np.asarray(is_soft), 0, tokens)
        used, index = np.unique(tokens, return_inverse=True)
        x = embed_tokens({"embed": jnp.asarray(table[used])}, cfg, jnp.asarray(index.reshape(tokens.shape), jnp.int32))
        if emb is not None:
            x = jnp.where(is_soft[..., None], jnp.asarray(emb, jnp.float32)[None], x)
            extra["blocks"] = image_blocks(is_soft)
        xs.append(x)
        extras.append(extra)
    del table

    compiled = {}

    def run_layer(i, kind, p, x, extra):
        t = x.shape[1]
        key = (kind, t, "blocks" in extra)
        if key not in compiled:  # one compilation per layer kind and stream length, weights as arguments
            def fn(p, x, cache, blocks=None, kind=kind):
                positions = jnp.arange(t, dtype=jnp.int32)[None, :]
                start = jnp.zeros((1,), jnp.int32)
                nv = jnp.full((1,), t, jnp.int32)
                kw = {} if blocks is None else {"blocks": blocks}
                return layer_fn(Params(p), cfg, kind, x, positions, start, nv, cache,
                                attention=AttentionForm.SDPA, **kw)[0]

            compiled[key] = jax.jit(fn)
        return compiled[key](p, x, _layer_cache(cfg, i, t), extra.get("blocks"))

    for i, kind in enumerate(cfg.layer_kinds):
        p = jax.device_put(_layer(params, i))
        xs = [run_layer(i, kind, p, x, extra) for x, extra in zip(xs, extras)]
        del p
        if progress:
            progress(i + 1, n_layers, f"layer {i + 1}/{n_layers}")
    # the tied head a slice of the vocabulary at a time (each logit is computed as unembed does)
    table = np.asarray(load(params["embed"]), np.float32)
    norm = jnp.asarray(load(params["final_norm"]), jnp.float32)
    picked = [x[:, jnp.asarray(list(pos), jnp.int32)] for x, pos in zip(xs, positions)]
    out = [np.empty((len(pos), table.shape[0]), np.float32) for pos in positions]
    for r0 in range(0, table.shape[0], HEAD_ROWS):
        head = {"embed": jnp.asarray(table[r0:r0 + HEAD_ROWS]), "final_norm": norm}
        for o, x in zip(out, picked):
            o[:, r0:r0 + HEAD_ROWS] = np.asarray(unembed(head, cfg, x))[0]
    return out


def streamed_parity(cfg: ModelConfig, params: dict, recorded: Sequence[Recorded], decode_steps: int,
                    encode_image: Callable | None = None, vision_layout=None,
                    progress: Callable | None = None) -> ParityReport:
    """The parity report of the artifact's recorded runs against the layer-streamed reference.
    `encode_image(image) -> soft tokens [N, E]`: the JAX vision encoder (prompts with images),
    with the artifact's `vision_layout` (its metadata's image layout)."""
    from contract.prompt import image_inputs, soft_runs

    encoder, embeddings = [], []
    for pi, r in enumerate(recorded):
        if r.embeddings is None:
            embeddings.append(None)
            continue
        ids, ref_emb = image_inputs(vision_layout, r.ids[:len(r.ids) - len(r.greedy)], r.images, encode_image,
                                    r.embeddings.shape[-1])
        for k, (s, e) in enumerate(soft_runs(vision_layout, ids)):
            a, ref = r.embeddings[s:e], ref_emb[s:e]
            encoder.append({"prompt": pi, "image": k, "max_abs": float(np.abs(a - ref).max()),
                            "rel_rms": float(np.sqrt(np.mean((a - ref) ** 2) / max(np.mean(ref ** 2), 1e-30)))})
        full = np.zeros((len(r.ids), ref_emb.shape[-1]), np.float32)
        full[:len(ref_emb)] = ref_emb
        embeddings.append(full)
    ref_logits = streamed_logits(cfg, params, [r.ids for r in recorded],
                                 [[pos for _, _, pos in r.steps] for r in recorded], embeddings, progress)
    steps, greedy = [], []
    for pi, (r, ref) in enumerate(zip(recorded, ref_logits)):
        matched, want_prev = None, None
        for (name, step, pos), art, want in zip(r.steps, r.logits, ref):
            if name == "decode" and matched is None and int(np.argmax(want_prev)) != r.greedy[step]:
                matched = step
            steps.append(StepReport(pi, name, step, pos, *compare_logits(want, art)))
            want_prev = want
        greedy.append(decode_steps if matched is None else matched)
    return ParityReport(steps, greedy, decode_steps, encoder)


__all__ = ["Recorded", "run_artifact", "streamed_logits", "streamed_parity"]
