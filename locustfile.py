"""Locust load for the tbcm service (closed loop: each user sends its next request when the last is answered).

    locust -f locustfile.py --host http://127.0.0.1:3000 --headless -u 8 -r 8 -t 60s

Every non-200 is a Locust failure named by its status (429/503 are load shed by design, 504 timeouts). Locust
cannot hold an arrival rate while the server slows down and rounds response times (10 ms steps above 100 ms), so
open-loop rates, tail latency and SLO sweeps use `tbcm loadtest` (docs/operators.md).
Set TBCM_LOCUST_BODY to JSON merged into every request, e.g. '{"steps": 2}'.
"""
from __future__ import annotations

import json
import os
import random

from locust import HttpUser, between, task

from tbcm.service.loadtest import DEFAULT_PROMPTS

EXTRA = json.loads(os.environ.get("TBCM_LOCUST_BODY", "{}"))


class ImageUser(HttpUser):
    wait_time = between(0, 0.05)

    @task(3)
    def generate(self) -> None:
        self.client.post("/generate", json={"prompt": random.choice(DEFAULT_PROMPTS), **EXTRA})

    @task(1)
    def openai_images(self) -> None:
        self.client.post("/v1/images/generations", json={"prompt": random.choice(DEFAULT_PROMPTS), **EXTRA})
