"""Serving benchmark: the in-process generator against the HTTP service, batching gain, tail latency under
Poisson load, and overload behaviour, in one run on this machine. Prints a table and writes JSON.

    python -m benchmarks.bench_serving                    # the shipped student (an error if it is missing)
    python -m benchmarks.bench_serving --model teacher    # or a pipeline folder, or --tiny (a tiny random student)

Goals: HTTP p50 at concurrency 1 <= 1.15x the generator's p50 at batch 1 (measured in alternating rounds, side by
side); throughput at 16 clients >= 2.5x one
client; Poisson at 70% of the 16-client throughput: p99 <= 3x the unloaded HTTP p50; 3x that rate for
--overload-s: only 200/429/503, no 5xx, RSS flat (within 10%), and full recovery (c=1 p50 back within 25%).
Every prompt is new unless --repeat-ratio says otherwise (in-process and over HTTP alike), so the service's
encoded-prompt cache only helps as much as it would with real users; each phase reports its cache hit ratio.
"""
from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

from tbcm.models.pipeline import shown_path
from tbcm.service.config import ServiceConfig
from tbcm.service.loadprompts import PromptMix
from tbcm.service.loadrun import prompt_mix, run_load
from tbcm.service.loadtest import LoadTestConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

PROMPT = "a small red circle in the middle"  # the in-process generator's warm-up
SHED = {"200", "429", "503"}
POISSON_LOAD = 0.7  # the tail phase's rate, as a share of the 16-client throughput


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="student", help="shipped name, pipeline folder or model-store tag")
    parser.add_argument("--tiny", action="store_true", help="benchmark a tiny random student instead (smoke run)")
    parser.add_argument("--duration-s", type=float, default=15.0, help="measured seconds of each load phase")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each phase")
    parser.add_argument("--overload-s", type=float, default=60.0, help="seconds of 3x overload")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in generator and server (0: the service's default)")
    defaults = ServiceConfig()
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="the server's max_batch")
    parser.add_argument("--microbatch", type=int, default=defaults.microbatch,
                        help="rows per pass, in the server and the in-process generator alike (0: the "
                             "service's default for the device)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra `tbcm serve` argument for A/B runs, repeatable: --serve-arg=--switch-interval-ms=5")
    parser.add_argument("--repeat-ratio", type=float, default=0.0,
                        help="chance that a request repeats a prompt already sent (0: every prompt is new)")
    parser.add_argument("--json-out", default="runs/bench/serving.json", help="where the JSON report goes")
    return parser.parse_args()


SERVER_PACKAGES = ("uvicorn", "uvloop", "httptools", "aiohttp")  # uvicorn uses uvloop and httptools when present


def machine() -> dict:
    import bentoml
    import diffusers
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "bentoml": bentoml.__version__, **{name: installed_version(name) for name in SERVER_PACKAGES}}


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_generator(path: Path, threads: int, microbatch: int):
    """The one-step generator in this process, with as many torch threads as the server's generator gets, warm."""
    import torch

    from tbcm.models.generator import Generator
    from tbcm.models.pipeline import load_pipeline
    from tbcm.service.runtime import generator_threads, pick_device, rows_per_pass

    config = ServiceConfig(threads=threads, microbatch=microbatch)
    if threads := generator_threads(config):
        torch.set_num_threads(threads)
    generator = Generator(load_pipeline(path, device=pick_device(config.device)), microbatch=rows_per_pass(config))
    for seed in range(3):
        generator.generate([PROMPT], [seed])
    return generator


def timed_ms(call, seconds: float) -> list[float]:
    """Milliseconds of each call(i) made back to back for `seconds`."""
    times, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        call(len(times))
        times.append((time.perf_counter() - started) * 1000)
    return times


def overhead(url: str, generator, load: LoadTestConfig, mix: PromptMix, rounds: int = 5) -> dict:
    """One image in-process (text encoding + transformer + VAE decode) against closed-loop HTTP with one client (the
    load tester's aiohttp client), in alternating rounds of load.duration_s / rounds each, p50 = the median of the
    rounds' p50s: this shared machine's speed drifts by 10-20% over minutes, so both are measured side by side."""
    seconds = load.duration_s / rounds
    local, remote = [], []
    for _ in range(rounds):
        local.append(statistics.median(timed_ms(lambda i: generator.generate([mix.next()], [i]), seconds)))
        remote.append(run_load(url, replace(load, mode="closed", concurrency=1, duration_s=seconds,
                                            warmup_s=0.5), mix)["latency_ms"]["p50"])
    return {"rounds": rounds, "generator_p50_ms": round(statistics.median(local), 2),
            "http_p50_ms": round(statistics.median(remote), 2), "generator_round_p50s": [round(v, 2) for v in local],
            "http_round_p50s": remote}


def start_server(model: str, threads: int, extra_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`tbcm serve` on a free local port (plus `extra_args`, e.g. ("--microbatch", "1")), once /readyz is 200."""
    port = free_port()
    return launch([sys.executable, "-m", "tbcm.cli.main", "serve", "--model", model, "--port", str(port), "--host",
                   "127.0.0.1", "--threads", str(threads), *extra_args], port, model)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: list[str], port: int, what: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server `command` listening on `port`; return it and its URL once its /readyz answers 200."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"bench_serving: the service for {what!r} did not become ready (exit code {proc.poll()})")


STAGE_FAMILIES = ("tbcm_request_stage_seconds", "tbcm_batch_stage_seconds")  # per request, per generator call


def server_counters(url: str) -> dict[str, float]:
    """The _sum and _count samples of the service's stage and batch-size histograms, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counters = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name in (*STAGE_FAMILIES, "tbcm_batch_size"):
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    counters[sample.name + sample.labels.get("stage", "")] = sample.value
    return counters


def server_view(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the server saw during a phase: generator calls, images per call, mean ms per stage (per call for the
    generator's stages, per request for queue wait and image encoding)."""
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    calls = delta["tbcm_batch_size_count"]
    stages = {key.removeprefix(family + "_sum"): delta[key] / count * 1000
              for family in STAGE_FAMILIES for key in delta if key.startswith(family + "_sum")
              if (count := delta[key.replace("_sum", "_count", 1)])}
    return {"generator_calls": int(calls), "images_per_call": round(delta["tbcm_batch_size_sum"] / calls, 2)
            if calls else None, "stage_ms_mean": {stage: round(ms, 2) for stage, ms in stages.items()}}


def phase(url: str, load: LoadTestConfig, mix: PromptMix, pid: int | None = None) -> dict:
    """One load phase (under `overload` RSS sampling when pid is given) with the server's view of it."""
    before = server_counters(url)
    report = overload(url, load, mix, pid) if pid else run_load(url, load, mix)
    return {**report, "server": server_view(before, server_counters(url))}


def rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def overload(url: str, load: LoadTestConfig, mix: PromptMix, pid: int) -> dict:
    """Open-loop overload in a thread while RSS is sampled every second."""
    import threading

    reports, samples = [], []
    thread = threading.Thread(target=lambda: reports.append(run_load(url, load, mix)))
    thread.start()
    while thread.is_alive():
        samples.append(rss_mb(pid))
        thread.join(timeout=1.0)
    return {**reports[0], "rss_mb_samples": [round(s, 1) for s in samples]}


def run(args: argparse.Namespace) -> dict:
    from tbcm.service.runtime import resolve_spec

    tiny_dir = None
    if args.tiny:
        from tests.tiny import make_tiny_pipeline

        tiny_dir = tempfile.TemporaryDirectory()
        model = str(make_tiny_pipeline(Path(tiny_dir.name) / "student", student=True, seed=1))
    else:
        model = args.model
    path = resolve_spec(model)  # a missing model is an error here, never a silent fallback
    info = json.loads((path / "tbcm.json").read_text()) if (path / "tbcm.json").exists() else {}
    report = {"machine": machine(), "model": {"spec": "tiny" if args.tiny else model, "path": shown_path(path),
                                              "manifest": info}, "phases": {}}
    phases = report["phases"]
    generator = load_generator(path, args.threads, args.microbatch)
    report["server_args"] = {"threads": args.threads, "max_batch": args.max_batch, "microbatch": generator.microbatch,
                             "extra": args.serve_arg}
    proc, url = start_server(str(path), args.threads, ("--max-batch", str(args.max_batch),
                                                       "--microbatch", str(args.microbatch), *args.serve_arg))
    try:
        base = LoadTestConfig(duration_s=args.duration_s, warmup_s=args.warmup_s, progress=False, slo_ms=1e9,
                              repeat_ratio=args.repeat_ratio)
        mix = prompt_mix(base)  # one for the whole run: every phase's prompts are new to the server
        phases["overhead"] = overhead(url, generator, base, mix)
        phases["c1"] = phase(url, replace(base, mode="closed", concurrency=1), mix)
        phases["c16"] = phase(url, replace(base, mode="closed", concurrency=16), mix)
        sustainable = phases["c16"]["throughput_rps"]
        phases["poisson70"] = phase(url, replace(base, mode="open", rate=POISSON_LOAD * sustainable), mix)
        rss_before = rss_mb(proc.pid)
        phases["overload3x"] = phase(url, replace(base, mode="open", rate=3 * sustainable,
                                                  duration_s=args.overload_s), mix, proc.pid)
        phases["overload3x"]["rss_mb_before"] = round(rss_before, 1)
        while httpx.get(url + "/info", timeout=30).json()["queue"]["waiting"]:
            time.sleep(0.5)
        phases["recovery_c1"] = phase(url, replace(base, mode="closed", concurrency=1), mix)
        phases["ready_after"] = httpx.get(url + "/readyz", timeout=30).status_code
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    report["goals"] = goals(phases)
    return report


def goals(p: dict) -> dict:
    c1_p50 = p["c1"]["latency_ms"]["p50"]
    rss = p["overload3x"]["rss_mb_samples"]
    statuses = set(p["overload3x"]["status_counts"])
    checks = {
        "http_p50 / generator_p50 (alternating) <= 1.15": (p["overhead"]["http_p50_ms"] /
                                                           p["overhead"]["generator_p50_ms"], 1.15, "le"),
        "throughput c16 / c1 >= 2.5": (p["c16"]["throughput_rps"] / p["c1"]["throughput_rps"], 2.5, "ge"),
        "poisson70 p99 / c1 p50 <= 3": (p["poisson70"]["latency_ms"]["p99"] / c1_p50, 3.0, "le"),
        "overload: max RSS / RSS before <= 1.10": (max(rss) / p["overload3x"]["rss_mb_before"], 1.10, "le"),
        "recovery c1 p50 / c1 p50 <= 1.25": (p["recovery_c1"]["latency_ms"]["p50"] / c1_p50, 1.25, "le"),
    }
    result = {name: {"value": round(value, 3), "goal": goal, "met": value <= goal if op == "le" else value >= goal}
              for name, (value, goal, op) in checks.items()}
    result["overload: only 200/429/503"] = {"value": sorted(statuses), "goal": sorted(SHED),
                                            "met": statuses <= SHED}
    result["recovery: all 200 and ready"] = {"value": [sorted(p["recovery_c1"]["status_counts"]), p["ready_after"]],
                                             "goal": [["200"], 200], "met": set(p["recovery_c1"]["status_counts"])
                                             == {"200"} and p["ready_after"] == 200}
    return result


@functools.lru_cache
def md1_waits(load: float, arrivals: int = 200_000) -> tuple[float, ...]:
    """The sorted waits of `arrivals` requests in an M/D/1 queue (Poisson arrivals, one server, every request
    taking 1 time unit) at `load` (arrival rate x service time), by Lindley's recursion W' = max(0, W + 1 - gap),
    seeded."""
    rng, wait, waits = random.Random(0), 0.0, []
    for _ in range(arrivals):
        waits.append(wait)
        wait = max(0.0, wait + 1 - rng.expovariate(load))
    return tuple(sorted(waits))


def md1_wait_quantile(load: float, q: float = 0.99) -> float:
    waits = md1_waits(load)
    return waits[int(q * len(waits))]


def poisson_floor(p: dict) -> tuple[float, float, float]:
    """(p99 ms, wait p99 in service times, service ms) of an ideal single queue at the tail phase's load: every
    request served in 1 / (16-client throughput), after the unloaded p50 of its own work. Without a cheaper service
    under load (batching economy), no scheduler of one such server has a lower p99 (operators.md section 6)."""
    wait, service_ms = md1_wait_quantile(POISSON_LOAD), 1000 / p["c16"]["throughput_rps"]
    return p["c1"]["latency_ms"]["p50"] + wait * service_ms, wait, service_ms


def table(report: dict) -> str:
    p = report["phases"]
    over = p["overhead"]
    rows = [("generator, batch 1, in-process", f"p50 {over['generator_p50_ms']:.1f} ms", "alternating with"),
            ("HTTP closed loop, 1 client, alternating", f"p50 {over['http_p50_ms']:.1f} ms",
             f"{over['rounds']} rounds each")]
    for name, label in (("c1", "HTTP closed loop, 1 client"), ("c16", "HTTP closed loop, 16 clients"),
                        ("poisson70", "HTTP Poisson, 70% of c16 throughput"), ("overload3x", "HTTP open, 3x"),
                        ("recovery_c1", "HTTP closed loop, 1 client, after")):
        run = p[name]
        lat = run["latency_ms"]
        latency = f"p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} ms" if lat else "no 200s"
        rows.append((label, latency, f"{run['throughput_rps']:.2f} ok/s {run['status_counts']}"))
        server = run["server"]
        stages = " ".join(f"{stage} {ms:.1f}" for stage, ms in server["stage_ms_mean"].items())
        rows.append(("  server side", f"{server['images_per_call']} images/call", f"mean ms: {stages}"))
        if name == "poisson70":
            floor, wait, service_ms = poisson_floor(p)
            rows.append(("  one ideal queue (M/D/1)", f"p99 {floor:.1f} ms", f"unloaded p50 + the p99 wait, "
                         f"{wait:.2f} x {service_ms:.1f} ms (1 / c16 throughput)"))
        rows.append(("  prompts", f"repeat fraction {run['prompts']['repeat_fraction']:g}",
                     f"server prompt-cache hit ratio {run['prompt_cache']['hit_ratio']}"))
        slowest = run["latency_breakdown_ms"].get("slowest_1pct")
        if slowest:
            parts = " ".join(f"{k} {v:.1f}" for k, v in slowest.items() if k not in ("requests", "latency"))
            rows.append(("  slowest 1%, per request", f"latency {slowest['latency']:.1f} ms", f"mean ms: {parts}"))
    lines = [f"model {report['model']['spec']} ({report['model']['path']}); {report['machine']['cpu']}, "
             f"{report['machine']['cpus']} CPUs, load {report['machine']['loadavg_at_start'][0]:.1f}; "
             + ", ".join(f"{k} {v}" for k, v in report["server_args"].items())]
    lines += [f"{a:<40} {b:<28} {c}" for a, b, c in rows]
    lines += [f"{'MET ' if g['met'] else 'MISS'} {name}: {g['value']}" for name, g in report["goals"].items()]
    return "\n".join(lines)


def run_and_report(name: str, args: argparse.Namespace, run, table) -> int:
    """A serving benchmark's main: run(args) -> report, written to args.json_out, printed with table(report)."""
    try:
        report = run(args)
    except ValueError as err:  # PipelineError: the model is missing or broken
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"wrote {out}")
    return 0


def main() -> int:
    return run_and_report("bench_serving", parse_args(), run, table)


if __name__ == "__main__":
    sys.exit(main())
