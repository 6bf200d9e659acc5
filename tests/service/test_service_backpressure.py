"""Backpressure in-process, made deterministic with tiny queues and the simulated_delay_s knob (every generator
call takes that much longer after warm-up): 429 queue full, 503 up front and before compute, 504, disconnects."""
from __future__ import annotations

import json
import threading
import time

import pytest
from prometheus_client import REGISTRY

PROMPT = "a small red circle in the middle"


def mock_metrics():
    import dataclasses
    from unittest.mock import MagicMock

    from tbcm.service.metrics import Metrics

    return Metrics(**{f.name: MagicMock() for f in dataclasses.fields(Metrics) if not f.name.startswith("_")})


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
    assert time.monotonic() - started < 1.0  # at once: queued, it would wait >= 2 s behind the two 1 s batches
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
    assert time.monotonic() - started < 1.0  # loose for a loaded CI machine; admitted, it would get 504
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
    assert str(broken) in error and "model_index.json" in error
    response = client.post("/generate", json={"prompt": PROMPT})
    assert response.status_code == 503 and str(broken) in response.json()["error"]["message"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowerThanEstimatedModel:
    """A generator call is estimated at `estimate` seconds and really takes `real` (on the fake clock): a machine
    under CPU contention. `hold` keeps the first call running until the test sets it."""

    def __init__(self, clock: FakeClock, estimate: float, real: float):
        import torch

        self.clock, self.real, self.hold, self.torch = clock, real, threading.Event(), torch
        self.times = type("Times", (), {"estimate": lambda _self, steps, size, images: estimate})()

    def encode_prompts(self, prompts) -> int:
        return 0

    def generate(self, prompts, seeds, steps, size, guidance, delay_s=0.0):
        assert self.hold.wait(timeout=60)
        self.clock.now += self.real
        return type("Generation", (), {"images": self.torch.zeros(len(prompts), 4, 4, 3, dtype=self.torch.uint8),
                                       "timings": {}})()


def answer(job, clock: FakeClock):
    """What the handler would answer: the batcher's refusal, else 504 when the images came after the deadline."""
    from tbcm.service.batcher import Rejected

    try:
        job.future.result(timeout=60)
    except Rejected as err:
        return err.status, err.message
    return (504 if clock.now > job.deadline else 200), ""


@pytest.mark.parametrize("margin", [1.0, 1.25])
def test_deadline_margin_turns_504s_from_slow_batches_into_503s_before_compute(margin):
    """Batches estimated at 1 s really take 1.5 s. Without a margin both requests below are admitted, computed and
    late (504); with 1.25 the first is refused up front and the second is dropped before compute (503)."""
    from tbcm.service.batcher import Batcher, Job, Rejected
    from tbcm.service.config import ServiceConfig

    clock = FakeClock()
    model = SlowerThanEstimatedModel(clock, estimate=1.0, real=1.5)
    batcher = Batcher(ServiceConfig(microbatch=1, deadline_margin=margin), mock_metrics(), clock)

    def job(timeout: float) -> Job:
        return Job(model, [PROMPT], [0], [4.5], steps=1, size=16, deadline=clock.now + timeout, arrived=clock.now)

    try:
        # up front: a lone request with 1.1 s left, estimated at 1 s (x1.25 = 1.25 s)
        alone = job(1.1)
        if margin == 1.0:
            batcher.submit(alone)
            model.hold.set()
            assert answer(alone, clock) == (504, "")
        else:
            with pytest.raises(Rejected, match=r"cannot answer within .*x1.25 safety margin") as refused:
                batcher.submit(alone)
            assert refused.value.status == 503
        # before compute: a request queued behind a running call; admitted (2 s estimated, x1.25 = 2.5 s <= 2.6 s),
        # then checked again when the running call really ends at 1.5 s: 1.5 + 1 (x1.25: 2.75) against 2.6
        model.hold.clear()
        start = clock.now
        running, queued = job(100.0), None
        batcher.submit(running)
        deadline = time.monotonic() + 60
        while not batcher.state()["running"] and time.monotonic() < deadline:
            time.sleep(0.005)
        queued = job(2.6)
        batcher.submit(queued)
        model.hold.set()
        assert answer(running, clock)[0] == 200
        status, message = answer(queued, clock)
        if margin == 1.0:
            assert status == 504 and clock.now - start == 3.0
        else:
            assert status == 503 and "dropped before compute" in message and clock.now - start == 1.5
    finally:
        model.hold.set()
        batcher.close()


class RecordingModel(SlowerThanEstimatedModel):
    """Records the images of every generator call; the first call runs until the test sets `hold`."""

    def __init__(self, clock: FakeClock):
        super().__init__(clock, estimate=0.01, real=0.01)
        self.calls: list[int] = []

    def generate(self, prompts, seeds, steps, size, guidance, delay_s=0.0):
        self.calls.append(len(prompts))
        return super().generate(prompts, seeds, steps, size, guidance, delay_s)


@pytest.mark.parametrize(("waiting", "calls"), [([1] * 5, [4, 1]), ([1] * 3, [3]), ([3, 2, 1], [4, 2]),
                                                ([1] * 10, [8, 2]), ([5, 1], [5, 1])])
def test_calls_take_whole_microbatches_while_more_than_one_is_waiting(waiting, calls):
    """max_batch 8, microbatch 4: requests of `waiting` images queue behind a running call, then go out as `calls`
    (a call never pads a microbatch while a later request could have filled it)."""
    from tbcm.service.batcher import Batcher, Job
    from tbcm.service.config import ServiceConfig

    clock = FakeClock()
    model = RecordingModel(clock)
    batcher = Batcher(ServiceConfig(max_batch=8, microbatch=4), mock_metrics(), clock)

    def job(images: int) -> Job:
        return Job(model, [PROMPT] * images, list(range(images)), [4.5] * images, steps=1, size=16, deadline=1e9)

    try:
        jobs = [job(1)]
        batcher.submit(jobs[0])
        deadline = time.monotonic() + 60
        while not batcher.state()["running"] and time.monotonic() < deadline:
            time.sleep(0.005)
        jobs += [job(images) for images in waiting]
        for queued in jobs[1:]:
            batcher.submit(queued)
        assert all(queued.text_ready.wait(timeout=60) for queued in jobs)  # every one may join a call
        model.hold.set()
        assert all(answer(queued, clock)[0] == 200 for queued in jobs)
        assert model.calls == [1, *calls]
    finally:
        model.hold.set()
        batcher.close()


def test_a_warm_up_runs_call_by_call_with_queued_batches_between_its_calls():
    """A hot swap's warm-up goes to the generator thread one call at a time (Engine._load), so a request that
    arrives during a warm-up call waits for that call only, not for the whole warm-up."""
    from tbcm.service.batcher import Batcher, Job
    from tbcm.service.config import ServiceConfig

    clock = FakeClock()
    model = RecordingModel(clock)
    batcher = Batcher(ServiceConfig(microbatch=1), mock_metrics(), clock)
    order, first_call_running, release = [], threading.Event(), threading.Event()

    def warm_up_call(i: int):
        order.append(f"warm-up {i}")
        if i == 0:
            first_call_running.set()
            assert release.wait(timeout=60)

    def warm_up() -> None:  # what Engine._load does with warm_up_calls(model)
        for i in range(3):
            batcher.call(lambda i=i: warm_up_call(i), alone=True).result(timeout=60)

    model.hold.set()
    swapping = threading.Thread(target=warm_up)
    try:
        swapping.start()
        assert first_call_running.wait(timeout=60)
        job = Job(model, [PROMPT], [0], [4.5], steps=1, size=16, deadline=1e9)
        job.future.add_done_callback(lambda _: order.append("request"))
        batcher.submit(job)
        release.set()
        swapping.join(timeout=60)
        assert answer(job, clock)[0] == 200
        assert order == ["warm-up 0", "request", "warm-up 1", "warm-up 2"]
    finally:
        release.set()
        batcher.close()


class EncodingRecordingModel(RecordingModel):
    """Also records which prompts the text stage encoded while the first generator call was still held, and
    counts cache hits as a real prompt cache would."""

    def __init__(self, clock: FakeClock):
        super().__init__(clock)
        self.encoded_while_held: list[str] = []
        self.cache: set[str] = set()

    def encode_prompts(self, prompts) -> int:
        if not self.hold.is_set():
            self.encoded_while_held += prompts
        hits = sum(prompt in self.cache for prompt in prompts)
        self.cache.update(prompts)
        return hits


@pytest.mark.parametrize("text_stage", [True, False])
def test_queued_prompts_are_encoded_while_the_generator_runs_an_earlier_call(text_stage):
    """With the text stage, the prompts of requests queued behind a running call are encoded before that call
    ends; without it, only inside their own call. Hits and misses count distinct prompts either way."""
    from tbcm.service.batcher import Batcher, Job
    from tbcm.service.config import ServiceConfig

    clock = FakeClock()
    model = EncodingRecordingModel(clock)
    metrics = mock_metrics()
    batcher = Batcher(ServiceConfig(microbatch=1, text_stage=text_stage), metrics, clock)

    def job(prompts: list[str]) -> Job:
        return Job(model, prompts, list(range(len(prompts))), [4.5] * len(prompts), steps=1, size=16, deadline=1e9)

    try:
        jobs = [job(["first"])]
        batcher.submit(jobs[0])
        deadline = time.monotonic() + 60
        while not batcher.state()["running"] and time.monotonic() < deadline:
            time.sleep(0.005)
        jobs += [job(["second", "second"]), job(["third", "first"])]
        for queued in jobs[1:]:
            batcher.submit(queued)
        if text_stage:
            assert all(queued.text_ready.wait(timeout=60) for queued in jobs)
        model.hold.set()
        assert all(answer(queued, clock)[0] == 200 for queued in jobs)
        assert model.encoded_while_held == (["first", "second", "third", "first"] if text_stage else ["first"])
        hits = sum(call.args[0] for call in metrics.prompt_cache_hits.inc.call_args_list)
        misses = sum(call.args[0] for call in metrics.prompt_cache_misses.inc.call_args_list)
        assert (hits, misses) == (1, 3)  # "first" again is the one hit
    finally:
        model.hold.set()
        batcher.close()


def test_closing_releases_a_call_waiting_for_prompts_the_text_stage_will_not_encode():
    """Request X's prompt is still encoding when its client gives up; the next call, request A, waits for A's
    prompt, which comes after X's. The service closes then, so the text stage stops before A's. The call goes on
    (A's prompt is encoded inside it) and close returns at once, instead of the generator waiting for A forever."""
    from tbcm.service.batcher import Batcher, Job
    from tbcm.service.config import ServiceConfig

    clock = FakeClock()
    model = EncodingRecordingModel(clock)
    encoding, finish_encoding = threading.Event(), threading.Event()

    def encode(prompts) -> int:
        if prompts == ["X"]:
            encoding.set()
            assert finish_encoding.wait(timeout=60)
        return 0

    model.encode_prompts = encode
    batcher = Batcher(ServiceConfig(microbatch=1), mock_metrics(), clock)
    first, given_up, waiting = (Job(model, [name], [0], [4.5], steps=1, size=16, deadline=1e9) for name in "GXA")
    try:
        batcher.submit(first)
        deadline = time.monotonic() + 60
        while not batcher.state()["running"] and time.monotonic() < deadline:
            time.sleep(0.005)
        batcher.submit(given_up)
        batcher.submit(waiting)
        assert encoding.wait(timeout=60) and given_up.future.cancel()
        model.hold.set()  # the generator finishes G, skips X, takes A and waits for its prompt
        while batcher.state()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.005)
        closing = threading.Thread(target=batcher.close)
        closing.start()
        time.sleep(0.2)  # close has released A, and the text stage is still inside X's encoding
        finish_encoding.set()
        closing.join(timeout=20)
        assert not closing.is_alive()
        assert answer(first, clock)[0] == 200 and answer(waiting, clock)[0] == 200
    finally:
        model.hold.set()
        finish_encoding.set()


def test_a_call_takes_later_requests_only_once_their_prompts_are_encoded():
    """Two requests queue behind a running call; the second's prompt is still encoding when that call ends, so the
    next call takes the first alone instead of waiting for the text stage, and the second gets its own call."""
    from tbcm.service.batcher import Batcher, Job
    from tbcm.service.config import ServiceConfig

    clock = FakeClock()
    model = RecordingModel(clock)
    release_text = threading.Event()

    def encode(prompts) -> int:
        if prompts == ["slow"]:
            assert release_text.wait(timeout=60)
        return 0

    model.encode_prompts = encode
    batcher = Batcher(ServiceConfig(microbatch=1), mock_metrics(), clock)
    jobs = [Job(model, [name], [0], [4.5], steps=1, size=16, deadline=1e9) for name in ("first", "second", "slow")]
    try:
        batcher.submit(jobs[0])
        deadline = time.monotonic() + 60
        while not batcher.state()["running"] and time.monotonic() < deadline:
            time.sleep(0.005)
        for job in jobs[1:]:
            batcher.submit(job)
        assert jobs[1].text_ready.wait(timeout=60) and not jobs[2].text_ready.is_set()
        model.hold.set()
        assert answer(jobs[1], clock)[0] == 200 and not jobs[2].future.done()
        release_text.set()
        assert answer(jobs[2], clock)[0] == 200
        assert model.calls == [1, 1, 1]
    finally:
        model.hold.set()
        release_text.set()
        batcher.close()


@pytest.mark.parametrize("alone", [True, False])
def test_the_text_stage_pauses_only_for_calls_that_need_the_device_alone(alone):
    """A request arrives while a warm-up call runs: its prompts are encoded during that call unless the call needs
    the device alone (CUDA-graph capture), in which case only after it."""
    from tbcm.service.batcher import Batcher, Job
    from tbcm.service.config import ServiceConfig

    clock = FakeClock()
    model = EncodingRecordingModel(clock)
    batcher = Batcher(ServiceConfig(microbatch=1), mock_metrics(), clock)
    running, release = threading.Event(), threading.Event()
    job = Job(model, ["queued"], [0], [4.5], steps=1, size=16, deadline=1e9)

    def warm_up_call():
        running.set()
        assert release.wait(timeout=60)
        return job.text_ready.is_set()

    try:
        done = batcher.call(warm_up_call, alone=alone)
        assert running.wait(timeout=60)
        batcher.submit(job)
        if not alone:
            assert job.text_ready.wait(timeout=60)
        else:  # the text stage has taken the job; it encodes only under the lock, which the call holds
            deadline = time.monotonic() + 60
            while batcher._text_jobs and time.monotonic() < deadline:
                time.sleep(0.001)
            assert not batcher._text_jobs and batcher._device_alone.locked() and not job.text_ready.is_set()
        release.set()
        assert done.result(timeout=60) is (not alone)
        model.hold.set()
        assert answer(job, clock)[0] == 200
    finally:
        release.set()
        model.hold.set()
        batcher.close()
