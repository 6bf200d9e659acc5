"""A served model: the pipeline, its generator, the limits requests are checked against, and its batch-time model.

`load_model` resolves a model spec (shipped name, pipeline folder, or BentoML model-store tag) and loads it;
`warm_up_calls` are the calls that run it at every step count a request may use cheaply and time each one, so the
batch-time model can predict from the first request on whether a deadline can be met.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tbcm.models.generator import DEFAULT_GUIDANCE, Generator
from tbcm.models.pipeline import SHIPPED, Pipeline, PipelineError, load_pipeline, resolve_model
from tbcm.models.text import TextEncoder

from tbcm.service.config import ServiceConfig

WARMUP_PROMPT = "a small red circle in the middle"
WARMUP_STEPS = 4  # warm up (and time) step counts 1..this, as far as the model allows; others are extrapolated
EMA_WEIGHT = 0.3  # weight of a faster newest batch in the running per-chunk time (slower ones count fully)


class ModelNotFound(PipelineError):
    """No shipped name, folder or model-store tag of that name."""


def resolve_spec(spec: str) -> Path:
    """A shipped name or pipeline folder, else a BentoML model-store tag -> the pipeline folder; ModelNotFound
    when it is neither."""
    try:
        return resolve_model(spec)
    except PipelineError as folder_error:
        import bentoml
        from bentoml.exceptions import BentoMLException, NotFound

        try:
            return Path(bentoml.models.get(spec).path)
        except (NotFound, BentoMLException, ValueError):
            raise ModelNotFound(f"model {spec!r}: {folder_error}; and no BentoML model-store tag {spec!r} "
                                f"(see `bentoml models list`)") from None


class OutsideModelRoots(PipelineError):
    """A hot swap named a folder outside the configured model roots."""


def check_swap_spec(spec: str, roots: list[str]) -> None:
    """A swap may name a shipped model, a model-store tag (name:version) or a folder under one of `roots`; the
    check reads nothing from disk, so its error says nothing about what exists there."""
    if spec in SHIPPED or (":" in spec and "/" not in spec and os.sep not in spec):
        return
    path = os.path.realpath(spec)
    if not any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        where = ", ".join(roots) if roots else "none are configured"
        shipped = ", ".join(sorted(SHIPPED))
        raise OutsideModelRoots(f"model {spec[:200]!r}: a hot swap may load a shipped name ({shipped}), a model-store"
                                f" tag, or a folder under the model roots (TBCM_MODEL_ROOTS: {where})")


def manifest_sha256(pipe: Pipeline) -> str:
    """SHA-256 of the folder's tbcm.json as stored (of its parsed contents when the folder has none)."""
    if pipe.path is not None and (pipe.path / "tbcm.json").exists():
        return folder_manifest_sha256(pipe.path)
    return hashlib.sha256(json.dumps(pipe.info, sort_keys=True).encode()).hexdigest()


def folder_manifest_sha256(folder: Path) -> str:
    """What /info reports as manifest_sha256 for a model served from `folder` (read here, without loading it)."""
    manifest = Path(folder) / "tbcm.json"
    data = manifest.read_bytes() if manifest.exists() else json.dumps({}).encode()
    return hashlib.sha256(data).hexdigest()


def same_text_encoder(a: TextEncoder, b: TextEncoder) -> bool:
    """Whether two text encoders encode every prompt alike: same tokenizer vocabulary, length, instruction, class
    and weights (compared tensor by tensor), on the same device."""
    if (a.max_length, a.complex_human_instruction, type(a.encoder), a.device) != \
            (b.max_length, b.complex_human_instruction, type(b.encoder), b.device):
        return False
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        return False
    ours, theirs = a.encoder.state_dict(), b.encoder.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


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

    def seed_from(self, other: "BatchTimeModel") -> None:
        """Start from `other`'s times: a model whose calls cost what `other`'s model's do (`same_costs`)."""
        with other._lock:
            known = dict(other._per_chunk)
        with self._lock:
            self._per_chunk.update(known)

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
    manifest_sha256: str = ""
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
                "manifest_sha256": self.manifest_sha256,
                "sizes": self.sizes, "default_steps": self.generator.default_steps,
                "max_steps": self.generator.max_steps, "max_prompt_tokens": self.pipe.text.max_length,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
                "load_seconds": round(self.load_seconds, 3)}

    def encode_prompts(self, prompts: list[str]) -> int:
        """Encode these distinct prompts into the text encoder's cache; returns how many were cached already."""
        hits = sum(self.pipe.text.is_cached(prompt) for prompt in prompts)
        self.pipe.text.encode(prompts)
        return hits

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


CPU_ROWS_PER_PASS, CUDA_ROWS_PER_PASS = 1, 4  # microbatch 0's meaning (operators.md section 6 has the numbers)


def rows_per_pass(config: ServiceConfig) -> int:
    """Rows per transformer/VAE pass: `microbatch` if set; else 1 on CPU, where a padded row costs as much as a real
    one (one client's p50 42 ms over HTTP against 65 ms padded to 4 rows, for 5% less 16-client throughput:
    operators.md section 6), and 4 on CUDA, where a pass of 4 costs little more than one."""
    if config.microbatch:
        return config.microbatch
    return CPU_ROWS_PER_PASS if pick_device(config.device).type == "cpu" else CUDA_ROWS_PER_PASS


def load_model(spec: str, config: ServiceConfig) -> LoadedModel:
    """Load (not yet warmed up); raises PipelineError (a ValueError) naming the model when it cannot be served."""
    path = resolve_spec(spec)
    try:
        pipe = load_pipeline(path, device=pick_device(config.device))
    except PipelineError as err:
        raise PipelineError(f"model {spec!r}: {err}") from None
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise PipelineError(f"model {spec!r} ({path}): cannot be loaded: {err}") from None
    generator = Generator(pipe, microbatch=rows_per_pass(config))
    sizes = [pipe.default_size] + [s for s in config.size_list() if s != pipe.default_size]
    for size in sizes:
        try:
            generator.check(generator.default_steps, size)
        except ValueError as err:
            raise PipelineError(f"model {spec!r}: configured sizes: {err}") from None
    return LoadedModel(spec, pipe, generator, sizes, BatchTimeModel(generator.microbatch),
                       manifest_sha256(pipe))


def same_costs(a: LoadedModel, b: LoadedModel) -> bool:
    """Whether a generator call of `b` does the work of the same call of `a`: the same transformer and VAE
    configs (the weights' values change no operation), dtypes, sizes, rows per pass, device and graph capture."""
    def costs(model: LoadedModel) -> tuple:
        pipe = model.pipe
        configs = [{k: v for k, v in module.config.items() if not k.startswith("_")}
                   for module in (pipe.transformer, pipe.vae)]
        return (configs, pipe.transformer.dtype, pipe.vae.dtype, model.sizes, model.generator.microbatch,
                pipe.text.device, model.generator.captures_graphs)
    return costs(a) == costs(b)


def warm_up_calls(model: LoadedModel, timed: bool = True) -> list[Callable[[], object]]:
    """The warm-up, as separate generator calls: per size, one untimed call at the default step count to pay the
    one-time costs (the weights' first use; with CUDA the capture of the one-step and decode graphs, which every
    step count shares), then, if `timed`, each cheap step count once, timed, to seed the time model (a hot swap to
    a model of the live one's `same_costs` takes the live one's times instead). Run one by one on the generator
    thread, they let the live model's batches run between them (a hot swap does not stall serving for the whole
    warm-up)."""
    gen = model.generator
    step_counts = range(1, min(WARMUP_STEPS, gen.max_steps) + 1) if model.pipe.is_student else [gen.default_steps]
    step_counts = step_counts if timed else []
    rows = gen.microbatch
    prompts, seeds, guidance = [WARMUP_PROMPT] * rows, list(range(rows)), [DEFAULT_GUIDANCE] * rows
    calls = []
    for size in model.sizes:
        calls.append(functools.partial(gen.generate, prompts, seeds, steps=gen.default_steps, guidance=guidance,
                                       size=size))
        calls += [functools.partial(model.generate, prompts, seeds, steps, size, guidance) for steps in step_counts]
    return calls
