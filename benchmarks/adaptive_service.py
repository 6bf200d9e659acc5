"""The one-step generator behind BentoML's own adaptive batching, as BentoML documents it, for the side-by-side
with our batcher and routes (`benchmarks/bench_adaptive.py`; docs/operators.md section 4).

A batchable API takes one list argument, so a request is `{"prompt": ["..."]}` (no seed, size or steps: every
image uses seed 0, and the work of a call does not depend on its seeds). BentoML groups the lists of concurrent
requests into one call of up to 4 prompts (`max_batch_size`, our `max_batch`); a call encodes its prompts (the
text encoder's cache answers a repeated one, as ours does), runs the generator at one row a pass (our
CPU default) and encodes PNGs, answered in base64 in a JSON list (a JSON list cannot hold bytes). Torch threads:
every core but one, as `tbcm serve` on CPU.

    TBCM_MODEL=student bentoml serve benchmarks.adaptive_service:Images --port 3000
"""
from __future__ import annotations

import base64
import io
import os

import bentoml
from PIL import Image

MAX_BATCH = 4  # images per call, as ServiceConfig.max_batch
MAX_LATENCY_MS = 10_000  # BentoML sheds with 503 a request it expects to miss this (ServiceConfig.request_timeout_s)


@bentoml.service(workers=1, traffic={"timeout": 60})
class Images:  # one worker process, as `tbcm serve`
    def __init__(self) -> None:
        import torch

        from tbcm.models.generator import Generator
        from tbcm.models.pipeline import load_pipeline
        from tbcm.service.runtime import resolve_spec

        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        self.generator = Generator(load_pipeline(resolve_spec(os.environ.get("TBCM_MODEL", "student"))), microbatch=1)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def generate(self, prompt: list[str]) -> list[str]:
        images = self.generator.generate(prompt, [0] * len(prompt)).images
        return [png(image) for image in images]


def png(pixels) -> str:
    out = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()
