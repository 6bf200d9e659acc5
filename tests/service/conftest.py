"""Service fixtures: in-process services (BentoML's ASGI app + starlette TestClient, any config) and one real
`tbcm serve` subprocess on a free port (for what only a real server shows: /metrics from the worker, the openai
client, load tests, hot swap under load). Both serve the tiny student."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin-token"
READY_TIMEOUT_S = 1800  # a cold `bentoml serve` imports torch and diffusers: many minutes on a starved CPU


def wait_ready(get, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if get("/readyz").status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"service not ready after {timeout} s")


@pytest.fixture(scope="session")
def service_app():
    """One BentoML ASGI app for the session: its middlewares register Prometheus metrics once per process; each
    TestClient runs its lifespan anew, so every test still gets a fresh service instance with its own config."""
    from tbcm.service.service import TBCMService

    return TBCMService.to_asgi()


@pytest.fixture
def make_service(monkeypatch, tiny_student_dir, service_app):
    """make_service(**config) -> a started TestClient of TBCMService with that ServiceConfig (ready, unless
    wait_ready_s=0)."""
    from starlette.testclient import TestClient

    from tbcm.service.config import ServiceConfig

    stack = contextlib.ExitStack()

    def start(wait_ready_s: float = 120, **overrides) -> TestClient:
        config = ServiceConfig(**{"model": str(tiny_student_dir), "threads": 1, **overrides})
        for name, value in config.to_env().items():
            monkeypatch.setenv(name, value)
        client = stack.enter_context(TestClient(service_app))
        if wait_ready_s:
            wait_ready(client.get, wait_ready_s)
        return client

    with stack:
        yield start


@pytest.fixture(scope="session")
def second_student_dir(tmp_path_factory):
    from tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "student-v2", student=True, seed=2)


@pytest.fixture(scope="session")
def admin_headers():
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(model: Path, log_path: Path, *extra: str):
    """`tbcm serve MODEL` on a free port (admin token set), ready; yields its base URL; stopped with SIGINT."""
    port = free_port()
    env = {**os.environ, "TBCM_ADMIN_TOKEN": ADMIN_TOKEN}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tbcm.cli.main", "serve", "--model", str(model),
                                 "--port", str(port), "--host", "127.0.0.1", "--threads", "1", *extra],
                                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(lambda path: httpx.get(url + path, timeout=5), READY_TIMEOUT_S)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.returncode not in (0, -signal.SIGINT):
            print(log_path.read_text()[-4000:])


@pytest.fixture(scope="session")
def start_server():
    """start_server(model, log_path, *args): the `serving` context manager, for tests that start servers."""
    return serving


@pytest.fixture(scope="session")
def live_log(tmp_path_factory) -> Path:
    """The log (stdout and stderr) of the live server."""
    return tmp_path_factory.mktemp("live") / "serve.log"


@pytest.fixture(scope="session")
def live_server(tiny_student_dir, second_student_dir, live_log):
    """`tbcm serve` of the tiny student on a free port, allowed to swap to both tiny students; yields its URL."""
    roots = f"{tiny_student_dir.parent},{second_student_dir.parent}"
    with serving(tiny_student_dir, live_log, "--model-roots", roots) as url:
        yield url
