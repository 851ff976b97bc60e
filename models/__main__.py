"""`python -m models`: inspect the registry, check a model's cache paths, generate with the JAX
reference.

  python -m models list
  python -m models check --model gemma3-270m --random-init 0
  python -m models check --checkpoint ./gemma-3-1b-it
  python -m models generate --checkpoint ./gemma-3-1b-it --prompt "Why is the sky blue?"

Bad input exits 2 with one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_list(_args) -> int:
    from models import count_params, get_config, list_models

    rows = [["name", "family", "params", "layers", "window", "context", "chat"]]
    for name in list_models():
        c = get_config(name)
        n = count_params(c)
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
        rows.append([name, c.family.value, size, str(c.num_layers), str(c.sliding_window),
                     str(c.max_seq_len), "yes" if c.instruction_tuned else ""])
    print(_table(rows))
    return 0


def _load(args):
    """(config, params) from --checkpoint, or --model with --random-init."""
    from models import get_config, init_params, load_checkpoint

    t0 = time.perf_counter()
    if args.checkpoint:
        cfg, params = load_checkpoint(args.checkpoint, args.model)
        what = f"loaded {args.checkpoint}"
    else:
        if not args.model:
            raise ValueError("pass --model NAME (see `python -m models list`) or --checkpoint PATH")
        cfg = get_config(args.model)
        params = init_params(cfg, args.random_init)
        what = f"random init (seed {args.random_init})"
    n = sum(p.size for p in params.values())
    print(f"{cfg.name}: {what}, {n / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return cfg, params


def cmd_check(args) -> int:
    """Prefill in chunks + one-token decode must equal one full-sequence prefill."""
    import jax
    import jax.numpy as jnp

    from models import forward, init_cache

    cfg, params = _load(args)
    total = args.tokens or min(2 * cfg.sliding_window + 8, cfg.max_seq_len)
    chunk = max(1, min(args.chunk or cfg.sliding_window // 2 + 1, total))
    prefill = total - args.decode_steps
    if prefill < 1:
        raise ValueError(f"--tokens {total} must exceed --decode-steps {args.decode_steps}")
    step = jax.jit(forward, static_argnums=(1,))
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, total)).astype(np.int32)
    tokens[0, 0] = cfg.tokens.bos

    t0 = time.perf_counter()
    full, _ = step(params, cfg, jnp.asarray(tokens), 0, init_cache(cfg, 1, total), None)
    full = np.asarray(full)[0]
    cache, outs = init_cache(cfg, 1, total), []
    for s in range(0, prefill, chunk):
        n = min(chunk, prefill - s)
        block = np.zeros((1, chunk), np.int32)
        block[0, :n] = tokens[0, s:s + n]
        logits, cache = step(params, cfg, jnp.asarray(block), s, cache, n)
        outs.append(np.asarray(logits)[0, :n])
    for s in range(prefill, total):
        logits, cache = step(params, cfg, jnp.asarray(tokens[:, s:s + 1]), s, cache, None)
        outs.append(np.asarray(logits)[0])
    err = np.abs(np.concatenate(outs) - full).max(axis=-1)
    rel = float(err.max() / max(np.abs(full).max(), 1e-30))
    ok = rel <= args.tolerance
    print(f"cache check: {total} tokens (window {cfg.sliding_window}), prefill chunks of {chunk}, "
          f"{args.decode_steps} decode steps, {time.perf_counter() - t0:.1f} s")
    print(f"  max |chunked - full| = {err.max():.3e} (relative {rel:.3e}, tolerance "
          f"{args.tolerance:.0e}) at position {int(err.argmax())}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def cmd_generate(args) -> int:
    from models import Sampling, generate
    from contract.tokenizer import Tokenizer

    cfg, params = _load(args)
    tok_path = args.tokenizer or args.checkpoint
    if tok_path is None:
        raise ValueError("pass --tokenizer PATH (a SentencePiece .model) to generate text")
    tok = Tokenizer(tok_path)
    if cfg.instruction_tuned and not args.raw:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}], family=cfg.family)
    else:
        ids = tok.encode(args.prompt)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    max_len = args.max_len or min(cfg.max_seq_len, len(ids) + args.max_new_tokens)
    out = generate(params, cfg, [ids], args.max_new_tokens, sampling=sampling, max_len=max_len)
    print(tok.decode(out.tokens[0]))
    return 0


def main(argv=None) -> int:
    from contract.cli_help import HelpFormatter, prog

    parser = argparse.ArgumentParser(prog=prog("models"), description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="the registered models and their shapes", formatter_class=HelpFormatter)

    def model_args(p):
        p.add_argument("--model", help="registry name (see `list`); optional with --checkpoint")
        p.add_argument("--checkpoint", type=Path, help="HF safetensors or official Orbax folder")
        p.add_argument("--random-init", type=int, default=0, metavar="SEED",
                       help="random weights from SEED when no checkpoint is given")

    check = sub.add_parser("check", help="the JAX model's cache paths agree: chunked prefill + decode vs one full "
                                         "forward pass", formatter_class=HelpFormatter)
    model_args(check)
    check.add_argument("--tokens", type=int, help="sequence length (default 2*window + 8)")
    check.add_argument("--chunk", type=int, help="prefill chunk (default window/2 + 1: wraps the ring)")
    check.add_argument("--decode-steps", type=int, default=6, help="decode steps after the prefill")
    check.add_argument("--tolerance", type=float, default=1e-4, help="max relative error")

    gen = sub.add_parser("generate", help="generate text with the JAX reference model", formatter_class=HelpFormatter)
    model_args(gen)
    gen.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: the checkpoint's)")
    gen.add_argument("--prompt", required=True, help="the user's text")
    gen.add_argument("--raw", action="store_true", help="no chat template for -it models")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--max-len", type=int, help="context length (default prompt + new tokens)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    gen.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")

    args = parser.parse_args(argv)
    commands = {"list": cmd_list, "check": cmd_check, "generate": cmd_generate}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # our errors: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
