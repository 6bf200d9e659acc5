"""ServiceConfig: every knob of the image service, defined once, with its comment as the help text.

`tbcm serve` turns each field into a `--option`; the worker reads each one back from the environment variable
`TBCM_<FIELD>` (e.g. `TBCM_MAX_BATCH=8`), so `bentoml serve service.service:TBCMService` takes the same knobs.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass

ENV_PREFIX = "TBCM_"
ADMIN_TOKEN_ENV = "TBCM_ADMIN_TOKEN"  # a secret, so an environment variable only, never a command-line option
IMAGE_FORMATS = ("png", "jpeg", "webp")


def parse_bool(text: str) -> bool:
    """An environment variable's boolean: 1/true/yes/on or 0/false/no/off (any case)."""
    word = text.strip().lower()
    if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"not a boolean: {text!r}")
    return word in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ServiceConfig:
    model: str = "student"  # pipeline folder, shipped name (student, teacher) or BentoML model-store tag (name:version)
    model_roots: str = ""  # folders, comma-separated, whose pipeline folders a hot swap may load (shipped names and
                           # model-store tags always may); empty: no folders
    sizes: str = ""  # allowed square image sizes in pixels, comma-separated; empty: the model's default size only
    max_batch: int = 4  # most images in one generator call (equal (steps, size) share one)
    microbatch: int = 0  # rows per transformer/VAE pass; calls are padded to a multiple, so an image never depends
                         # on its batch. 0: 1 on CPU (a pass costs what its rows cost, padding only wastes), 4 on
                         # CUDA (a padded pass costs little more than one row)
    max_queue: int = 64  # requests waiting for the generator; one more is answered 429 at once
    request_timeout_s: float = 10.0  # unanswered by then: 504; estimated to miss it: 503 up front
    deadline_margin: float = 1.25  # deadline checks stretch batch-time estimates by this (>= 1): 503 early, not 504
    max_n: int = 4  # most images per request
    max_prompt_chars: int = 2000  # longer prompts get 400 before tokenising (the encoder-token limit is the model's)
    max_guidance: float = 20.0  # guidance scale allowed in [0, max_guidance]
    max_body_bytes: int = 65536  # larger request bodies get 413
    default_format: str = "png"  # image format when a request names none: png, jpeg or webp
    default_quality: int = 90  # JPEG/WebP quality when a request names none (1-100)
    device: str = "auto"  # torch device for the generator: auto (cuda when present), cpu, cuda, cuda:1, ...
    threads: int = 0  # torch intra-op threads for the generator (0: CPU, all cores but one; CUDA, torch's default)
    encode_threads: int = 2  # threads encoding images to PNG/JPEG/WebP beside the generator
    text_stage: bool = True  # encode each request's prompts on arrival, in a thread beside the generator, so
                             # queued prompts are encoded while the transformer runs (off: in the call)
    access_log: bool = True  # BentoML's per-request access log line (the tbcm_* metrics count requests either way)
    switch_interval_ms: float = 1.0  # worker's GIL switch interval (0: Python's 5 ms); caps the generator's GIL waits
    simulated_delay_s: float = 0.0  # drills and tests only: extra seconds every batch takes after warm-up (keep 0)

    def __post_init__(self):
        positive = ("max_batch", "max_queue", "max_n", "max_prompt_chars", "max_body_bytes",
                    "encode_threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or min(self.simulated_delay_s, self.threads, self.switch_interval_ms,
                                              self.microbatch) < 0:
            raise ValueError("request_timeout_s must be > 0; simulated_delay_s, threads, switch_interval_ms, "
                             "microbatch >= 0")
        if self.deadline_margin < 1:
            raise ValueError(f"deadline_margin must be at least 1, got {self.deadline_margin}")
        if self.default_format not in IMAGE_FORMATS:
            raise ValueError(f"default_format must be one of {', '.join(IMAGE_FORMATS)}, got {self.default_format!r}")
        if not 1 <= self.default_quality <= 100:
            raise ValueError(f"default_quality must be between 1 and 100, got {self.default_quality}")
        self.size_list()

    def root_list(self) -> list[str]:
        """The model roots, each as an absolute path with symlinks resolved."""
        return [os.path.realpath(part.strip()) for part in self.model_roots.split(",") if part.strip()]

    def size_list(self) -> list[int]:
        """The sizes named in `sizes` (empty list: the model's default size only)."""
        try:
            return sorted({int(part) for part in self.sizes.split(",") if part.strip()})
        except ValueError:
            raise ValueError(f"sizes must be comma-separated integers, got {self.sizes!r}") from None

    def to_env(self) -> dict[str, str]:
        """The TBCM_* environment a worker needs to rebuild this config with `from_env`."""
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_env(cls, environ: typing.Mapping[str, str] = os.environ) -> "ServiceConfig":
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            text = environ.get(ENV_PREFIX + f.name.upper())
            if text is not None:
                try:
                    values[f.name] = parse_bool(text) if hints[f.name] is bool else hints[f.name](text)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={text!r} is not a valid "
                                     f"{hints[f.name].__name__}") from None
        return cls(**values)

