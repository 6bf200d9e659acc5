"""The engine behind the HTTP routes: the live model (loaded in the background, hot-swappable), the batcher, and
one request's path through them (queue, generator call, image encoding), with its metrics.

Hot swap: the new model is loaded in a thread beside the old one, warmed up on the generator thread between
two batches, then becomes live with one reference assignment; requests already queued keep the model they were
validated against (see batcher.py), so no request fails or changes model mid-flight.
"""
from __future__ import annotations

import asyncio
import gc
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable

from PIL import Image

from tbcm.service.batcher import BatchResult, Batcher, Job, Rejected
from tbcm.service.config import ServiceConfig
from tbcm.service.metrics import Metrics
from tbcm.service.runtime import LoadedModel, load_model, warm_up
from tbcm.service.schema import ImageRequest

log = logging.getLogger("tbcm.service")
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def freeze_heap() -> None:
    """Move every object alive now (the loaded models, torch, diffusers, BentoML) out of the cyclic collector's
    reach, so its full collections under load walk only request garbage: unfrozen, they paused the worker for long
    enough to show in the p99. Objects freed by reference counting are still freed; cyclic garbage frozen here (an
    old model's, after a hot swap) is collected at the next load."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class SwapInProgress(RuntimeError):
    """Another hot swap is loading; one at a time."""


@dataclass
class Answer:
    images: list[bytes]        # encoded, one per seed
    seeds: list[int]
    model: LoadedModel
    batch: BatchResult
    encode_seconds: float
    total_seconds: float       # from the handler's start to the encoded answer (Server-Timing "total")


def encode_image(pixels, fmt: str, quality: int) -> bytes:
    """uint8 (H, W, 3) -> PNG/JPEG/WebP bytes (PNG is lossless and byte-for-byte deterministic)."""
    out = io.BytesIO()
    options = {} if fmt == "png" else {"quality": quality}
    Image.fromarray(pixels.numpy()).save(out, format=PIL_FORMATS[fmt], **options)
    return out.getvalue()


class Engine:
    def __init__(self, config: ServiceConfig, metrics: Metrics, on_fatal: Callable[[str], None]):
        self.config, self.metrics = config, metrics
        self.model: LoadedModel | None = None
        self.error: str | None = None
        self.batcher = Batcher(config, metrics)
        self._encoder = ThreadPoolExecutor(config.encode_threads, thread_name_prefix="tbcm-encode")
        self._swap_lock = threading.Lock()
        threading.Thread(target=self._load_first, args=(on_fatal,), name="tbcm-load", daemon=True).start()

    def _load_first(self, on_fatal: Callable[[str], None]) -> None:
        log.info("loading model %r", self.config.model)
        try:
            self.model = self._load(self.config.model)
        except Exception as err:  # whatever stops the model loading stops the service, with the model's name
            self.error = f"cannot serve model {self.config.model!r}: {err}"
            on_fatal(self.error)
            return
        log.info("model %r live from %s after %.1f s (loaded and warmed up)", self.model.spec,
                 self.model.pipe.path, self.model.load_seconds)

    def _load(self, spec: str) -> LoadedModel:
        """Load on this thread, warm up on the generator thread (between batches)."""
        started = time.perf_counter()
        model = load_model(spec, self.config)
        self.batcher.call(lambda: warm_up(model)).result()
        freeze_heap()
        model.load_seconds = time.perf_counter() - started
        return model

    @property
    def ready(self) -> bool:
        return self.model is not None

    def live_model(self) -> LoadedModel:
        model = self.model
        if model is None:
            raise Rejected(503, "not_ready", self.error or "the model is still loading", retry_after=5)
        return model

    def swap(self, spec: str) -> LoadedModel:
        """Load and warm up `spec` beside the live model, then make it live (blocking; run it in a thread)."""
        if not self._swap_lock.acquire(blocking=False):
            raise SwapInProgress("a hot swap is already in progress")
        try:
            model = self._load(spec)
            old, self.model = self.model, model
            log.info("hot swap: %s -> %s (%s) after %.1f s", old and old.spec, model.spec, model.pipe.path,
                     model.load_seconds)
            return model
        finally:
            self._swap_lock.release()

    def info(self) -> dict:
        model = self.model
        return {"ready": model is not None, "error": self.error, "model": model and model.describe(),
                "queue": self.batcher.state()}

    async def run(self, request: ImageRequest, model: LoadedModel, arrived: float,
                  disconnected: Callable[[], Awaitable[None]]) -> Answer:
        """Queue, wait (until done, timeout -> 504, or client gone -> dropped), encode; Rejected on any refusal."""
        deadline = arrived + self.config.request_timeout_s
        job = Job(model, [request.prompt] * request.n, request.seeds, [request.guidance] * request.n,
                  request.steps, request.size, deadline, arrived=arrived)
        self.batcher.submit(job)
        done = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({done, gone}, timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not done.done():
            job.future.cancel()  # still queued: the batcher drops it; already computing: the result is dropped
            if gone.done() and not gone.cancelled():
                raise Rejected(499, "disconnected", "the client disconnected before its images were ready")
            raise Rejected(504, "timeout", f"no answer within {self.config.request_timeout_s:g} s")
        result = done.result()  # raises the batcher's Rejected (503 deadline, 500 failed)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        images = await asyncio.gather(*(loop.run_in_executor(self._encoder, encode_image, pixels,
                                                             request.format, request.quality)
                                        for pixels in result.images))
        encode_seconds = time.perf_counter() - started
        self.metrics.observe_stage("image_encoding", encode_seconds)
        self.metrics.images.inc(len(images))
        return Answer(list(images), request.seeds, model, result, encode_seconds, time.monotonic() - arrived)

    def close(self) -> None:
        self.batcher.close()
        self._encoder.shutdown(wait=False, cancel_futures=True)
