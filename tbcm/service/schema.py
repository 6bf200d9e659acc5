"""The API's bodies, declared once as pydantic models: requests are validated with them, responses are built with
them, and the OpenAPI document (service/openapi.py) is generated from them.

The request models depend on the service config and the live model (sizes, step range, n, prompt limits), so
`request_models(limits)` builds them for the `Limits` of the moment; a hot swap gives new limits, and so a new
document. Every validation failure becomes one InvalidRequest naming the field and what is allowed; fields that
are accepted without effect are listed in `ImageRequest.ignored`.
"""
from __future__ import annotations

import functools
import json
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from tbcm.models.generator import DEFAULT_GUIDANCE
from tbcm.models.text import PromptTooLong

from tbcm.service.config import IMAGE_FORMATS, ServiceConfig
from tbcm.service.runtime import LoadedModel

MAX_SEED = 2**32 - 1
MAX_INT_DIGITS = 40  # longer JSON integers are read as infinity (refused by every field), never parsed in full
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
# negative_prompt: the students' guidance is an embedded scalar (no CFG), and the teacher path guides against
# the empty prompt, so a negative prompt cannot change the image; accepted (tools send it) and reported ignored.
OPENAI_NO_EFFECT = ("model", "quality", "style", "user", "moderation", "safety_identifier")


class InvalidRequest(ValueError):
    def __init__(self, param: str | None, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.message, self.status, self.code = param, message, status, code


def unicode_text(value: str) -> str:
    """Text the tokenizer can take: no unpaired surrogate (valid JSON, e.g. "\\ud800", but not Unicode)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"must be valid Unicode text; character {err.start} is an unpaired surrogate") from None
    return value


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def json_integer(value):
    """JSON Schema's integer: an integral number, so 4.0 is one (and is read as 4); 4.5, "4" and true are not (strict
    int refuses them)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_boolean(value):
    """Only true or false: a Literal compares by equality, so Literal[False] alone would take 0 and 0.0."""
    if not isinstance(value, bool):
        raise ValueError(f"must be a boolean, got {kind(value)}")
    return value


Text = Annotated[str, AfterValidator(unicode_text)]
Integer = Annotated[int, BeforeValidator(json_integer)]  # every integer field: its schema says "integer"
OptionalInteger = Annotated[Optional[int], BeforeValidator(json_integer)]  # not Optional[Integer]: pydantic then
                                                                          # writes ge/le, not minimum/maximum


@dataclass(frozen=True)
class Limits:
    """What a request is checked against: the config's limits and the live model's."""
    model_id: str
    max_prompt_chars: int
    max_prompt_tokens: int
    max_n: int
    default_steps: int
    max_steps: int
    max_guidance: float
    sizes: tuple[int, ...]  # the default first
    default_format: str
    default_quality: int

    @classmethod
    def of(cls, config: ServiceConfig, model: LoadedModel) -> "Limits":
        return cls(model.spec, config.max_prompt_chars, model.pipe.text.max_length, config.max_n,
                   model.generator.default_steps, model.generator.max_steps, config.max_guidance,
                   tuple(model.sizes), config.default_format, config.default_quality)


@functools.lru_cache(maxsize=16)
def request_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    """(native /generate body, OpenAI /v1/images/generations body) for these limits."""
    prompt_help = (f"{limits.max_prompt_chars} characters at most, and at most {limits.max_prompt_tokens} encoder "
                   f"tokens (the model's max_sequence_length, special tokens included; longer prompts get 400)")
    prompt = Annotated[Text, AfterValidator(not_blank), Field(min_length=1, max_length=limits.max_prompt_chars,
                                                              description=prompt_help)]
    negative = Annotated[Optional[Text], Field(None, max_length=limits.max_prompt_chars, description=(
        "accepted and has no effect (embedded guidance; reported in X-Ignored-Fields)"))]
    common = dict(
        prompt=(prompt, ...),
        n=(Integer, Field(1, ge=1, le=limits.max_n, description="images; image i uses seed + i")),
        seed=(OptionalInteger, Field(None, ge=0, le=MAX_SEED, description=(
            "seed of the first image (random when absent); seed + n - 1 must not exceed 4294967295"))),
        steps=(Integer, Field(limits.default_steps, ge=1, le=limits.max_steps, description="sampling steps")),
        guidance=(float, Field(DEFAULT_GUIDANCE, ge=0, le=limits.max_guidance, description="guidance scale")),
        negative_prompt=negative)
    sizes = Literal[limits.sizes]
    formats = Literal[IMAGE_FORMATS]
    native = create_model(
        "GenerateRequest", __config__=STRICT, **common,
        size=(sizes, Field(limits.sizes[0], description="side of the square image in pixels")),
        format=(formats, Field(limits.default_format, description="image format")),
        quality=(Integer, Field(limits.default_quality, ge=1, le=100, description="JPEG/WebP quality")))
    size_names = Literal[("auto", *(f"{s}x{s}" for s in limits.sizes))]
    no_effect = {name: (Optional[Text], Field(None, max_length=limits.max_prompt_chars, description=(
        "accepted and has no effect (X-Ignored-Fields)" if name != "model" else
        f"the model to use; only the live one, {limits.model_id!r} (GET /v1/models), is served: another gets 404")))
        for name in OPENAI_NO_EFFECT}
    openai = create_model(
        "ImagesGenerationRequest", __config__=STRICT, **common, **no_effect,
        size=(size_names, Field("auto", description="WIDTHxHEIGHT, square; auto is the model's default")),
        response_format=(Literal["b64_json"], Field("b64_json", description="only b64_json (no URLs)")),
        output_format=(formats, Field("png")),
        output_compression=(Integer, Field(100 - limits.default_quality, ge=0, le=100,
                                       description="quality = 100 - output_compression (JPEG/WebP)")),
        background=(Literal["auto", "opaque"], Field("auto")),
        stream=(Annotated[Literal[False], BeforeValidator(json_boolean)],
                Field(False, description="streaming is not supported")),
        partial_images=(Integer, Field(0, ge=0, le=0, description="partial images are not supported")))
    return native, openai


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


def _big_int(text: str):
    if len(text.lstrip("-")) <= MAX_INT_DIGITS:
        return int(text)
    return float("-inf") if text.startswith("-") else float("inf")


def parse_json(body: bytes):
    """A request body as JSON (integers of more than MAX_INT_DIGITS digits read as +-infinity)."""
    try:
        return json.loads(body, parse_int=_big_int)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(None, "the body must be a JSON object (content-type: application/json)") from None


def kind(value) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "number")


def _shown(value) -> str:
    if isinstance(value, str):
        return f"{len(value)} characters" if len(value) > 40 else json.dumps(value)
    text = json.dumps(value) if isinstance(value, (bool, int, float)) and abs(value) < 1e30 else kind(value)
    return text if len(text) <= 40 else kind(value)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def allowed(schema: dict) -> str:
    """What a field's JSON schema allows, in words: 'an integer between 1 and 4', 'one of png, jpeg, webp'."""
    options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    spec = options[0] if options else schema
    if "enum" in spec or "const" in spec:
        values = spec.get("enum", [spec.get("const")])
        return "one of " + ", ".join(v if isinstance(v, str) else json.dumps(v) for v in values)
    if spec.get("type") in ("integer", "number"):
        noun = "an integer" if spec["type"] == "integer" else "a number"
        if "minimum" not in spec or "maximum" not in spec:
            return noun
        return f"{noun} between {_number(spec['minimum'])} and {_number(spec['maximum'])}"
    if spec.get("type") == "string":
        return f"a string of {spec.get('minLength', 0)} to {spec.get('maxLength', 'any number of')} characters"
    return spec.get("type", "a value")


def _invalid(error: dict, model: type[BaseModel]) -> InvalidRequest:
    """pydantic's first error -> InvalidRequest naming the field, what it allows and what it got."""
    if not error["loc"]:
        return InvalidRequest(None, f"the body must be a JSON object, got {kind(error['input'])}")
    name = str(error["loc"][0])
    fields = model.model_json_schema()["properties"]
    if error["type"] == "extra_forbidden":
        return InvalidRequest(name, f"unknown field {name!r}; allowed fields: {', '.join(fields)}")
    if error["type"] == "missing":
        return InvalidRequest(name, f"{name} is required: {allowed(fields[name])}")
    if error["type"] == "value_error":
        return InvalidRequest(name, f"{name} {error['ctx']['error']}")
    value = error["input"]
    got = kind(value) if error["type"].endswith("_type") and kind(value) != "number" else _shown(value)
    return InvalidRequest(name, f"{name} must be {allowed(fields[name])}, got {got}")


def _validate(model: type[BaseModel], body) -> BaseModel:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise _invalid(err.errors(include_url=False)[0], model) from None


def _common(request: BaseModel, model: LoadedModel) -> dict:
    """The checks a schema cannot state: encoder tokens, and seed + i in range."""
    try:
        model.pipe.text.check(request.prompt)
    except PromptTooLong as err:
        raise InvalidRequest("prompt", str(err)) from None
    seed = secrets.randbelow(MAX_SEED + 2 - request.n) if request.seed is None else request.seed
    if seed + request.n - 1 > MAX_SEED:
        raise InvalidRequest("seed", f"seed + n - 1 must be at most {MAX_SEED} (image i uses seed + i), got seed "
                             f"{seed} with n {request.n}")
    return dict(prompt=request.prompt, n=request.n, seed=seed, steps=request.steps, guidance=request.guidance,
                ignored=[] if request.negative_prompt is None else ["negative_prompt"])


def parse_native(body, config: ServiceConfig, model: LoadedModel) -> ImageRequest:
    request = _validate(request_models(Limits.of(config, model))[0], body)
    return ImageRequest(**_common(request, model), size=request.size, format=request.format,
                        quality=request.quality)


def parse_openai(body, config: ServiceConfig, model: LoadedModel) -> ImageRequest:
    request = _validate(request_models(Limits.of(config, model))[1], body)
    if request.model is not None and request.model != model.spec:
        raise InvalidRequest("model", f"model {request.model!r} is not served here; GET /v1/models lists "
                             f"{model.spec!r}", status=404, code="model_not_found")
    common = _common(request, model)
    common["ignored"] += [name for name in OPENAI_NO_EFFECT if getattr(request, name) is not None]
    size = model.default_size if request.size == "auto" else int(request.size.split("x")[0])
    return ImageRequest(**common, size=size, format=request.output_format,
                        quality=max(1, 100 - request.output_compression))


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = Field(None, description="the request field at fault, when one is")
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error, 404 and 405 included: OpenAI's shape."""
    error: ErrorBody


class NativeImage(BaseModel):
    seed: int
    b64: str = Field(description="the encoded image, base64")


class GenerateResponse(BaseModel):
    """POST /generate with n > 1 (n = 1 answers the image bytes)."""
    model: str
    format: str
    images: list[NativeImage]


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str


class ImagesResponse(BaseModel):
    created: int = Field(description="unix seconds")
    data: list[OpenAIImage]
    output_format: str
    size: str
    seed: int = Field(description="seed of the first image; image i used seed + i")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tbcm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SwapRequest(BaseModel):
    model_config = STRICT
    model: Annotated[Text, AfterValidator(not_blank), Field(min_length=1, max_length=4096, description=(
        "a shipped name, a BentoML model-store tag, or a pipeline folder under the configured model roots"))]


class SwapResponse(BaseModel):
    live: dict = Field(description="the now live model, as /info shows it")


def parse_swap(body) -> str:
    return _validate(SwapRequest, body).model
