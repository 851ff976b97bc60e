"""Multi-turn chat (runtime_py/chat.py, `python -m runtime_py chat`): the caches carry the
conversation, so each turn continues exactly as one prompt of the whole conversation would."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from contract.tokenizer import Tokenizer
from export.driver import export
from export.options import ExportOptions
from models import get_config, init_params
from runtime_py import ContextFullError, load
from runtime_py.chat import Conversation
from runtime_py.text import stop_ids

MAX_LEN = 64


def _it_config(name: str, tok: Tokenizer):
    cfg = get_config(name)
    return dataclasses.replace(cfg, instruction_tuned=True,
                               tokens=dataclasses.replace(cfg.tokens, end_of_turn=tok.end_of_turn_id))


def _it_artifact(name: str, target: str, tok: Tokenizer, out, max_len: int = MAX_LEN):
    cfg = _it_config(name, tok)
    return export(cfg, init_params(cfg, 0), target,
                  ExportOptions(out_dir=out, max_len=max_len, prefill_lens=(8,), verify=False)).path


@pytest.fixture(scope="module")
def tok(tokenizer_256):
    return Tokenizer(tokenizer_256)


@pytest.fixture(scope="module")
def artifacts(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    return {(name, target): _it_artifact(name, target, tok, out / f"{name}-{target}") for name, target in CASES}


CASES = [("gemma3-tiny", "tflite"), ("gemma3-tiny", "onnx"), ("recurrentgemma-tiny", "tflite")]


@pytest.mark.parametrize("name,target", CASES)
def test_each_turn_continues_as_one_prompt_of_the_conversation(artifacts, tok, name, target):
    session = load(artifacts[name, target])
    chat = Conversation(session, tok, max_new_tokens=6)
    first = list(chat.say("hello world"))
    opening = tok.encode_chat([{"role": "user", "content": "hello world"}], family=session.metadata.family)
    assert first and chat.fed[:len(opening)] == opening
    reply = chat.say("and then?")
    head = next(reply)
    prompt = list(chat.fed)  # every id the second reply follows: no reply token fed yet
    assert session.position == len(prompt)  # the caches hold them all (the head is not fed yet)
    second = [head] + list(reply)
    # the first reply's tokens, fed as sampled, then the turn: the reply closed, the user's turn opened
    assert prompt[len(prompt) - len(chat.turn_ids("and then?")):][0] == tok.end_of_turn_id
    assert first == prompt[len(prompt) - len(chat.turn_ids("and then?")) - len(first):
                           len(prompt) - len(chat.turn_ids("and then?"))]
    fresh = load(artifacts[name, target])
    assert fresh.generate(prompt, 6, stop_tokens=stop_ids(fresh, tok)) == second
    chat.reset()
    assert session.position == 0 and list(chat.say("hello world")) == first


def test_a_reply_left_early_is_closed_by_the_next_turn(artifacts, tok):
    session = load(artifacts["gemma3-tiny", "tflite"])
    chat = Conversation(session, tok, max_new_tokens=6)
    reply = chat.say("hello world")
    taken = [next(reply), next(reply)]
    reply.close()  # the caller stopped reading (Ctrl-C in the CLI)
    second = chat.say("and then?")
    head = next(second)
    prompt = list(chat.fed)
    turn = chat.turn_ids("and then?")
    assert prompt[-len(turn) - 2:-len(turn)] == taken and turn[0] == tok.end_of_turn_id
    assert load(artifacts["gemma3-tiny", "tflite"]).generate(prompt, 6, stop_tokens=stop_ids(session, tok)) == \
        [head] + list(second)


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupt_around_a_decode_leaves_the_conversation_whole(artifacts, tok, when):
    """Ctrl-C lands when a decode call returns (or, rarely, just before it starts): either way the
    next turn continues as one prompt of the conversation would."""
    session = load(artifacts["gemma3-tiny", "tflite"])
    chat = Conversation(session, tok, max_new_tokens=6)
    real, calls = session.decode, []

    def interrupted(token):
        calls.append(token)
        if len(calls) == 2:
            if when == "after":
                real(token)
            raise KeyboardInterrupt
        return real(token)

    session.decode = interrupted
    reply = chat.say("hello world")
    with pytest.raises(KeyboardInterrupt):
        for _ in reply:
            pass
    session.decode = real
    second = chat.say("and then?")
    head = next(second)
    prompt = list(chat.fed)
    turn = chat.turn_ids("and then?")
    assert prompt[-len(turn) - 2:-len(turn)] == calls  # both tokens in the history, once each
    assert session.position == len(prompt)  # ... and in the caches, once each
    fresh = load(artifacts["gemma3-tiny", "tflite"])
    assert fresh.generate(prompt, 6, stop_tokens=stop_ids(fresh, tok)) == [head] + list(second)


def test_a_turn_that_does_not_fit_leaves_the_conversation_as_it_was(artifacts, tok):
    session = load(artifacts["gemma3-tiny", "tflite"])
    chat = Conversation(session, tok, max_new_tokens=8)
    list(chat.say("hello"))
    position, fed = session.position, list(chat.fed)
    with pytest.raises(ContextFullError, match="do not fit"):
        next(chat.say("hello " * 40))
    assert session.position == position and chat.fed == fed
    list(chat.say("again"))  # the conversation goes on from where it was
    assert session.position > position and chat.fed[:len(fed)] == fed


def test_chat_refuses_a_base_model_and_a_system_turn_gemma_2_lacks(tok, tmp_path):
    base = load(export(get_config("gemma3-tiny"), init_params(get_config("gemma3-tiny"), 0), "tflite",
                       ExportOptions(out_dir=tmp_path / "base", max_len=MAX_LEN, prefill_lens=(8,),
                                     verify=False)).path)
    with pytest.raises(ValueError, match="not instruction-tuned"):
        Conversation(base, tok)
    gemma2 = load(_it_artifact("gemma2-tiny", "tflite", tok, tmp_path / "g2"))
    with pytest.raises(ValueError, match="System role not supported by gemma2"):
        Conversation(gemma2, tok, system="Be brief.")
    assert Conversation(gemma2, tok).fed == []


def test_chat_cli_streams_turns_and_starts_over_on_reset(artifacts, tokenizer_256):
    run = subprocess.run([sys.executable, "-m", "runtime_py", "chat", "--artifact", str(artifacts["gemma3-tiny", "tflite"]),
                          "--tokenizer", str(tokenizer_256), "--max-new-tokens", "5"],
                         input="hello world\n\n/reset\nhello world\nand then?\n/exit\nnot read\n",
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    replies = run.stdout.split("\n")
    assert len(replies) == 4 and replies[-1] == "" and replies[0] == replies[1], run.stdout
    assert "[conversation reset]" in run.stderr and run.stderr.count("context tokens used]") == 3
    session = load(artifacts["gemma3-tiny", "tflite"])
    tok = Tokenizer(tokenizer_256)
    chat = Conversation(session, tok, max_new_tokens=5)
    expected = [tok.decode(list(chat.say(t))) for t in ("hello world", "and then?")]
    assert replies[1:3] == expected


@pytest.fixture(scope="module")
def vision_chat(vision_tiny, tokenizer_vision, tmp_path_factory):
    """gemma3-vision-tiny as an -it artifact (TFLite; context 128: two images of 16 soft tokens and
    the turns around them)."""
    cfg, params = vision_tiny
    tok = Tokenizer(tokenizer_vision)
    cfg = dataclasses.replace(cfg, instruction_tuned=True,
                              tokens=dataclasses.replace(cfg.tokens, end_of_turn=tok.end_of_turn_id))
    out = tmp_path_factory.mktemp("vision_chat")
    path = export(cfg, params, "tflite", ExportOptions(out_dir=out, max_len=128, prefill_lens=(8, 32),
                                                       verify=False)).path
    return path, tok, tokenizer_vision


def test_images_in_any_turn_continue_as_one_prompt(vision_chat):
    import numpy as np

    path, tok, _ = vision_chat
    rng = np.random.default_rng(0)
    pictures = [rng.uniform(-1, 1, (1, 28, 28, 3)).astype(np.float32) for _ in range(2)]
    session = load(path)
    chat = Conversation(session, tok, max_new_tokens=5)
    first = list(chat.say("what is this?", images=pictures[:1]))
    boi = session.vision.boi_token
    # an image without a marker opens the user's content, inside the turn
    assert chat.fed[0] == tok.bos_id and chat.fed.index(boi) > chat.fed.index(tok.start_of_turn_id)
    reply = chat.say("and <start_of_image> this one?", images=pictures[1:])
    head = next(reply)
    prompt, images = list(chat.fed), list(chat.images)
    second = [head] + list(reply)
    assert prompt.count(boi) == 2 and len(images) == 2 and first
    fresh = load(path)
    assert fresh.generate(prompt, 5, images=images, stop_tokens=stop_ids(fresh, tok)) == second
    seen = []
    for order in (images, images[::-1]):  # the images are seen where they were given
        other = load(path)
        seen.append(other.prefill(*other.image_inputs(prompt, order)))
    assert not np.allclose(seen[0], seen[1], atol=1e-3)
    with pytest.raises(ValueError, match="2 <start_of_image> markers for 1 images"):
        next(chat.say("<start_of_image> and <start_of_image>", images=pictures[:1]))


def test_chat_cli_takes_images_and_goes_on_after_a_failed_turn(vision_chat, tmp_path):
    import numpy as np
    from PIL import Image

    path, tok, tokenizer = vision_chat
    picture = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(picture)
    run = subprocess.run([sys.executable, "-m", "runtime_py", "chat", "--artifact", str(path),
                          "--tokenizer", str(tokenizer),
                          "--max-new-tokens", "4"],
                         input=f"/image {picture}\nwhat is this?\n/image {tmp_path / 'missing.png'}\nand now?\n",
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr  # the missing image
    assert f"error: no image at {tmp_path / 'missing.png'}" in run.stderr
    replies = run.stdout.split("\n")
    chat = Conversation(load(path), tok, max_new_tokens=4)
    assert replies[:2] == [tok.decode(list(chat.say("what is this?", images=[picture]))),
                           tok.decode(list(chat.say("and now?")))], run.stderr


def test_litert_lm_holds_the_conversation_in_its_own_engine(tok, tokenizer_256, tmp_path):
    """`chat --engine litertlm`: LiteRT-LM's own Conversation over the bundle's chat template. Its
    first reply is runtime_py's (the template renders the turn alike); later turns run and grow
    its token count (their replies may differ: docs/cli.md says where its history differs), and
    the CLI prints what the engine says."""
    from export.litertlm import write_bundle
    from runtime_py.litertlm_engine import Engine

    tfl = _it_artifact("gemma3-tiny", "tflite", tok, tmp_path, max_len=128)
    bundle = write_bundle(tfl, tokenizer_256, _it_config("gemma3-tiny", tok), 128, tmp_path / "it.litertlm")
    turns = ["hello world", "and then?", "tell me more"]
    ours = tok.decode(list(Conversation(load(bundle), tok, max_new_tokens=5).say(turns[0])))
    runner = Engine(bundle)
    try:
        conversation = runner.conversation(max_new_tokens=5)
        theirs, counts = [], []
        for t in turns:
            theirs.append("".join(conversation.say(t)))
            counts.append(conversation.token_count())
        conversation.close()
    finally:
        runner.close()
    assert theirs[0] == ours and all(theirs) and counts == sorted(set(counts))
    run = subprocess.run([sys.executable, "-m", "runtime_py", "chat", "--engine", "litertlm", "--artifact", str(bundle),
                          "--max-new-tokens", "5"], input="\n".join(turns) + "\n",
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split("\n")[:3] == theirs, run.stderr
