"""``rwkvpy serve``: an OpenAI-compatible server with continuous batching and a prefix state
cache, over any model of :mod:`rwkvpy.models` (it sees them only through their interface)."""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time

from ..errors import RwkvpyError
from .api import create_app
from .engine import Engine, Event, Job, QueueFull
from .metrics import Metrics


def default_chat_format(tokenizer) -> str:
    """World (RWKV-4 World, RWKV-7 G1) for the World vocabulary, Raven for the 20B one, else World."""
    name = type(tokenizer).__name__.lower()
    if "world" in name:
        return "world"
    if "hf" in name or "huggingface" in name:
        return "raven"
    return "world"


SWITCH_INTERVAL = 2e-4  # seconds


class Server:
    """An engine and its app; ``start()`` runs uvicorn in a thread (tests, notebooks), ``run()``
    in the foreground (the CLI)."""

    def __init__(self, model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 chat_format: str | None = None, api_key: str | None = None, max_streams: int = 32,
                 max_queue: int = 64, cache_mib: int = 512, prefill_chunk: int | None = None,
                 max_prompt_tokens: int = 16384, log_level: str = "warning"):
        import uvicorn

        self.metrics = Metrics()
        self.engine = Engine(model, tokenizer, max_streams=max_streams, max_queue=max_queue,
                             cache_bytes=cache_mib << 20, prefill_chunk=prefill_chunk, metrics=self.metrics)
        self.app = create_app(self.engine, tokenizer, model_name, chat_format or default_chat_format(tokenizer),
                              api_key, max_prompt_tokens, self.metrics)
        config = uvicorn.Config(self.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
        self.uvicorn = uvicorn.Server(config)
        self.host, self.port = host, port
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @staticmethod
    def _share_the_interpreter() -> None:
        """The engine thread gives up the GIL at every torch op and must win it back from the
        HTTP thread: with Python's default 5 ms switch interval each of a step's ~1,000 small
        ops can wait that long while responses are being written."""
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))

    def start(self, timeout: float = 30) -> "Server":
        self._share_the_interpreter()
        self.engine.start()
        self.thread = threading.Thread(target=self.uvicorn.run, name="rwkvpy-http", daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not self.uvicorn.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def run(self) -> None:
        """Serve until interrupted (the CLI). The engine's loop runs on this thread, which
        loaded the model and so already owns torch's OpenMP workers; on a thread of its own it
        would get a second set, and libgomp, seeing more threads than cores, stops letting them
        spin between ops: decode steps ran 1.4-2x slower (docs/design.md). HTTP runs on another
        thread; if it stops (a port in use), so does the engine."""
        self._share_the_interpreter()
        failed = []

        def http() -> None:
            try:
                self.uvicorn.run()
            except BaseException as e:  # noqa: BLE001 - uvicorn exits with SystemExit on a bad port
                failed.append(e)
            finally:
                self.engine.stop()

        self.thread = threading.Thread(target=http, name="rwkvpy-http", daemon=True)
        self.thread.start()
        if threading.current_thread() is threading.main_thread():  # only there may handlers be set
            signal.signal(signal.SIGTERM, lambda *_: self.engine.stop())  # a graceful stop, as uvicorn's own
        try:
            self.engine.loop()
        finally:
            self.uvicorn.should_exit = True
            self.engine.stop()
            self.thread.join(timeout=10)
        if not self.uvicorn.started:
            raise RwkvpyError(f"the HTTP server did not start on {self.url} (is the port in use?)")
        if failed:
            raise RwkvpyError(f"the HTTP server on {self.url} failed: {failed[0]!r}")

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.engine.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


__all__ = ["Server", "Engine", "Job", "Event", "QueueFull", "create_app", "free_port", "default_chat_format"]
