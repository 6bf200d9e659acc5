"""The service's own Prometheus metrics, prefixed `tbcm_`, created inside the worker process.

BentoML serves /metrics from prometheus_client's multiprocess files, which only hold metrics created in the
worker after it set PROMETHEUS_MULTIPROC_DIR; objects created at import time in the parent would be lost
(BentoML #5056). So `worker_metrics()` is called from the service's `__init__`, once per process.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

# 1 ms to 5 s in steps of sqrt(2) (1, 1.4, 2, 2.8, 4, 5.7 ms, ...): percentiles resolved to within ~20% anywhere
LATENCY_BUCKETS = tuple(round(0.001 * 2 ** (i / 2), 6) for i in range(25)) + (5.0,)
BATCH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64)
STAGES = ("queue_wait", "text_encoding", "transformer", "vae_decode", "image_encoding")
REJECT_REASONS = ("invalid", "too_large", "queue_full", "deadline", "timeout", "disconnected", "not_ready",
                  "failed")


@dataclass(frozen=True)
class Metrics:
    stage_seconds: object     # Histogram{stage}: queue_wait and image_encoding per request, the rest per batch
    batch_size: object        # Histogram: images per generator call
    queue_depth: object       # Gauge: requests waiting for the generator
    images: object            # Counter: images generated and returned
    rejected: object          # Counter{reason}: requests answered without images

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()


@functools.lru_cache(maxsize=1)
def worker_metrics() -> Metrics:
    """The metrics of this process (created on first call; later calls return the same objects)."""
    from prometheus_client import Counter, Gauge, Histogram

    metrics = Metrics(
        stage_seconds=Histogram("tbcm_stage_seconds", "Seconds spent per stage of image generation",
                                ["stage"], buckets=LATENCY_BUCKETS),
        batch_size=Histogram("tbcm_batch_size", "Images per generator call",
                             buckets=BATCH_BUCKETS),
        queue_depth=Gauge("tbcm_queue_depth", "Requests waiting for the generator", multiprocess_mode="livesum"),
        images=Counter("tbcm_images_generated", "Images generated and returned"),
        rejected=Counter("tbcm_requests_rejected", "Requests answered without images, by reason", ["reason"]),
    )
    for stage in STAGES:  # every series exists from the start, so dashboards and tests see zeros, not gaps
        metrics.stage_seconds.labels(stage=stage)
    for reason in REJECT_REASONS:
        metrics.rejected.labels(reason=reason)
    return metrics
