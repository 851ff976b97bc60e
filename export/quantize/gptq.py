"""GPTQ for the int4 recipes (`--int4-method gptq`): each matmul's codes rounded so that the layer's
*output* on calibration text changes least, instead of each weight on its own (the default
per-block error search, export/quantize/blocks.py). Same layouts, kernels and decode speed; only
the codes and scales differ. docs/quantization.md#gptq has the measurements and the cost.

How it runs (bounded memory: one layer's f32 weights at a time, never the model):

  text     export/quantize/calibration.txt (English prose and Python code written for this
           project; not any benchmark's text) or --calibration-text, tokenized with the model's
           tokenizer into as few equal windows of up to CALIBRATION_TOKENS tokens as hold it
           (at least CALIBRATION_SEQUENCES), each starting with BOS. A random-weight
           dry run without a tokenizer calibrates on seeded random ids (its numbers mean nothing;
           it measures time and memory).
  layers   one at a time: the layer's input (the previous layers already quantized, as the
           artifact computes them) runs through the layer with its f32 weights, and each matmul's
           input statistic H = sum over tokens of x x^T is collected in the same trace
           (models.layers.tap). Every matmul is then quantized by `algorithms.gptq`: columns in
           order, each column's rounding error spread over the columns not yet rounded, weighted
           by H; each block's scale (and zero point on ONNX) chosen by the default method's search
           from the error-updated weights. Matmuls that read the same input (q/k/v, gate/up) are
           quantized as one matrix (rows are independent given H: one factorization). The layer
           then runs again with its quantized weights to give the next layer's input.
  output   each weight's blocks go to a scratch folder as they are computed and are read back,
           memory-mapped, when the writer takes them: the codes of the whole model are never in
           memory.

The tied table, where the recipe holds it at int4, is GPTQ'd as the LM head (the statistic of the
final normed hidden state), symmetric, a slice of rows at a time; the lookup reads the same codes,
which GPTQ does not weigh (measured: the table alone at int4 costs perplexity ratio 1.083 with
GPTQ, 1.128 with the default search, on the real Gemma 3 270M). Not GPTQ'd: an int8 table
(int4-b32-e8: round to nearest costs ~nothing there), a checkpoint's carried int4 blocks (Q4_0,
Q4_K: exact, they feed the calibration as they are), the layers a mixed-precision GGUF keeps at
8 bits (`skip`: f32 in the calibration), the vision tower (the calibration is text), weights whose
width does not divide into the block.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.quantize.blocks import GPTQ_ASYMMETRIC_SEARCH, GPTQ_SYMMETRIC_SEARCH, BlockQuantized, PendingBlocks, quantizable
from export.quantize.sizes import TABLE

CALIBRATION = Path(__file__).with_name("calibration.txt")
CALIBRATION_SEQUENCES = 2
CALIBRATION_TOKENS = 1024
# Damping, a share of the mean diagonal of H added to it, by the codes' form (measured on the real
# Gemma 3 270M on two disjoint sets of text windows, docs/quantization.md#gptq---int4-method-gptq):
# with zero points (ONNX) 0.1 was lower on both perplexity and KL on each; symmetric (TFLite) 0.1
# and 0.3 were even, and 0.3 is kept.
DAMP = 0.3  # symmetric codes
DAMP_ZERO_POINTS = 0.1  # codes with zero points


def default_damp(asymmetric: bool) -> float:
    """The damping GPTQ uses unless --gptq-damp says otherwise."""
    return DAMP_ZERO_POINTS if asymmetric else DAMP


def calibration_ids(cfg, tokenizer=None, seed: int = 0, max_len: int | None = None,
                    text: Path | None = None) -> np.ndarray:
    """[S, T] token ids of the calibration text (`text`, default CALIBRATION), each window
    starting with BOS: T <= CALIBRATION_TOKENS and the model's context (the calibration runs in
    JAX, not in the artifact: the export's --max-seq-len does not bound it); S: as few equal
    windows as hold the whole text, at least CALIBRATION_SEQUENCES.
    Without a tokenizer: seeded random ids (dry runs)."""
    limit = min(CALIBRATION_TOKENS, max_len or cfg.max_seq_len)
    if tokenizer is None:
        rng = np.random.default_rng(seed)
        ids = rng.integers(3, min(cfg.vocab_size, 262144), (CALIBRATION_SEQUENCES, limit))
        ids[:, 0] = cfg.tokens.bos
        return ids.astype(np.int32)
    from contract.tokenizer import Tokenizer

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    path = Path(text or CALIBRATION)
    body = tok.encode(path.read_text(encoding="utf-8"), add_bos=False)
    # as few windows as hold the whole text (at least CALIBRATION_SEQUENCES), of equal length
    count = max(CALIBRATION_SEQUENCES, -(-len(body) // (limit - 1)))
    t = min(limit, len(body) // count + 1)
    if len(body) < CALIBRATION_SEQUENCES * 64:
        raise ValueError(f"the calibration text {path} is only {len(body)} tokens with this tokenizer; the "
                         f"calibration (GPTQ, or TFLite dynamic-int8's smoothing) needs at least "
                         f"{CALIBRATION_SEQUENCES * 64} (a few thousand are better): pass --calibration-text FILE")
    rows = [[tok.bos_id] + body[i * (t - 1):(i + 1) * (t - 1)] for i in range(count)]
    return np.asarray(rows, np.int32)


def gptq_names(params: dict, block: int, carried: dict | None = None) -> list[str]:
    """The weights GPTQ quantizes: every layer matmul weight whose width divides into `block` and
    that the checkpoint does not carry already."""
    carried = carried or {}
    return [n for n, v in params.items()
            if n.startswith("layers.") and n != TABLE and quantizable(n, v) and np.shape(v)[1] % block == 0
            and n not in carried]


def _embed(params: dict, cfg, ids: np.ndarray):
    """The calibration tokens' embeddings [S, T, E] f32, reading only their rows of the table."""
    import jax.numpy as jnp

    from models.lazy import is_lazy
    from models.model import HEAD_ROTATION, embed_tokens

    table = params[TABLE]
    uniq, inverse = np.unique(ids, return_inverse=True)
    if is_lazy(table) and table.reads_rows:
        rows = np.stack([np.asarray(table.read_rows(int(u), int(u) + 1), np.float32)[0] for u in uniq])
    else:
        rows = np.asarray(table, np.float32)[uniq]
    p = {TABLE: jnp.asarray(rows)}
    if HEAD_ROTATION in params:  # a rotated table's rows, rotated back by the lookup (export/quantize/rotate.py)
        p[HEAD_ROTATION] = jnp.asarray(np.asarray(params[HEAD_ROTATION], np.float32))
    return embed_tokens(p, cfg, jnp.asarray(inverse.reshape(ids.shape), jnp.int32))


class _LayerRunner:
    """One layer's forward at the calibration shape, traced once per layer kind (the layer's
    weights renamed to the first layer of its kind), returning the layer's output and, for each
    distinct matmul input, a statistic under the name of the first weight that reads it:
    `stat` "hessian", H = x^T x (f32, GPTQ); "absmax", max |x_j| over the tokens followed by
    SAMPLE_ROWS of the tokens' inputs, evenly spaced (f32 [1 + SAMPLE_ROWS, K],
    export/quantize/smooth.py)."""

    SAMPLE_ROWS = 64

    @classmethod
    def sample_rows(cls, n: int) -> np.ndarray:
        """The indices of the SAMPLE_ROWS (or all n) evenly spaced rows "absmax" keeps of n."""
        return np.linspace(0, n - 1, min(cls.SAMPLE_ROWS, n)).astype(np.int32)

    def __init__(self, cfg, batch: int, length: int, stat: str = "hessian"):
        import jax
        import jax.numpy as jnp

        from models.cache import init_cache

        if stat not in ("hessian", "absmax"):
            raise ValueError(f"internal error: unknown calibration statistic {stat!r}")
        self.cfg = cfg
        self.stat = stat
        self.first = {}
        for i, kind in enumerate(cfg.layer_kinds):
            self.first.setdefault(kind, i)
        self.cache = init_cache(cfg, batch, length)
        self.positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (batch, length))
        self.start = jnp.zeros(batch, jnp.int32)
        self.valid = jnp.full(batch, length, jnp.int32)
        self.readers: dict[int, dict[str, list[str]]] = {}  # rep layer -> first reader -> all readers
        self._fn = jax.jit(self._run, static_argnums=(0, 1))

    def _run(self, rep: int, stats: bool, weights: dict, x):
        import jax.numpy as jnp

        from models.layers import tap
        from models.model import apply_layer

        names = {id(v): k for k, v in weights.items()}
        inputs: dict[int, tuple[object, list[str]]] = {}

        def record(w, xin):
            name = names.get(id(w))
            if name is not None:
                inputs.setdefault(id(xin), (xin, []))[1].append(name)

        with tap(record if stats else (lambda w, xin: None)):
            y, _ = apply_layer(weights, self.cfg, rep, x, self.positions, self.start, self.valid, self.cache[rep])
        if not stats:
            return y, {}
        self.readers[rep] = {readers[0]: readers for _, readers in inputs.values()}
        hs = {}
        for xin, readers in inputs.values():
            flat = xin.reshape(-1, xin.shape[-1]).astype(jnp.float32)
            if self.stat == "absmax":
                rows = self.sample_rows(flat.shape[0])
                hs[readers[0]] = jnp.concatenate([jnp.abs(flat).max(0)[None], flat[rows]], 0)
            else:
                hs[readers[0]] = jnp.einsum("ti,tj->ij", flat, flat, preferred_element_type=jnp.float32)
        return y, hs

    def __call__(self, i: int, weights: dict, x, stats: bool):
        """Layer i on x; weights keyed "layers.{i}.NAME". Returns (y, {first reader: H}, {first
        reader: [readers]}) with names in layer i's keys."""
        rep = self.first[self.cfg.layer_kinds[i]]
        src, dst = f"layers.{i}.", f"layers.{rep}."
        renamed = {dst + k[len(src):]: v for k, v in weights.items()}
        y, hs = self._fn(rep, stats, renamed, x)
        if not stats:
            return y, {}, {}
        back = lambda n: src + n[len(dst):]  # noqa: E731
        readers = {back(k): [back(n) for n in v] for k, v in self.readers[rep].items()}
        return y, {back(k): np.asarray(v) for k, v in hs.items()}, readers


def _to_blocks(out, bits: int, asymmetric: bool) -> BlockQuantized:
    if asymmetric:
        codes, scales, zeros = out
        offset = 2 ** (bits - 1)
        return BlockQuantized((codes.astype(np.int16) - offset).astype(np.int8), scales.astype(np.float16), bits,
                              "gptq asymmetric", (zeros.astype(np.int16) - offset).astype(np.int8))
    codes, scales = out
    return BlockQuantized(codes.astype(np.int8), scales.astype(np.float16), bits, "gptq")


def quantize_group(weights: list[np.ndarray], hessian: np.ndarray, bits: int, block: int,
                   asymmetric: bool, damp: float | None = None) -> list[BlockQuantized]:
    """GPTQ of matmuls that read one input (H its statistic), as one matrix, split back per weight."""
    from export.quantize.algorithms import gptq, mse_search

    w = np.concatenate([np.asarray(x, np.float32) for x in weights]) if len(weights) > 1 else \
        np.asarray(weights[0], np.float32)
    kw = GPTQ_ASYMMETRIC_SEARCH if asymmetric else GPTQ_SYMMETRIC_SEARCH
    damp = default_damp(asymmetric) if damp is None else damp
    whole = _to_blocks(gptq(w, hessian, bits, block, damp=damp, scale_fn=mse_search, **kw), bits, asymmetric)
    out, r = [], 0
    for x in weights:
        n = np.shape(x)[0]
        zeros = None if whole.zeros is None else whole.zeros[r:r + n]
        out.append(BlockQuantized(whole.codes[r:r + n], whole.scales[r:r + n], bits, whole.origin, zeros))
        r += n
    return out


def _spill(b: BlockQuantized, folder: Path, name: str) -> PendingBlocks:
    """b saved to folder; a PendingBlocks that reads it back memory-mapped."""
    stem = folder / name.replace("/", "_")
    np.save(f"{stem}.codes.npy", b.codes)
    np.save(f"{stem}.scales.npy", b.scales)
    if b.zeros is not None:
        np.save(f"{stem}.zeros.npy", b.zeros)
    return _spilled(stem, b.shape, b.bits, b.block, b.zeros is not None, b.origin)


def _spilled(stem: Path, shape, bits: int, block: int, asym: bool, origin: str) -> PendingBlocks:
    def load():
        zeros = np.load(f"{stem}.zeros.npy", mmap_mode="r") if asym else None
        return BlockQuantized(np.load(f"{stem}.codes.npy", mmap_mode="r"), np.load(f"{stem}.scales.npy", mmap_mode="r"),
                              bits, origin, zeros)

    return PendingBlocks(tuple(shape), bits, block, load, origin)


def _table_blocks(value, hessian: np.ndarray, bits: int, block: int, folder: Path,
                  damp: float | None = None) -> PendingBlocks:
    """GPTQ of the tied table as the LM head (H: the final normed hidden state's statistic),
    symmetric (the lookup reads it too), a slice of rows at a time (rows are independent given
    H), written straight into memory-mapped files: the f32 table is never whole."""
    from models.lazy import row_chunks

    n, k = value.shape
    stem = folder / TABLE
    codes = np.lib.format.open_memmap(f"{stem}.codes.npy", "w+", np.int8, (n, k))
    scales = np.lib.format.open_memmap(f"{stem}.scales.npy", "w+", np.float16, (n, k // block))
    for r, rows in row_chunks(value, 64 << 20):
        b = quantize_group([rows], hessian, bits, block, asymmetric=False, damp=damp)[0]
        codes[r:r + len(rows)] = b.codes
        scales[r:r + len(rows)] = b.scales
    codes.flush()
    scales.flush()
    del codes, scales
    return _spilled(stem, (n, k), bits, block, False, "gptq")


def gptq_blocks(params: dict, cfg, bits: int, block: int, *, asymmetric: bool, scratch: Path, tokenizer=None,
                seed: int = 0, carried: dict | None = None, max_len: int | None = None, text: Path | None = None,
                table: bool = False, progress=None, skip=(), damp: float | None = None) -> dict[str, PendingBlocks]:
    """GPTQ blocks of every weight `gptq_names` lists (see the module doc), spilled to `scratch`;
    with `table`, also the tied table (as the LM head, from the last layer's output: recipes
    whose table is int4). params: the export's stored weights (arrays or models.lazy.LazyTensor);
    carried: name -> BlockQuantized / PendingBlocks the checkpoint holds (used as they are in
    the calibration). skip: names written another way (a mixed-precision source's layers kept at
    8 bits: f32 in the calibration). damp: default_damp(asymmetric) unless given (--gptq-damp), the
    table's too. progress(i, n, label) after each layer."""
    import jax.numpy as jnp

    from export.quantize.blocks import resolved

    carried = carried or {}
    # one damping for the export, the table included (symmetric in both targets): the layers' form's
    damp = default_damp(asymmetric) if damp is None else damp
    todo = set(gptq_names(params, block, carried)) - set(skip)
    ids = calibration_ids(cfg, tokenizer, seed, max_len, text)
    x = _embed(params, cfg, ids)
    runner = _LayerRunner(cfg, *ids.shape)
    out: dict[str, PendingBlocks] = {}
    n_layers = len(cfg.layer_kinds)
    for i in range(n_layers):
        prefix = f"layers.{i}."
        weights = {}
        for k, v in params.items():
            if k.startswith(prefix):
                weights[k] = resolved(carried[k]).dequantize() if k in carried else np.asarray(v, np.float32)
        y_f32, hs, readers = runner(i, {k: jnp.asarray(v) for k, v in weights.items()}, x, stats=True)
        del y_f32
        for first, names in readers.items():
            names = [n for n in names if n in todo]
            if not names:
                continue
            group = quantize_group([weights[n] for n in names], hs[first], bits, block, asymmetric, damp)
            for n, b in zip(names, group):
                out[n] = _spill(b, scratch, n)
                weights[n] = b.dequantize()
        del hs
        x, _, _ = runner(i, {k: jnp.asarray(v) for k, v in weights.items()}, x, stats=False)
        if progress is not None:
            progress(i + 1, n_layers + table, f"gptq layer {i + 1}/{n_layers}")
    if table and TABLE not in carried and np.shape(params[TABLE])[1] % block == 0:
        from models.layers import rms_norm, rotate_blocks
        from models.model import HEAD_ROTATION

        h = rms_norm(x, jnp.asarray(np.asarray(params["final_norm"], np.float32)), cfg.norm_eps)
        if HEAD_ROTATION in params:  # the LM head's input as the graph has it (export/quantize/rotate.py)
            h = rotate_blocks(h, jnp.asarray(np.asarray(params[HEAD_ROTATION], np.float32)))
        h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
        out[TABLE] = _table_blocks(params[TABLE], h.T @ h, bits, block, scratch, damp)
        if progress is not None:
            progress(n_layers + 1, n_layers + 1, "gptq table")
    missing = todo - set(out)
    if missing:
        raise RuntimeError(f"internal error: no calibration input reached {sorted(missing)[:3]}")
    return out
