"""Against a real `tbcm serve` subprocess: probes, /metrics from the worker (and a second server beside it with
metrics of its own), our INFO logs in the server log, the OpenAPI document, the official openai client, the load
tester, Locust, and a hot swap under load with zero failed requests."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image


PROMPT = "a small red circle in the middle"
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_probes_and_info(live_server, tiny_student_dir):
    assert httpx.get(live_server + "/livez").status_code == 200
    assert httpx.get(live_server + "/readyz").status_code == 200
    info = httpx.get(live_server + "/info").json()
    assert info["ready"] and info["admin"] and info["model"]["path"] == str(tiny_student_dir)


def metric_samples(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_are_created_in_the_worker_and_exposed(live_server):
    prompt = "a medium purple cross on the top"
    assert httpx.post(live_server + "/generate", json={"prompt": prompt, "n": 2}).status_code == 200
    assert httpx.post(live_server + "/generate", json={"prompt": prompt, "steps": 99}).status_code == 400
    samples = metric_samples(live_server)
    for family, stages in (("tbcm_request_stage_seconds", ("queue_wait", "image_encoding")),
                           ("tbcm_batch_stage_seconds", ("text_encoding", "transformer", "vae_decode"))):
        for stage in stages:
            assert samples[(f"{family}_count", (("stage", stage),))] >= 1
            for le in ("0.001", "5.0", "+Inf"):
                assert (f"{family}_bucket", (("le", le), ("stage", stage))) in samples
    assert samples[("tbcm_images_generated_total", ())] >= 2
    assert samples[("tbcm_batch_size_count", ())] >= 1
    assert ("tbcm_queue_depth", ()) in samples
    assert samples[("tbcm_requests_rejected_total", (("reason", "invalid"),))] >= 1
    assert samples[("tbcm_prompt_cache_misses_total", ())] >= 1
    live = httpx.get(live_server + "/info").json()["model"]
    info = (("manifest_sha256", live["manifest_sha256"]), ("model", live["spec"]))
    assert samples[("tbcm_model_info", info)] == 1.0
    assert ("tbcm_swaps_total", ()) in samples and ("tbcm_swap_failures_total", ()) in samples
    assert any(name == "bentoml_service_request_total" for name, _ in samples)


def test_a_second_server_on_the_host_keeps_its_own_metrics(live_server, start_server, tiny_student_dir, tmp_path):
    """Both servers' workers write Prometheus multiprocess files; each server has its own folder, so starting the
    second neither wipes nor mixes into the first one's series, and stopping it removes its folder."""
    assert httpx.post(live_server + "/generate", json={"prompt": PROMPT, "n": 3}).status_code == 200
    first = metric_samples(live_server)[("tbcm_images_generated_total", ())]
    log = tmp_path / "second.log"
    with start_server(tiny_student_dir, log) as second:
        assert metric_samples(second)[("tbcm_images_generated_total", ())] == 0.0
        assert metric_samples(live_server)[("tbcm_images_generated_total", ())] == first
        assert httpx.post(second + "/generate", json={"prompt": PROMPT}).status_code == 200
        assert metric_samples(second)[("tbcm_images_generated_total", ())] == 1.0
        assert metric_samples(live_server)[("tbcm_images_generated_total", ())] == first
    folder = re.search(r"metrics in (\S+)", log.read_text()).group(1)
    assert "tbcm-metrics-" in folder and not Path(folder).exists()


def test_our_info_logs_reach_the_server_log(live_server, live_log):
    text = live_log.read_text()
    assert re.search(r"\[INFO\] \[entry_service:tbcm:1\] model '.*' live from ", text), text[-3000:]


def test_the_openapi_document_is_served_and_names_every_route(live_server):
    document = httpx.get(live_server + "/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    assert {"/generate", "/v1/images/generations", "/v1/models", "/info", "/admin/swap"} <= set(document["paths"])
    assert httpx.get(live_server + "/docs").status_code == 200
    missing = httpx.get(live_server + "/no/such/route")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_the_official_openai_client_works_unchanged(live_server):
    import openai

    client = openai.OpenAI(base_url=live_server + "/v1", api_key="x")
    result = client.images.generate(prompt=PROMPT, n=2, size="16x16", response_format="b64_json",
                                    extra_body={"seed": 3, "steps": 2})
    assert len(result.data) == 2 and result.output_format == "png"
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert [image.size for image in images] == [(16, 16), (16, 16)]
    with pytest.raises(openai.BadRequestError, match="size must be one of auto, 16x16"):
        client.images.generate(prompt=PROMPT, size="1024x1024")
    [model] = client.models.list().data
    assert client.images.generate(prompt=PROMPT, model=model.id, size="16x16").data
    with pytest.raises(openai.NotFoundError, match="model 'dall-e-3' is not served here"):
        client.images.generate(prompt=PROMPT, model="dall-e-3")


def test_loadtest_cli_open_and_closed_loop(live_server, tmp_path):
    from tbcm.cli.main import main

    out = tmp_path / "open.json"
    assert main(["loadtest", live_server, "--mode", "open", "--arrival", "fixed", "--rate", "6",
                 "--duration-s", "3", "--warmup-s", "1", "--json-out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == 18 and report["status_counts"] == {"200": 18}
    assert set(report["latency_ms"]) == {"p50", "p90", "p95", "p99", "max", "mean"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    out = tmp_path / "closed.json"
    assert main(["loadtest", live_server, "--mode", "closed", "--concurrency", "3", "--duration-s", "2",
                 "--warmup-s", "0.5", "--json-out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["requests"] >= 3 and set(report["status_counts"]) == {"200"}
    assert report["throughput_rps"] > 0 and report["goodput_rps"] <= report["throughput_rps"]


def test_locustfile_runs_headless(live_server, tmp_path):
    result = subprocess.run([sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "locustfile.py"), "--headless",
                             "-u", "2", "-r", "2", "-t", "10s", "--host", live_server, "--only-summary",
                             "--csv", str(tmp_path / "locust")], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = (tmp_path / "locust_stats.csv").read_text()
    assert "POST,/generate," in stats


def test_hot_swap_under_load_fails_no_request(live_server, tiny_student_dir, second_student_dir, admin_headers):
    stop, answers = threading.Event(), []

    def client_loop() -> None:  # closed loop, until the swap is done and a few requests went to the new model
        with httpx.Client(base_url=live_server, timeout=60) as client:
            while not stop.is_set():
                response = client.post("/generate", json={"prompt": PROMPT})
                answers.append((response.status_code, response.headers.get("x-model")))

    clients = [threading.Thread(target=client_loop) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        swapped = httpx.post(live_server + "/admin/swap", json={"model": str(second_student_dir)},
                             headers=admin_headers, timeout=300)
        assert swapped.status_code == 200, swapped.text
        assert httpx.get(live_server + "/info").json()["model"]["path"] == str(second_student_dir)
        served_before = len(answers)
        while len(answers) < served_before + 6:
            threading.Event().wait(0.05)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
        httpx.post(live_server + "/admin/swap", json={"model": str(tiny_student_dir)}, headers=admin_headers,
                   timeout=300)
    assert {status for status, _ in answers} == {200}
    models = [model for _, model in answers]
    assert models[0] == str(tiny_student_dir) and models[-1] == str(second_student_dir)
