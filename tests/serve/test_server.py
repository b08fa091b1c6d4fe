"""The OpenAI-compatible server, through the real ``openai`` client (and raw HTTP where the
client would hide what is checked) against a real uvicorn on a free port of 127.0.0.1."""

import concurrent.futures as cf
import json
import time
from dataclasses import dataclass

import httpx
import pytest
import torch
from torch import Tensor

import rwkvpy
from rwkvpy.loading import default_model_path
from rwkvpy.models.base import ModelBase
from rwkvpy.models.state import RecurrentState
from rwkvpy.serve import Server, free_port
from rwkvpy.tokenizers import tokenizer_for_model

openai = pytest.importorskip("openai")
NAME = "shakespeare"


def start(model=None, **kw) -> Server:
    """A server on a free port; segments of 32 tokens (not measured: servers compared with each
    other must read prompts alike)."""
    model = model or rwkvpy.load(default_model_path())
    kw = {"prefill_chunk": 32, **kw}
    return Server(model, tokenizer_for_model(256), NAME, port=free_port(), **kw).start()


@pytest.fixture(scope="module")
def server():
    srv = start()
    yield srv
    srv.stop()


def client(srv, **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def complete(srv, prompt, **kw):
    kw = {"max_tokens": 24, "temperature": 0, **kw}
    return client(srv).completions.create(model=NAME, prompt=prompt, **kw)


def stream_completion(srv, prompt, **kw):
    kw = {"max_tokens": 24, "temperature": 0, **kw}
    chunks = list(client(srv).completions.create(model=NAME, prompt=prompt, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    return text, finishes, usage, chunks


def metric(srv, name: str) -> float:
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_prefill_chunk_is_measured_within_its_choices():
    from rwkvpy.serve.engine import PREFILL_CHUNKS, measure_prefill_chunk

    assert measure_prefill_chunk(rwkvpy.load(default_model_path())) in PREFILL_CHUNKS


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=5)])
def test_streamed_text_equals_non_streamed_and_usage_is_exact(server, kw):
    prompt = "ROMEO:\nWhat light"
    whole = complete(server, prompt, **kw)
    text, finishes, usage, chunks = stream_completion(server, prompt, **kw)
    assert text == whole.choices[0].text and len(text) > 0
    assert finishes == [whole.choices[0].finish_reason] == ["length"]
    assert len(usage) == 1 and chunks[-1].usage is not None  # the usage chunk comes last
    assert usage[0].prompt_tokens == whole.usage.prompt_tokens == len(prompt.encode())
    assert usage[0].completion_tokens == whole.usage.completion_tokens == 24  # bytes: a token each
    assert usage[0].total_tokens == len(prompt.encode()) + 24


def test_chat_streamed_equals_non_streamed(server):
    msgs = [{"role": "system", "content": "Speak plainly."}, {"role": "user", "content": "Who goes there?"}]
    c = client(server)
    whole = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=30, temperature=0)
    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=30, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]


def test_concurrent_greedy_requests_each_return_what_they_return_alone(server):
    prompts = [f"{name}:\n" for name in ("ROMEO", "JULIET", "KING", "FIRST CITIZEN", "MENENIUS", "HAMLET",
                                          "NURSE", "CLOWN")] * 4  # 32 requests
    prompts = [p + "O " * (i % 5) for i, p in enumerate(prompts)]
    alone = [complete(server, p, max_tokens=16).choices[0].text for p in prompts[:8]]
    with cf.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda p: complete(server, p, max_tokens=16).choices[0].text, prompts))
    alone += [complete(server, p, max_tokens=16).choices[0].text for p in prompts[8:]]
    assert together == alone


def test_stop_strings_split_across_tokens_are_never_emitted(server):
    free = complete(server, "ROMEO:", max_tokens=40).choices[0].text
    stop = free[10:13]  # three bytes: three tokens of this byte-level model
    cut = complete(server, "ROMEO:", max_tokens=40, stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    text, finishes, _, _ = stream_completion(server, "ROMEO:", max_tokens=40, stop=[stop])
    assert text == free[: free.index(stop)] and finishes == ["stop"]
    # a tail that could start a stop string is held back, then flushed when it does not complete
    never = free[-2:] + "\x07"
    text, finishes, _, _ = stream_completion(server, "ROMEO:", max_tokens=40, stop=[never])
    assert text == free and finishes == ["length"]


def test_second_chat_turn_is_cached_and_answers_as_a_cold_server(server):
    msgs = [{"role": "user", "content": "Good morrow, cousin."}]
    c = client(server)
    first = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0)
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "What news?"}]
    warm = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0)
    assert warm.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens + 20
    cold_server = start()
    try:
        cold = client(cold_server).chat.completions.create(model=NAME, messages=msgs, max_tokens=20, temperature=0)
    finally:
        cold_server.stop()
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == warm.choices[0].message.content


def test_n_choices_and_logprobs(server):
    r = complete(server, "KING:", max_tokens=8, temperature=1.0, n=3, seed=1, logprobs=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 8 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    again = complete(server, "KING:", max_tokens=8, temperature=1.0, n=3, seed=1)
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]  # seeded: reproducible
    chat = client(server).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and len(content[0].top_logprobs) == 3
    greedy_top = content[0].top_logprobs[0]
    assert greedy_top.token == content[0].token and abs(greedy_top.logprob - content[0].logprob) < 1e-6


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (json.dumps({"model": NAME, "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": NAME, "prompt": "x", "temperature": [1]}).encode(), 400, "temperature"),
    (json.dumps({"model": NAME}).encode(), 400, "prompt"),
    (json.dumps({"model": "gpt-9", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": NAME, "prompt": "x" * 20000}).encode(), 400, "prompt"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert complete(server, "A", max_tokens=2).choices[0].finish_reason == "length"


def test_unknown_fields_are_ignored(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "A", "max_tokens": 3,
                                                          "temperature": 0, "best_of_something": 7})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_disconnect_frees_the_stream(server):
    body = {"model": NAME, "prompt": "ROMEO:", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # 3 chunks: data lines and blank lines
        assert sum(1 for ln in got if ln.startswith("data:")) == 3
        assert metric(server, "rwkvpy_requests_running") == 1
    deadline = time.time() + 5
    while metric(server, "rwkvpy_requests_running") != 0:
        assert time.time() < deadline, "the stream was not freed"
        time.sleep(0.01)
    assert complete(server, "A", max_tokens=2).choices[0].finish_reason == "length"


def test_queue_full_is_429_and_api_key_is_401():
    srv = start(max_streams=1, max_queue=1, api_key="sesame")
    try:
        bad = client(srv, api_key="wrong")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(srv.url + "/health").status_code == 200  # not under /v1/
        good = client(srv, api_key="sesame")

        def long(_):
            try:
                good.completions.create(model=NAME, prompt="A", max_tokens=300, temperature=0)
                return 200
            except openai.RateLimitError:
                return 429

        with cf.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(long, range(6)))
        assert 429 in codes and 200 in codes
        with pytest.raises(openai.BadRequestError):  # more choices than streams would wait forever
            good.completions.create(model=NAME, prompt="A", max_tokens=2, n=2)
    finally:
        srv.stop()


# --- a scripted model: the server sees models only through their interface -----------------


@dataclass(frozen=True)
class ScriptState(RecurrentState):
    x: Tensor  # (1, B, 1), unused
    pos: Tensor
    model_id: str = ""


class ScriptedModel(ModelBase):
    """Emits the bytes of ``text`` in turn, whatever it reads: multi-byte characters arrive as
    several tokens."""

    def __init__(self, text: str):
        super().__init__()
        self.script = list(text.encode())
        self.w = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.config = type("Cfg", (), {"vocab_size": 256, "arch": "script"})()

    def zero_state(self, batch_size=1):
        return ScriptState(torch.zeros(1, batch_size, 1), torch.zeros(batch_size, dtype=torch.long), "script")

    def forward(self, tokens, state=None, *, last_only=False, return_state=True):
        tokens = self.check_tokens(tokens)
        B, T = tokens.shape
        state = state or self.zero_state(B)
        pos = state.pos[:, None] + torch.arange(1, T + 1)  # position after each token
        logits = torch.full((B, T, 256), -10.0)
        nxt = torch.tensor(self.script)[(pos - 1) % len(self.script)]
        logits.scatter_(-1, nxt[..., None], 10.0)
        new = ScriptState(state.x, state.pos + T, state.model_id)
        return (logits[:, -1:] if last_only else logits), new


def test_multibyte_characters_split_across_tokens_arrive_whole():
    text = "héllo wörld ✓ 日本 "
    srv = start(ScriptedModel(text))
    try:
        n = len(text.encode())
        chunks = list(client(srv).completions.create(model=NAME, prompt="x", max_tokens=n, temperature=0,
                                                     stream=True))
        pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
        assert any(len(p.encode()) > 1 for p in pieces)  # multi-byte characters came in one piece
    finally:
        srv.stop()


@pytest.mark.slow
def test_soak_1000_requests_no_5xx_and_flat_memory():
    import os

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    # A 2 MiB cache fills within the first 100 requests (two states of ~31 KB each per request):
    # from then on memory may only hold what the budget allows.
    srv = start(cache_mib=2)
    # A new connection per request, as separate clients make; verify=False spares each request
    # httpx's loading of the CA bundle (~40 ms of the client's CPU; plain http uses none of it).
    plain = {"timeout": 30, "verify": False}
    try:
        def one(i):
            body = {"model": NAME, "prompt": f"LINE {i}:", "max_tokens": 2, "temperature": 0.8, "seed": i}
            if i % 10 == 3:  # malformed
                return httpx.post(srv.url + "/v1/completions", content=b"{",
                                  headers={"content-type": "application/json"}, **plain).status_code
            if i % 10 == 7:  # disconnected early
                with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True,
                                                                              "max_tokens": 200}, **plain) as r:
                    next(r.iter_lines())
                    return r.status_code
            return httpx.post(srv.url + "/v1/completions", json=body, **plain).status_code

        with cf.ThreadPoolExecutor(8) as pool:
            first = list(pool.map(one, range(100)))
            level = rss()
            rest = list(pool.map(one, range(100, 1000)))
        codes = first + rest
        assert not [c for c in codes if c >= 500]
        assert codes.count(400) == 100
        assert rss() <= level * 1.05
        assert srv.engine.cache.bytes <= 2 << 20 and srv.engine.cache.entries > 0
    finally:
        srv.stop()


def test_a_long_prompt_is_read_a_layer_per_turn_and_reads_the_same(monkeypatch):
    """With no time for prompts in a decode turn (PREFILL_SHARE 0) a turn still takes one step
    (about a layer) of the segment being read, so a decoding stream gets a token every turn
    while a long prompt is read; and that prompt's reply is the one an idle engine gives."""
    import rwkvpy.serve.engine as engine
    from rwkvpy.generation.sampling import SamplingParams

    model = rwkvpy.load(default_model_path())
    tokenizer = tokenizer_for_model(256)
    long_prompt = list(b"ROMEO:\nWhat light through yonder window breaks?\n" * 3)  # 150 tokens: 5 segments

    def reply(eng, log, tag, prompt, n):
        job = engine.Job(prompt=prompt, params=SamplingParams(temperature=0, max_new_tokens=n),
                         emit=lambda e: e.token is not None and log.append((tag, e.token)))
        eng.submit(job)
        return job

    idle = engine.Engine(model, tokenizer, prefill_chunk=32).start()
    alone: list = []
    reply(idle, alone, "long", long_prompt, 8).done.wait(60)
    idle.stop()

    monkeypatch.setattr(engine, "PREFILL_SHARE", 0.0)
    busy = engine.Engine(model, tokenizer, prefill_chunk=32).start()
    log: list = []
    decoding = reply(busy, log, "decode", list(b"JULIET:\n"), 400)
    while len(log) < 3:
        time.sleep(0.01)
    long_job = reply(busy, log, "long", long_prompt, 8)
    long_job.done.wait(60)
    decoding.cancel()
    busy.stop()
    first_long = next(i for i, (tag, _) in enumerate(log) if tag == "long")
    during = sum(tag == "decode" for tag, _ in log[3:first_long])
    assert during >= 5 * model.config.n_layer, (during, model.config.n_layer)
    assert [t for tag, t in log if tag == "long"] == [t for _, t in alone]


def test_a_prompt_cancelled_while_read_stops_being_read(monkeypatch):
    """A client that leaves while its prompt's segment is half read: the engine drops that
    segment at its next turn (no more layers spent on it) and serves the next request."""
    import rwkvpy.serve.engine as engine
    from rwkvpy.generation.sampling import SamplingParams

    monkeypatch.setattr(engine, "PREFILL_SHARE", 0.0)  # one layer a turn while a stream decodes
    eng = engine.Engine(rwkvpy.load(default_model_path()), tokenizer_for_model(256), prefill_chunk=32).start()
    tokens: list = []
    params = SamplingParams(temperature=0, max_new_tokens=400)
    decoding = engine.Job(prompt=list(b"JULIET:\n"), params=params, emit=lambda e: tokens.append(e.token))
    eng.submit(decoding)
    while len(tokens) < 3:
        time.sleep(0.01)
    leaving = engine.Job(prompt=list(b"ROMEO:\n" * 40), params=params, emit=lambda e: None)
    eng.submit(leaving)
    while eng.reading is None:
        time.sleep(0.001)
    leaving.cancel()
    assert leaving.done.wait(10)
    deadline = time.time() + 5
    while (reading := eng.reading) is not None and leaving in reading[0] and time.time() < deadline:
        time.sleep(0.01)
    assert reading is None or leaving not in reading[0]
    got: list = []
    after = engine.Job(prompt=list(b"KING:\n"), params=SamplingParams(temperature=0, max_new_tokens=4),
                       emit=lambda e: e.token is not None and got.append(e.token))
    eng.submit(after)
    assert after.done.wait(30) and len(got) == 4
    decoding.cancel()
    eng.stop()


def test_prompt_reading_share_grows_with_the_streams_waiting_for_it():
    """One prompt beside one decoding stream keeps the plain share (its latency bound); a
    burst of new requests gets more, up to MAX_PREFILL_WEIGHT times."""
    import rwkvpy.serve.engine as engine
    from rwkvpy.generation.sampling import SamplingParams

    eng = engine.Engine(rwkvpy.load(default_model_path()), tokenizer_for_model(256), prefill_chunk=32)
    job = lambda n=1: engine.Job(prompt=[1], params=SamplingParams(), emit=lambda e: None, n=n)  # noqa: E731
    eng.streams = [object()]
    eng.prefilling.extend([job()])
    assert eng._prefill_weight() == 1
    eng.prefilling.extend([job(), job(n=2)])
    assert eng._prefill_weight() == 4  # four choices wait for one stream
    eng.prefilling.extend([job(n=3)] * 5)
    assert eng._prefill_weight() == engine.MAX_PREFILL_WEIGHT
    eng.streams = [object()] * 8
    assert eng._prefill_weight() == 19 / 8


def test_a_slow_decode_turn_does_not_lengthen_the_prompt_reading_after_it():
    """The prompt-reading budget follows the median of the recent decode turns at this batch
    size where this turn's was slower; a new batch size starts its own record."""
    import rwkvpy.serve.engine as engine

    eng = engine.Engine(rwkvpy.load(default_model_path()), tokenizer_for_model(256), prefill_chunk=32)
    eng.batch = ([object()], None)
    for t in (0.020, 0.021, 0.019, 0.020):
        assert eng._typical_decode_time(t) == t  # none slower than the median so far
    assert eng._typical_decode_time(0.200) == 0.020  # a hiccup: the budget stays that of a usual turn
    assert eng._typical_decode_time(0.010) == 0.010  # a faster turn counts as itself
    eng.batch = ([object()] * 8, None)
    assert eng._typical_decode_time(0.050) == 0.050  # eight rows: their own record


def test_the_serve_command_answers_stops_on_sigterm_and_refuses_a_taken_port():
    """``rwkvpy serve`` (the engine on the main thread, HTTP on another): it answers, a second
    server on the same port exits 1 with one line, and SIGTERM stops the first one cleanly."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "rwkvpy", "serve", "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json() == {"status": "ok"}:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.time() < deadline, server.stderr.read()
            time.sleep(0.2)
        body = {"model": "default", "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1].startswith("rwkvpy: error:") and "port" in second.stderr
        assert "Traceback" not in second.stderr
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_the_serve_command_refuses_compile_in_one_line():
    """``serve --compile`` would recompile for every new number of running streams while
    serving: refused before loading, one line, no traceback."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "rwkvpy", "serve", "--compile", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--compile" in r.stderr
    assert "Traceback" not in r.stderr
