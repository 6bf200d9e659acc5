"""Backpressure in-process, made deterministic with tiny queues and the simulated_delay_s knob (every generator
call takes that much longer after warm-up): 429 queue full, 503 up front and before compute, 504, disconnects."""
from __future__ import annotations

import json
import threading
import time

from prometheus_client import REGISTRY

PROMPT = "a small red circle in the middle"


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def wait_queue(client, **expected) -> None:
    """Poll /info until the batcher's state has the expected values (e.g. running=True, waiting=1)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        queue = client.get("/info").json()["queue"]
        if all(queue[key] == value for key, value in expected.items()):
            return
        time.sleep(0.01)
    raise TimeoutError(f"queue never reached {expected}")


def post_in_thread(client, results: list, body: dict | None = None) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(client.post("/generate", json=body or {"prompt": PROMPT})))
    thread.start()
    return thread


def test_full_queue_is_429_at_once_with_retry_after(make_service):
    client = make_service(max_queue=1, simulated_delay_s=1.0)
    before = counter("tbcm_requests_rejected_total", reason="queue_full")
    results = []
    first = post_in_thread(client, results)
    wait_queue(client, running=True)
    second = post_in_thread(client, results)
    wait_queue(client, waiting=1)
    started = time.monotonic()
    refused = client.post("/generate", json={"prompt": PROMPT})
    assert time.monotonic() - started < 0.5
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    first.join(), second.join()
    assert [r.status_code for r in results] == [200, 200]
    assert counter("tbcm_requests_rejected_total", reason="queue_full") == before + 1


def test_timeout_is_504_and_then_an_unmeetable_deadline_is_503_up_front(make_service):
    client = make_service(request_timeout_s=0.5, simulated_delay_s=1.5)
    timed_out = client.post("/generate", json={"prompt": PROMPT})  # warm-up calls were fast: admitted
    assert timed_out.status_code == 504 and "0.5 s" in timed_out.json()["error"]["message"]
    wait_queue(client, running=False)  # that call has now taught the time model it takes > 1.5 s
    started = time.monotonic()
    shed = client.post("/generate", json={"prompt": PROMPT})
    assert time.monotonic() - started < 0.5
    assert shed.status_code == 503 and int(shed.headers["retry-after"]) >= 1
    assert "cannot answer within 0.5 s" in shed.json()["error"]["message"]


def test_a_request_whose_batch_would_end_past_its_deadline_is_dropped_before_compute(make_service):
    client = make_service(request_timeout_s=3.0, simulated_delay_s=2.0)
    images_before = counter("tbcm_images_generated_total")
    results = []
    first = post_in_thread(client, results)
    wait_queue(client, running=True)
    dropped = client.post("/generate", json={"prompt": PROMPT})  # admitted on the warm-up estimate
    first.join()
    assert results[0].status_code == 200
    assert dropped.status_code == 503 and "dropped before compute" in dropped.json()["error"]["message"]
    assert counter("tbcm_images_generated_total") == images_before + 1


def test_a_disconnected_client_is_dropped_before_its_batch_runs(make_service):
    client = make_service(simulated_delay_s=1.0)
    images_before = counter("tbcm_images_generated_total")
    gone_before = counter("tbcm_requests_rejected_total", reason="disconnected")
    results = []
    first = post_in_thread(client, results)
    wait_queue(client, running=True)
    leave = threading.Event()
    sent = client.portal.start_task_soon(raw_post, client.app, {"prompt": PROMPT, "seed": 9}, leave)
    wait_queue(client, waiting=1)
    leave.set()  # the client goes away while its request waits behind the running call
    messages = sent.result(timeout=60)
    first.join()
    wait_queue(client, running=False, waiting=0)
    assert results[0].status_code == 200
    assert all(m.get("status") != 200 for m in messages)
    assert counter("tbcm_requests_rejected_total", reason="disconnected") == gone_before + 1
    assert counter("tbcm_images_generated_total") == images_before + 1


async def raw_post(app, body: dict, leave: threading.Event) -> list[dict]:
    """POST /generate straight through the ASGI app, with a client that disconnects when `leave` is set."""
    import asyncio

    payload = json.dumps(body).encode()
    pending = [{"type": "http.request", "body": payload, "more_body": False}]
    sent = []

    async def receive():
        if pending:
            return pending.pop(0)
        while not leave.is_set():
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/generate", "raw_path": b"/generate", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    await app(scope, receive, send)
    return sent


def test_a_model_that_cannot_load_is_reported_by_name(make_service, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    client = make_service(model=str(broken), wait_ready_s=0)
    deadline = time.monotonic() + 60
    while client.get("/info").json()["error"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/readyz").status_code == 503
    error = client.get("/info").json()["error"]
    assert str(broken) in error and "no 'transformer' entry" in error
    response = client.post("/generate", json={"prompt": PROMPT})
    assert response.status_code == 503 and str(broken) in response.json()["error"]["message"]
