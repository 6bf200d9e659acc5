"""The HTTP API in-process: every endpoint, every validation error, seeds and determinism across batches."""
from __future__ import annotations

import base64
import io
import json
import threading

import pytest
from PIL import Image

from tbcm.service.config import ServiceConfig
from tbcm.service.loadtest import parse_server_timing

PROMPT = "a small red circle in the middle"


@pytest.fixture
def client(make_service):
    return make_service(simulated_delay_s=0.0)


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_generate_png_with_seed_header(client):
    response = client.post("/generate", json={"prompt": PROMPT, "seed": 7})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "7"
    stages = parse_server_timing(response.headers["server-timing"])
    assert {"queue", "transformer", "vae_decode", "encode", "total"} <= set(stages)
    assert stages["total"] >= stages["queue"] + stages["transformer"] + stages["encode"]
    assert decode(response.content).size == (16, 16)
    again = client.post("/generate", json={"prompt": PROMPT, "seed": 7})
    assert again.content == response.content


@pytest.mark.parametrize("text_stage", [True, False])
def test_the_served_image_is_the_generators_with_the_text_stage_on_or_off(make_service, student_pipe, one_thread,
                                                                          text_stage):
    """Prompts encoded on the text stage's thread give the image a plain generator call gives, byte for byte."""
    from tbcm.models.generator import Generator
    from tbcm.service.engine import encode_image

    served = make_service(text_stage=text_stage).post("/generate", json={"prompt": PROMPT, "seed": 7})
    from tbcm.service.runtime import rows_per_pass

    image = Generator(student_pipe, microbatch=rows_per_pass(ServiceConfig())).generate([PROMPT], [7]).images[0]
    assert served.content == encode_image(image, "png", ServiceConfig().default_quality)


def test_generate_picks_and_returns_a_seed_when_none_given(client):
    response = client.post("/generate", json={"prompt": PROMPT})
    seed = int(response.headers["x-seed"])
    assert client.post("/generate", json={"prompt": PROMPT, "seed": seed}).content == response.content


def test_generate_n_returns_base64_json_with_consecutive_seeds(client):
    response = client.post("/generate", json={"prompt": PROMPT, "seed": 10, "n": 3, "format": "webp"})
    assert response.status_code == 200
    images = response.json()["images"]
    assert [image["seed"] for image in images] == [10, 11, 12]
    assert all(decode(base64.b64decode(image["b64"])).format == "WEBP" for image in images)
    single = client.post("/generate", json={"prompt": PROMPT, "seed": 11, "format": "webp"})
    assert base64.b64decode(images[1]["b64"]) == single.content


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_generate_lossy_formats_and_quality(client, fmt, pil):
    high = client.post("/generate", json={"prompt": PROMPT, "seed": 1, "format": fmt, "quality": 100})
    low = client.post("/generate", json={"prompt": PROMPT, "seed": 1, "format": fmt, "quality": 5})
    assert high.headers["content-type"] == f"image/{fmt}" and decode(high.content).format == pil
    assert len(low.content) < len(high.content)


def test_steps_and_guidance_change_the_image(client):
    base = client.post("/generate", json={"prompt": PROMPT, "seed": 3}).content
    assert client.post("/generate", json={"prompt": PROMPT, "seed": 3, "steps": 2}).content != base
    assert client.post("/generate", json={"prompt": PROMPT, "seed": 3, "guidance": 9.0}).content != base


def test_negative_prompt_is_accepted_and_reported_ignored(client):
    plain = client.post("/generate", json={"prompt": PROMPT, "seed": 4})
    negative = client.post("/generate", json={"prompt": PROMPT, "seed": 4, "negative_prompt": "blue"})
    assert negative.status_code == 200 and negative.headers["x-ignored-fields"] == "negative_prompt"
    assert negative.content == plain.content


@pytest.mark.parametrize("microbatch", [0, 4])  # the default (on CPU one row a pass), and padded passes (CUDA's)
def test_same_seed_alone_and_inside_a_concurrent_batch_gives_identical_png(make_service, microbatch):
    client = make_service(simulated_delay_s=1.0, microbatch=microbatch)
    alone = client.post("/generate", json={"prompt": PROMPT, "seed": 42})
    assert alone.headers["x-batch-size"] == "1"
    blocker = threading.Thread(target=client.post, args=("/generate",), kwargs={"json": {"prompt": "x"}})
    blocker.start()  # occupies the generator, so the next four requests queue up and share one call
    while not client.get("/info").json()["queue"]["running"]:
        pass
    results = {}

    def send(i: int) -> None:
        body = {"prompt": PROMPT if i == 0 else f"a blue square number {i}", "seed": 42 if i == 0 else i,
                "guidance": 4.5 if i == 0 else 3.0 + i}
        results[i] = client.post("/generate", json=body)

    senders = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in senders:
        thread.start()
    for thread in senders + [blocker]:
        thread.join()
    assert results[0].headers["x-batch-size"] == "4"
    assert results[0].content == alone.content


def test_worker_sets_the_gil_switch_interval_and_freezes_the_loaded_heap(make_service):
    import gc
    import sys

    before = sys.getswitchinterval()
    try:
        gc.unfreeze()
        client = make_service(switch_interval_ms=2.5)
        assert client.get("/readyz").status_code == 200
        assert sys.getswitchinterval() == pytest.approx(0.0025)
        assert gc.get_freeze_count() > 1000  # the model and the libraries, frozen once it went live
    finally:
        sys.setswitchinterval(before)
        gc.unfreeze()


def test_openai_schema_in_process(client):
    live = client.get("/v1/models").json()["data"][0]["id"]
    response = client.post("/v1/images/generations", json={
        "prompt": PROMPT, "n": 2, "size": "16x16", "response_format": "b64_json", "output_format": "jpeg",
        "output_compression": 50, "model": live, "quality": "auto", "user": "", "seed": 5, "steps": 2,
        "guidance": 4.0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output_format"] == "jpeg" and body["size"] == "16x16" and len(body["data"]) == 2
    assert decode(base64.b64decode(body["data"][0]["b64_json"])).format == "JPEG"
    assert response.headers["x-seed"] == "5"
    assert set(response.headers["x-ignored-fields"].split(",")) == {"model", "quality", "user"}


def test_info_names_the_live_model(client, tiny_student_dir):
    info = client.get("/info").json()
    assert info["ready"] is True and info["model"]["path"] == str(tiny_student_dir)
    assert info["model"]["manifest"]["kind"] == "student" and info["model"]["max_steps"] == 4
    assert info["config"]["max_batch"] == ServiceConfig().max_batch


BAD_NATIVE = [
    ({}, "prompt", "prompt is required: a string of 1 to 2000 characters"),
    ({"prompt": "   "}, "prompt", "must not be empty"),
    ({"prompt": "x" * 2001}, "prompt", "a string of 1 to 2000 characters, got 2001 characters"),
    ({"prompt": "red " * 40}, "prompt", "encoder tokens; at most 16"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": PROMPT, "steps": 0}, "steps", "between 1 and 4"),
    ({"prompt": PROMPT, "steps": 5}, "steps", "between 1 and 4"),
    ({"prompt": PROMPT, "steps": 1.5}, "steps", "must be an integer"),
    ({"prompt": PROMPT, "steps": "2"}, "steps", "got string"),
    ({"prompt": PROMPT, "n": 0}, "n", "between 1 and 4"),
    ({"prompt": PROMPT, "n": 5}, "n", "between 1 and 4"),
    ({"prompt": PROMPT, "n": True}, "n", "got boolean"),
    ({"prompt": PROMPT, "guidance": -1}, "guidance", "between 0 and 20"),
    ({"prompt": PROMPT, "guidance": 21}, "guidance", "between 0 and 20"),
    ({"prompt": PROMPT, "guidance": "high"}, "guidance", "must be a number"),
    ({"prompt": PROMPT, "seed": -1}, "seed", "between 0 and 4294967295"),
    ({"prompt": PROMPT, "seed": 2**32}, "seed", "between 0 and 4294967295"),
    ({"prompt": PROMPT, "seed": 2**32 - 1, "n": 4}, "seed", "seed + n - 1 must be at most 4294967295"),
    ('{"prompt": "a red circle", "seed": 1%s}' % ("0" * 5000), "seed",
     "must be an integer between 0 and 4294967295, got number"),
    ({"prompt": PROMPT, "guidance": 1e400}, "guidance", "must be a number between 0 and 20"),
    ({"prompt": "\ud800 a red circle"}, "prompt", "unpaired surrogate"),
    ({"prompt": PROMPT, "negative_prompt": "\udfff"}, "negative_prompt", "unpaired surrogate"),
    ({"prompt": PROMPT, "size": 32}, "size", "must be one of 16"),
    ({"prompt": PROMPT, "size": "16"}, "size", "must be one of 16"),
    ({"prompt": PROMPT, "format": "gif"}, "format", "png, jpeg, webp"),
    ({"prompt": PROMPT, "quality": 0}, "quality", "between 1 and 100"),
    ({"prompt": PROMPT, "quality": 101}, "quality", "between 1 and 100"),
    ({"prompt": PROMPT, "negative_prompt": 3}, "negative_prompt", "must be a string"),
    ({"prompt": PROMPT, "seeds": [1]}, "seeds", "unknown field"),
    ({"prompt": PROMPT, "seed": {}}, "seed", "must be an integer between 0 and 4294967295, got object"),
    ({"prompt": PROMPT, "n": 2.5}, "n", "must be an integer between 1 and 4, got 2.5"),
]

BAD_OPENAI = [
    ({"prompt": PROMPT, "size": "32x32"}, "size", "size must be one of auto, 16x16, got \"32x32\""),
    ({"prompt": PROMPT, "size": "16x32"}, "size", "one of auto, 16x16"),
    ({"prompt": PROMPT, "size": 16}, "size", "one of auto, 16x16"),
    ({"prompt": "\ud800"}, "prompt", "unpaired surrogate"),
    ({"prompt": PROMPT, "user": "\ud800"}, "user", "unpaired surrogate"),
    ({"prompt": PROMPT, "response_format": "url"}, "response_format", "must be one of b64_json"),
    ({"prompt": PROMPT, "output_format": "svg"}, "output_format", "png, jpeg, webp"),
    ({"prompt": PROMPT, "output_compression": 101}, "output_compression", "between 0 and 100"),
    ({"prompt": PROMPT, "background": "transparent"}, "background", "auto, opaque"),
    ({"prompt": PROMPT, "stream": True}, "stream", "stream must be one of false, got true"),
    ({"prompt": PROMPT, "n": 7}, "n", "between 1 and 4"),
    ({"prompt": PROMPT, "style": 1}, "style", "must be a string"),
    ({"prompt": PROMPT, "svg": {}}, "svg", "unknown field"),
    ({"prompt": PROMPT, "stream": 0}, "stream", "stream must be a boolean, got number"),
    ({"prompt": PROMPT, "partial_images": False}, "partial_images", "between 0 and 0, got boolean"),
    ({"prompt": PROMPT, "partial_images": 1}, "partial_images", "between 0 and 0, got 1"),
]


def test_integral_numbers_are_integers_as_the_schema_says(client):
    """JSON Schema counts 4.0 as an integer: accepted wherever an integer is, and read as one."""
    whole = client.post("/generate", json={"prompt": PROMPT, "n": 2, "seed": 3, "steps": 2})
    floats = client.post("/generate", json={"prompt": PROMPT, "n": 2.0, "seed": 3.0, "steps": 2.0, "size": 16.0})
    assert floats.status_code == 200 and floats.json() == whole.json()
    openai = client.post("/v1/images/generations", json={"prompt": PROMPT, "partial_images": 0.0,
                                                          "output_compression": 10.0, "stream": False})
    assert openai.status_code == 200


def test_every_field_states_what_it_allows(client):
    from tbcm.service.schema import allowed

    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("GenerateRequest", "ImagesGenerationRequest", "SwapRequest"):
        for field, spec in schemas[name]["properties"].items():
            assert allowed(spec) and "{" not in allowed(spec), (name, field)
    assert allowed(schemas["GenerateRequest"]["properties"]["seed"]) == "an integer between 0 and 4294967295"


@pytest.mark.parametrize("path,body,param,message", [("/generate", *case) for case in BAD_NATIVE] +
                         [("/v1/images/generations", *case) for case in BAD_OPENAI])
def test_every_bad_field_is_a_400_naming_it(client, path, body, param, message):
    # sent as JSON text: a lone surrogate is valid JSON ("\ud800") that httpx's encoder would not write (a str body
    # is JSON text already: a 5001-digit number that Python's int() refuses)
    text = body if isinstance(body, str) else json.dumps(body)
    response = client.post(path, content=text, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b"\xff\xfe"])
def test_bodies_that_are_not_json_objects_are_400(client, content):
    response = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON object" in response.json()["error"]["message"]


def test_oversized_bodies_are_413_declared_or_streamed(client):
    assert client.post("/generate", content=b"x" * 70000).status_code == 413  # before reading: no content-type check

    def chunks():
        for _ in range(20):
            yield b"x" * 4096

    response = client.post("/generate", content=chunks())  # chunked: no content-length to trust
    assert response.status_code == 413 and "65536" in response.json()["error"]["message"]


@pytest.mark.parametrize("content_type,status", [("text/plain", 415), ("application/x-www-form-urlencoded", 415),
                                                 ("application/json; charset=utf-8", 200), (None, 200)])
def test_content_types_other_than_json_are_415(client, content_type, status):
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post("/generate", content=json.dumps({"prompt": PROMPT}), headers=headers)
    assert response.status_code == status
    if status == 415:
        assert "application/json" in response.json()["error"]["message"]


def test_wrong_methods_and_paths_answer_our_json_errors(client):
    wrong_method = client.get("/generate")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]
    assert wrong_method.json()["error"]["message"] == "GET is not allowed on '/generate'"
    for method in ("GET", "POST", "DELETE"):
        missing = client.request(method, "/nope")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert client.get("/docs.json").status_code == 200  # BentoML's routes behind ours still answer
    for path in ("/livez", "/readyz", "/metrics"):  # BentoML's GET routes, before ours
        response = client.put(path)
        assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD", path
        assert response.json()["error"]["message"] == f"PUT is not allowed on '{path}'"


def test_models_lists_the_live_model_and_another_name_is_404(client, tiny_student_dir):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [str(tiny_student_dir)]
    response = client.post("/v1/images/generations", json={"prompt": PROMPT, "model": "dall-e-3"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "dall-e-3" in error["message"]


def test_openapi_document_covers_every_endpoint_with_the_enforced_limits(make_service):
    client = make_service(max_n=3)
    document = client.get("/openapi.json").json()
    assert {"/generate", "/v1/images/generations", "/v1/models", "/info", "/admin/swap", "/openapi.json",
            "/docs", "/livez", "/healthz", "/readyz", "/metrics"} <= set(document["paths"])
    schemas = document["components"]["schemas"]
    native = schemas["GenerateRequest"]["properties"]
    assert native["n"]["maximum"] == 3 and native["steps"]["maximum"] == 4 and native["size"]["const"] == 16
    assert "at most 16 encoder tokens" in native["prompt"]["description"]
    assert schemas["ImagesGenerationRequest"]["properties"]["size"]["enum"] == ["auto", "16x16"]
    assert schemas["ImagesGenerationRequest"]["additionalProperties"] is False
    generate = document["paths"]["/generate"]["post"]
    assert {"200", "400", "413", "415", "429", "503", "504"} <= set(generate["responses"])
    assert generate["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert document["paths"]["/admin/swap"]["post"]["security"] == [{"bearer": []}]
    assert {"401", "403", "404", "409"} <= set(document["paths"]["/admin/swap"]["post"]["responses"])
    page = client.get("/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text
    assert client.get("/static_content/swagger-ui-bundle.js").status_code == 200  # BentoML's copy, no CDN


def test_admin_swap_is_disabled_without_a_token(client, monkeypatch, second_student_dir):
    monkeypatch.delenv("TBCM_ADMIN_TOKEN", raising=False)
    response = client.post("/admin/swap", json={"model": str(second_student_dir)})
    assert response.status_code == 403 and "disabled" in response.json()["error"]["message"]


@pytest.mark.parametrize("authorization", [None, "Bearer nope", "secret", "Basic secret", "Bearer"])
def test_admin_swap_needs_the_bearer_token(client, monkeypatch, second_student_dir, authorization):
    monkeypatch.setenv("TBCM_ADMIN_TOKEN", "secret")
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.post("/admin/swap", json={"model": str(second_student_dir)}, headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["type"] == "authentication_error"


def test_admin_swap_loads_only_from_the_model_roots(make_service, monkeypatch, second_student_dir, tmp_path):
    from prometheus_client import REGISTRY

    client = make_service(model_roots=str(second_student_dir.parent))
    monkeypatch.setenv("TBCM_ADMIN_TOKEN", "secret")
    good = {"Authorization": "bearer secret"}  # the scheme in any case
    failures = REGISTRY.get_sample_value("tbcm_swap_failures_total") or 0.0
    swaps = REGISTRY.get_sample_value("tbcm_swaps_total") or 0.0
    for outside in (tmp_path / "missing", tmp_path, second_student_dir.parent / ".." / "elsewhere"):
        refused = client.post("/admin/swap", json={"model": str(outside)}, headers=good)
        assert refused.status_code == 403 and "model roots" in refused.json()["error"]["message"]
    missing = client.post("/admin/swap", json={"model": str(second_student_dir.parent / "missing")}, headers=good)
    assert missing.status_code == 404 and "expected a pipeline folder" in missing.json()["error"]["message"]
    assert missing.json()["error"]["code"] == "model_not_found"
    assert client.post("/admin/swap", json={"model": "no-such:tag"}, headers=good).status_code == 404
    assert REGISTRY.get_sample_value("tbcm_swap_failures_total") == failures + 5
    assert client.get("/info").json()["model"]["spec"] != str(second_student_dir)
    swapped = client.post("/admin/swap", json={"model": str(second_student_dir)}, headers=good)
    assert swapped.status_code == 200 and swapped.json()["live"]["path"] == str(second_student_dir)
    assert REGISTRY.get_sample_value("tbcm_swaps_total") == swaps + 1
    live = {"model": str(second_student_dir), "manifest_sha256": swapped.json()["live"]["manifest_sha256"]}
    assert REGISTRY.get_sample_value("tbcm_model_info", live) == 1.0
    response = client.post("/generate", json={"prompt": PROMPT, "seed": 1})
    assert response.headers["x-model"] == str(second_student_dir)


def test_a_swap_to_the_same_text_encoder_keeps_the_prompt_cache(make_service, monkeypatch, tiny_student_dir,
                                                                 tmp_path):
    import shutil

    from prometheus_client import REGISTRY

    copy = shutil.copytree(tiny_student_dir, tmp_path / "student-copy")
    client = make_service(model_roots=str(tmp_path))
    monkeypatch.setenv("TBCM_ADMIN_TOKEN", "secret")
    prompt = "a large green cross on the right"
    assert client.post("/generate", json={"prompt": prompt}).status_code == 200
    swapped = client.post("/admin/swap", json={"model": str(copy)}, headers={"Authorization": "Bearer secret"})
    assert swapped.status_code == 200
    hits = REGISTRY.get_sample_value("tbcm_prompt_cache_hits_total")
    misses = REGISTRY.get_sample_value("tbcm_prompt_cache_misses_total")
    assert client.post("/generate", json={"prompt": prompt}).headers["x-model"] == str(copy)
    assert REGISTRY.get_sample_value("tbcm_prompt_cache_hits_total") == hits + 1
    assert client.post("/generate", json={"prompt": "a small red cross on the left"}).status_code == 200
    assert REGISTRY.get_sample_value("tbcm_prompt_cache_misses_total") == misses + 1
