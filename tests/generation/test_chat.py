"""Chat keeps its state between turns; state files round-trip and refuse other models."""

import subprocess
import sys

import pytest
import torch

import rwkvpy
from conftest import make_model, rel_err
from rwkvpy import ChatSession, RwkvpyError, SamplingParams
from rwkvpy.models import RWKV4Config
from rwkvpy.tokenizers import ByteTokenizer

CFG = RWKV4Config(vocab_size=256, n_embd=32, n_layer=2)
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
LAYERS = ("att_x", "ffn_x", "num", "den", "max")


def assert_state_is(state, model, tokens):
    with torch.no_grad():
        _, expected = model(torch.tensor([tokens]))
    assert torch.equal(state.pos, expected.pos)
    for name in LAYERS:
        assert rel_err(getattr(state, name), getattr(expected, name)) < 1e-5, name


@pytest.mark.parametrize("fmt", ["world", "raven", "alpaca"])
def test_state_after_turns_equals_whole_transcript(fmt):
    model = make_model(CFG)
    # ASCII only, so the transcript (text) is exact: invalid UTF-8 would become U+FFFD.
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=1, max_new_tokens=15,
                            banned_tokens=tuple(range(128, 256)))
    chat = ChatSession(model, ByteTokenizer(), format=fmt, system="You are terse.", params=params)
    for message in ["Hello there", "multi\n\n\nline question", "ok"]:
        chat.say(message)
    assert_state_is(chat.state, model, chat.history)
    # Byte-level tokens have no merges across boundaries, so the text gives the same tokens.
    assert chat.history == list(chat.transcript.encode())
    assert "line question" in chat.transcript and "multi\n\n" not in chat.transcript


def test_each_turn_feeds_only_its_own_tokens():
    model = make_model(CFG)
    chat = ChatSession(model, ByteTokenizer(), params=GREEDY)
    chat.say("first message")
    before = chat.state.pos.item()
    chat.say("second")
    turn = len("User: second\n\nAssistant:")
    fed = chat.state.pos.item() - before
    # the turn, the reply, and at most a separator closing a reply cut by max_new_tokens
    assert turn < fed <= len("\n\n") + turn + GREEDY.max_new_tokens


def test_regenerate_returns_to_the_state_before_the_reply():
    model = make_model(CFG)
    chat = ChatSession(model, ByteTokenizer(), params=SamplingParams(temperature=1.0, seed=3, max_new_tokens=12))
    chat.say("hi")
    state_before = chat.state
    first = chat.say("tell me")
    second = "".join(chat.regenerate())
    assert first != second  # sampled again from the same point
    assert chat.transcript.count("tell me") == 1
    assert_state_is(chat.state, model, chat.history)
    greedy = ChatSession(model, ByteTokenizer(), params=GREEDY)
    a = greedy.say("x")
    state_a = greedy.state
    assert "".join(greedy.regenerate()) == a
    for name in LAYERS:
        assert torch.equal(getattr(greedy.state, name), getattr(state_a, name))
    assert state_before.pos.item() < chat.state.pos.item()


def test_abandoned_stream_keeps_a_consistent_state():
    model = make_model(CFG)
    chat = ChatSession(model, ByteTokenizer(), params=GREEDY)
    stream = chat.send("hello")
    next(stream)
    stream.close()
    assert_state_is(chat.state, model, chat.history)
    chat.say("again")  # the cut reply is closed with the separator first
    assert "\n\nUser: again" in chat.transcript
    assert_state_is(chat.state, model, chat.history)


def test_state_file_round_trip_and_metadata(tmp_path):
    from rwkvpy.models.state import read_state_file

    model = make_model(CFG)
    _, state = model(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    state.save(tmp_path / "s.st", text="abc")
    back = rwkvpy.load_state(tmp_path / "s.st", model)
    assert back.model_id == model.fingerprint and torch.equal(back.pos, state.pos)
    for name in LAYERS:
        assert torch.equal(getattr(back, name), getattr(state, name))
    meta = read_state_file(tmp_path / "s.st")[1]
    assert meta["text"] == "abc" and meta["tokens_consumed"] == "[3, 3]" and meta["dtype"] == "float32"
    assert meta["format_version"] == "1" and meta["model_fingerprint"] == model.fingerprint


def test_state_of_another_model_is_refused(tmp_path):
    model, other = make_model(CFG, seed=0), make_model(CFG, seed=1)
    model.zero_state().save(tmp_path / "s.st")
    with pytest.raises(RwkvpyError, match="different model"):
        rwkvpy.load_state(tmp_path / "s.st", other)
    bigger = make_model(RWKV4Config(vocab_size=256, n_embd=32, n_layer=3))
    with pytest.raises(RwkvpyError, match="different model"):
        rwkvpy.load_state(tmp_path / "s.st", bigger)


def test_state_without_model_cannot_be_saved(tmp_path):
    with pytest.raises(RwkvpyError, match="does not know its model"):
        rwkvpy.RWKV4State.zeros(1, 1, 4, 4).save(tmp_path / "s.st")


def run_chat(model_dir, script: str):
    r = subprocess.run([sys.executable, "-m", "rwkvpy", "chat", "--model", str(model_dir), "--temperature", "0",
                        "--max-tokens", "10"], input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.split("User: ") if "Assistant:" in line]


def test_chat_save_then_load_in_a_new_process_continues_identically(tmp_path):
    rwkvpy.save(make_model(CFG, seed=4), tmp_path / "model")
    state = tmp_path / "chat.st"
    first = run_chat(tmp_path / "model", f"hello\n/save {state}\nnext question\n")
    second = run_chat(tmp_path / "model", f"/load {state}\nnext question\n")
    assert len(first) == 2 and len(second) == 1
    assert second[0] == first[1]


@pytest.mark.parametrize("args,pattern", [
    (["--model", "/nonexistent/model.pth", "hi"], "/nonexistent/model.pth: no such file"),
    (["--tokenizer", "/nonexistent/tok.json", "hi"], "no such tokenizer file"),
    (["--tokenizer", "VOCAB", "hi"], "does not match the model's 256"),
])
def test_generate_cli_errors_are_one_line(tmp_path, args, pattern):
    import rwkv.rwkv_tokenizer

    from pathlib import Path

    rwkvpy.save(make_model(CFG), tmp_path / "model")
    vocab = Path(rwkv.rwkv_tokenizer.__file__).parent / "rwkv_vocab_v20230424.txt"
    full = ["--model", str(tmp_path / "model")] + [str(vocab) if a == "VOCAB" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "rwkvpy", "generate", *full], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0]


def test_generate_cli_is_reproducible_and_reads_stdin(tmp_path):
    rwkvpy.save(make_model(CFG), tmp_path / "model")
    cmd = [sys.executable, "-m", "rwkvpy", "generate", "--model", str(tmp_path / "model"), "--seed", "11",
           "--max-tokens", "30"]
    a = subprocess.run(cmd + ["Once"], capture_output=True, text=True)
    b = subprocess.run(cmd + ["-"], input="Once", capture_output=True, text=True)
    assert a.returncode == 0 and a.stdout == b.stdout and len(a.stdout) > 1
