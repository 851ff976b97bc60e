"""`python -m runtime_py`: run an exported artifact.

  python -m runtime_py generate --artifact artifacts/gemma3-1b_f32_ctx4096.tflite \
      --tokenizer ./gemma-3-1b-it/tokenizer.model --prompt "Why is the sky blue?"
  python -m runtime_py generate --artifact artifacts/gemma-3-1b-it_f32_ctx4096_onnx --prompt "Hi"
  python -m runtime_py generate --artifact artifacts/gemma-3-1b-it_int4-b32_ctx4096.litertlm --prompt "Hi"
  python -m runtime_py generate --artifact artifacts/gemma-3-4b-it_f32_ctx4096.tflite \
      --tokenizer ./gemma-3-4b-it --image cat.jpg --prompt "<start_of_image> What is in this picture?"
  python -m runtime_py generate --artifact artifacts/gemma-3-1b-it_dynamic-int8_spec4_ctx4096.tflite \
      --draft artifacts/gemma-3-270m-it_int4-b32_spec4_ctx4096.tflite --prompt "Hi"   # speculative

Text is streamed as it is generated. Instruction-tuned artifacts get the chat template (unless
--raw). Bad input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def cmd_generate(args) -> int:
    from contract.sampling import Sampling
    from runtime_py import load
    from runtime_py.text import prompt_ids, stream_text, tokenizer_for

    session = load(args.artifact, args.threads)
    tok = tokenizer_for(session, args.artifact, args.tokenizer)
    draft = stats = None
    if args.draft is not None:
        from runtime_py.speculative import SpeculativeStats, check_pair

        draft = load(args.draft, args.threads)
        check_pair(session, draft, args.draft_tokens)
        stats = SpeculativeStats()
    elif args.draft_tokens is not None:
        raise ValueError("--draft-tokens needs --draft ARTIFACT")
    images = args.image or []
    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("pass the prompt as --prompt TEXT or --prompt-file PATH (one of them)")
    text = args.prompt if args.prompt is not None else _read_prompt(args.prompt_file)
    crops = None
    if args.pan_and_scan and images:
        from runtime_py.image import PanAndScan, with_crops

        n_pictures = len(images)
        images, crops = with_crops(images, PanAndScan())
    ids = prompt_ids(session, tok, text, n_pictures if crops else len(images), args.raw, crops=crops)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    t0 = time.perf_counter()
    out: list[int] = []
    bar = PrefillBar() if len(ids) > PrefillBar.MIN_TOKENS else None
    for piece in stream_text(session, tok, ids, args.max_new_tokens, images=images, sampling=sampling, counts=out,
                             progress=bar, draft=draft, draft_tokens=args.draft_tokens, stats=stats):
        if bar is not None:
            bar = bar.close()
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    seconds = time.perf_counter() - t0
    n_prompt = len(ids) + len(images) * (session.vision.image_length - 1 if images else 0)
    views = f"{len(images)} images" + (f", {sum(crops)} of them pan-and-scan crops" if crops and sum(crops) else "")
    print(f"[{n_prompt} prompt tokens{f' ({views})' if images else ''}, {len(out)} generated in "
          f"{seconds:.2f} s]", file=sys.stderr)
    if stats is not None:
        print(f"[{stats}]", file=sys.stderr)
    return 0


def _read_prompt(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read --prompt-file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--prompt-file {path} is not UTF-8 text") from None


class PrefillBar:
    """The prefill's progress on stderr for a long prompt: tokens done, rate, time left."""

    MIN_TOKENS = 256

    def __init__(self):
        self.t0 = time.perf_counter()
        self.shown = False

    def __call__(self, done: int, total: int):
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        width = 30
        fill = int(width * done / total)
        left = (total - done) / rate if rate > 0 else 0.0
        sys.stderr.write(f"\rprefill [{'#' * fill}{'.' * (width - fill)}] {done}/{total} tokens, {rate:.0f} tok/s, "
                         f"{left:.0f} s left ")
        sys.stderr.flush()
        self.shown = True

    def close(self):
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
        return None


def main(argv=None) -> int:
    from contract.cli_help import HelpFormatter, prog

    ap = argparse.ArgumentParser(prog=prog("runtime_py"), description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="generate text from an artifact (.tflite, .litertlm, ONNX folder)",
                         description="Generate text from an exported artifact, streamed as it comes.",
                         formatter_class=HelpFormatter)
    gen.add_argument("--artifact", type=Path, required=True,
                     help="a .tflite, a .litertlm bundle, or an ONNX folder written by python -m export")
    gen.add_argument("--tokenizer", type=Path,
                     help="tokenizer.model or its folder (default: the one a .litertlm bundle or an ONNX "
                          "artifact folder carries); checked against the artifact's vocabulary")
    gen.add_argument("--prompt", help="the user's text")
    gen.add_argument("--prompt-file", type=Path,
                     help="read the user's text from a UTF-8 file (long prompts: prefilled in chunks, with a "
                          "progress bar; one longer than the context is refused)")
    gen.add_argument("--image", type=Path, action="append",
                     help="an image file (repeatable; Gemma 3 with vision): each goes where the prompt says "
                          "<start_of_image>, or before the prompt when it has no marker")
    gen.add_argument("--pan-and-scan", action="store_true",
                     help="also show each wide or tall image as 2-4 crops (Hugging Face's do_pan_and_scan, with its "
                          "defaults): more detail, 260 more prompt tokens per crop")
    gen.add_argument("--raw", action="store_true",
                     help="no chat template (instruction-tuned artifacts get it otherwise)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    gen.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--threads", type=int, help="CPU threads (default: the runtime's choice)")
    gen.add_argument("--draft", type=Path,
                     help="speculative decoding: a smaller artifact of the same tokenizer (e.g. Gemma 3 270M for "
                          "Gemma 3) proposes tokens that the --artifact checks in one call; both exported with "
                          "--speculative K. Greedy output is the same as without it")
    gen.add_argument("--draft-tokens", type=int,
                     help="draft tokens per step (default: the K the target was exported with)")
    args = ap.parse_args(argv)
    try:
        return cmd_generate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
