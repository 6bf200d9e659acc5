"""The service's own Prometheus metrics, prefixed `tbcm_`, created inside the worker process.

BentoML serves /metrics from prometheus_client's multiprocess files, which only hold metrics created in the
worker after it set PROMETHEUS_MULTIPROC_DIR; objects created at import time in the parent would be lost
(BentoML #5056). So `worker_metrics()` is called from the service's `__init__`, once per process. Each
`tbcm serve` gives its server its own multiprocess folder (cli/service.py), so two servers on one host never
share or wipe each other's series.

Per-request stages (queue_wait, prompt_encoding: the text stage's work on its prompts, image_encoding) and
per-call stages (text_encoding: waiting for the call's prompts, then reading them; transformer, vae_decode: one
observation per generator call, whatever its size) are separate histograms, so a rate() of either family counts
one kind of event.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

# 1 ms to 5 s in steps of sqrt(2) (1, 1.4, 2, 2.8, 4, 5.7 ms, ...): percentiles resolved to within ~20% anywhere
LATENCY_BUCKETS = tuple(round(0.001 * 2 ** (i / 2), 6) for i in range(25)) + (5.0,)
BATCH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64)
REQUEST_STAGES = ("queue_wait", "prompt_encoding", "image_encoding")
BATCH_STAGES = ("text_encoding", "transformer", "vae_decode")
REJECT_REASONS = ("invalid", "not_found", "too_large", "unsupported_media_type", "queue_full", "deadline",
                  "timeout", "disconnected", "not_ready", "failed")
REJECT_LOG_INTERVAL_S = 60.0  # a summary of rejections is logged at most this often (INFO), when there were any

log = logging.getLogger("tbcm.service")


@dataclass
class Metrics:
    request_stage_seconds: object  # Histogram{stage}: queue_wait, prompt_encoding, image_encoding, per request
    batch_stage_seconds: object    # Histogram{stage}: text_encoding, transformer, vae_decode, one per generator call
    batch_size: object             # Histogram: images per generator call
    queue_depth: object            # Gauge: requests waiting for the generator
    images: object                 # Counter: images generated and returned
    rejected: object               # Counter{reason}: requests answered without images
    model_info: object             # Gauge{model, manifest_sha256}: 1 for the live model, 0 for models swapped out
    swaps: object                  # Counter: hot swaps that made a new model live
    swap_failures: object          # Counter: hot swaps refused or failed (the old model stayed live)
    prompt_cache_hits: object      # Counter: distinct prompts of a request already encoded (cached)
    prompt_cache_misses: object    # Counter: distinct prompts of a request that had to be encoded
    _recent: Counter = field(default_factory=Counter)  # rejections since the last summary line
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe_request_stage(self, stage: str, seconds: float) -> None:
        self.request_stage_seconds.labels(stage=stage).observe(seconds)

    def observe_batch_stage(self, stage: str, seconds: float) -> None:
        self.batch_stage_seconds.labels(stage=stage).observe(seconds)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()
        with self._lock:
            self._recent[reason] += 1

    def log_rejections(self) -> None:
        """One INFO line with the rejections by reason since the last call, if there were any."""
        with self._lock:
            recent, self._recent = self._recent, Counter()
        if recent:
            log.info("rejected in the last %.0f s: %s", REJECT_LOG_INTERVAL_S,
                     ", ".join(f"{reason} {count}" for reason, count in sorted(recent.items())))

    def set_live(self, old: tuple[str, str] | None, new: tuple[str, str]) -> None:
        """Mark (model, manifest hash) `new` live and `old` (if any) swapped out."""
        if old is not None and old != new:
            self.model_info.labels(model=old[0], manifest_sha256=old[1]).set(0)
        self.model_info.labels(model=new[0], manifest_sha256=new[1]).set(1)


@functools.lru_cache(maxsize=1)
def worker_metrics() -> Metrics:
    """The metrics of this process (created on first call; later calls return the same objects)."""
    from prometheus_client import Counter as PromCounter, Gauge, Histogram

    metrics = Metrics(
        request_stage_seconds=Histogram("tbcm_request_stage_seconds", "Seconds per request in a "
                                        "stage (queue_wait, prompt_encoding, image_encoding)", ["stage"],
                                        buckets=LATENCY_BUCKETS),
        batch_stage_seconds=Histogram("tbcm_batch_stage_seconds", "Seconds per generator call in a stage "
                                      "(text_encoding, transformer, vae_decode)", ["stage"], buckets=LATENCY_BUCKETS),
        batch_size=Histogram("tbcm_batch_size", "Images per generator call", buckets=BATCH_BUCKETS),
        queue_depth=Gauge("tbcm_queue_depth", "Requests waiting for the generator", multiprocess_mode="livesum"),
        images=PromCounter("tbcm_images_generated", "Images generated and returned"),
        rejected=PromCounter("tbcm_requests_rejected", "Requests answered without images, by reason", ["reason"]),
        model_info=Gauge("tbcm_model_info", "The live model (1) and models swapped out (0), with the SHA-256 of "
                         "their tbcm.json", ["model", "manifest_sha256"], multiprocess_mode="livemax"),
        swaps=PromCounter("tbcm_swaps", "Hot swaps that made a new model live"),
        swap_failures=PromCounter("tbcm_swap_failures", "Hot swaps refused or failed (the old model stayed live)"),
        prompt_cache_hits=PromCounter("tbcm_prompt_cache_hits", "Distinct prompts of a request found in "
                                      "the encoded-prompt cache"),
        prompt_cache_misses=PromCounter("tbcm_prompt_cache_misses", "Distinct prompts of a request that "
                                        "had to be encoded"),
    )
    for stage in REQUEST_STAGES:  # every series exists from the start, so dashboards and tests see zeros, not gaps
        metrics.request_stage_seconds.labels(stage=stage)
    for stage in BATCH_STAGES:
        metrics.batch_stage_seconds.labels(stage=stage)
    for reason in REJECT_REASONS:
        metrics.rejected.labels(reason=reason)
    return metrics
