"""Continuous batching: one thread steps every running stream together.

Each turn of the loop (1) feeds the last sampled token of every decoding stream in one batched
``model.step`` (one state row per stream) and samples each stream's next token with its own
generator, then (2) reads queued prompts, a segment at a time and about one layer per step
(``model.forward_in_steps``), for up to PREFILL_SHARE of the decode step's time, so running
streams keep a bounded inter-token latency however long a prompt is. Streams join the batch
when their prompt is read and leave when they finish or are cancelled (a disconnected client).

Prompts are read in segments whose boundaries depend only on absolute positions (multiples of
``prefill_chunk``) and on the request's checkpoints (message boundaries), where the state is
stored in the prefix cache: a request resumed from the cache computes exactly what a cold one
does after that point.
"""

from __future__ import annotations

import codecs
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import RwkvpyError
from ..generation.loop import StopStringFilter
from ..generation.sampling import Penalties, SamplingParams, apply_penalties, ban_tokens, make_generator, sample
from ..models.state import RecurrentState
from .cache import PrefixCache


IDLE_PREFILL_SECONDS = 0.1  # with nothing decoding, prefill this long between admissions
PREFILL_SHARE = 0.75  # a decode turn reads prompts for at most this fraction of its step's time,
MAX_PREFILL_WEIGHT = 4  # times (up to this) the streams waiting for their prompt per stream decoding


PREFILL_CHUNKS = (8, 16, 32, 64, 128, 256)


@torch.no_grad()
def measure_prefill_chunk(model, slack: float = 0.5) -> int:
    """The longest prompt segment (of PREFILL_CHUNKS) whose longest step of
    ``model.forward_in_steps`` (about one layer) takes at most ``slack`` times a one-stream
    decode step on this machine: a turn that reads prompts overruns its budget by at most that.
    A family without layer steps reads a whole segment in one step. Where even the shortest
    costs more, the longest costing at most 1.25x the shortest: latency cannot be bounded
    there, so prompts are at least read fast. Measured once at start."""
    state = model.zero_state(1)
    tok = torch.zeros(1, dtype=torch.long, device=model.device)

    def median_seconds(measure: Callable[[], float]) -> float:
        measure()  # warm-up
        return sorted(measure() for _ in range(3))[1]

    def one_step() -> float:
        t0 = time.perf_counter()
        model.step(tok, state)
        return time.perf_counter() - t0

    def longest_step(n: int) -> Callable[[], float]:
        ids = torch.zeros(1, n, dtype=torch.long, device=model.device)

        def measure() -> float:
            steps, item, worst = model.forward_in_steps(ids, state, last_only=True), None, 0.0
            while item is None:
                t0 = time.perf_counter()
                item = next(steps)
                worst = max(worst, time.perf_counter() - t0)
            return worst
        return measure

    step = median_seconds(one_step)
    costs = {}
    for n in PREFILL_CHUNKS:
        costs[n] = median_seconds(longest_step(n))
        if costs[n] > max(slack * step, 1.25 * costs[PREFILL_CHUNKS[0]]):
            break
    limit = max(slack * step, 1.25 * costs[PREFILL_CHUNKS[0]])
    return max([n for n, c in costs.items() if c <= limit] or [PREFILL_CHUNKS[0]])


class QueueFull(RwkvpyError):
    """More requests wait than the queue holds (HTTP 429)."""


@dataclass
class Event:
    """What the engine tells the HTTP side about one choice of a job."""

    index: int
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" or "length": the last event of the choice
    error: str | None = None


@dataclass(eq=False)  # jobs are compared by identity
class Job:
    """One request: a prompt (token ids) and ``n`` choices sampled from it."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # called from the engine thread; must not block
    n: int = 1
    checkpoints: tuple[int, ...] = ()  # prompt lengths whose state the cache should keep
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=itertools.count().__next__)
    # set by the engine
    cached_tokens: int = 0
    pos: int = 0  # prompt tokens read
    state: RecurrentState | None = None
    logits: torch.Tensor | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Stream:
    """One choice being decoded: its sampler, penalties, text decoder and stop handling."""

    def __init__(self, job: Job, index: int, state: RecurrentState, tokenizer, vocab: int):
        self.job, self.index, self.state = job, index, state
        p = job.params
        self.generator = make_generator(None if p.seed is None else p.seed + index)
        self.penalties = Penalties.empty(vocab) if (p.presence_penalty or p.frequency_penalty) else None
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopStringFilter(p.stop_strings)
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.pending: int | None = None  # sampled, not yet fed
        self.closing = False  # finished: its last token is fed once more, then it leaves

    def choose(self, logits: torch.Tensor) -> None:
        """Sample the next token from ``logits`` (V,) and emit it, or finish."""
        p, job = self.job.params, self.job
        if len(self.tokens) >= p.max_new_tokens:
            return self._finish("length", feed_last=False)
        scores = ban_tokens(logits, p.banned_tokens)
        if self.penalties is not None:
            scores = apply_penalties(scores, self.penalties, p.presence_penalty, p.frequency_penalty)
        token = int(sample(scores, p, self.generator))
        if token in p.stop_tokens:
            return self._finish("stop", feed_last=False)
        self.tokens.append(token)
        if self.penalties is not None:
            self.penalties.add(token, p.penalty_decay)
        event = Event(self.index, token=token)
        if job.logprobs is not None:
            logp = torch.log_softmax(scores.float(), -1)
            event.logprob = float(logp[token])
            if job.logprobs:
                top = logp.topk(job.logprobs)
                event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        text, stopped = self.stops.push(self.utf8.decode(self.tokenizer.decode_bytes([token])))
        event.text = text
        job.emit(event)
        self.pending = token
        if stopped:
            self._finish("stop", feed_last=True)
        elif len(self.tokens) >= p.max_new_tokens:
            self._finish("length", feed_last=True)

    def _finish(self, reason: str, feed_last: bool) -> None:
        tail = ""
        if reason == "length" or not feed_last:  # no stop string matched: flush what was held back
            tail = self.stops.push(self.utf8.decode(b"", final=True))[0] + self.stops.flush()
        self.job.emit(Event(self.index, text=tail, finish_reason=reason))
        self.closing = True
        if not feed_last:
            self.pending = None


class Engine:
    """The model's one user. ``submit(job)`` queues a job; events arrive through ``job.emit``."""

    def __init__(self, model, tokenizer, max_streams: int = 32, max_queue: int = 64, cache_bytes: int = 512 << 20,
                 prefill_chunk: int | None = None, metrics=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_streams, self.max_queue = max_streams, max_queue
        self.prefill_chunk = prefill_chunk or measure_prefill_chunk(model)
        self.cache = PrefixCache(cache_bytes)
        self.metrics = metrics
        self.vocab = model.config.vocab_size
        self.inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.waiting: deque[Job] = deque()
        self.prefilling: deque[Job] = deque()
        # the segment being read: its jobs, their spans, and the model's steps through it
        self.reading: tuple[list[Job], dict[Job, tuple[int, int]], Iterator] | None = None
        self.streams: list[Stream] = []
        self.batch: tuple[list[Stream], RecurrentState] | None = None
        self.waiting_count = 0  # jobs submitted and not yet admitted (read by submit)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopped = False
        self.running = False  # while loop() runs, on whichever thread
        self.thread = threading.Thread(target=self.loop, name="rwkvpy-engine", daemon=True)
        self.step_seconds = 0.0
        self.turn_times: deque[float] = deque(maxlen=9)  # recent decode turns of the current batch size
        self.turn_rows = 0

    def start(self) -> "Engine":
        self.running = True  # already, for a health check that comes before the thread's first turn
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.waiting_count >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.waiting_count += 1
        self.inbox.put(job)
        self.wake.set()

    # --- the loop -------------------------------------------------------------------------

    def loop(self) -> None:
        """The engine's loop until ``stop()``: on its own thread after ``start()``, or on the
        caller's (``Server.run`` keeps it on the main thread, see there)."""
        self.running = True
        try:
            self._loop()
        finally:
            self.running = False

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self.stopped:
            try:
                self._turn()
            except Exception as e:  # noqa: BLE001 - a failure fails the running jobs, not the server
                self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        jobs = {s.job for s in self.streams} | set(self.prefilling)
        for job in jobs:
            for i in range(job.n):
                job.emit(Event(i, error=message))
            job.done.set()
        self.streams, self.batch, self.reading = [], None, None
        self.prefilling.clear()

    def _turn(self) -> None:
        self._take_inbox()
        self._drop_cancelled()
        self._admit()
        busy, decode_time = False, 0.0
        t0 = time.perf_counter()
        if any(s.pending is not None for s in self.streams):
            self._decode_step()
            busy = True
            decode_time = self._typical_decode_time(time.perf_counter() - t0)
        if self.prefilling:
            self._prefill(budget=PREFILL_SHARE * decode_time * self._prefill_weight() if busy
                          else IDLE_PREFILL_SECONDS)
            busy = True
        self._report()
        if not busy:
            self.wake.wait(timeout=0.05)
            self.wake.clear()

    def _typical_decode_time(self, seconds: float) -> float:
        """This turn's decode time, or the median of the last few at this batch size where that is
        less: a step slowed by the machine must not also lengthen the prompt reading after it,
        which would stretch that inter-token gap twice."""
        rows = len(self.batch[0]) if self.batch is not None else 0
        if rows != self.turn_rows:
            self.turn_times.clear()
            self.turn_rows = rows
        self.turn_times.append(seconds)
        return min(seconds, sorted(self.turn_times)[len(self.turn_times) // 2])

    def _prefill_weight(self) -> float:
        """Prompt reading's share of a turn grows with the streams waiting for it (a burst of
        new requests joins sooner), up to MAX_PREFILL_WEIGHT; one long prompt beside one
        decoding stream keeps the plain share (its latency bound)."""
        waiting = sum(j.n for j in self.prefilling)
        return min(MAX_PREFILL_WEIGHT, max(1.0, waiting / max(1, len(self.streams))))

    def _take_inbox(self) -> None:
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        for q in (self.waiting, self.prefilling):
            for job in [j for j in q if j.cancelled.is_set()]:
                q.remove(job)
                if q is self.waiting:
                    with self.lock:
                        self.waiting_count -= 1
                job.done.set()
        if self.reading is not None and not any(j in self.prefilling for j in self.reading[0]):
            self.reading = None  # every job of the segment being read has gone
        gone = [s for s in self.streams if s.job.cancelled.is_set()]
        for s in gone:
            self._leave(s)

    def _running_choices(self) -> int:
        return len(self.streams) + sum(j.n for j in self.prefilling)

    def _admit(self) -> None:
        while self.waiting and self._running_choices() + self.waiting[0].n <= self.max_streams:
            job = self.waiting.popleft()
            with self.lock:
                self.waiting_count -= 1
            n, state, logits = self.cache.lookup(job.prompt)
            if n:
                job.cached_tokens, job.pos = n, n
                job.state, job.logits = state.to(self.model.device), logits
                if self.metrics:
                    self.metrics.cache_hits.inc()
                    self.metrics.cached_tokens.inc(n)
            else:
                job.state = self.model.zero_state(1)
            self.prefilling.append(job)

    def _segments_end(self, job: Job) -> int:
        """End of the next prompt segment: the next multiple of the chunk or checkpoint."""
        chunk_end = (job.pos // self.prefill_chunk + 1) * self.prefill_chunk
        ends = [c for c in job.checkpoints if c > job.pos] + [chunk_end, len(job.prompt)]
        return min(ends)

    def _prefill(self, budget: float) -> None:
        """Read prompt segments about one layer at a time (``model.forward_in_steps``) while the
        next step fits in ``budget`` seconds (at least one step a turn). Jobs whose next
        segments have the same length are read together, one row each (a batch of new short
        prompts costs about one call). A segment's steps are the same operations whichever
        turns they fall in, so its result does not depend on the load."""
        t0, last_step = time.perf_counter(), 0.0
        while self.prefilling:
            if self.reading is None:
                ready = [j for j in self.prefilling if j.pos >= len(j.prompt)]  # wholly cached prompts
                for job in ready:
                    self.prefilling.remove(job)
                    self._start_streams(job)
                if ready or not self.prefilling:
                    continue
                self.reading = self._next_segment()
            if time.perf_counter() - t0 + last_step > budget and last_step:
                return
            group, spans, steps = self.reading
            t_step = time.perf_counter()
            item = next(steps)
            last_step = time.perf_counter() - t_step
            if item is not None:
                self.reading = None
                self._segment_read(group, spans, *item)

    def _next_segment(self) -> tuple[list[Job], dict[Job, tuple[int, int]], Iterator]:
        spans = {job: (job.pos, self._segments_end(job)) for job in self.prefilling}
        length = spans[self.prefilling[0]][1] - spans[self.prefilling[0]][0]
        group = [j for j in self.prefilling if spans[j][1] - spans[j][0] == length][:self.max_streams]
        ids = torch.tensor([j.prompt[spans[j][0]:spans[j][1]] for j in group], device=self.model.device)
        state = group[0].state if len(group) == 1 else type(group[0].state).concat([j.state for j in group])
        return group, {j: spans[j] for j in group}, self.model.forward_in_steps(ids, state, last_only=True)

    def _segment_read(self, group: list[Job], spans: dict, logits: torch.Tensor, state: RecurrentState) -> None:
        for row, job in enumerate(group):
            if job not in self.prefilling:  # cancelled while its segment was read
                continue
            job.state = state if len(group) == 1 else state.select(row)
            job.logits, job.pos = logits[row, -1], spans[job][1]
            if job.pos in job.checkpoints or job.pos == len(job.prompt):
                self.cache.insert(job.prompt[:job.pos], job.state, job.logits)
            if job.pos >= len(job.prompt):
                self.prefilling.remove(job)
                self._start_streams(job)
        if self.metrics:
            self.metrics.prompt_tokens.inc(sum(b - a for a, b in spans.values()))

    def _start_streams(self, job: Job) -> None:
        for i in range(job.n):
            state = job.state if job.n == 1 else job.state.clone()
            s = Stream(job, i, state, self.tokenizer, self.vocab)
            self.streams.append(s)
            s.choose(job.logits)
            if s.closing and s.pending is None:
                self._leave(s)

    def _decode_step(self) -> None:
        members = [s for s in self.streams if s.pending is not None]
        state = self._batch_state(members)
        tokens = torch.tensor([s.pending for s in members], device=self.model.device)
        t0 = time.perf_counter()
        logits, state = self.model.step(tokens, state)
        self.step_seconds = time.perf_counter() - t0
        if self.metrics:
            self.metrics.step_time.observe(self.step_seconds)
        self.batch = (members, state)
        for row, s in enumerate(members):
            s.pending = None
            if s.closing:  # its last token is now fed: the reply's end goes to the cache
                self.cache.insert(s.job.prompt + s.tokens, state.select(row), logits[row])
                self._leave(s)
                continue
            s.choose(logits[row])
            if s.closing and s.pending is None:
                self._leave(s)

    def _batch_state(self, members: list[Stream]) -> RecurrentState:
        """The batched state of ``members``, rebuilt only when the batch changed."""
        if self.batch is not None and self.batch[0] == members:
            return self.batch[1]
        self._unbatch()
        return type(members[0].state).concat([s.state for s in members])

    def _unbatch(self) -> None:
        """Give each member of the last batch its own row back (before the batch changes)."""
        if self.batch is None:
            return
        old, state = self.batch
        for row, s in enumerate(old):
            if s in self.streams:
                s.state = state.select(row)
        self.batch = None

    def _leave(self, s: Stream) -> None:
        self._unbatch()
        self.streams.remove(s)
        if self.metrics:
            self.metrics.completion_tokens.inc(len(s.tokens))
        if not any(o.job is s.job for o in self.streams):
            s.job.done.set()

    def _report(self) -> None:
        if self.metrics:
            self.metrics.running.set(len(self.streams))
            self.metrics.waiting.set(len(self.waiting) + len(self.prefilling))
            self.metrics.cache_bytes.set(self.cache.bytes)
