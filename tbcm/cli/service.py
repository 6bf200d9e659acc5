"""`tbcm serve`, `tbcm loadtest`, `tbcm swap`, `tbcm store-model`: the BentoML service and its tools."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tbcm.cli.options import add_config_options, config_from_args

WORKING_DIR = Path(__file__).resolve().parents[2]  # the folder that holds the tbcm package: bentoml imports it from there
SERVICE_IMPORT = "tbcm.service.service:TBCMService"  # what bentofile.yaml names too


def register(sub) -> None:
    from tbcm.service.config import ServiceConfig
    from tbcm.service.loadtest import LoadTestConfig

    s = sub.add_parser("serve", help="serve a model over HTTP (BentoML): /generate, /v1/images/generations, ...")
    add_config_options(s, ServiceConfig)
    s.add_argument("--port", type=int, default=3000, help="HTTP port (default: 3000)")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    s.set_defaults(handler=serve)

    t = sub.add_parser("loadtest", help="load-test a running service (open or closed loop, sweep) and report")
    t.add_argument("url", help="base URL of the service, e.g. http://127.0.0.1:3000")
    add_config_options(t, LoadTestConfig)
    t.set_defaults(handler=loadtest)

    w = sub.add_parser("swap", help="hot-swap the model of a running service (needs TBCM_ADMIN_TOKEN)")
    w.add_argument("url", help="base URL of the service")
    w.add_argument("--model", required=True, help="pipeline folder (as the server sees it), shipped name or tag")
    w.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for load + warm-up")
    w.set_defaults(handler=swap)

    m = sub.add_parser("store-model", help="copy a pipeline folder into the BentoML model store")
    m.add_argument("model", help="pipeline folder or shipped name (student, teacher)")
    m.add_argument("--name", default="tbcm-student", help="model-store name (default: tbcm-student)")
    m.set_defaults(handler=store_model)


def serve(args) -> int:
    """Check the model resolves, hand the config to the worker through TBCM_* variables, run `bentoml serve` in this
    process (its arbiter) with a Prometheus multiprocess folder of this server's own, removed when it stops.

    BentoML's default folder, ~/bentoml/prometheus_multiproc_dir, is shared by every BentoML server on the host, and
    each one wipes it at start; BentoML reads the folder from its container (what its own pytest plugin sets), and
    hands it to the worker as PROMETHEUS_MULTIPROC_DIR."""
    from tbcm.service.config import ServiceConfig
    from tbcm.models.pipeline import shown_path
    from tbcm.service.runtime import resolve_spec

    config = config_from_args(ServiceConfig, args)
    path = resolve_spec(config.model)  # a missing model fails here, in seconds, naming it
    os.environ.update(config.to_env())
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml_cli.cli import cli

    with tempfile.TemporaryDirectory(prefix=f"tbcm-metrics-{args.port}-") as metrics_dir:
        print(f"tbcm serve: model {config.model!r} -> {shown_path(path)}; serving on http://{args.host}:{args.port}; "
              f"metrics in {metrics_dir}", file=sys.stderr, flush=True)
        BentoMLContainer.prometheus_multiproc_dir.set(metrics_dir)
        cli.main(["serve", SERVICE_IMPORT, "--port", str(args.port), "--host", args.host, "--working-dir",
                  str(WORKING_DIR)], prog_name="bentoml", standalone_mode=False)
    return 0


def loadtest(args) -> int:
    from tbcm.service.loadrun import loadtest as run
    from tbcm.service.loadtest import LoadTestConfig, summary

    report = run(args.url, config_from_args(LoadTestConfig, args))
    print(summary(report))
    if args.json_out:
        print(f"wrote {args.json_out}")
    return 0


def swap(args) -> int:
    from tbcm.service.client import ServiceClient, admin_token

    response = ServiceClient(args.url).swap(args.model, admin_token(), args.timeout)
    print(json.dumps(response.json(), indent=2))
    return 0 if response.status_code == 200 else 1


def store_model(args) -> None:
    import bentoml

    from tbcm.models.pipeline import resolve_model, shown_path

    path = resolve_model(args.model)
    info = json.loads((path / "tbcm.json").read_text()) if (path / "tbcm.json").exists() else {}
    with bentoml.models.create(args.name, labels={"kind": str(info.get("kind", "unknown"))},
                               metadata={"source": str(path)}) as model:
        shutil.copytree(path, model.path, dirs_exist_ok=True)
    print(f"stored {shown_path(path)} as {model.tag} (serve it with --model {model.tag})")
