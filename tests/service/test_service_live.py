"""Against a real `tbcm serve` subprocess: probes, /metrics from the worker, the official openai client, the
load tester, Locust, and a hot swap under load with zero failed requests."""
from __future__ import annotations

import base64
import io
import json
import os
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


def test_metrics_are_created_in_the_worker_and_exposed(live_server):
    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.post(live_server + "/generate", json={"prompt": PROMPT, "n": 2}).status_code == 200
    assert httpx.post(live_server + "/generate", json={"prompt": PROMPT, "steps": 99}).status_code == 400
    samples = {}
    for family in text_string_to_metric_families(httpx.get(live_server + "/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    for stage in ("queue_wait", "text_encoding", "transformer", "vae_decode", "image_encoding"):
        assert samples[("tbcm_stage_seconds_count", (("stage", stage),))] >= 1
        for le in ("0.001", "5.0", "+Inf"):
            assert ("tbcm_stage_seconds_bucket", (("le", le), ("stage", stage))) in samples
    assert samples[("tbcm_images_generated_total", ())] >= 2
    assert samples[("tbcm_batch_size_count", ())] >= 1
    assert ("tbcm_queue_depth", ()) in samples
    assert samples[("tbcm_requests_rejected_total", (("reason", "invalid"),))] >= 1
    assert any(name == "bentoml_service_request_total" for name, _ in samples)


def test_the_official_openai_client_works_unchanged(live_server):
    import openai

    client = openai.OpenAI(base_url=live_server + "/v1", api_key="x")
    result = client.images.generate(prompt=PROMPT, n=2, size="16x16", response_format="b64_json",
                                    extra_body={"seed": 3, "steps": 2})
    assert len(result.data) == 2 and result.output_format == "png"
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert [image.size for image in images] == [(16, 16), (16, 16)]
    with pytest.raises(openai.BadRequestError, match="size must be auto or one of 16x16"):
        client.images.generate(prompt=PROMPT, size="1024x1024")


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
