"""Hot swap under load: p99 with two swaps against p99 without, at half the sustainable rate. Prints a table and
writes JSON.

    python -m benchmarks.bench_swap                       # the shipped student, swapped to a copy of itself and back

One fresh server for the rate: 16 closed-loop clients measure the sustainable throughput, and the load is Poisson
at `--load` (0.5) of it (or at `--rate`, for A/B runs of two versions at one rate). Then `--pairs` pairs of runs,
each on a fresh server (`tbcm serve --model-roots` naming a temporary folder that holds a copy of the model) with
the same arrivals and prompts: one without a swap, one with `POST /admin/swap` to the copy `--swap-at-s` into the
measured part and back to the model `--swap-back-s` later. Goals (issue 35): no failed request, and p99 with swaps
within 2x of p99 without, in every pair.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.bench_serving import machine, run_and_report, start_server
from benchmarks.provenance import command, transformer_sha256
from tbcm.models.pipeline import shown_path
from tbcm.service.client import ServiceClient
from tbcm.service.config import ADMIN_TOKEN_ENV
from tbcm.service.loadrun import prompt_mix, run_load
from tbcm.service.loadtest import LoadTestConfig
from tbcm.service.runtime import resolve_spec

TOKEN = "bench-swap-token"  # the admin token of the benchmark's own servers


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="student", help="shipped name or pipeline folder (served and copied)")
    parser.add_argument("--load", type=float, default=0.5, help="share of the 16-client throughput sent, Poisson")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="requests/s sent instead (A/B runs of two versions at one rate); 0: --load")
    parser.add_argument("--duration-s", type=float, default=45.0, help="measured seconds of each run")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each run")
    parser.add_argument("--swap-at-s", type=float, default=15.0, help="first swap, seconds into the measured part")
    parser.add_argument("--swap-back-s", type=float, default=10.0, help="seconds from the first swap to the second")
    parser.add_argument("--pairs", type=int, default=2, help="runs without and with swaps, alternating")
    parser.add_argument("--seed", type=int, default=31, help="arrivals and prompts, the same in every run")
    parser.add_argument("--json-out", default="runs/bench/swap.json", help="where the JSON report goes")
    return parser.parse_args()


def swaps(url: str, at_s: float, targets: list[tuple[float, str]], answers: list[dict]) -> None:
    """POST /admin/swap to each (offset, target) of `targets` at `at_s` + offset seconds from now."""
    client = ServiceClient(url)
    started = time.monotonic()
    for offset, target in targets:
        time.sleep(max(0.0, started + at_s + offset - time.monotonic()))
        sent = time.perf_counter()
        response = client.swap(target, TOKEN)
        live = response.json().get("live", {}) if response.status_code == 200 else {}
        answers.append({"to": target, "status": response.status_code, "answer_s": round(time.perf_counter() - sent, 3),
                        "load_seconds": live.get("load_seconds")})


def one_run(model: str, roots: str, load: LoadTestConfig, swap_to: list[tuple[float, str]]) -> dict:
    """A fresh server under `load`; the swaps in `swap_to` ((seconds into the measured part, target), ...)."""
    proc, url = start_server(model, 0, ("--model-roots", roots))
    try:
        answers: list[dict] = []
        thread = None
        if swap_to:
            thread = threading.Thread(target=swaps, args=(url, load.warmup_s, swap_to, answers))
            thread.start()
        report = run_load(url, load, prompt_mix(load))
        if thread:
            thread.join()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    keep = ("requests", "throughput_rps", "latency_ms", "status_counts", "latency_breakdown_ms", "prompt_cache")
    return {**{key: report[key] for key in keep}, "swaps": answers}


def closed_loop_throughput(model: str, base: LoadTestConfig) -> float:
    proc, url = start_server(model, 0)
    try:
        return run_load(url, replace(base, mode="closed", concurrency=16))["throughput_rps"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def run(args: argparse.Namespace) -> dict:
    path = resolve_spec(args.model)  # a missing model is an error here, never a silent fallback
    os.environ[ADMIN_TOKEN_ENV] = TOKEN  # inherited by the servers started below
    report = {"command": command(), "machine": machine(), "args": vars(args),
              "model": {"spec": args.model, "path": shown_path(path), "transformer_sha256": transformer_sha256(path)}}
    base = LoadTestConfig(duration_s=15.0, warmup_s=args.warmup_s, progress=False, slo_ms=1e9, seed=args.seed)
    with tempfile.TemporaryDirectory() as roots:
        copy = Path(roots) / "copy"
        shutil.copytree(path, copy)
        sustainable = None if args.rate else closed_loop_throughput(args.model, base)
        rate = args.rate or round(args.load * sustainable, 1)
        load = replace(base, mode="open", rate=rate, duration_s=args.duration_s)
        report["sustainable_rps"], report["rate"] = sustainable, load.rate
        targets = [(args.swap_at_s, str(copy)), (args.swap_at_s + args.swap_back_s, args.model)]
        report["pairs"] = [{"no_swap": one_run(args.model, roots, load, []),
                            "two_swaps": one_run(args.model, roots, load, targets)} for _ in range(args.pairs)]
    report["goals"] = goals(report["pairs"])
    return report


def goals(pairs: list[dict]) -> dict:
    ratios = [pair["two_swaps"]["latency_ms"]["p99"] / pair["no_swap"]["latency_ms"]["p99"] for pair in pairs]
    failed = sum(n for run in (pair[arm] for pair in pairs for arm in pair)
                 for status, n in run["status_counts"].items() if status != "200")
    swaps_ok = all(s["status"] == 200 for pair in pairs for s in pair["two_swaps"]["swaps"])
    return {"p99 two swaps / p99 no swap <= 2": {"value": [round(r, 2) for r in ratios], "goal": 2.0,
                                                  "met": max(ratios) <= 2.0},
            "failed requests = 0, every swap 200": {"value": failed, "goal": 0, "met": failed == 0 and swaps_ok}}


def table(report: dict) -> str:
    lines = [f"model {report['model']['spec']} ({report['model']['path']}); {report['machine']['cpu']}, "
             f"{report['machine']['cpus']} CPUs; 16 clients: "
             f"{f'{sustainable:.1f}' if (sustainable := report['sustainable_rps']) else '(not measured)'} ok/s; "
             "Poisson at "
             f"{report['rate']} requests/s for {report['args']['duration_s']:g} s",
             f"{'pair':<5} {'run':<10} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  statuses, swaps"]
    for number, pair in enumerate(report["pairs"], 1):
        for arm, run in pair.items():
            lat = run["latency_ms"]
            swapped = "; ".join(f"{s['status']} in {s['answer_s']} s (load and warm-up {s['load_seconds']} s)"
                                for s in run["swaps"])
            lines.append(f"{number:<5} {arm:<10} {run['requests']:>8} {lat['p50']:>8.1f} {lat['p99']:>8.1f} "
                         f"{lat['max']:>8.1f}  {run['status_counts']} {swapped}")
    lines += [f"{'MET ' if g['met'] else 'MISS'} {name}: {g['value']}" for name, g in report["goals"].items()]
    return "\n".join(lines)


def main() -> int:
    return run_and_report("bench_swap", parse_args(), run, table)


if __name__ == "__main__":
    sys.exit(main())
