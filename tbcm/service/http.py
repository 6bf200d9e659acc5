"""The HTTP routes (a Starlette app that the BentoML service mounts beside its /livez, /readyz and /metrics).

    POST /generate                 native: image bytes (n=1) or JSON with base64 images (n>1); X-Seed header
    POST /v1/images/generations    OpenAI Images API request and response (b64_json)
    GET  /info                     the live model (path, manifest), config, queue
    POST /admin/swap               hot swap to another model (Authorization: Bearer $TBCM_ADMIN_TOKEN)

Every error is JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, never a traceback.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hmac
import json
import logging
import os
import time
from typing import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tbcm.models.pipeline import PipelineError

from tbcm.service.batcher import Rejected
from tbcm.service.config import ADMIN_TOKEN_ENV
from tbcm.service.engine import Answer, Engine, SwapInProgress
from tbcm.service.schema import InvalidRequest, parse_native, parse_openai

log = logging.getLogger("tbcm.service")
ERROR_TYPES = {400: "invalid_request_error", 403: "permission_error", 409: "conflict", 413: "invalid_request_error",
               429: "rate_limit_error", 499: "client_disconnected", 500: "server_error", 503: "overloaded",
               504: "timeout"}


def error_response(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> Response:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": None}}
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    return JSONResponse(body, status_code=status, headers=headers)


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing more than `limit` bytes (declared or streamed) with 413."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "too_large", f"the body is {declared} bytes; at most {limit} are allowed")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Rejected(413, "too_large", f"the body is over {limit} bytes; at most {limit} are allowed")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(None, "the body must be a JSON object (content-type: application/json)") from None


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
        return JSONResponse({"model": answer.model.spec, "format": image_request.format, "images": images},
                            headers=headers)

    async def openai_generations(request: Request) -> Response:
        image_request, answer = await generate_images(request, parse_openai)
        data = [{"b64_json": base64.b64encode(image).decode(), "revised_prompt": image_request.prompt}
                for image in answer.images]
        size = f"{image_request.size}x{image_request.size}"
        return JSONResponse({"created": int(time.time()), "data": data, "output_format": image_request.format,
                             "size": size, "seed": answer.seeds[0]},
                            headers=answer_headers(answer, image_request.ignored))

    async def info(request: Request) -> Response:
        engine = get_engine()
        return JSONResponse({**engine.info(), "config": dataclasses.asdict(engine.config),
                             "admin": bool(os.environ.get(ADMIN_TOKEN_ENV))})

    async def swap(request: Request) -> Response:
        token = os.environ.get(ADMIN_TOKEN_ENV, "")
        if not token:
            return error_response(403, f"the admin endpoint is disabled: {ADMIN_TOKEN_ENV} is not set")
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return error_response(403, "a valid admin token is required (Authorization: Bearer <token>)")
        engine = get_engine()
        body = await read_json(request, engine.config.max_body_bytes)
        spec = body.get("model") if isinstance(body, dict) else None
        if not isinstance(spec, str) or not spec.strip():
            raise InvalidRequest("model", "model must be a pipeline folder, shipped name or model-store tag")
        try:
            model = await asyncio.to_thread(engine.swap, spec)
        except SwapInProgress as err:
            return error_response(409, str(err))
        except PipelineError as err:
            return error_response(400, str(err), "model")
        return JSONResponse({"live": model.describe()})

    def guarded(handler):
        """Turn every refusal into its JSON error (counted by reason) and anything else into a plain 500."""

        async def endpoint(request: Request) -> Response:
            engine = get_engine()
            try:
                return await handler(request)
            except InvalidRequest as err:
                engine.metrics.reject("invalid")
                return error_response(400, err.message, err.param)
            except Rejected as err:
                engine.metrics.reject(err.reason)
                return error_response(err.status, err.message, retry_after=err.retry_after)
            except Exception:
                log.exception("unexpected error in %s %s", request.method, request.url.path)
                engine.metrics.reject("failed")
                return error_response(500, "internal error; see the server log")

        return endpoint

    return Starlette(routes=[
        Route("/generate", guarded(generate), methods=["POST"]),
        Route("/v1/images/generations", guarded(openai_generations), methods=["POST"]),
        Route("/info", guarded(info), methods=["GET"]),
        Route("/admin/swap", guarded(swap), methods=["POST"]),
    ])
