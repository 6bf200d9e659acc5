"""The load of `tbcm loadtest` (service/loadtest.py has its config and report): open loop, closed loop, the sweep.

The transport is aiohttp (a [bench] dependency, imported here only): the client usually shares the machine with
the server, and its CPU per request decides whether it can hold an open-loop rate at all (`client_send_lag_ms_max`
is how far it fell behind its own schedule; with httpx's client, whose per-request CPU grows with its connection
pool, 3x overload left it far behind). Prompts come from a PromptMix (unique unless --repeat-ratio says otherwise),
and /metrics is read before and after each run for the server's prompt-cache hit ratio.
"""
from __future__ import annotations

import asyncio
import gc
import json
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import aiohttp
from yarl import URL  # aiohttp's URL type (an aiohttp dependency)

from tbcm.service.loadprompts import PromptMix
from tbcm.service.loadtest import LoadTestConfig, Recorder, cache_counts, cache_report, clock, parse_server_timing


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

    async def cache_counts(self, metrics_url: URL) -> dict[str, float] | None:
        """The server's prompt-cache counters (None when /metrics cannot be read or has none)."""
        try:
            async with self.session.get(metrics_url) as response:
                return cache_counts(await response.text()) if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError):
            return None


def _bodies(config: LoadTestConfig, mix: PromptMix):
    extra = json.loads(config.body)
    while True:
        yield {"prompt": mix.next(), **extra}


async def _open_loop(client: _Client, config: LoadTestConfig, recorder: Recorder, t0: float, bodies) -> None:
    rng = random.Random(config.seed)
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


async def _closed_loop(client: _Client, config: LoadTestConfig, recorder: Recorder, t0: float, bodies) -> None:
    async def worker() -> None:
        while (sent := clock() - t0) < config.warmup_s + config.duration_s:
            recorder.begin()
            status, stages = await client.send(next(bodies))
            recorder.finish(sent, status, clock() - t0 - sent, stages)

    await asyncio.gather(*(worker() for _ in range(config.concurrency)))


def prompt_mix(config: LoadTestConfig) -> PromptMix:
    return PromptMix(config.seed + 1, config.repeat_ratio, config.prompts)


async def _run(url: str, config: LoadTestConfig, mix: PromptMix) -> dict:
    connections = config.max_in_flight if config.mode == "open" else config.concurrency
    # idle connections are dropped before uvicorn's 5 s keep-alive timeout would close them under a request
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=2.0)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)  # the whole request, waiting for a connection included
    recorder, since = Recorder(config), mix.counts()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        client = _Client(session, URL(url.rstrip("/") + config.endpoint))
        before = await client.cache_counts(URL(url.rstrip("/") + "/metrics"))
        t0 = clock() + 0.05
        load = _open_loop if config.mode == "open" else _closed_loop
        task = asyncio.ensure_future(load(client, config, recorder, t0, _bodies(config, mix)))
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if config.progress:
                print(recorder.progress_line(clock() - t0), end="", file=sys.stderr, flush=True)
        task.result()
        after = await client.cache_counts(URL(url.rstrip("/") + "/metrics"))
    if config.progress:
        print(file=sys.stderr)
    return {**recorder.report(), "prompts": mix.stats(since), "prompt_cache": cache_report(before, after)}


def run_load(url: str, config: LoadTestConfig, mix: PromptMix | None = None) -> dict:
    """One load run, its prompts from `mix` (default: a new one from the config; pass one mix to several runs so
    each run's prompts are new to the server). The objects alive before it are frozen out of the cyclic collector
    meanwhile: a full collection walking a big heap (bench_serving's client has torch loaded) would stall the
    client's clock, not the server."""
    gc.collect()
    gc.freeze()
    try:
        return event_loop_runner()(_run(url, config, mix or prompt_mix(config)))
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
    probes, good, bad, rate, mix = [], None, None, config.rate, prompt_mix(config)
    while rate <= config.sweep_max_rate:
        probes.append(run_load(url, replace(config, mode="open", rate=rate), mix))
        if not meets_slo(probes[-1]):
            bad = rate
            break
        good, rate = rate, rate * 2
    for _ in range(config.sweep_probes if bad is not None and good is not None else 0):
        rate = (good + bad) / 2
        probes.append(run_load(url, replace(config, mode="open", rate=rate), mix))
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
