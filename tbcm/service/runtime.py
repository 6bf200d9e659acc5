"""A served model: the pipeline, its generator, the limits requests are checked against, and its batch-time model.

`load_model` resolves a model spec (shipped name, pipeline folder, or BentoML model-store tag) and loads it;
`warm_up` runs it at every step count a request may use cheaply and times each call, so the batch-time model can
predict from the first request on whether a deadline can be met.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tbcm.models.generator import DEFAULT_GUIDANCE, Generator
from tbcm.models.pipeline import Pipeline, PipelineError, load_pipeline, resolve_model

from tbcm.service.config import ServiceConfig

WARMUP_PROMPT = "a small red circle in the middle"
WARMUP_STEPS = 4  # warm up (and time) step counts 1..this, as far as the model allows; others are extrapolated
EMA_WEIGHT = 0.3  # weight of a faster newest batch in the running per-chunk time (slower ones count fully)


def resolve_spec(spec: str) -> Path:
    """A shipped name or pipeline folder, else a BentoML model-store tag -> the pipeline folder."""
    try:
        return resolve_model(spec)
    except PipelineError as folder_error:
        import bentoml
        from bentoml.exceptions import BentoMLException, NotFound

        try:
            return Path(bentoml.models.get(spec).path)
        except (NotFound, BentoMLException, ValueError):
            raise PipelineError(f"model {spec!r}: {folder_error}; and no BentoML model-store tag {spec!r} "
                                f"(see `bentoml models list`)") from None


class BatchTimeModel:
    """Seconds one generator call takes, learned from the calls themselves.

    A call of n images runs ceil(n / microbatch) fixed-shape chunks, so the model keeps seconds per chunk for every
    (steps, size): a slower call replaces it at once (shedding must react to a slowdown before the queue does), a
    faster one pulls it down by EMA_WEIGHT. An unseen (steps, size) borrows the closest seen one, scaled by steps and
    by pixel count (an over-estimate for extra steps, since text encoding and VAE decoding do not grow with steps).
    """

    def __init__(self, microbatch: int):
        self.microbatch = microbatch
        self._per_chunk: dict[tuple[int, int], float] = {}
        self._lock = threading.Lock()

    def chunks(self, images: int) -> int:
        return math.ceil(images / self.microbatch)

    def observe(self, steps: int, size: int, images: int, seconds: float) -> None:
        per_chunk = seconds / self.chunks(images)
        with self._lock:
            old = self._per_chunk.get((steps, size))
            slower = old is None or per_chunk > old  # follow slowdowns at once, speed-ups gradually
            self._per_chunk[(steps, size)] = per_chunk if slower else old + EMA_WEIGHT * (per_chunk - old)

    def estimate(self, steps: int, size: int, images: int) -> float:
        with self._lock:
            known = dict(self._per_chunk)
        if not known:
            return 0.0
        if (steps, size) in known:
            per_chunk = known[(steps, size)]
        else:
            near_steps, near_size = min(known, key=lambda k: (abs(k[1] - size), abs(k[0] - steps)))
            per_chunk = known[(near_steps, near_size)] * steps / near_steps * (size / near_size) ** 2
        return per_chunk * self.chunks(images)


@dataclass(eq=False)
class LoadedModel:
    spec: str                      # what the operator asked for (name, folder or tag)
    pipe: Pipeline
    generator: Generator
    sizes: list[int]               # allowed square sizes, the default first
    times: BatchTimeModel
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0

    @property
    def default_size(self) -> int:
        return self.sizes[0]

    @property
    def kind(self) -> str:
        return "student" if self.pipe.is_student else "teacher"

    def describe(self) -> dict:
        """What /info shows about the live model."""
        return {"spec": self.spec, "path": str(self.pipe.path), "kind": self.kind, "manifest": self.pipe.info,
                "sizes": self.sizes, "default_steps": self.generator.default_steps,
                "max_steps": self.generator.max_steps, "max_prompt_tokens": self.pipe.text.max_length,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
                "load_seconds": round(self.load_seconds, 3)}

    def generate(self, prompts: list[str], seeds: list[int], steps: int, size: int, guidance: list[float],
                 delay_s: float = 0.0):
        """One generator call (after `delay_s` of simulated extra device time), timed into the batch-time model."""
        started = time.perf_counter()
        time.sleep(delay_s)
        generation = self.generator.generate(prompts, seeds, steps=steps, guidance=guidance, size=size)
        self.times.observe(steps, size, len(prompts), time.perf_counter() - started)
        return generation


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def generator_threads(config: ServiceConfig) -> int:
    """Torch intra-op threads for the generator: `threads` if set; else, on CPU, every core but one, which the HTTP
    worker, JSON and image encoding need (with 2 torch threads on a 2-core CPU they fought the model's threads:
    results.md, Table 4); else 0, torch's default."""
    if config.threads:
        return config.threads
    return max(1, (os.cpu_count() or 2) - 1) if pick_device(config.device).type == "cpu" else 0


def load_model(spec: str, config: ServiceConfig) -> LoadedModel:
    """Load (not yet warmed up); raises PipelineError (a ValueError) naming the model when it cannot be served."""
    path = resolve_spec(spec)
    try:
        pipe = load_pipeline(path, device=pick_device(config.device))
    except PipelineError as err:
        raise PipelineError(f"model {spec!r}: {err}") from None
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise PipelineError(f"model {spec!r} ({path}): cannot be loaded: {err}") from None
    generator = Generator(pipe, microbatch=config.microbatch)
    sizes = [pipe.default_size] + [s for s in config.size_list() if s != pipe.default_size]
    for size in sizes:
        try:
            generator.check(generator.default_steps, size)
        except ValueError as err:
            raise PipelineError(f"model {spec!r}: configured sizes: {err}") from None
    return LoadedModel(spec, pipe, generator, sizes, BatchTimeModel(config.microbatch))


def warm_up(model: LoadedModel) -> None:
    """Run each cheap step count once to pay one-time costs, then once more, timed, to seed the time model."""
    gen = model.generator
    step_counts = range(1, min(WARMUP_STEPS, gen.max_steps) + 1) if model.pipe.is_student else [gen.default_steps]
    rows = gen.microbatch
    prompts, seeds, guidance = [WARMUP_PROMPT] * rows, list(range(rows)), [DEFAULT_GUIDANCE] * rows
    for steps in step_counts:
        for size in model.sizes:
            gen.generate(prompts, seeds, steps=steps, guidance=guidance, size=size)  # one-time costs, untimed
            model.generate(prompts, seeds, steps, size, guidance)
