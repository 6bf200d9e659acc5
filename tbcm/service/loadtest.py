"""`tbcm loadtest URL`: open-loop (fixed or Poisson arrivals) and closed-loop load, and a sweep for the highest
rate that meets a p99 SLO.

Open loop sends each request at its scheduled time whatever the server does, and measures latency from that
scheduled time, so a stalled server shows up as latency instead of as fewer requests (no coordinated omission).
Closed loop runs `concurrency` clients that each send the next request when the last one is answered. Requests
scheduled (open) or sent (closed) during the warm-up are answered but not counted.

The transport is aiohttp: the client usually shares the machine with the server, and its CPU per request decides
whether it can hold an open-loop rate at all (`client_send_lag_ms_max` is how far it fell behind its own schedule;
with httpx's client, whose per-request CPU grows with its connection pool, 3x overload left it far behind).
"""
from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import aiohttp
from yarl import URL  # aiohttp's URL type (an aiohttp dependency)

DEFAULT_PROMPTS = ("a small red circle on the left", "a large blue square at the top",
                   "a green triangle in the middle", "two yellow circles at the bottom right")


@dataclass(frozen=True)
class LoadTestConfig:
    mode: str = "open"  # open: arrivals at --rate whatever the answers do; closed: --concurrency clients in a loop
    rate: float = 5.0  # open loop: requests per second (the sweep's starting rate)
    arrival: str = "poisson"  # open loop: poisson (exponential gaps) or fixed (equal gaps)
    concurrency: int = 4  # closed loop: clients, each sending its next request when its last one is answered
    duration_s: float = 20.0  # measured seconds of load
    warmup_s: float = 3.0  # seconds of load before the measured part (answered, not counted)
    slo_ms: float = 1000.0  # a 200 within this counts toward goodput; the sweep's p99 target
    endpoint: str = "/generate"  # path the requests are POSTed to (/generate or /v1/images/generations)
    body: str = "{}"  # JSON merged into every request body, e.g. '{"steps": 2}'
    prompts: str = ""  # file with one prompt per line (default: four built-in shapes prompts)
    timeout_s: float = 60.0  # client-side timeout of one request
    max_in_flight: int = 512  # open loop: a request due while this many are outstanding is counted as client_overflow
    seed: int = 0  # seed of the arrival times and the prompt choice
    json_out: str = ""  # write the report to this JSON file
    sweep: bool = False  # find the highest open-loop rate at which 99% of requests get a 200 within slo_ms
    sweep_probes: int = 4  # rates tried between the last good and the first bad rate once doubling has failed
    sweep_max_rate: float = 512.0  # stop doubling here
    progress: bool = True  # print a live progress line to stderr

    def __post_init__(self):
        if self.mode not in ("open", "closed") or self.arrival not in ("poisson", "fixed"):
            raise ValueError("mode must be open or closed, arrival poisson or fixed")
        if self.rate <= 0 or self.concurrency < 1 or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("rate and duration_s must be > 0, concurrency >= 1, warmup_s >= 0")
        extra = json.loads(self.body)
        if not isinstance(extra, dict):
            raise ValueError(f"body must be a JSON object, got {self.body!r}")


# Every latency and schedule is read from this clock, never from the event loop's: uvloop's loop.time() has
# millisecond resolution and is cached for a whole loop iteration.
clock = time.perf_counter


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0-100)."""
    return sorted_values[max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))]


class Recorder:
    """Outcomes of requests by start offset (scheduled or sent) in seconds since the load started."""

    def __init__(self, config: LoadTestConfig):
        self.config = config
        # (start offset, status, latency seconds, the answer's Server-Timing stages in seconds)
        self.outcomes: list[tuple[float, str, float, dict]] = []
        self.in_flight = 0
        self.max_send_lag = 0.0  # open loop: how far behind schedule the client itself fell (its own limit)

    def begin(self) -> None:
        self.in_flight += 1

    def finish(self, offset: float, status: str, latency: float, stages: dict) -> None:
        self.in_flight -= 1
        self.add(offset, status, latency, stages)

    def add(self, offset: float, status: str, latency: float, stages: dict | None = None) -> None:
        self.outcomes.append((offset, status, latency, stages or {}))

    def measured(self) -> list[tuple[float, str, float, dict]]:
        start, stop = self.config.warmup_s, self.config.warmup_s + self.config.duration_s
        return [o for o in self.outcomes if start <= o[0] < stop]

    def progress_line(self, elapsed: float) -> str:
        ok = sorted(latency for _, status, latency, _ in self.outcomes if status == "200")
        tail = f" p50 {percentile(ok, 50) * 1000:.0f} ms p99 {percentile(ok, 99) * 1000:.0f} ms" if ok else ""
        phase = "warm-up" if elapsed < self.config.warmup_s else "measuring"
        return (f"\r{phase} {elapsed:5.1f}s answered {len(self.outcomes)} 200s {len(ok)} "
                f"in flight {self.in_flight}{tail}   ")

    def report(self) -> dict:
        config, rows = self.config, self.measured()
        images_each = json.loads(config.body).get("n", 1)
        ok = sorted(latency for _, status, latency, _ in rows if status == "200")
        good = sum(latency * 1000 <= config.slo_ms for latency in ok)
        counts: dict[str, int] = {}
        for _, status, _, _ in rows:
            counts[status] = counts.get(status, 0) + 1
        latency = {f"p{q}": round(percentile(ok, q) * 1000, 2) for q in (50, 90, 95, 99)} if ok else {}
        if ok:
            latency |= {"max": round(ok[-1] * 1000, 2), "mean": round(sum(ok) / len(ok) * 1000, 2)}
        return {"mode": config.mode, "rate": config.rate if config.mode == "open" else None,
                "arrival": config.arrival if config.mode == "open" else None,
                "concurrency": config.concurrency if config.mode == "closed" else None,
                "duration_s": config.duration_s, "warmup_s": config.warmup_s, "requests": len(rows),
                "status_counts": dict(sorted(counts.items())), "latency_ms": latency,
                "throughput_rps": round(len(ok) / config.duration_s, 3),
                "images_per_s": round(len(ok) * images_each / config.duration_s, 3),
                "slo_ms": config.slo_ms, "goodput_rps": round(good / config.duration_s, 3),
                "slo_met_fraction": round(good / len(rows), 4) if rows else 0.0,
                "client_send_lag_ms_max": round(self.max_send_lag * 1000, 1),
                "latency_breakdown_ms": self.breakdown(rows, percentile(ok, 99) if ok else 0.0)}

    @staticmethod
    def breakdown(rows: list, p99: float) -> dict:
        """Where the time of the 200s went, all of them and the slowest 1% (latency >= p99): the mean of each
        Server-Timing stage, and `outside`: latency minus the server's total (client, network, HTTP server)."""
        timed = [(latency, stages) for _, status, latency, stages in rows if status == "200" and "total" in stages]
        groups = {"all": timed, "slowest_1pct": [row for row in timed if row[0] >= p99]}
        out = {}
        for name, group in groups.items():
            if group:
                stages = {key: sum(s.get(key, 0.0) for _, s in group) / len(group) for key in group[0][1]}
                stages["outside"] = sum(latency - s["total"] for latency, s in group) / len(group)
                stages["latency"] = sum(latency for latency, _ in group) / len(group)
                out[name] = {"requests": len(group), **{k: round(v * 1000, 2) for k, v in stages.items()}}
        return out


def parse_server_timing(header: str) -> dict:
    """'queue;dur=1.5, total;dur=40.2' -> {'queue': 0.0015, 'total': 0.0402} (seconds; entries without dur skipped)."""
    stages = {}
    for entry in header.split(","):
        name, *params = [part.strip() for part in entry.split(";")]
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur" and name:
                try:
                    stages[name] = float(value) / 1000
                except ValueError:
                    pass
    return stages


class _Client:
    """POSTs JSON bodies to one URL and answers (status, Server-Timing stages): the status is the HTTP code,
    client_timeout when the request took longer than the config's timeout_s, or error:<exception name> when the
    connection failed."""

    def __init__(self, session: aiohttp.ClientSession, target: URL):
        self.session, self.target = session, target

    async def send(self, body: dict) -> tuple[str, dict]:
        try:
            async with self.session.post(self.target, json=body) as response:
                await response.read()
                return str(response.status), parse_server_timing(response.headers.get("Server-Timing", ""))
        except TimeoutError:  # aiohttp's timeouts (ServerTimeoutError too) are TimeoutErrors
            return "client_timeout", {}
        except aiohttp.ClientError as err:
            return f"error:{type(err).__name__}", {}


def _bodies(config: LoadTestConfig):
    prompts = DEFAULT_PROMPTS
    if config.prompts:
        prompts = [line.strip() for line in Path(config.prompts).read_text().splitlines() if line.strip()]
    rng, extra = random.Random(config.seed + 1), json.loads(config.body)
    while True:
        yield {"prompt": rng.choice(prompts), **extra}


async def _open_loop(client: _Client, config: LoadTestConfig, recorder: Recorder, t0: float) -> None:
    rng, bodies = random.Random(config.seed), _bodies(config)
    tasks, offset = set(), 0.0

    async def one(scheduled: float, body: dict) -> None:
        status, stages = await client.send(body)
        recorder.finish(scheduled, status, clock() - (t0 + scheduled), stages)

    while offset < config.warmup_s + config.duration_s:
        await asyncio.sleep(max(0.0, t0 + offset - clock()))
        recorder.max_send_lag = max(recorder.max_send_lag, clock() - (t0 + offset))
        if recorder.in_flight >= config.max_in_flight:
            recorder.add(offset, "client_overflow", 0.0)
        else:
            recorder.begin()
            task = asyncio.ensure_future(one(offset, next(bodies)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        offset += rng.expovariate(config.rate) if config.arrival == "poisson" else 1.0 / config.rate
    await asyncio.gather(*tasks)


async def _closed_loop(client: _Client, config: LoadTestConfig, recorder: Recorder, t0: float) -> None:
    bodies = _bodies(config)

    async def worker() -> None:
        while (sent := clock() - t0) < config.warmup_s + config.duration_s:
            recorder.begin()
            status, stages = await client.send(next(bodies))
            recorder.finish(sent, status, clock() - t0 - sent, stages)

    await asyncio.gather(*(worker() for _ in range(config.concurrency)))


async def _run(url: str, config: LoadTestConfig) -> dict:
    connections = config.max_in_flight if config.mode == "open" else config.concurrency
    # idle connections are dropped before uvicorn's 5 s keep-alive timeout would close them under a request
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=2.0)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)  # the whole request, waiting for a connection included
    recorder = Recorder(config)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        client = _Client(session, URL(url.rstrip("/") + config.endpoint))
        t0 = clock() + 0.05
        load = _open_loop if config.mode == "open" else _closed_loop
        task = asyncio.ensure_future(load(client, config, recorder, t0))
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if config.progress:
                print(recorder.progress_line(clock() - t0), end="", file=sys.stderr, flush=True)
        task.result()
    if config.progress:
        print(file=sys.stderr)
    return recorder.report()


def run_load(url: str, config: LoadTestConfig) -> dict:
    """One load run. The objects alive before it are frozen out of the cyclic collector meanwhile: a full collection
    walking a big heap (bench_serving's client has torch loaded) would stall the client's clock, not the server."""
    gc.collect()
    gc.freeze()
    try:
        return event_loop_runner()(_run(url, config))
    finally:
        gc.unfreeze()


def event_loop_runner():
    """uvloop's runner where it is installed (less client CPU per request on a shared machine), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def meets_slo(report: dict) -> bool:
    """99% of the measured requests got a 200 within the SLO (a p99 bound that counts failures as misses)."""
    return report["requests"] > 0 and report["slo_met_fraction"] >= 0.99


def sweep(url: str, config: LoadTestConfig) -> dict:
    """Double the open-loop rate until the SLO fails, then bisect between the last good and first bad rate."""
    probes, good, bad, rate = [], None, None, config.rate
    while rate <= config.sweep_max_rate:
        probes.append(run_load(url, replace(config, mode="open", rate=rate)))
        if not meets_slo(probes[-1]):
            bad = rate
            break
        good, rate = rate, rate * 2
    for _ in range(config.sweep_probes if bad is not None and good is not None else 0):
        rate = (good + bad) / 2
        probes.append(run_load(url, replace(config, mode="open", rate=rate)))
        good, bad = (rate, bad) if meets_slo(probes[-1]) else (good, rate)
    return {"sweep": True, "slo_ms": config.slo_ms, "best_rate": good, "first_failing_rate": bad,
            "probes": probes}


def loadtest(url: str, config: LoadTestConfig) -> dict:
    """Run what the config asks for, print a summary, write the JSON report if asked."""
    report = sweep(url, config) if config.sweep else run_load(url, config)
    report = {"url": url, "config": asdict(config), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **report}
    if config.json_out:
        Path(config.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.json_out).write_text(json.dumps(report, indent=2))
    return report


def summary(report: dict) -> str:
    """Human-readable lines of a report (a single run, or a sweep's probes and result)."""
    runs = report["probes"] if report.get("sweep") else [report]
    lines = []
    for run in runs:
        load = f"open {run['rate']:g}/s {run['arrival']}" if run["mode"] == "open" else \
            f"closed x{run['concurrency']}"
        lat = " ".join(f"{k} {v:g}" for k, v in run["latency_ms"].items())
        lag = f", client send lag max {run['client_send_lag_ms_max']:g} ms" if run["mode"] == "open" else ""
        lines.append(f"{load}: {run['requests']} requests, {run['throughput_rps']:g} ok/s, goodput "
                     f"{run['goodput_rps']:g}/s (SLO {run['slo_ms']:g} ms), latency ms: {lat or 'none'}, "
                     f"status {run['status_counts']}{lag}")
        slowest = run.get("latency_breakdown_ms", {}).get("slowest_1pct")
        if slowest:
            parts = ", ".join(f"{k} {v:g}" for k, v in slowest.items() if k != "requests")
            lines.append(f"  slowest 1% ({slowest['requests']} requests), mean ms: {parts}")
    if report.get("sweep"):
        lines.append(f"highest rate meeting p99 <= {report['slo_ms']:g} ms: {report['best_rate']} req/s "
                     f"(first failing: {report['first_failing_rate']})")
    return "\n".join(lines)
