"""`tbcm loadtest URL`: its config, the recorder of outcomes and the report (percentiles, goodput, where the
time went, prompts and the server's prompt-cache hits). The load itself is service/loadrun.py (aiohttp, a [bench]
dependency); this module imports nothing beyond the standard library, so `tbcm --help` needs neither.

Open loop sends each request at its scheduled time whatever the server does, and measures latency from that
scheduled time, so a stalled server shows up as latency instead of as fewer requests (no coordinated omission).
Closed loop runs `concurrency` clients that each send the next request when the last one is answered. Requests
scheduled (open) or sent (closed) during the warm-up are answered but not counted.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass


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
    prompts: str = ""  # file with one prompt per line, used in shuffled order; empty: unique shapes captions
    repeat_ratio: float = 0.0  # chance that a request repeats a prompt already sent (0: every prompt is new)
    timeout_s: float = 60.0  # client-side timeout of one request
    max_in_flight: int = 512  # open loop: a request due while this many are outstanding is counted as client_overflow
    seed: int = 0  # seed of the arrival times and the prompt choice
    json_out: str = ""  # write the report to this JSON file
    sweep: bool = False  # find the highest open-loop rate at which 99 in 100 requests get a 200 within slo_ms
    sweep_probes: int = 4  # rates tried between the last good and the first bad rate once doubling has failed
    sweep_max_rate: float = 512.0  # stop doubling here
    progress: bool = True  # print a live progress line to stderr

    def __post_init__(self):
        if self.mode not in ("open", "closed") or self.arrival not in ("poisson", "fixed"):
            raise ValueError("mode must be open or closed, arrival poisson or fixed")
        if self.rate <= 0 or self.concurrency < 1 or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("rate and duration_s must be > 0, concurrency >= 1, warmup_s >= 0")
        if not 0 <= self.repeat_ratio <= 1:
            raise ValueError(f"repeat_ratio must be between 0 and 1, got {self.repeat_ratio}")
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


CACHE_SERIES = {"hits": "tbcm_prompt_cache_hits_total", "misses": "tbcm_prompt_cache_misses_total"}


def cache_counts(metrics_text: str) -> dict[str, float] | None:
    """The server's prompt-cache counters from its /metrics text; None when it has none (not a tbcm server)."""
    counts = {}
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        for key, series in CACHE_SERIES.items():
            if name == series:
                counts[key] = float(value)
    return counts if len(counts) == len(CACHE_SERIES) else None


def cache_report(before: dict | None, after: dict | None) -> dict:
    """Hits and misses of the server's prompt cache between two scrapes (the whole run, warm-up included)."""
    if before is None or after is None:
        return {"hits": None, "misses": None, "hit_ratio": None}
    hits, misses = (after[key] - before[key] for key in ("hits", "misses"))
    return {"hits": hits, "misses": misses, "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None}


def prompt_line(prompts: dict, cache: dict) -> str:
    ratio = "unknown (no tbcm_prompt_cache_* series)" if cache["hits"] is None else \
        f"{cache['hit_ratio']} ({cache['hits']:g} hits, {cache['misses']:g} misses)"
    return (f"prompts: {prompts['sent']} sent, {prompts['distinct']} distinct, repeat fraction "
            f"{prompts['repeat_fraction']:g}; server prompt-cache hit ratio {ratio}")


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
        if "prompts" in run:
            lines.append(f"  {prompt_line(run['prompts'], run['prompt_cache'])}")
    if report.get("sweep"):
        lines.append(f"highest rate meeting p99 <= {report['slo_ms']:g} ms: {report['best_rate']} req/s "
                     f"(first failing: {report['first_failing_rate']})")
    return "\n".join(lines)
