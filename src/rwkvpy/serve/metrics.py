"""Prometheus metrics of one server (its own registry, so several servers in one process,
as in the tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("rwkvpy_requests_running", "streams being decoded", registry=r)
        self.waiting = Gauge("rwkvpy_requests_waiting", "requests queued or reading their prompt", registry=r)
        self.requests = Counter("rwkvpy_requests", "requests answered, by status", ["status"], registry=r)
        self.prompt_tokens = Counter("rwkvpy_prompt_tokens", "prompt tokens read by the model", registry=r)
        self.completion_tokens = Counter("rwkvpy_completion_tokens", "tokens generated", registry=r)
        self.cache_hits = Counter("rwkvpy_cache_hits", "requests resumed from the prefix cache", registry=r)
        self.cached_tokens = Counter("rwkvpy_cached_tokens", "prompt tokens not read thanks to the cache",
                                     registry=r)
        self.cache_bytes = Gauge("rwkvpy_cache_bytes", "bytes held by the prefix cache", registry=r)
        self.step_time = Histogram("rwkvpy_step_seconds", "time of one batched decode step", registry=r,
                                   buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))

    def render(self) -> bytes:
        return generate_latest(self.registry)
