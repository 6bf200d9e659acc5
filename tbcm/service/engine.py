"""The engine behind the HTTP routes: the live model (loaded in the background, hot-swappable), the batcher, and
one request's path through them (queue, generator call, image encoding), with its metrics.

Hot swap: the new model is loaded in a thread beside the old one and warmed up on the generator thread one call at
a time, with the live model's batches running between those calls, then becomes live with one reference
assignment; requests already queued keep the model they were validated against (see batcher.py), so no request
fails or changes model mid-flight. When the new model's text encoder encodes like the live one's, the new model
takes the live one's encoder, and with it the encoded-prompt cache; when its calls do the same work
(`same_costs`: same configs, dtypes, sizes), it takes the live one's call times too and warms up with one call per
size instead of one per step count (docs/operators.md section 5 has the numbers).
"""
from __future__ import annotations

import asyncio
import gc
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Awaitable, Callable

from PIL import Image

from tbcm.service.batcher import BatchResult, Batcher, Job, Rejected
from tbcm.service.config import ServiceConfig
from tbcm.models.pipeline import PipelineError, shown_path

from tbcm.service.metrics import REJECT_LOG_INTERVAL_S, Metrics
from tbcm.service.runtime import LoadedModel, check_swap_spec, load_model, rows_per_pass, same_costs, \
    same_text_encoder, warm_up_calls
from tbcm.service.schema import ImageRequest

log = logging.getLogger("tbcm.service")
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def freeze_heap() -> None:
    """Collect what is not frozen yet, then move every object alive now (the loaded models, torch, diffusers,
    BentoML) out of the cyclic collector's reach, so its collections under load walk only request garbage:
    unfrozen, they paused the worker for long enough to show in the p99. After a hot swap only the objects made
    since the last load are walked (a full walk holds the GIL for about 0.25 s on the CPU: every thread stalls);
    frozen objects are still freed by reference counting, and a model holds no reference cycle
    (`Generator` reaches its runners' functions through weak references), so a model swapped out is freed as
    soon as its last request ends."""
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
        config = replace(config, microbatch=rows_per_pass(config))  # the batcher rounds calls to the real pass size
        self.config, self.metrics = config, metrics
        self.model: LoadedModel | None = None
        self.error: str | None = None
        self.batcher = Batcher(config, metrics)
        self._encoder = ThreadPoolExecutor(config.encode_threads, thread_name_prefix="tbcm-encode")
        self._swap_lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._load_first, args=(on_fatal,), name="tbcm-load", daemon=True).start()
        threading.Thread(target=self._log_rejections, name="tbcm-log", daemon=True).start()

    def _log_rejections(self) -> None:
        while not self._closed.wait(REJECT_LOG_INTERVAL_S):
            self.metrics.log_rejections()

    def _load_first(self, on_fatal: Callable[[str], None]) -> None:
        log.info("loading model %r", self.config.model)
        try:
            self.model = self._load(self.config.model)
        except Exception as err:  # whatever stops the model loading stops the service, with the model's name
            self.error = f"cannot serve model {self.config.model!r}: {err}"
            on_fatal(self.error)
            return
        self.metrics.set_live(None, (self.model.spec, self.model.manifest_sha256))
        log.info("model %r live from %s after %.1f s (loaded and warmed up; manifest sha256 %s)", self.model.spec,
                 shown_path(self.model.pipe.path), self.model.load_seconds, self.model.manifest_sha256[:12])

    def _load(self, spec: str, live: LoadedModel | None = None) -> LoadedModel:
        """Load on this thread; take the live model's text encoder (and prompt cache) when it encodes alike; warm up
        on the generator thread, one call at a time, so the live model's batches run in between."""
        started = time.perf_counter()
        model = load_model(spec, self.config)
        if live is not None and same_text_encoder(live.pipe.text, model.pipe.text):
            model.pipe.text = live.pipe.text
            log.info("hot swap: %r shares the live model's text encoder and prompt cache", spec)
        loaded = time.perf_counter()
        inherit = live is not None and same_costs(live, model)
        if inherit:  # its calls cost what the live one's do: no timed warm-up calls
            model.times.seed_from(live.times)
        calls = warm_up_calls(model, timed=not inherit)
        for call in calls:
            self.batcher.call(call, alone=model.generator.captures_graphs).result()
        log.info("model %r loaded in %.2f s, warmed up in %.2f s (%d generator calls%s)", spec, loaded - started,
                 time.perf_counter() - loaded, len(calls), "; the live model's call times" if inherit else "")
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
            live = self.live_model()
            check_swap_spec(spec, self.config.root_list())
            model = self._load(spec, live)
        except PipelineError as err:
            self.metrics.swap_failures.inc()
            log.warning("hot swap to %r refused; %r stays live: %s", spec[:200], live.spec, str(err)[:500])
            raise
        finally:
            self._swap_lock.release()
        self.model = model
        self.metrics.swaps.inc()
        self.metrics.set_live((live.spec, live.manifest_sha256), (model.spec, model.manifest_sha256))
        log.info("hot swap: %r -> %r (%s, manifest sha256 %s) after %.1f s", live.spec, model.spec,
                 model.pipe.path, model.manifest_sha256[:12], model.load_seconds)
        return model

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
        self.metrics.observe_request_stage("image_encoding", encode_seconds)
        self.metrics.images.inc(len(images))
        return Answer(list(images), request.seeds, model, result, encode_seconds, time.monotonic() - arrived)

    def close(self) -> None:
        self._closed.set()
        self.batcher.close()
        self._encoder.shutdown(wait=False, cancel_futures=True)
