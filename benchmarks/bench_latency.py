"""Serving latency (Table 4): the one-step student's end-to-end latency per stage at batch 1 and its throughput at
the best batch, against the teacher's 16-step (CFG) latency on the same machine. Prints a table, writes JSON + .md.

    python -m benchmarks.bench_latency                                  # shipped student and teacher, HTTP too
    python -m benchmarks.bench_latency --http-teacher --repeats 50      # also time the teacher over HTTP
    python -m benchmarks.bench_latency --tiny --json /tmp/latency.json  # tiny random pipelines (smoke run)

In-process, batch 1, medians of --repeats warm calls: text encoding, transformer, VAE decode (the generator's own
stage timings; every call has a new prompt, so the text encoder's cache never hides its stage), image encoding (the
service's `encode_image`, PNG) and the wall clock of all four. The generator pads every call to --microbatch rows
(default: the service's), as the service does, so batch 1 here is the service's batch 1. HTTP: POST /generate at
concurrency 1 against `tbcm serve` with the same microbatch; overhead = HTTP p50 - in-process total p50.
Throughput: the student's generator images/s at batches 1-32, each call one unpadded pass (microbatch = batch).
Headline: the transformer-stage speed-up (limit: the NFE ratio, 32) and the end-to-end speed-up, next to
Sana-Sprint's own 1.2 s / 0.21 s = 5.7x on an A100.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from benchmarks.bench_serving import PROMPT, machine, start_server
from benchmarks.provenance import command as provenance_command, transformer_sha256
from tbcm.models.generator import TEACHER_DEFAULT_STEPS, Generator
from tbcm.models.pipeline import load_pipeline
from tbcm.service.config import ServiceConfig
from tbcm.service.engine import encode_image
from tbcm.service.runtime import pick_device, resolve_spec, rows_per_pass


STAGES = ("text_encoding", "transformer", "vae_decode", "image_encoding", "total")
LABELS = {"text_encoding": "text encoding", "transformer": "transformer", "vae_decode": "VAE decode",
          "image_encoding": "image encoding (PNG)", "total": "in-process total"}
BATCHES = (1, 2, 4, 8, 16, 32)
WARMUP = 3
SANA_SPRINT = {"teacher_s": 1.2, "student_s": 0.21, "speedup": round(1.2 / 0.21, 1), "gpu": "A100"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="student", help="shipped name, pipeline folder or model-store tag")
    parser.add_argument("--teacher", default="teacher", help="shipped name, pipeline folder or model-store tag")
    parser.add_argument("--repeats", type=int, default=20, help="measured calls per row (after warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads here and in the server (0: default)")
    parser.add_argument("--microbatch", type=int, default=ServiceConfig().microbatch,
                        help="rows per generator pass for the batch-1 rows, in-process and in the server")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP rows")
    parser.add_argument("--http-teacher", action="store_true", help="also serve the teacher and time it over HTTP")
    parser.add_argument("--tiny", action="store_true", help="tiny random student and teacher instead (smoke run)")
    parser.add_argument("--json", default="docs/results/latency.json", help="JSON report; the .md goes beside it")
    return parser.parse_args()


def prompt(call: int) -> str:
    """A prompt the text encoder has not seen (its cache would otherwise hide the text-encoding stage)."""
    return f"{PROMPT}, take {call}"


def ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1000, 3)


def in_process(generator: Generator, steps: int, repeats: int) -> dict:
    """Median ms per stage of one image at batch 1: generate() then the service's PNG encoding, as served."""
    quality = ServiceConfig().default_quality
    samples = {stage: [] for stage in STAGES}
    for seed in range(WARMUP + repeats):
        started = time.perf_counter()
        generation = generator.generate([prompt(seed)], [seed], steps=steps)
        encode_started = time.perf_counter()
        encode_image(generation.images[0], "png", quality)
        done = time.perf_counter()
        if seed >= WARMUP:
            for stage, seconds in generation.timings.items():
                samples[stage].append(seconds)
            samples["image_encoding"].append(done - encode_started)
            samples["total"].append(done - started)
    return {stage: ms(values) for stage, values in samples.items()}


def server_timing(header: str) -> dict[str, float]:
    """'queue;dur=10.2, transformer;dur=1187.1, ...' -> {'queue': 10.2, 'transformer': 1187.1, ...} (ms)."""
    parts = (item.strip().split(";dur=") for item in header.split(",") if ";dur=" in item)
    return {name: float(value) for name, value in parts}


def http_latency(path: Path, steps: int, args: argparse.Namespace) -> dict:
    """Median ms of POST /generate (one PNG) at concurrency 1, and the server's own Server-Timing medians."""
    proc, url = start_server(str(path), args.threads, ("--microbatch", str(args.microbatch),
                                                        "--request-timeout-s", "600"))
    totals, stages = [], {}
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            for seed in range(WARMUP + args.repeats):
                started = time.perf_counter()
                response = client.post("/generate", json={"prompt": prompt(seed), "seed": seed, "steps": steps})
                elapsed = time.perf_counter() - started
                if response.status_code != 200 or response.headers["content-type"] != "image/png":
                    raise RuntimeError(f"POST /generate: {response.status_code} {response.text[:200]}")
                if seed >= WARMUP:
                    totals.append(elapsed)
                    for name, value in server_timing(response.headers.get("server-timing", "")).items():
                        stages.setdefault(name, []).append(value)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    return {"p50_ms": ms(totals), "server_timing_p50_ms": {k: round(statistics.median(v), 3)
                                                            for k, v in stages.items()}}


def throughput(pipe, repeats: int) -> dict:
    """Student generator images/s at each batch, one unpadded pass per call (microbatch = batch)."""
    rows = []
    for batch in BATCHES:
        generator = Generator(pipe, microbatch=batch)
        seeds = list(range(batch))
        generator.generate([prompt(-1 - i) for i in seeds], seeds, steps=1)  # warm-up
        times = []
        for call in range(repeats):
            prompts = [prompt(1000 * batch + batch * call + i) for i in seeds]
            started = time.perf_counter()
            generator.generate(prompts, seeds, steps=1)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        rows.append({"batch": batch, "ms_per_call": round(seconds * 1000, 3),
                     "images_per_s": round(batch / seconds, 2)})
    return {"rows": rows, "best": max(rows, key=lambda row: row["images_per_s"])}


def headline(report: dict) -> dict:
    student, teacher = report["in_process"]["student"], report["in_process"]["teacher"]
    nfe = report["models"]["teacher"]["nfe"] / report["models"]["student"]["nfe"]
    result = {"transformer_speedup": round(teacher["transformer"] / student["transformer"], 2),
              "transformer_speedup_limit": nfe,
              "end_to_end_speedup_in_process": round(teacher["total"] / student["total"], 2),
              "sana_sprint_end_to_end_speedup": SANA_SPRINT}
    http = report["http"]
    if "student" in http and "teacher" in http:
        result["end_to_end_speedup_http"] = round(http["teacher"]["p50_ms"] / http["student"]["p50_ms"], 2)
    return result


def run(args: argparse.Namespace, scratch: Path) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        from tests.tiny import make_tiny_pipeline

        specs = {kind: str(make_tiny_pipeline(scratch / kind, student=kind == "student", seed=1))
                 for kind in ("student", "teacher")}
    else:
        specs = {"student": args.student, "teacher": args.teacher}
    paths = {kind: resolve_spec(spec) for kind, spec in specs.items()}  # a missing model is an error, no fallback
    device = pick_device(ServiceConfig().device)
    rows = rows_per_pass(ServiceConfig(microbatch=args.microbatch))
    pipes = {kind: load_pipeline(path, device=device) for kind, path in paths.items()}
    if not pipes["student"].is_student or pipes["teacher"].is_student:
        raise ValueError(f"--student must be a student and --teacher a teacher, got {specs}")
    steps = {"student": 1, "teacher": TEACHER_DEFAULT_STEPS}
    report = {"command": provenance_command(), "machine": {**machine(), "torch_threads": torch.get_num_threads()},
              "config": {"repeats": args.repeats, "warmup": WARMUP, "microbatch": rows, "batch": 1,
                         "prompt": prompt(0).replace("0", "N (distinct per call)"), "device": str(device)},
              "models": {kind: {"spec": "tiny" if args.tiny else specs[kind], "path": str(paths[kind]),
                                "transformer_sha256": transformer_sha256(paths[kind]),
                                "steps": steps[kind], "nfe": steps[kind] * (1 if kind == "student" else 2)}
                         for kind in specs},
              "in_process": {}, "http": {}}
    for kind, pipe in pipes.items():
        generator = Generator(pipe, microbatch=rows)
        report["in_process"][kind] = in_process(generator, steps[kind], args.repeats)
    report["throughput"] = throughput(pipes["student"], max(3, args.repeats // 4))
    served = [] if args.no_http else ["student"] + (["teacher"] if args.http_teacher else [])
    for kind in served:
        report["http"][kind] = http_latency(paths[kind], steps[kind], args)
        report["http"][kind]["overhead_ms"] = round(report["http"][kind]["p50_ms"]
                                                    - report["in_process"][kind]["total"], 3)
    report["headline"] = headline(report)
    return report


def markdown(report: dict) -> str:
    models, inp, http, head = report["models"], report["in_process"], report["http"], report["headline"]
    s, t = models["student"], models["teacher"]
    mach = report["machine"]
    lines = [f"`{report['command']}`", "",
             f"Batch 1, median of {report['config']['repeats']} warm calls (ms), microbatch "
             f"{report['config']['microbatch']}; {mach['cpu']}, {mach['cpus']} CPUs, {mach['torch_threads']} torch "
             f"threads, load {mach['loadavg_at_start'][0]:.1f} at start, torch {mach['torch']}, "
             f"GPU {mach['cuda'] or 'none'}.", "",
             f"| stage | student, {s['steps']} step (NFE {s['nfe']}) | teacher, {t['steps']} steps CFG "
             f"(NFE {t['nfe']}) | teacher / student |", "|---|---|---|---|"]

    def row(label: str, a: float | None, b: float | None, ratio: bool = True) -> str:
        quotient = f"{b / a:.2f}x" if ratio and a and b else "-"
        return f"| {label} | {'-' if a is None else f'{a:.1f}'} | {'-' if b is None else f'{b:.1f}'} | {quotient} |"

    for stage in STAGES:
        lines.append(row(LABELS[stage], inp["student"][stage], inp["teacher"][stage]))
    if http:
        p50 = {kind: http[kind]["p50_ms"] if kind in http else None for kind in ("student", "teacher")}
        over = {kind: http[kind]["overhead_ms"] if kind in http else None for kind in ("student", "teacher")}
        lines.append(row("HTTP POST /generate, 1 client", p50["student"], p50["teacher"]))
        lines.append(row("HTTP overhead (HTTP - in-process)", over["student"], over["teacher"], ratio=False))
    best = report["throughput"]["best"]
    lines += ["", "Student throughput (generator only, 1 step, one unpadded pass per call):", "",
              "| batch | ms per call | images/s |", "|---|---|---|"]
    lines += [f"| {r['batch']} | {r['ms_per_call']:.1f} | {r['images_per_s']:.1f} |"
              for r in report["throughput"]["rows"]]
    sana = head["sana_sprint_end_to_end_speedup"]
    e2e = f"{head['end_to_end_speedup_in_process']:.2f}x in-process"
    if "end_to_end_speedup_http" in head:
        e2e += f", {head['end_to_end_speedup_http']:.2f}x over HTTP"
    lines += ["", f"Best batch: {best['batch']} ({best['images_per_s']:.1f} images/s).",
              f"Transformer-stage speed-up: {head['transformer_speedup']:.2f}x (limit "
              f"{head['transformer_speedup_limit']:g}x, the NFE ratio). End-to-end speed-up: {e2e} (Sana-Sprint: "
              f"{sana['teacher_s']} s / {sana['student_s']} s = {sana['speedup']}x on an {sana['gpu']})."]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-latency-") as scratch:
            report = run(args, Path(scratch))
    except ValueError as err:  # PipelineError: the model is missing or broken
        print(f"bench_latency: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
