"""The in-process batcher: a bounded queue in front of ONE generator thread.

Admission (on the event loop, `submit`): a full queue answers 429 at once; a request whose estimated finish
(running batch + queued work + its own batch, from each model's batch-time model) is past its deadline answers
503 at once. Both carry Retry-After: the estimated seconds until the queue has drained.
Both deadline checks (admission and the drop before compute, below) stretch the estimate by `deadline_margin`:
a batch can take longer than the estimate (CPU contention, a slower GPU clock), and a request that then misses its
deadline is answered 504 after its compute was spent; the margin makes such requests 503 before compute instead.

The generator thread takes the oldest request and every later one with the same (model, steps, size) that fits
into `max_batch` images (guidance may differ per image) and whose prompts are encoded (see the text stage below),
and runs them as one generator call. While more than one microbatch of images waits, that limit is rounded down
to whole microbatches: the rest waits for the next call, where it fills padding rows, instead of adding a mostly
padded microbatch to this call. Right before the call it drops requests whose handler gave up (client
disconnected, or timed out) and answers 503 to those whose deadline the call would miss. Requests carry the model
they were validated against, so a hot swap never changes the model under a queued request: old requests finish on
the old model, new ones go to the new model.
Model warm-ups run on the same thread between batches (`call`, one warm-up call at a time).

The text stage (`text_stage`, on by default): a second thread encodes each admitted request's prompts into the
model's prompt cache as it arrives, so the prompts of queued requests are encoded while the generator thread runs
the transformer for earlier ones (text encoding is the largest cost per image on CPU: docs/results.md, Table 4).
The generator call waits for its requests' prompts, then finds them cached. A prompt's states do not depend on the
thread or on its company (TextEncoder encodes fixed-shape chunks), so images are the same with the stage off.
A warm-up call that captures CUDA graphs holds the device alone: the text thread waits while it runs (capture must
not overlap another thread's kernels); other warm-up calls (on the CPU) run beside the text stage, so a hot swap's
warm-up does not stop prompt encoding for the live model's requests.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from tbcm.service.config import ServiceConfig
from tbcm.service.metrics import Metrics
from tbcm.service.runtime import LoadedModel

log = logging.getLogger("tbcm.service")
EMA_TEXT = 0.2  # weight of the newest job in the text stage's running seconds per job


class Rejected(Exception):
    """A request answered without images: HTTP status, metrics reason, message, optional Retry-After seconds."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))


@dataclass(eq=False)
class Job:
    model: LoadedModel
    prompts: list[str]          # one per image
    seeds: list[int]
    guidance: list[float]
    steps: int
    size: int
    deadline: float             # time.monotonic() by which the answer must be out
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    text_ready: threading.Event = field(default_factory=threading.Event)  # its prompts are in the prompt cache

    @property
    def key(self) -> tuple:
        return self.model, self.steps, self.size

    @property
    def images(self) -> int:
        return len(self.seeds)


@dataclass
class BatchResult:
    images: torch.Tensor        # uint8 (n, H, W, 3), this request's rows of the batch
    batch_size: int             # images in the whole generator call
    timings: dict               # seconds per stage of the whole call (text_encoding, transformer, vae_decode)
    queue_wait: float           # seconds from arrival to the start of its call


class Batcher:
    def __init__(self, config: ServiceConfig, metrics: Metrics, clock: Callable[[], float] = time.monotonic):
        """`config.microbatch` is the generator's real pass size (the engine resolves 0 to the device's default)."""
        if config.microbatch < 1:
            raise ValueError(f"the batcher needs the generator's rows per pass, got microbatch {config.microbatch}")
        self.config, self.metrics = config, metrics
        self._clock = clock  # time.monotonic; tests pass a fake clock that a fake model advances
        self._queue: deque[Job] = deque()
        self._calls: deque[tuple[Callable, Future, bool]] = deque()  # (fn, its future, needs the device alone)
        self._after_call = False  # the last work was a call: queued jobs go before the next one
        self._cond = threading.Condition()
        self._running: tuple[float, float] | None = None  # (start, estimated seconds) of the call in progress
        self._closed = False
        self._text_jobs: deque[Job] = deque()  # admitted jobs whose prompts the text stage has not encoded yet
        self._text_seconds = 0.0  # the text stage's running seconds per job (EMA), for the backlog estimate
        self._device_alone = threading.Lock()  # held by a graph-capturing call, and by the text stage per encode
        self._thread = threading.Thread(target=self._loop, name="tbcm-generator", daemon=True)
        self._thread.start()
        if config.text_stage:
            threading.Thread(target=self._text_loop, name="tbcm-text", daemon=True).start()

    def state(self) -> dict:
        with self._cond:
            return {"waiting": len(self._queue), "running": self._running is not None,
                    "backlog_s": round(self._backlog(self._clock(), []), 3)}

    def submit(self, job: Job) -> None:
        """Queue a job or raise Rejected (429 queue full, 503 deadline cannot be met)."""
        with self._cond:
            now = self._clock()
            if self._closed:
                raise Rejected(503, "not_ready", "the service is shutting down", retry_after=1)
            if len(self._queue) >= self.config.max_queue:
                raise Rejected(429, "queue_full", f"the queue is full ({self.config.max_queue} requests waiting)",
                               retry_after=self._backlog(now, []))
            estimate = self._backlog(now, [job])
            if now + self.config.deadline_margin * estimate > job.deadline:
                raise Rejected(503, "deadline", f"cannot answer within {self.config.request_timeout_s:g} s "
                               f"(estimated {estimate:.2f} s, x{self.config.deadline_margin:g} safety margin)",
                               retry_after=self._backlog(now, []))
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            if self.config.text_stage:
                self._text_jobs.append(job)
            else:
                job.text_ready.set()  # the generator call encodes them itself
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            waiting, self._queue = list(self._queue), deque()
            calls, self._calls = list(self._calls), deque()
            for job in self._text_jobs:
                job.text_ready.set()  # a generator call waiting for one goes on (and fails or finishes) at once
            self._text_jobs.clear()
            self._cond.notify_all()
        for _, future, _ in calls:
            future.set_exception(RuntimeError("the service is shutting down"))
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Rejected(503, "not_ready", "the service is shutting down", retry_after=1))
        self._thread.join(timeout=60)

    def _batch_seconds(self, key: tuple, images: int) -> float:
        model, steps, size = key
        return model.times.estimate(steps, size, images)

    def _backlog(self, now: float, extra: list[Job]) -> float:
        """Estimated seconds until the running call, every queued job and `extra` are done (lock held): the
        generator's work, or the text stage's when that is longer (the two run side by side)."""
        text = self._text_seconds * (len(self._text_jobs) + len(extra)) if self.config.text_stage else 0.0
        total = 0.0 if self._running is None else max(0.0, sum(self._running) - now)
        images = Counter()
        for job in [*self._queue, *extra]:
            if not job.future.cancelled():
                images[job.key] += job.images
        for key, count in images.items():
            full, rest = divmod(count, self.config.max_batch)
            total += full * self._batch_seconds(key, self.config.max_batch)
            total += self._batch_seconds(key, rest) if rest else 0.0
        return max(total, text)

    def call(self, fn: Callable[[], object], alone: bool) -> Future:
        """Run `fn` on the generator thread before the next batch (model warm-up). With `alone` (a call that captures
        CUDA graphs) the text stage waits until it ends, so the capture never overlaps another thread's kernels;
        without, the text stage goes on encoding queued prompts beside it."""
        future = Future()
        with self._cond:
            self._calls.append((fn, future, alone))
            self._cond.notify_all()
        return future

    def _next_text_job(self) -> Job | None:
        """Block for the oldest admitted job whose prompts are not encoded yet (skipping given-up ones); None once
        closed."""
        with self._cond:
            while True:
                while self._text_jobs and self._text_jobs[0].future.done():  # given up, or answered already
                    self._text_jobs.popleft().text_ready.set()
                if self._text_jobs or self._closed:
                    break
                self._cond.wait()
            return None if self._closed else self._text_jobs.popleft()

    def _text_loop(self) -> None:
        while (job := self._next_text_job()) is not None:
            started = time.perf_counter()
            try:
                with self._device_alone:
                    self._encode_prompts(job)
            except Exception:  # logged; the generator call encodes them again and fails the request if it must
                log.exception("text stage: encoding a request's prompts failed")
            finally:
                job.text_ready.set()
            seconds = time.perf_counter() - started
            self.metrics.observe_request_stage("prompt_encoding", seconds)
            with self._cond:
                self._text_seconds += EMA_TEXT * (seconds - self._text_seconds)

    def _encode_prompts(self, job: Job) -> None:
        """Encode a job's distinct prompts into its model's cache, counting prompt-cache hits and misses."""
        distinct = list(dict.fromkeys(job.prompts))
        hits = job.model.encode_prompts(distinct)
        self.metrics.prompt_cache_hits.inc(hits)
        self.metrics.prompt_cache_misses.inc(len(distinct) - hits)

    def _next_work(self) -> tuple[Callable, Future, bool] | list[Job] | None:
        """Block for work: a pending call, else the oldest job plus every queued job that can share its generator
        call (never two calls in a row while jobs wait, so a warm-up of many calls cannot hold requests back);
        None once closed."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].future.cancelled():
                    self._queue.popleft()
                if self._calls or self._queue or self._closed:
                    break
                self.metrics.queue_depth.set(0)
                self._cond.wait()
            if self._closed:
                return None
            self._after_call = bool(self._calls) and not (self._after_call and self._queue)
            if self._after_call:
                return self._calls.popleft()
            head = self._queue.popleft()
            live = [job for job in self._queue if not job.future.cancelled()]
            # the head's prompts may still be encoding (the call waits for them); a later job joins only once its
            # prompts are encoded, so the call never waits for the text stage on its account
            joinable = {job for job in live if job.key == head.key and job.text_ready.is_set()}
            limit = self._call_limit(head, joinable)
            batch, images, kept = [head], head.images, deque()
            for job in live:
                if job in joinable and images + job.images <= limit:
                    batch.append(job)
                    images += job.images
                else:
                    kept.append(job)
            self._queue = kept
            self.metrics.queue_depth.set(len(kept))
            self._running = (self._clock(), self._batch_seconds(head.key, images))
            return batch

    def _call_limit(self, head: Job, same_key: set[Job]) -> int:
        """Most images for the call that `head` starts: max_batch, rounded down to whole microbatches while more
        than one microbatch is waiting (a part-filled microbatch is padded, and costs as much as a full one)."""
        rows, waiting = self.config.microbatch, head.images + sum(job.images for job in same_key)
        if waiting <= rows:
            return self.config.max_batch
        return max(head.images, min(self.config.max_batch, waiting) // rows * rows)

    def _loop(self) -> None:
        while (work := self._next_work()) is not None:
            if isinstance(work, tuple):
                fn, future, alone = work
                try:
                    with self._device_alone if alone else contextlib.nullcontext():
                        future.set_result(fn())
                except Exception as err:
                    future.set_exception(err)
                continue
            try:
                self._run(work)
            except Exception:  # a failed call fails its requests (500, logged here), never the generator thread
                log.exception("generator call failed (%d requests)", len(work))
                for job in work:
                    if not job.future.done():
                        job.future.set_exception(Rejected(500, "failed", "image generation failed; see the log"))
            finally:
                with self._cond:
                    self._running = None

    def _admit(self, batch: list[Job]) -> list[Job]:
        """The jobs still worth computing: not given up by their handler, and able to meet their deadline (with the
        batch taking deadline_margin times its estimate)."""
        now = self._clock()
        estimate = self._batch_seconds(batch[0].key, sum(job.images for job in batch))
        finish = now + self.config.deadline_margin * estimate
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # its handler cancelled it (client gone or timed out) and counted it
            if finish > job.deadline:
                job.future.set_exception(Rejected(503, "deadline", "dropped before compute: its batch would end "
                                                  "past the request's deadline", retry_after=finish - now))
                continue
            self.metrics.observe_request_stage("queue_wait", now - job.arrived)
            live.append(job)
        return live

    def _run(self, batch: list[Job]) -> None:
        live = self._admit(batch)
        if not live:
            return
        model, steps, size = live[0].key
        started = self._clock()
        waited = time.perf_counter()
        for job in live:
            if self.config.text_stage:
                job.text_ready.wait()
            else:
                self._encode_prompts(job)
        text_wait = time.perf_counter() - waited
        generation = model.generate([p for job in live for p in job.prompts], [s for job in live for s in job.seeds],
                                    steps, size, [g for job in live for g in job.guidance],
                                    self.config.simulated_delay_s)
        total = sum(job.images for job in live)
        self.metrics.batch_size.observe(total)
        # the call's time in text: waiting for its prompts (or encoding them), then reading them from the cache
        generation.timings["text_encoding"] = text_wait + generation.timings.get("text_encoding", 0.0)
        for stage, seconds in generation.timings.items():
            self.metrics.observe_batch_stage(stage, seconds)
        offset = 0
        for job in live:
            rows = generation.images[offset:offset + job.images]
            offset += job.images
            job.future.set_result(BatchResult(rows, total, generation.timings, started - job.arrived))
