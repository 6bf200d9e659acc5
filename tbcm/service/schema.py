"""Request bodies -> ImageRequest, checked field by field against the service config and the live model.

Two schemas share the checks: the native `POST /generate` and OpenAI's `POST /v1/images/generations` (with our
extras seed, steps, guidance, negative_prompt as top-level fields). Every failure raises InvalidRequest naming
the field and what is allowed; fields that are accepted without effect are listed in `ImageRequest.ignored`.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from tbcm.models.generator import DEFAULT_GUIDANCE
from tbcm.models.text import PromptTooLong

from tbcm.service.config import IMAGE_FORMATS, ServiceConfig
from tbcm.service.runtime import LoadedModel

MAX_SEED = 2**32 - 1
# negative_prompt: the students' guidance is an embedded scalar (no CFG), and the teacher path guides against
# the empty prompt, so a negative prompt cannot change the image; accepted (tools send it) and reported ignored.
COMMON_FIELDS = ("prompt", "n", "seed", "steps", "guidance", "negative_prompt")
NATIVE_FIELDS = COMMON_FIELDS + ("size", "format", "quality")
OPENAI_FIELDS = COMMON_FIELDS + ("size", "response_format", "output_format", "output_compression", "background",
                                 "stream", "partial_images", "model", "quality", "style", "user", "moderation",
                                 "safety_identifier")
OPENAI_NO_EFFECT = ("model", "quality", "style", "user", "moderation", "safety_identifier")


class InvalidRequest(ValueError):
    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param, self.message = param, message


@dataclass
class ImageRequest:
    prompt: str
    n: int
    seed: int
    steps: int
    guidance: float
    size: int
    format: str
    quality: int
    ignored: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]


def _kind(value) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "number")


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, f"{name} must be an integer between {low} and {high}, got {_kind(value)}")
    if not low <= value <= high:
        raise InvalidRequest(name, f"{name} must be between {low} and {high}, got {value}")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(name, f"{name} must be a number between {low:g} and {high:g}, got {_kind(value)}")
    if not low <= value <= high:
        raise InvalidRequest(name, f"{name} must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _choice(body: dict, name: str, default, allowed: tuple):
    value = body.get(name)
    if value is None:
        return default
    if value not in allowed or type(value) not in {type(a) for a in allowed}:  # True == 1, but not here
        names = ", ".join(str(a).lower() for a in allowed)
        raise InvalidRequest(name, f"{name} must be one of {names}, got {value!r}")
    return value


def _text(body: dict, name: str, limit: int, required: bool) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(name, f"{name} must be a string of 1 to {limit} characters, got {_kind(value)}")
    if not value.strip():
        raise InvalidRequest(name, f"{name} must not be empty")
    if len(value) > limit:
        raise InvalidRequest(name, f"{name} is {len(value)} characters; at most {limit} are allowed")
    return value


def _check_fields(body, allowed: tuple) -> None:
    if not isinstance(body, dict):
        raise InvalidRequest(None, f"the body must be a JSON object, got {_kind(body)}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidRequest(unknown[0], f"unknown field {unknown[0]!r}; allowed fields: {', '.join(allowed)}")


def _common(body: dict, config: ServiceConfig, model: LoadedModel) -> dict:
    """The fields both schemas share, checked; the prompt against characters first, then encoder tokens."""
    prompt = _text(body, "prompt", config.max_prompt_chars, required=True)
    try:
        model.pipe.text.check(prompt)
    except PromptTooLong as err:
        raise InvalidRequest("prompt", str(err)) from None
    negative = _text(body, "negative_prompt", config.max_prompt_chars, required=False)
    gen = model.generator
    return dict(prompt=prompt, n=_integer(body, "n", 1, 1, config.max_n),
                seed=_integer(body, "seed", secrets.randbelow(MAX_SEED + 1), 0, MAX_SEED),
                steps=_integer(body, "steps", gen.default_steps, 1, gen.max_steps),
                guidance=_number(body, "guidance", DEFAULT_GUIDANCE, 0.0, config.max_guidance),
                ignored=[] if negative is None else ["negative_prompt"])


def parse_native(body, config: ServiceConfig, model: LoadedModel) -> ImageRequest:
    _check_fields(body, NATIVE_FIELDS)
    common = _common(body, config, model)
    size = _choice(body, "size", model.default_size, tuple(model.sizes))
    return ImageRequest(**common, size=size,
                        format=_choice(body, "format", config.default_format, IMAGE_FORMATS),
                        quality=_integer(body, "quality", config.default_quality, 1, 100))


def parse_openai(body, config: ServiceConfig, model: LoadedModel) -> ImageRequest:
    _check_fields(body, OPENAI_FIELDS)
    common = _common(body, config, model)
    _choice(body, "response_format", "b64_json", ("b64_json",))
    _choice(body, "background", "auto", ("auto", "opaque"))
    _choice(body, "stream", False, (False,))
    _choice(body, "partial_images", 0, (0,))
    for name in OPENAI_NO_EFFECT:
        _text(body, name, config.max_prompt_chars, required=False)
    common["ignored"] += [name for name in OPENAI_NO_EFFECT if body.get(name) is not None]
    size_text = body.get("size")
    size = model.default_size
    if size_text not in (None, "auto"):
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size_text) if isinstance(size_text, str) else None
        if not match or match.group(1) != match.group(2) or int(match.group(1)) not in model.sizes:
            allowed = ", ".join(f"{s}x{s}" for s in model.sizes)
            raise InvalidRequest("size", f"size must be auto or one of {allowed} for this model, got {size_text!r}")
        size = int(match.group(1))
    compression = _integer(body, "output_compression", 100 - config.default_quality, 0, 100)
    return ImageRequest(**common, size=size, format=_choice(body, "output_format", "png", IMAGE_FORMATS),
                        quality=max(1, 100 - compression))
