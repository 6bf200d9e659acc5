"""Our batcher and routes (`tbcm serve`) against BentoML's own adaptive batching (`@bentoml.api(batchable=True)`,
`benchmarks/adaptive_service.py`), side by side on this machine. Prints a table and writes JSON.

    python -m benchmarks.bench_adaptive                   # the shipped student behind both

Each server, fresh, gets the same phases: one closed-loop client, 16 clients, Poisson arrivals at 70% of its own
16-client throughput, and `--overload-s` at 3x that (statuses: a bounded queue answers 429 at once; BentoML's
dispatcher sheds with 503). Every request brings a new prompt (to the BentoML variant as a one-prompt list, the
batchable API's argument), so both encode every prompt.
Both run one worker process, a 4-image batch limit and one row a pass with every core but one for torch.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import replace

from benchmarks.bench_serving import POISSON_LOAD, free_port, launch, machine, run_and_report, start_server
from benchmarks.provenance import command, transformer_sha256
from tbcm.models.pipeline import shown_path
from tbcm.service.loadrun import prompt_mix, run_load
from tbcm.service.loadtest import LoadTestConfig
from tbcm.service.runtime import resolve_spec

SERVERS = ("tbcm serve", "BentoML adaptive batching")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="student", help="shipped name or pipeline folder, behind both servers")
    parser.add_argument("--duration-s", type=float, default=15.0, help="measured seconds of each load phase")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each phase")
    parser.add_argument("--overload-s", type=float, default=20.0, help="seconds of 3x overload")
    parser.add_argument("--json-out", default="runs/bench/serving-adaptive.json", help="where the JSON report goes")
    return parser.parse_args()


def start(name: str, model: str):
    if name == SERVERS[0]:
        return start_server(model, 0)
    port = free_port()
    return launch([sys.executable, "-m", "bentoml", "serve", "benchmarks.adaptive_service:Images", "--port", str(port),
                   "--host", "127.0.0.1"], port, model, env={**os.environ, "TBCM_MODEL": model})


class OnePromptLists:
    """A prompt mix whose prompts come as one-prompt lists: the batchable API's argument is a list."""

    def __init__(self, mix):
        self.mix = mix

    def next(self) -> list[str]:
        return [self.mix.next()]

    def __getattr__(self, name: str):
        return getattr(self.mix, name)


def phases(url: str, base: LoadTestConfig, overload_s: float, as_lists: bool) -> dict:
    mix = OnePromptLists(prompt_mix(base)) if as_lists else prompt_mix(base)
    keep = ("requests", "throughput_rps", "latency_ms", "status_counts", "prompts")
    report = {"c1": run_load(url, replace(base, mode="closed", concurrency=1), mix),
              "c16": run_load(url, replace(base, mode="closed", concurrency=16), mix)}
    sustainable = report["c16"]["throughput_rps"]
    report["poisson70"] = run_load(url, replace(base, mode="open", rate=POISSON_LOAD * sustainable), mix)
    report["overload3x"] = run_load(url, replace(base, mode="open", rate=3 * sustainable, duration_s=overload_s), mix)
    return {phase: {key: run[key] for key in keep} for phase, run in report.items()}


def run(args: argparse.Namespace) -> dict:
    path = resolve_spec(args.model)  # a missing model is an error here, never a silent fallback
    base = LoadTestConfig(duration_s=args.duration_s, warmup_s=args.warmup_s, progress=False, slo_ms=1e9)
    report = {"command": command(), "machine": machine(), "args": vars(args),
              "model": {"spec": args.model, "path": shown_path(path), "transformer_sha256": transformer_sha256(path)},
              "servers": {}}
    for name in SERVERS:
        proc, url = start(name, args.model)
        try:
            report["servers"][name] = phases(url, base, args.overload_s, as_lists=name != SERVERS[0])
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    return report


def table(report: dict) -> str:
    servers = report["servers"]
    def p50_p99(run: dict) -> str:
        return f"{run['latency_ms']['p50']:.1f} / {run['latency_ms']['p99']:.1f}"

    rows = {"1 client: p50 / p99 ms": lambda s: p50_p99(s["c1"]),
            "16 clients: requests/s": lambda s: f"{s['c16']['throughput_rps']:.1f}",
            "16 clients: p50 / p99 ms": lambda s: p50_p99(s["c16"]),
            "Poisson at 70%: p50 / p99 ms": lambda s: p50_p99(s["poisson70"]),
            "Poisson p99 / 1-client p50":
                lambda s: f"{s['poisson70']['latency_ms']['p99'] / s['c1']['latency_ms']['p50']:.2f}x",
            "3x overload: statuses": lambda s: str(s["overload3x"]["status_counts"]),
            "3x overload: p50 of the 200s, ms": lambda s: f"{s['overload3x']['latency_ms']['p50']:.1f}"
            if s["overload3x"]["latency_ms"] else "no 200s"}
    lines = [f"model {report['model']['spec']} ({report['model']['path']}); {report['machine']['cpu']}, "
             f"{report['machine']['cpus']} CPUs, bentoml {report['machine']['bentoml']}",
             f"{'':<36}" + "".join(f"{name:<30}" for name in servers)]
    lines += [f"{label:<36}" + "".join(f"{show(s):<30}" for s in servers.values()) for label, show in rows.items()]
    return "\n".join(lines)


def main() -> int:
    return run_and_report("bench_adaptive", parse_args(), run, table)


if __name__ == "__main__":
    sys.exit(main())
