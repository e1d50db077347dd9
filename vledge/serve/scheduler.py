"""Request batching: requests that arrive within the batch window share one batched generation.

Small models are overhead-bound, so eight rows cost little more than one. The scheduler runs in one
thread of its own (ONNX Runtime releases the GIL, so the event loop keeps accepting and preprocessing
requests meanwhile). The window is only waited out while another request is being read or preprocessed
(one that could join); a lone request runs at once. Requests are grouped by what must be equal within one
``generate`` call (sampling settings, stop strings); each row keeps its own ``max_tokens``:
its tokens past that are not used, and once every row of a batch has its answer (own limit, stop token,
stop string, cancelled) the generation is ended early through the ``on_token`` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vledge.errors import RequestError
from vledge.generation import cut_at_stop
from vledge.runtime import GenerationOptions, Timings
from vledge.serve.metrics import ServerMetrics
from vledge.serve.options import ServeOptions

log = logging.getLogger(__name__)

_job_numbers = itertools.count()


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str  # OpenAI's: "stop" or "length"


@dataclass(eq=False)
class Job:
    """One request's row: what to run, and how its tokens and answer get back to the event loop."""

    pixels: np.ndarray | list  # float32 [3, S, S]; a tiled model: the images' tiles (ImagePreprocessor.tiles())
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    positions: int = 0  # the prompt's length in model positions (image tokens included)
    enqueued_at: float = field(default_factory=time.perf_counter)
    number: int = field(default_factory=lambda: next(_job_numbers))
    future: asyncio.Future = field(init=False)
    events: asyncio.Queue = field(init=False)  # token ids while streaming, then the Answer or an error
    tokens: list[int] = field(default_factory=list, init=False)
    cancelled: str | None = field(default=None, init=False)  # why, once given up ("disconnected", "deadline")
    stopped: bool = field(default=False, init=False)  # the model ended this row (stop token or stop string)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()
        self.events = asyncio.Queue()

    @property
    def group(self) -> tuple[Any, ...]:
        """Jobs with equal groups may share one generate call and get the answers they would get alone."""
        if self.temperature == 0:
            return ("greedy", self.stop)
        if self.seed is not None:  # one random stream per call: a seeded row is only reproducible alone
            return ("seeded", self.number)
        return ("sample", self.temperature, self.top_p, self.stop)

    @property
    def settled(self) -> bool:
        return self.cancelled is not None or self.stopped or len(self.tokens) >= self.max_tokens

    def cancel(self, reason: str) -> None:
        if self.cancelled is None and not self.future.done():
            self.cancelled = reason

    # called on the event loop (through call_soon_threadsafe)
    def _push(self, token: int) -> None:
        self.events.put_nowait(token)

    def _resolve(self, outcome: Answer | BaseException) -> None:
        if self.future.done():
            return
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
            self.future.exception()  # marked as retrieved: a job nobody waits for any more logs no warning
        else:
            self.future.set_result(outcome)
        self.events.put_nowait(outcome)


class _BatchSettled(Exception):
    """Raised from ``on_token`` to end a generation whose rows all have their answers."""


class Scheduler:
    """Gathers jobs into batches and runs them, one batch at a time, in a thread of its own.

    The thread takes the next batch as soon as one ends, without waiting for the event loop (which may be
    busy answering the last batch's clients and reading the next requests).
    """

    def __init__(self, model, options: ServeOptions, metrics: ServerMetrics) -> None:
        self.model = model
        self.options = options
        self.metrics = metrics
        self._waiting: deque[Job] = deque()
        self._changed = threading.Condition()  # guards _waiting, _closed and arriving
        self._closed = False
        self._thread: threading.Thread | None = None
        self.arriving = 0  # requests being read or preprocessed: the batch window waits only for those
        self._tokenizer = model.tokenizer
        # Left-padded rows share the longest prompt's positions: a batch must leave every row its own room.
        self._max_positions = model.info()["architecture"].get("max_positions")

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="vledge-batch", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._changed:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._changed.notify_all()
        for job in left:
            job._resolve(RequestError("the server is shutting down", status=503, code="shutting_down",
                                      retry_after_s=self.options.retry_after_s))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch (not counting those given up)."""
        with self._changed:
            return self._depth()

    def _depth(self) -> int:
        return sum(1 for job in self._waiting if job.cancelled is None)

    @contextlib.contextmanager
    def arrival(self):
        """Marks a request on its way to :meth:`submit`; while none is, a batch does not wait for more."""
        with self._changed:
            self.arriving += 1
        try:
            yield
        finally:
            with self._changed:
                self.arriving -= 1
                self._changed.notify_all()

    def cancel(self, job: Job, reason: str) -> None:
        """Give ``job`` up: dropped if still waiting, its row no longer counted if running."""
        with self._changed:
            job.cancel(reason)
            self.metrics.queue_depth.set(self._depth())
            self._changed.notify_all()  # a window waiting on this job ends now

    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse it with 429 when the queue is full."""
        with self._changed:
            if self._closed:
                raise RequestError("the server is shutting down", status=503, code="shutting_down",
                                   retry_after_s=self.options.retry_after_s)
            if self._depth() >= self.options.max_queue:
                raise RequestError(f"the server's queue is full ({self.options.max_queue} requests waiting); "
                                   "retry later", status=429, code="queue_full",
                                   retry_after_s=self.options.retry_after_s)
            self._waiting.append(job)
            self.metrics.queue_depth.set(self._depth())
            self._changed.notify_all()

    # ------------------------------------------------------------------ batch thread

    def _work(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            try:
                if jobs:
                    self._run_batch(jobs)
            except Exception as exc:  # _run_batch answers its jobs itself; the thread must never die
                log.exception("batch of %d failed", len(jobs))
                for job in jobs:
                    self._resolve(job, RequestError(f"generation failed: {exc}", status=500,
                                                    code="generation_failed"))

    def _next_batch(self) -> list[Job] | None:
        """The next batch to run ([] to look again), or None once the scheduler is stopped."""
        window = self.options.batch_window_ms / 1e3
        with self._changed:
            while self._waiting and self._waiting[0].cancelled is not None:
                self._waiting.popleft()  # given up while waiting: the next job's window starts now
            self.metrics.queue_depth.set(self._depth())
            if self._closed:
                return None
            if not self._waiting:
                self._changed.wait()
                return []
            first = self._waiting[0]
            if self.options.batching and window > 0:
                while (self._compatible_waiting(first) < self.options.max_batch and first.cancelled is None
                       and self.arriving > 0 and not self._closed):
                    left = first.enqueued_at + window - time.perf_counter()
                    if left <= 0:
                        break
                    self._changed.wait(left)
                if first.cancelled is not None or self._closed:
                    return []
            return self._take_batch()

    def _compatible_waiting(self, first: Job) -> int:
        return sum(1 for job in self._waiting if job.group == first.group and job.cancelled is None)

    def _take_batch(self) -> list[Job]:
        """The oldest job and the next compatible ones (up to max_batch); cancelled jobs are dropped here."""
        group = None
        batch: list[Job] = []
        kept: deque[Job] = deque()
        now = time.perf_counter()
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancelled is not None:
                continue
            if group is None:
                group = job.group
            if job.group == group and len(batch) < self.options.max_batch and self._fits(batch, job):
                batch.append(job)
                self.metrics.observe_stage("queue", now - job.enqueued_at)
            else:
                kept.append(job)
        self._waiting = kept
        self.metrics.queue_depth.set(len(kept))
        return batch

    def _fits(self, batch: list[Job], job: Job) -> bool:
        if not batch or self._max_positions is None:
            return True
        rows = [*batch, job]
        return max(r.positions for r in rows) + max(r.max_tokens for r in rows) <= self._max_positions

    # ------------------------------------------------------------------ worker-thread side

    def _run_batch(self, jobs: list[Job]) -> None:
        try:
            self._generate(jobs)
        except Exception as exc:
            if len(jobs) == 1 or any(job.tokens for job in jobs):
                log.exception("generation of a batch of %d failed", len(jobs))
                for job in jobs:
                    self._resolve(job, RequestError(f"generation failed: {exc}", status=500,
                                                    code="generation_failed"))
                return
            log.warning("a batch of %d failed (%s); answering its rows one by one", len(jobs), exc)
            for job in jobs:
                self._run_batch([job])

    def _generate(self, jobs: list[Job]) -> None:
        first = jobs[0]
        options = GenerationOptions(max_new_tokens=max(job.max_tokens for job in jobs), temperature=first.temperature,
                                    top_p=first.top_p if first.temperature > 0 else 1.0,
                                    seed=first.seed if first.temperature > 0 else None)
        tracker = _RowTracker(jobs)
        timings = Timings()
        self.metrics.batch_size.observe(len(jobs))
        started = time.perf_counter()
        results: Sequence[Any] | None = None
        try:
            prompts = [job.prompt for job in jobs]
            if isinstance(first.pixels, list):  # a tiled model: each row its own images and tiles
                results = self.model.generate_from_tiles([job.pixels for job in jobs], prompts, options, first.stop,
                                                         tracker.on_token, timings)
            else:
                results = self.model.generate_from_pixels(np.stack([job.pixels for job in jobs]), prompts, options,
                                                          first.stop, tracker.on_token, timings)
        except _BatchSettled:
            pass
        elapsed = time.perf_counter() - started
        vision_s, prefill_s = timings.vision_ms / 1e3, timings.prefill_ms / 1e3
        for stage, seconds in (("vision", vision_s), ("prefill", prefill_s),
                               ("decode", elapsed - vision_s - prefill_s)):
            for _ in jobs:
                self.metrics.observe_stage(stage, seconds)
        for row, job in enumerate(jobs):
            if job.cancelled is not None:
                continue
            result = results[row] if results is not None else None
            self._resolve(job, self._answer(job, result))

    def _answer(self, job: Job, result) -> Answer:
        tokens = job.tokens[: job.max_tokens]
        if result is not None and list(result.token_ids) == tokens:  # the row ran exactly as it would alone
            reason = "length" if result.finish_reason == "length" else "stop"
            return Answer(result.text, tokens, reason)
        text, stopped = cut_at_stop(self._tokenizer.decode(tokens), job.stop)
        reason = "length" if len(tokens) >= job.max_tokens and not stopped else "stop"
        return Answer(text.strip(), tokens, reason)

    def _resolve(self, job: Job, outcome: Answer | BaseException) -> None:
        if isinstance(outcome, Answer):
            self.metrics.completion_tokens.inc(len(outcome.token_ids))
        job.loop.call_soon_threadsafe(job._resolve, outcome)


class _RowTracker:
    """Collects each row's tokens (streaming them) and notices when every row of the batch has its answer.

    ``on_token`` is called for the live rows of each decode step in row order, so a call for a row at or
    before the previous call's row starts a new step, and a row that got no token in the previous step was
    ended by the model (stop token or stop string).
    """

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.step = 0
        self.last_row = -1
        self.lock = threading.Lock()

    def on_token(self, row: int, token: int) -> None:
        with self.lock:
            if row <= self.last_row:
                self.step += 1
                for job in self.jobs:
                    if len(job.tokens) < self.step and not job.settled:
                        job.stopped = True
            self.last_row = row
            job = self.jobs[row]
            if not job.settled:
                job.tokens.append(token)
                if job.stream:
                    job.loop.call_soon_threadsafe(job._push, token)
            if all(job.settled for job in self.jobs):
                raise _BatchSettled

