"""The HTTP routes (a Starlette app that the BentoML service mounts beside its /livez, /readyz and /metrics).

    POST /generate                 native: image bytes (n=1) or JSON with base64 images (n>1); X-Seed header
    POST /v1/images/generations    OpenAI Images API request and response (b64_json)
    GET  /v1/models                the live model, as OpenAI's model list
    GET  /info                     the live model (path, manifest), config, queue
    POST /admin/swap               hot swap to another model (Authorization: Bearer $TBCM_ADMIN_TOKEN)
    GET  /openapi.json, /docs      the OpenAPI document of all of these (service/openapi.py), and its page

Bodies are the pydantic models of service/schema.py. Every error, 404 and 405 included, is JSON in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, never a traceback.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hmac
import logging
import os
import time
from typing import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Match, Route

from tbcm.models.pipeline import PipelineError

from tbcm.service.batcher import Rejected
from tbcm.service.config import ADMIN_TOKEN_ENV
from tbcm.service.engine import Answer, Engine, SwapInProgress
from tbcm.service.openapi import BENTOML_ROUTES, DOCS_PAGE, openapi_document
from tbcm.service.runtime import ModelNotFound, OutsideModelRoots
from tbcm.service.schema import (ErrorResponse, GenerateResponse, ImagesResponse, InvalidRequest, Limits, ModelList,
                                 SwapResponse, parse_json, parse_native, parse_openai, parse_swap)

log = logging.getLogger("tbcm.service")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict", 413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error", 499: "client_disconnected",
               500: "server_error", 503: "overloaded", 504: "timeout"}
REJECT_REASONS = {400: "invalid", 404: "not_found"}


def error_response(status: int, message: str, param: str | None = None, retry_after: int | None = None,
                   code: str | None = None, headers: dict | None = None) -> Response:
    body = ErrorResponse(error={"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param,
                                "code": code})
    headers = dict(headers or {}) | ({} if retry_after is None else {"Retry-After": str(retry_after)})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media in ("", "application/json") or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, limit: int):
    """The body as JSON: 413 past `limit` bytes (declared or streamed), 415 unless the content-type is JSON (a
    missing one is read as JSON)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "too_large", f"the body is {declared} bytes; at most {limit} are allowed")
    if not _is_json(request.headers.get("content-type", "")):
        raise Rejected(415, "unsupported_media_type", f"the body must be application/json, got content-type "
                       f"{request.headers['content-type'][:100]!r}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Rejected(413, "too_large", f"the body is over {limit} bytes; at most {limit} are allowed")
    return parse_json(bytes(body))


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case); None without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def timing_header(answer: Answer) -> str:
    """Server-Timing: where a request's time went, in ms (stages of its generator call are for the whole call;
    total runs from the handler's start to the encoded answer, so a client's latency minus total is spent outside)."""
    stages = {"queue": answer.batch.queue_wait, **answer.batch.timings, "encode": answer.encode_seconds,
              "total": answer.total_seconds}
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in stages.items())


def answer_headers(answer: Answer, ignored: list[str]) -> dict:
    headers = {"X-Seed": str(answer.seeds[0]), "X-Model": answer.model.spec,
               "X-Batch-Size": str(answer.batch.batch_size), "Server-Timing": timing_header(answer)}
    if ignored:
        headers["X-Ignored-Fields"] = ",".join(ignored)
    return headers


class FallbackRoute(Route):
    """Every path and method, except the paths BentoML routes after our mounted app (its index page, /docs.json and
    /static_content/, added behind the mount in _bentoml_impl/server/app.py): BentoML's probes and /metrics come
    before the mount, so whatever else reaches us and matches no route of ours is answered by `endpoint`."""
    BENTOML_AFTER_MOUNT = ("/", "/docs.json")

    def __init__(self, endpoint):
        super().__init__("/{path:path}", endpoint, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                                            "OPTIONS"])

    def matches(self, scope):
        path = scope.get("path", "")
        if path in self.BENTOML_AFTER_MOUNT or path.startswith("/static_content/"):
            return Match.NONE, {}
        return super().matches(scope)


def build_app(get_engine: Callable[[], Engine]) -> Starlette:
    """The routes; `get_engine` returns the running service's engine (looked up per request)."""

    async def generate_images(request: Request, parse) -> tuple:
        arrived = time.monotonic()
        engine = get_engine()
        body = await read_json(request, engine.config.max_body_bytes)
        model = engine.live_model()
        image_request = parse(body, engine.config, model)
        answer = await engine.run(image_request, model, arrived, functools.partial(wait_disconnect, request))
        return image_request, answer

    async def generate(request: Request) -> Response:
        image_request, answer = await generate_images(request, parse_native)
        headers = answer_headers(answer, image_request.ignored)
        if image_request.n == 1:
            return Response(answer.images[0], media_type=f"image/{image_request.format}", headers=headers)
        images = [{"seed": seed, "b64": base64.b64encode(data).decode()}
                  for seed, data in zip(answer.seeds, answer.images)]
        body = GenerateResponse(model=answer.model.spec, format=image_request.format, images=images)
        return JSONResponse(body.model_dump(), headers=headers)

    async def openai_generations(request: Request) -> Response:
        image_request, answer = await generate_images(request, parse_openai)
        data = [{"b64_json": base64.b64encode(image).decode(), "revised_prompt": image_request.prompt}
                for image in answer.images]
        body = ImagesResponse(created=int(time.time()), data=data, output_format=image_request.format,
                              size=f"{image_request.size}x{image_request.size}", seed=answer.seeds[0])
        return JSONResponse(body.model_dump(), headers=answer_headers(answer, image_request.ignored))

    async def models(request: Request) -> Response:
        model = get_engine().live_model()
        return JSONResponse(ModelList(data=[{"id": model.spec, "created": int(model.loaded_at)}]).model_dump())

    async def info(request: Request) -> Response:
        engine = get_engine()
        return JSONResponse({**engine.info(), "config": dataclasses.asdict(engine.config),
                             "admin": bool(os.environ.get(ADMIN_TOKEN_ENV))})

    async def openapi(request: Request) -> Response:
        engine = get_engine()
        limits = Limits.of(engine.config, engine.live_model())
        return JSONResponse(openapi_document(limits, bool(os.environ.get(ADMIN_TOKEN_ENV))))

    async def docs(request: Request) -> Response:
        return HTMLResponse(DOCS_PAGE)

    async def swap(request: Request) -> Response:
        token = os.environ.get(ADMIN_TOKEN_ENV, "")
        if not token:
            return error_response(403, f"the admin endpoint is disabled: {ADMIN_TOKEN_ENV} is not set")
        given = bearer_token(request)
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            return error_response(401, "a valid admin token is required (Authorization: Bearer <token>)",
                                  headers={"WWW-Authenticate": 'Bearer realm="tbcm admin"'})
        engine = get_engine()
        spec = parse_swap(await read_json(request, engine.config.max_body_bytes))
        try:
            model = await asyncio.to_thread(engine.swap, spec)
        except SwapInProgress as err:
            return error_response(409, str(err))
        except OutsideModelRoots as err:
            return error_response(403, str(err), "model")
        except ModelNotFound as err:
            return error_response(404, str(err), "model", code="model_not_found")
        except PipelineError as err:
            return error_response(400, str(err), "model")
        return JSONResponse(SwapResponse(live=model.describe()).model_dump())

    def guarded(handler):
        """Turn every refusal into its JSON error (counted by reason) and anything else into a plain 500."""

        async def endpoint(request: Request) -> Response:
            engine = get_engine()
            try:
                return await handler(request)
            except InvalidRequest as err:
                engine.metrics.reject(REJECT_REASONS[err.status])
                return error_response(err.status, err.message, err.param, code=err.code)
            except Rejected as err:
                engine.metrics.reject(err.reason)
                return error_response(err.status, err.message, retry_after=err.retry_after)
            except Exception:
                log.exception("unexpected error in %s %s", request.method, request.url.path)
                engine.metrics.reject("failed")
                return error_response(500, "internal error; see the server log")

        return endpoint

    routes = [
        Route("/generate", guarded(generate), methods=["POST"]),
        Route("/v1/images/generations", guarded(openai_generations), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/info", guarded(info), methods=["GET"]),
        Route("/admin/swap", guarded(swap), methods=["POST"]),
        Route("/openapi.json", guarded(openapi), methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]

    async def no_route(request: Request) -> Response:
        """Every other path and method (BentoML passes what its own routes do not take): 405 naming the allowed
        methods of a route of ours or of BentoML's, else 404, in our JSON shape instead of Starlette's plain text."""
        path = ascii(request.url.path[:200])
        if request.url.path in BENTOML_ROUTES:
            return error_response(405, f"{request.method} is not allowed on {path}", headers={"Allow": "GET, HEAD"})
        for route in routes:
            if route.matches(request.scope)[0] == Match.PARTIAL:
                return error_response(405, f"{request.method} is not allowed on {path}",
                                      headers={"Allow": ", ".join(sorted(route.methods))})
        return error_response(404, f"no route {request.method} {path}; see /openapi.json")

    return Starlette(routes=[*routes, FallbackRoute(no_route)])
