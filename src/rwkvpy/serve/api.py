"""The OpenAI-compatible HTTP API over an :class:`~rwkvpy.serve.engine.Engine`.

    GET  /v1/models             the one model served
    POST /v1/completions        prompt -> text (streamed as server-sent events with "stream": true)
    POST /v1/chat/completions   messages -> reply, in the model's chat format
    GET  /health                200 while the engine runs
    GET  /metrics               Prometheus text format

Errors use OpenAI's schema, ``{"error": {"message", "type", "param", "code"}}``: malformed JSON
and wrong types 400, a missing or wrong API key 401, an unknown model 404, a prompt longer
than the limit 400, a full queue 429. Unknown request fields are ignored.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation.chat import FORMATS as CHAT_FORMATS
from ..generation.chat import SEPARATOR, clean_message
from ..generation.sampling import SamplingParams
from .engine import Engine, Event, Job, QueueFull

DEFAULT_CHAT_MAX_TOKENS = 512


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


# --- request bodies ---------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # extension
    min_p: float = Field(0.0, ge=0, lt=1)  # extension
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension: stop tokens
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=20)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=0)


# --- the app ----------------------------------------------------------------------------------


def render_chat(messages: list[ChatMessage], fmt_name: str) -> list[str]:
    """The conversation as parts, each ending at a message boundary (the cache's checkpoints);
    the last part is the assistant prefix the model continues."""
    fmt = CHAT_FORMATS[fmt_name]
    parts = []
    for m in messages:
        if m.role in ("system", "developer"):
            parts.append(fmt.system.format(system=clean_message(m.text())))
        elif m.role == "user":
            parts.append(fmt.user.format(message=clean_message(m.text())))
        else:
            # A reply goes back as the model wrote it (leading space included), so that its
            # tokens match the cached ones; only blank lines, which would end the turn, go.
            text = re.sub(r"\n\s*\n+", "\n", m.text().replace("\r\n", "\n")).rstrip("\n")
            if fmt.assistant.endswith(":") and not text.startswith((" ", "\n")):
                text = " " + text
            parts.append(fmt.assistant)
            parts.append(f"{text}{SEPARATOR}")
    parts.append(fmt.assistant)
    return parts


class Mailbox:
    """Events from the engine's thread to the event loop with one wake-up of the loop per batch
    (a decode step of 32 streams posts 32 events at once), not one per event: each wake-up
    also hands the interpreter over between the two threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        with self.lock:
            self.items.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, event in items:
            queue.put_nowait(event)


def create_app(engine: Engine, tokenizer, model_name: str, chat_format: str = "world", api_key: str | None = None,
               max_prompt_tokens: int = 16384, metrics=None) -> FastAPI:
    app = FastAPI(title="rwkvpy", docs_url=None, redoc_url=None, openapi_url=None)
    mailboxes: dict = {}  # the event loop serving this app and its Mailbox
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        if metrics:
            metrics.requests.labels(str(e.status)).inc()
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if metrics:
            metrics.requests.labels("400").inc()
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", "invalid_request_error")
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}",
                              "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(401, "invalid or missing API key", "invalid_request_error",
                                      code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not engine.running:
            return error_response(503, "the engine is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render() if metrics else b"", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "rwkvpy"}]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def sampling(req: _Common, max_tokens: int, stop_strings: tuple[str, ...]) -> SamplingParams:
        if req.n > engine.max_streams:
            raise ApiError(400, f"n: {req.n} choices exceed this server's {engine.max_streams} streams", param="n")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop: empty strings are not allowed", param="stop")
        vocab = engine.vocab
        bad = [t for t in (req.stop_token_ids or []) if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab})",
                           param="stop_token_ids")
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              stop_strings=tuple(dict.fromkeys((*stops, *stop_strings))),
                              stop_tokens=tuple(req.stop_token_ids or ()), max_new_tokens=max_tokens,
                              seed=req.seed)

    def check_prompt(tokens: list[int]) -> None:
        if not tokens:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(tokens) > max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(tokens)} tokens; this server takes at most "
                                f"{max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        if max(tokens) >= engine.vocab or min(tokens) < 0:
            raise ApiError(400, f"token ids must be in [0, {engine.vocab})", param="prompt")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str):
            if len(req.prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request", param="prompt")
            tokens = tokenizer.encode(req.prompt[0])
        elif isinstance(req.prompt, str):
            tokens = tokenizer.encode(req.prompt)
        else:
            tokens = list(req.prompt)
        check_prompt(tokens)
        params = sampling(req, 16 if req.max_tokens is None else req.max_tokens, ())
        job = Job(tokens, params, emit=None, n=req.n, checkpoints=(len(tokens),), logprobs=req.logprobs)
        return await run(job, req, request, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        parts = render_chat(req.messages, chat_format)
        tokens, checkpoints = [], []
        for part in parts:  # encoded part by part: boundaries are exact and the same every turn
            tokens += tokenizer.encode(part)
            checkpoints.append(len(tokens))
        check_prompt(tokens)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling(req, DEFAULT_CHAT_MAX_TOKENS if limit is None else limit, (SEPARATOR,))
        top = req.top_logprobs or 0
        job = Job(tokens, params, emit=None, n=req.n, checkpoints=tuple(checkpoints),
                  logprobs=top if req.logprobs else None)
        return await run(job, req, request, "chat.completion")

    def token_text(t: int) -> str:
        return tokenizer.decode_bytes([t]).decode("utf-8", errors="replace")

    def logprobs_of(kind: str, events: list[Event]):
        if kind == "text_completion":
            return {"tokens": [token_text(e.token) for e in events],
                    "token_logprobs": [e.logprob for e in events],
                    "top_logprobs": [{token_text(t): lp for t, lp in (e.top_logprobs or [])} for e in events]}
        return {"content": [{"token": token_text(e.token), "logprob": e.logprob,
                             "bytes": list(tokenizer.decode_bytes([e.token])),
                             "top_logprobs": [{"token": token_text(t), "logprob": lp,
                                               "bytes": list(tokenizer.decode_bytes([t]))}
                                              for t, lp in (e.top_logprobs or [])]} for e in events]}

    async def run(job: Job, req: _Common, request: Request, kind: str):
        loop = asyncio.get_running_loop()
        if mailboxes.get("loop") is not loop:
            mailboxes.update(loop=loop, box=Mailbox(loop))
        box = mailboxes["box"]
        events: asyncio.Queue[Event] = asyncio.Queue()
        job.emit = lambda e: box.post(events, e)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_exceeded", code="rate_limit_exceeded") from None
        rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        want_logprobs = job.logprobs is not None

        def usage(completion_tokens: int) -> dict:
            return {"prompt_tokens": len(job.prompt), "completion_tokens": completion_tokens,
                    "total_tokens": len(job.prompt) + completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(job, events, rid, kind, include_usage, want_logprobs, usage),
                                     media_type="text/event-stream")
        per_choice: list[list[Event]] = [[] for _ in range(job.n)]
        finish: list[str | None] = [None] * job.n
        try:
            while any(f is None for f in finish):
                e = await events.get()
                if e.error:
                    raise ApiError(500, f"generation failed: {e.error}", "server_error")
                per_choice[e.index].append(e)
                if e.finish_reason:
                    finish[e.index] = e.finish_reason
        finally:
            if any(f is None for f in finish):
                job.cancel()  # the client went away (or the engine failed): free the streams
        choices = []
        for i, evs in enumerate(per_choice):
            text = "".join(e.text for e in evs)
            tokens = [e for e in evs if e.token is not None]
            lp = logprobs_of(kind, tokens) if want_logprobs else None
            if kind == "text_completion":
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish[i]})
            else:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": finish[i]})
        n_tokens = sum(1 for evs in per_choice for e in evs if e.token is not None)
        if metrics:
            metrics.requests.labels("200").inc()
        return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name, "choices": choices,
                "usage": usage(n_tokens)}

    async def stream(job: Job, events: asyncio.Queue, rid: str, kind: str, include_usage: bool,
                     want_logprobs: bool, usage):
        obj = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
        now = int(time.time())

        def chunk(choices, **extra) -> str:
            body = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def choice(e: Event, first: bool) -> dict:
            lp = logprobs_of(kind, [e]) if want_logprobs and e.token is not None else None
            if kind == "text_completion":
                return {"index": e.index, "text": e.text, "logprobs": lp, "finish_reason": e.finish_reason}
            delta = {"content": e.text} if e.text or not e.finish_reason else {}
            if first:
                delta = {"role": "assistant", **delta}
            return {"index": e.index, "delta": delta, "logprobs": lp, "finish_reason": e.finish_reason}

        started, finished, n_tokens = set(), set(), 0
        try:
            while len(finished) < job.n:
                e = await events.get()
                if e.error:
                    yield f"data: {json.dumps({'error': {'message': e.error, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                    break
                if e.token is not None:
                    n_tokens += 1
                if e.text or e.finish_reason or (want_logprobs and e.token is not None) or e.index not in started:
                    yield chunk([choice(e, e.index not in started)])
                    started.add(e.index)
                if e.finish_reason:
                    finished.add(e.index)
            if include_usage:
                yield chunk([], usage=usage(n_tokens))
            yield "data: [DONE]\n\n"
            if metrics:
                metrics.requests.labels("200").inc()
        finally:
            if len(finished) < job.n:
                job.cancel()  # a client that went away frees its stream at the engine's next turn

    return app
