"""Locust load for the tbcm service (closed loop: each user sends its next request when the last is answered).

    locust -f locustfile.py --host http://127.0.0.1:3000 --headless -u 8 -r 8 -t 60s

Every non-200 is a Locust failure named by its status (429/503 are load shed by design, 504 timeouts). Locust
cannot hold an arrival rate while the server slows down and rounds response times (10 ms steps above 100 ms), so
open-loop rates, tail latency and SLO sweeps use `tbcm loadtest` (docs/operators.md).
Prompts are unique, as `tbcm loadtest` sends them (service/loadprompts.py), so the service's encoded-prompt cache
does not flatter the numbers. Environment: TBCM_LOCUST_BODY, JSON merged into every request (e.g. '{"steps": 2}');
TBCM_LOCUST_REPEAT_RATIO, the chance a request repeats a prompt already sent (default 0); TBCM_LOCUST_PROMPTS, a
file of prompts, one a line (default: the shapes captions).
"""
from __future__ import annotations

import json
import os

from locust import HttpUser, between, task

from tbcm.service.loadprompts import PromptMix

EXTRA = json.loads(os.environ.get("TBCM_LOCUST_BODY", "{}"))
PROMPTS = PromptMix(seed=int.from_bytes(os.urandom(4), "little"),
                    repeat_ratio=float(os.environ.get("TBCM_LOCUST_REPEAT_RATIO", "0")),
                    prompt_file=os.environ.get("TBCM_LOCUST_PROMPTS", ""))


class ImageUser(HttpUser):
    wait_time = between(0, 0.05)

    @task(3)
    def generate(self) -> None:
        self.client.post("/generate", json={"prompt": PROMPTS.next(), **EXTRA})

    @task(1)
    def openai_images(self) -> None:
        self.client.post("/v1/images/generations", json={"prompt": PROMPTS.next(), **EXTRA})
