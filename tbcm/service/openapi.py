"""The OpenAPI 3.1 document of the service's endpoints (GET /openapi.json, rendered at GET /docs), generated from the
pydantic models of service/schema.py for the limits of the live model, so every range it states is the one enforced.

BentoML's own /docs.json only lists the APIs declared with @bentoml.api (here none: the routes are our ASGI app), so
it shows BentoML's probes alone; this document covers every endpoint, BentoML's probes and /metrics included.
"""
from __future__ import annotations

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tbcm.service.schema import (ErrorResponse, GenerateResponse, ImagesResponse, Limits, ModelList, SwapRequest,
                                 SwapResponse, request_models)

REF = "#/components/schemas/{model}"
ERRORS = {400: "a field is invalid (param names it) or the body is not a JSON object",
          404: "no such route, or a model that is not served (code model_not_found)",
          405: "method not allowed on this route", 413: "the body is larger than max_body_bytes",
          415: "the body is not application/json (a missing content-type is read as JSON)",
          429: "the queue is full (Retry-After)", 503: "overloaded, deadline cannot be met, or still loading "
          "(Retry-After)", 504: "not answered within request_timeout_s"}
IMAGE_ERRORS = (400, 413, 415, 429, 503, 504)
BENTOML_ROUTES = {  # BentoML's own GET routes, before our app; another method on them gets our 405 (http.py)
    "/livez": ("Liveness (BentoML): 200 while the process runs", {"description": "alive"}),
    "/healthz": ("Liveness (BentoML's alias of /livez)", {"description": "alive"}),
    "/readyz": ("Readiness (BentoML): 200 once the model is loaded and warmed up", {"description": "ready"}),
    "/metrics": ("Prometheus metrics (BentoML's and tbcm_*)", {"description": "exposition format", "content": {
        "text/plain": {"schema": {"type": "string"}}}}),
}
ANSWER_HEADERS = {"X-Seed": "seed of the first image", "X-Model": "the model that made the images",
                  "X-Batch-Size": "images in the generator call this request shared",
                  "Server-Timing": "queue, stages of the generator call, encode and total, in ms",
                  "X-Ignored-Fields": "fields accepted without effect, comma-separated"}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel]) -> dict:
    return {"application/json": {"schema": _ref(model)}}


def _errors(*statuses: int) -> dict:
    out = {}
    for status in statuses:
        out[str(status)] = {"description": ERRORS[status], "content": _json(ErrorResponse)}
        if status in (429, 503):
            out[str(status)]["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                           "description": "seconds to wait before retrying"}}
    return out


def _operation(summary: str, ok: dict, request: type[BaseModel] | None = None, errors: tuple = (),
               **extra) -> dict:
    operation = {"summary": summary, "responses": {"200": ok, **_errors(*errors)}, **extra}
    if request is not None:
        operation["requestBody"] = {"required": True, "content": _json(request)}
    return operation


def openapi_document(limits: Limits, admin_enabled: bool) -> dict:
    native, openai = request_models(limits)
    models = (native, openai, GenerateResponse, ImagesResponse, ModelList, SwapRequest, SwapResponse, ErrorResponse)
    schemas = models_json_schema([(m, "validation") for m in models], ref_template=REF)[1]["$defs"]
    headers = {name: {"description": text, "schema": {"type": "string"}} for name, text in ANSWER_HEADERS.items()}
    binary = {"schema": {"type": "string", "format": "binary"}}
    images = {f"image/{fmt}": binary for fmt in ("png", "jpeg", "webp")}
    swap_state = "enabled" if admin_enabled else "disabled on this server (TBCM_ADMIN_TOKEN unset: 403)"
    swap = _operation(f"Hot-swap the live model ({swap_state})",
                      {"description": "the new model is live", "content": _json(SwapResponse)}, SwapRequest,
                      (400, 413, 415), security=[{"bearer": []}])
    swap["responses"].update({
        "401": {"description": "missing or wrong bearer token", "content": _json(ErrorResponse),
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}},
        "403": {"description": "the admin endpoint is disabled (TBCM_ADMIN_TOKEN unset), or the folder is outside "
                "the model roots", "content": _json(ErrorResponse)},
        "404": {"description": "no shipped model, folder or model-store tag of that name (code model_not_found)",
                "content": _json(ErrorResponse)},
        "409": {"description": "another swap is in progress", "content": _json(ErrorResponse)}})
    paths = {
        "/generate": {"post": _operation(
            "Generate images: the image bytes for n = 1, JSON with base64 images for n > 1",
            {"description": "the images", "headers": headers, "content": {**images, **_json(GenerateResponse)}},
            native, IMAGE_ERRORS)},
        "/v1/images/generations": {"post": _operation(
            "OpenAI Images API (b64_json), with the extras seed, steps, guidance, negative_prompt",
            {"description": "the images", "headers": headers, "content": _json(ImagesResponse)},
            openai, (*IMAGE_ERRORS, 404))},
        "/v1/models": {"get": _operation("The live model (OpenAI's model list)",
                                         {"description": "models", "content": _json(ModelList)})},
        "/info": {"get": _operation("The live model, the config and the queue", {
            "description": "service state", "content": {"application/json": {"schema": {"type": "object"}}}})},
        "/admin/swap": {"post": swap},
        "/openapi.json": {"get": _operation("This document", {"description": "OpenAPI 3.1", "content": {
            "application/json": {"schema": {"type": "object"}}}})},
        "/docs": {"get": _operation("This document, rendered (Swagger UI)", {
            "description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}})},
        **{path: {"get": _operation(summary, ok)} for path, (summary, ok) in BENTOML_ROUTES.items()},
    }
    return {"openapi": "3.1.0",
            "info": {"title": "tbcm image service", "version": "1",
                     "description": f"Live model {limits.model_id!r}. Every error is {{'error': {{message, type, "
                                    f"param, code}}}} (OpenAI's shape), 404 and 405 included."},
            "paths": paths,
            "components": {"schemas": schemas,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                          "description": "TBCM_ADMIN_TOKEN"}}}}


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tbcm API</title>
<link rel="stylesheet" href="/static_content/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/static_content/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""
