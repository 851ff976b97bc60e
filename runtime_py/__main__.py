"""`python -m runtime_py`: run an exported artifact.

  python -m runtime_py generate --artifact artifacts/gemma3-1b_f32_ctx4096.tflite \
      --tokenizer ./gemma-3-1b-it/tokenizer.model --prompt "Why is the sky blue?"
  python -m runtime_py generate --artifact artifacts/gemma-3-1b-it_f32_ctx4096_onnx --prompt "Hi"
  python -m runtime_py generate --artifact artifacts/gemma-3-1b-it_int4-b32_ctx4096.litertlm --prompt "Hi"
  python -m runtime_py generate --artifact artifacts/gemma-3-4b-it_f32_ctx4096.tflite \
      --tokenizer ./gemma-3-4b-it --image cat.jpg --prompt "<start_of_image> What is in this picture?"
  python -m runtime_py generate --artifact artifacts/gemma-3-1b-it_dynamic-int8_spec4_ctx4096.tflite \
      --draft artifacts/gemma-3-270m-it_int4-b32_spec4_ctx4096.tflite --prompt "Hi"   # speculative

  python -m runtime_py chat --artifact artifacts/gemma-3-1b-it_int4-b32_ctx4096.litertlm   # multi-turn

Text is streamed as it is generated. Instruction-tuned artifacts get the chat template (unless
--raw). Bad input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def cmd_generate(args) -> int:
    from contract.sampling import Sampling
    from runtime_py import load
    from runtime_py.text import prompt_ids, stream_text, tokenizer_for

    if args.engine != "runtime_py":
        return cmd_generate_engine(args)
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


def cmd_generate_engine(args) -> int:
    """generate --engine litertlm|genai: the same prompt and images through LiteRT-LM or
    onnxruntime-genai (greedy; their own tokenizer, image processing and generation loop)."""
    from contract.tokenizer import Tokenizer
    from runtime_py.text import check_tokenizer, prompt_text

    path, engine = Path(args.artifact), args.engine
    if args.draft is not None or args.temperature or args.pan_and_scan:
        what = "--draft" if args.draft is not None else "--temperature" if args.temperature else "--pan-and-scan"
        raise ValueError(f"--engine {engine} runs greedy generation of the prompt and images as given; drop {what} "
                         "(or use the default --engine runtime_py)")
    if engine == "litertlm":
        if path.suffix != ".litertlm":
            raise ValueError(f"--engine litertlm runs .litertlm bundles; {path} is not one (python -m export "
                             "--target litertlm writes them)")
        from contract.bundle import read_bundle
        from contract.tflite import read_tflite

        meta, bundled = read_tflite(path)[1], read_bundle(path).tokenizer_bytes()
    else:
        if not (path / "genai_config.json").exists():
            raise ValueError(f"--engine genai runs onnxruntime-genai folders; {path} has no genai_config.json "
                             "(python -m export --target onnx writes them, except with --kv-cache int8, which "
                             "onnxruntime-genai cannot run: drop --engine)")
        from contract.onnx import read_metadata

        meta, bundled = read_metadata(path), (path / "tokenizer.model").read_bytes() \
            if (path / "tokenizer.model").exists() else None
    if meta is None:
        raise ValueError(f"{path} holds no gemma-edge metadata: re-export it with python -m export")
    if args.tokenizer is not None:
        tok = Tokenizer(args.tokenizer)
    elif bundled is not None:
        tok = Tokenizer.from_bytes(bundled)
    else:
        raise ValueError(f"{path} holds no tokenizer.model: pass a tokenizer (--tokenizer PATH)")
    check_tokenizer(tok, meta)
    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("pass the prompt as --prompt TEXT or --prompt-file PATH (one of them)")
    images = [Path(p) for p in args.image or []]
    text = prompt_text(meta, tok, args.prompt if args.prompt is not None else _read_prompt(args.prompt_file),
                       len(images), args.raw)
    if images and "<start_of_image>" not in text:
        text = "<start_of_image>" * len(images) + text  # images first, as runtime_py places them
    t0 = time.perf_counter()
    if engine == "litertlm":
        from runtime_py.litertlm_engine import Engine

        runner = Engine(path, args.threads, max_num_images=len(images))
        try:
            out = runner.generate(text, images, args.max_new_tokens)
        finally:
            runner.close()
    else:
        from runtime_py.genai_engine import Engine

        out = tok.decode(Engine(path, args.threads).generate(text, images, args.max_new_tokens))
    print(out)
    print(f"[{engine}: {len(images)} images, generated in {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    return 0


class _OwnChat:
    """runtime_py's Conversation, as cmd_chat drives it: text pieces per turn."""

    def __init__(self, args):
        from contract.sampling import Sampling
        from runtime_py import load
        from runtime_py.chat import Conversation
        from runtime_py.text import tokenizer_for

        self.session = load(args.artifact, args.threads)
        self.tok = tokenizer_for(self.session, args.artifact, args.tokenizer)
        self.chat = Conversation(self.session, self.tok, system=args.system, max_new_tokens=args.max_new_tokens,
                                 sampling=Sampling(args.temperature, args.top_k, args.top_p, args.seed))
        self.model, self.max_len, self.vision = self.session.metadata.model, self.session.max_len, \
            self.session.vision is not None

    def say(self, text: str, images) -> Iterator[str]:
        from runtime_py.session import ContextFullError

        try:
            reply = self.chat.say(text, images=images)
            first = next(reply, None)
        except ContextFullError as e:
            print(f"[context full: {e}; starting a new conversation]", file=sys.stderr)
            self.chat.reset()
            reply = self.chat.say(text, images=images)  # the turn alone; raises (exit 2) if even that cannot fit
            first = next(reply, None)
        out, shown = [], ""
        try:
            for token in itertools.chain(() if first is None else (first,), reply):
                out.append(token)
                piece = self.tok.decode(out)
                yield piece[len(shown):]
                shown = piece
        finally:
            reply.close()  # a reply left early (Ctrl-C) is closed by the next turn

    def used(self) -> int:
        return self.session.position

    def reset(self):
        self.chat.reset()

    def close(self):
        pass


class _LiteRTLMChat:
    """LiteRT-LM's own Conversation on a .litertlm bundle (greedy, the bundle's chat template)."""

    IMAGES = 4  # images one conversation may hold (LiteRT-LM sizes its vision executor up front)

    def __init__(self, args):
        from contract.tflite import read_tflite
        from runtime_py.litertlm_engine import Engine

        if Path(args.artifact).suffix != ".litertlm":
            raise ValueError(f"--engine litertlm runs .litertlm bundles; {args.artifact} is not one")
        if args.temperature or args.tokenizer is not None:
            raise ValueError("--engine litertlm chats greedily with the bundle's own tokenizer: drop "
                             f"{'--temperature' if args.temperature else '--tokenizer'}")
        meta = read_tflite(args.artifact)[1]
        if meta is None or not meta.instruction_tuned:
            raise ValueError(f"{args.artifact} is not an instruction-tuned bundle: chat with an -it model")
        self.model, self.max_len, self.vision = meta.model, meta.max_seq_len, meta.image is not None
        self.args = args
        self.runner = Engine(args.artifact, args.threads, max_num_images=self.IMAGES if self.vision else 0)
        self.conversation = self.runner.conversation(args.system, args.max_new_tokens)

    def say(self, text: str, images) -> Iterator[str]:
        yield from self.conversation.say(text, images)

    def used(self) -> int:
        return self.conversation.token_count()

    def reset(self):
        self.conversation.close()
        self.conversation = self.runner.conversation(self.args.system, self.args.max_new_tokens)

    def close(self):
        self.conversation.close()
        self.runner.close()


def cmd_chat(args) -> int:
    """A conversation on stdin: one line per user turn, each reply streamed to stdout; /image PATH
    attaches an image to the next turn, /reset starts over, /exit (or the end of input) ends. The
    caches carry the conversation, so a turn costs its own tokens, not the history's
    (runtime_py/chat.py); `--engine litertlm` holds it in LiteRT-LM instead. A turn that fails (a
    missing image, one too many) is said on stderr and the chat goes on; the exit status is then 2."""
    from runtime_py.session import ContextFullError

    chat = _LiteRTLMChat(args) if args.engine == "litertlm" else _OwnChat(args)
    interactive = sys.stdin.isatty()
    if interactive:
        images = "; /image PATH adds an image to the next turn" if chat.vision else ""
        print(f"[{chat.model}, context {chat.max_len} tokens: one line per turn{images}; /reset starts over, "
              "/exit or Ctrl-D ends]", file=sys.stderr)
    pending, failed = [], False
    try:
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            text = line.strip()
            if not line or text in ("/exit", "/quit"):
                return 2 if failed else 0
            if not text:
                continue
            if text == "/reset":
                chat.reset()
                pending = []
                print("[conversation reset]", file=sys.stderr)
                continue
            if text.startswith("/image"):
                path = Path(text[len("/image"):].strip())
                if not chat.vision:
                    print("error: this artifact has no vision encoder: it takes no images", file=sys.stderr)
                    failed = True
                elif not path.is_file():
                    print(f"error: no image at {path}", file=sys.stderr)
                    failed = True
                else:
                    pending.append(path)
                    print(f"[image {path} goes with the next turn]", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            images, pending = pending, []
            pieces = chat.say(text, images)
            try:
                first = next(pieces, "")
            except ContextFullError:
                raise  # the turn alone is longer than the context: exit 2
            except (ValueError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                failed = True
                continue
            try:
                for piece in itertools.chain((first,), pieces):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
                pieces.close()
                sys.stdout.write(" [stopped]")
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(f"[{time.perf_counter() - t0:.2f} s; {chat.used()} of {chat.max_len} context tokens used]",
                  file=sys.stderr)
    finally:
        chat.close()


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


def _sampling_and_threads(parser):
    """The options generate and chat share: sampling, and the runtime's threads."""
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the runtime's choice)")


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
    _sampling_and_threads(gen)
    gen.add_argument("--engine", choices=["runtime_py", "litertlm", "genai"], default="runtime_py",
                     help="who runs the artifact: runtime_py (default), LiteRT-LM (a .litertlm bundle) or "
                          "onnxruntime-genai (an ONNX folder), each with its own tokenizer, image processing and "
                          "generation loop (greedy), to see the same answer from the runtimes you ship")
    gen.add_argument("--draft", type=Path,
                     help="speculative decoding: a smaller artifact of the same tokenizer (e.g. Gemma 3 270M for "
                          "Gemma 3) proposes tokens that the --artifact checks in one call; both exported with "
                          "--speculative K. Greedy output is the same as without it")
    gen.add_argument("--draft-tokens", type=int,
                     help="draft tokens per step (default: the K the target was exported with)")
    chat = sub.add_parser("chat", help="a conversation with an instruction-tuned artifact, one line per turn",
                          description="A multi-turn conversation on stdin with an instruction-tuned artifact: one "
                                      "line per user turn, each reply streamed to stdout; /image PATH adds an image "
                                      "to the next turn (Gemma 3 with vision), /reset starts over, /exit "
                                      "or the end of input ends. The caches carry the conversation: a turn prefills "
                                      "its own tokens only. When the context is full the conversation starts over "
                                      "(said on stderr).", formatter_class=HelpFormatter)
    chat.add_argument("--artifact", type=Path, required=True,
                      help="a .tflite, a .litertlm bundle, or an ONNX folder of an -it model")
    chat.add_argument("--tokenizer", type=Path,
                      help="tokenizer.model or its folder (default: the one a .litertlm bundle or an ONNX "
                           "artifact folder carries)")
    chat.add_argument("--system", help="a system message (Gemma 3: folded into the first user turn)")
    chat.add_argument("--max-new-tokens", type=int, default=512, help="tokens per reply at most")
    _sampling_and_threads(chat)
    chat.add_argument("--engine", choices=["runtime_py", "litertlm"], default="runtime_py",
                      help="who holds the conversation: runtime_py (default), or LiteRT-LM on a .litertlm bundle "
                           "(its own Conversation over the bundle's chat template, greedy): the chat your app "
                           "will have")
    args = ap.parse_args(argv)
    try:
        return cmd_chat(args) if args.command == "chat" else cmd_generate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
