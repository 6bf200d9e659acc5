"""The BentoML service: `bentoml serve service.service:TBCMService` (what `tbcm serve` runs).

One worker process holds one model copy, one generator thread and the batcher (service/batcher.py); BentoML
provides the HTTP server, /livez, /readyz (ready once the model is loaded and warmed up) and /metrics (its own
series plus our tbcm_* ones). Scale out with replicas, not workers (docs/operators.md).
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import bentoml

from tbcm.service.config import ServiceConfig
from tbcm.service.engine import Engine
from tbcm.service.http import build_app
from tbcm.service.metrics import LATENCY_BUCKETS, worker_metrics
from tbcm.service.runtime import generator_threads

log = logging.getLogger("tbcm.service")
IMPORT_CONFIG = ServiceConfig.from_env()  # only for the decorator's server-side timeout; workers re-read it
TIMEOUT_MARGIN_S = 30  # BentoML's own request timeout sits this far behind ours, as a last resort


def current_engine() -> Engine:
    return bentoml.get_current_service().engine


def stop_server(message: str) -> None:
    """The model cannot be served: say why, then stop the whole server rather than restart the worker forever."""
    log.error("tbcm: %s", message)
    if bentoml.server_context.worker_index is not None:  # inside `bentoml serve`: stop its arbiter, our parent
        os.kill(os.getppid(), signal.SIGTERM)
        os._exit(3)


@bentoml.asgi_app(build_app(current_engine))
@bentoml.service(name="tbcm", workers=1, traffic={"timeout": IMPORT_CONFIG.request_timeout_s + TIMEOUT_MARGIN_S},
                 metrics={"enabled": True, "duration": {"buckets": list(LATENCY_BUCKETS)}},
                 logging={"access": {"enabled": IMPORT_CONFIG.access_log}})
class TBCMService:
    def __init__(self) -> None:
        logging.getLogger("tbcm").setLevel(logging.INFO)  # BentoML's root handler prints it; its root level is WARNING
        config = ServiceConfig.from_env()
        if config.switch_interval_ms:
            sys.setswitchinterval(config.switch_interval_ms / 1000)
        if threads := generator_threads(config):
            import torch

            torch.set_num_threads(threads)
        self.engine = Engine(config, worker_metrics(), on_fatal=stop_server)

    def __is_ready__(self) -> bool:
        return self.engine.ready

    @bentoml.on_shutdown
    def close(self) -> None:
        self.engine.close()
