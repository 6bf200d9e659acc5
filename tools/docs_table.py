"""Write the numbers tables of README.md and docs/results.md from the shipped folders and the benchmark JSON.

    python3 tools/docs_table.py           # rewrite every block in place (`make docs`)
    python3 tools/docs_table.py --check   # exit 1, naming the stale blocks, if a file differs (tests/test_docs.py)

Each block sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->` and is generated whole; edit this script,
never the block. Sources (all repo-relative, standard library only, no model is loaded):
- weights/teacher/tbcm.json -> eval, weights/student/tbcm.json -> manifest.eval: the folders' own evals, n = 512;
- docs/results/table1.json: Table 1 of record, n = 2048, with the sha256 of the transformers it was measured on;
- docs/results/equal-time-*.json: Table 2, the side-by-side pairs, and docs/results/grid-*.json, the symmetric
  equal-time study (the distillation blocks are tools/docs_distill.py; what all blocks share, tools/docs_common.py);
- docs/results/latency.json, docs/results/serving.json and its variants (SERVING_VARIANTS): speed and
  serving.
A benchmark that cannot be tied to the shipped student (its transformer's sha256 or its training manifest) is
labelled "measured on an earlier student: to be re-measured" instead of being shown as current.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from docs_common import (DRAWS, RESULTS, ROOT, STALE, bars_met, fa, load, on_shipped_student, ratio, steps_header,
                         steps_row, student_manifest, table1_current, transformer_sha)
from docs_distill import block_grid, block_published_detached, block_table2


def latency_current() -> tuple[dict, bool]:
    latency = load(f"{RESULTS}/latency.json")
    return latency, on_shipped_student(latency["models"]["student"])


def serving_current() -> tuple[dict, bool]:
    serving = load(f"{RESULTS}/serving.json")
    return serving, on_shipped_student(serving["model"])


def note(current: bool) -> str:
    return "" if current else f" **({STALE})**"


def cached_prompts_note(serving: dict) -> str:
    """A serving run whose prompts hit the prompt cache times no text encoding: say so beside its numbers."""
    encode = serving["phases"]["c1"]["server"]["stage_ms_mean"]["text_encoding"]
    if encode >= 1.0:
        return ""
    return (f"The serving run repeated its prompts, so text encoding hit the prompt cache ({encode:.2f} ms a "
            "request at one client, against the latency run's distinct prompts): its latencies are below the "
            "in-process ones largely for that reason, and the two are not comparable.")


def block_numbers() -> str:
    """README: one table of the shipped numbers."""
    teacher_eval = load("weights/teacher/tbcm.json")["eval"]
    student_eval = student_manifest()["eval"]
    table, t1_ok = table1_current()
    rows = table["rows"]
    latency, lat_ok = latency_current()
    serving, srv_ok = serving_current()
    t1_src = f"`tbcm eval --n 2048`, `{RESULTS}/table1.json`{note(t1_ok)}"
    machine = "2-core AMD EPYC, 2 threads"
    lines = [
        "| measure | teacher (16 steps, CFG 4.5, NFE 32) | student (1 step, NFE 1) | student / teacher "
        "| n, split, draw | machine | made by |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in DRAWS:
        s, t = rows[f"student-{key}"], rows[f"teacher-{key}"]
        lines.append(f"| FD / accuracy, **of record** | {fa(t)} | {fa(s)} | FD {ratio(s, t, 'fd')}, accuracy "
                     f"{ratio(s, t, 'accuracy')} | 2048, {label} | {machine} | {t1_src} |")
    steps = {(r["model"], r["split"]): r for r in load(f"{RESULTS}/steps-n2048.json")["rows"]
             if r.get("steps") in (1, 16)}
    for split, label in (("train", "train"), ("heldout", "held out")):
        t, s = steps[("teacher", split)], steps[("student", split)]
        lines.append(f"| precision / recall (diversity) | {t['precision']:.3f} / {t['recall']:.3f} | "
                     f"{s['precision']:.3f} / {s['recall']:.3f} | recall {ratio(s, t, 'recall')} | 2048, {label}, "
                     f"seed 0 | {machine} | `python -m benchmarks.bench_quality`, `{RESULTS}/steps-n2048.json` |")
    for split, label in (("train", "train"), ("heldout", "held out")):
        t, s = teacher_eval[split], student_eval[split]
        lines.append(f"| FD / accuracy, folder's own eval | {fa(t)} | {fa(s)} | FD {ratio(s, t, 'fd')}, accuracy "
                     f"{ratio(s, t, 'accuracy')} | 512, {label}, seed 0 | 2-core CPU | `make world`, `make student` "
                     f"(`weights/*/tbcm.json`; n = 512, not comparable with n = 2048) |")
    lat_machine = latency["machine"]
    cpu = f"{lat_machine['cpu']}, {lat_machine['cpus']} CPUs, {lat_machine['torch_threads']} threads"
    lat_src = f"`python -m benchmarks.bench_latency --threads 2`, `{RESULTS}/latency.json`{note(lat_ok)}"
    proc = latency["in_process"]
    head = latency["headline"]
    lines.append(f"| speed-up, transformer stage | {proc['teacher']['transformer']:.1f} ms | "
                 f"{proc['student']['transformer']:.1f} ms | {head['transformer_speedup']:.1f}x faster "
                 f"(NFE bound {head['transformer_speedup_limit']:.0f}x) | batch 1, median of "
                 f"{latency['config']['repeats']} | {cpu} | {lat_src} |")
    lines.append(f"| latency, in-process end to end | {proc['teacher']['total']:.1f} ms | "
                 f"{proc['student']['total']:.1f} ms"
                 f" | {head['end_to_end_speedup_in_process']:.1f}x faster | batch 1 | {cpu} | {lat_src} |")
    best = latency["throughput"]["best"]
    lines.append(f"| throughput, generator | - | {best['images_per_s']:.1f} images/s | - | batch {best['batch']} | "
                 f"{cpu} | {lat_src} |")
    phases = serving["phases"]
    srv_cpu = f"{serving['machine']['cpu']}, {serving['machine']['cpus']} CPUs, service defaults"
    hits = phases["c16"]["prompt_cache"]["hit_ratio"]
    prompts = "unique prompts" if hits == 0 else f"prompt-cache hit ratio {hits:.2f}"
    srv_src = f"`python -m benchmarks.bench_serving`, `{RESULTS}/serving.json`{note(srv_ok)}"
    lines.append(f"| serving latency, HTTP, 1 client | - | p50 {phases['c1']['latency_ms']['p50']:.1f} ms, p99 "
                 f"{phases['c1']['latency_ms']['p99']:.1f} ms | - | closed loop, 1 client, {prompts} | {srv_cpu} | "
                 f"{srv_src} |")
    lines.append(f"| serving throughput, HTTP, 16 clients | - | {phases['c16']['throughput_rps']:.1f} requests/s "
                 f"(p99 {phases['c16']['latency_ms']['p99']:.1f} ms) | - | closed loop, 16 clients, {prompts} | "
                 f"{srv_cpu} | "
                 f"{srv_src} |")
    lines.append(f"| serving tail, Poisson at 70% load | - | p99 {phases['poisson70']['latency_ms']['p99']:.1f} ms at "
                 f"{phases['poisson70']['throughput_rps']:.1f} requests/s | - | open loop, {prompts} | {srv_cpu} | "
                 f"{srv_src} |")
    cached = cached_prompts_note(serving)
    return "\n".join(lines + (["", cached] if cached else []))


SERVING_VARIANTS = (("microbatch 4 (padded passes)", "serving-microbatch4.json", "--microbatch 4"),
                    ("text stage off", "serving-no-text-stage.json", "--serve-arg=--no-text-stage"))


def serving_side_by_side(default: dict) -> list[str]:
    """The service with its defaults beside each variant of SERVING_VARIANTS, one bench_serving run each."""
    variants = [(label, load(f"{RESULTS}/{name}"), name, flag) for label, name, flag in SERVING_VARIANTS]
    lines = [f"Defaults and variants side by side (`{RESULTS}/serving.json`, then "
             + ", ".join(f"`{RESULTS}/{name}` with `{flag}`" for _, _, name, flag in variants) + "):", "",
             "| | defaults | " + " | ".join(label for label, *_ in variants) + " |",
             "|---|---|" + "---|" * len(variants)]

    def latency(run: dict, phase: str, q: str) -> float:
        return run["phases"][phase]["latency_ms"][q]

    rows = {"HTTP p50 / p99, 1 client (ms)": lambda r: f"{latency(r, 'c1', 'p50'):.1f} / {latency(r, 'c1', 'p99'):.1f}",
            "throughput, 16 clients (requests/s)": lambda r: f"{r['phases']['c16']['throughput_rps']:.1f}",
            "images per call, 16 clients": lambda r: f"{r['phases']['c16']['server']['images_per_call']:.2f}",
            "Poisson at 70%: rate (requests/s), p50 / p99 (ms)": lambda r: (
                f"{r['phases']['poisson70']['throughput_rps']:.1f}, {latency(r, 'poisson70', 'p50'):.1f} / "
                f"{latency(r, 'poisson70', 'p99'):.1f}"),
            "Poisson p99 / unloaded p50": lambda r: f"{latency(r, 'poisson70', 'p99') / latency(r, 'c1', 'p50'):.2f}x"}
    runs = [default] + [run for _, run, *_ in variants]
    return lines + [f"| {label} | " + " | ".join(show(run) for run in runs) + " |" for label, show in rows.items()]


def block_table1() -> str:
    """docs/results.md: the one-step bars at n = 2048, with the folders' own n = 512 evals labelled as such."""
    table, current = table1_current()
    rows = table["rows"]
    lines = []
    if not current:
        lines += [f"**These rows were {STALE}** (the shipped transformers' sha256 differ from `table1.json`'s).", ""]
    lines += ["| split, draw (n = 2048) | teacher, 16 steps: FD / accuracy | student, 1 step: FD / accuracy "
              "| FD / teacher's (bar <= 1.3x) | accuracy / teacher's (bar >= 0.95x) | bars met |",
              "|---|---|---|---|---|---|"]
    for key, label in DRAWS:
        s, t = rows[f"student-{key}"], rows[f"teacher-{key}"]
        lines.append(f"| {label} | {fa(t)} | {fa(s)} | {ratio(s, t, 'fd')} | {ratio(s, t, 'accuracy')} | "
                     f"{bars_met(s, t)} |")
    s = rows["student-train-seed1"]
    lines.append(f"| train, `--seed 1` | - | {fa(s)} | - | - | - |")
    teacher_eval = load("weights/teacher/tbcm.json")["eval"]
    student_eval = student_manifest()["eval"]
    lines += ["", "The folders' own evals (`tbcm.json`, n = 512, seed 0; FD at this n is not comparable with the rows "
              "above, since the reference set is n real renders too):", "",
              "| split (n = 512) | teacher: FD / accuracy | student: FD / accuracy |", "|---|---|---|"]
    for split, label in (("train", "train"), ("heldout", "held out")):
        lines.append(f"| {label} | {fa(teacher_eval[split])} | {fa(student_eval[split])} |")
    return "\n".join(lines)


def block_seeds() -> str:
    table, current = table1_current()
    rows = table["rows"]
    lines = [] if current else [f"**{STALE}**", ""]
    lines += ["| training seed | train | held out | held out, `--seed 1` | pooled held-out accuracy / teacher's |",
              "|---|---|---|---|---|"]
    t_pool = (rows["teacher-heldout"]["accuracy"] + rows["teacher-heldout-seed1"]["accuracy"]) / 2
    for seed, prefix in ((0, "student"), (1, "seed1-student"), (2, "seed2-student")):
        cells = []
        for key, _ in DRAWS:
            s, t = rows[f"{prefix}-{key}"], rows[f"teacher-{key}"]
            cells.append(f"{fa(s)} ({ratio(s, t, 'fd')}, {ratio(s, t, 'accuracy')})")
        pool = (rows[f"{prefix}-heldout"]["accuracy"] + rows[f"{prefix}-heldout-seed1"]["accuracy"]) / 2
        label = "0 (shipped)" if seed == 0 else str(seed)
        lines.append(f"| {label} | {' | '.join(cells)} | {pool / t_pool:.3f}x |")
    return "\n".join(lines)


def block_steps() -> str:
    """docs/results.md: the shipped student at 1, 2 and 4 steps beside the teacher, with diversity (recall)."""
    table = load(f"{RESULTS}/steps-n2048.json")
    rows = {(r["model"], r.get("steps", 0), r["split"]): r for r in table["rows"]}
    current = all(r["transformer_sha256"] == transformer_sha(f"weights/{r['model']}")
                  for r in table["rows"] if r["model"] != "real")
    lines = [] if current else [f"**{STALE}**", ""]
    lines += [steps_header("model, steps (NFE)")]
    for model, steps, label in (("student", 1, "student, 1 (1)"), ("student", 2, "student, 2 (2)"),
                                ("student", 4, "student, 4 (4)"), ("teacher", 16, "teacher, 16 (32)")):
        lines.append(steps_row(label, rows[(model, steps, "train")], rows[(model, steps, "heldout")]))
    recall = [rows[("student", 1, split)]["recall"] / rows[("teacher", 16, split)]["recall"]
              for split in ("train", "heldout")]
    lines += ["", f"One-step recall against the teacher's: {recall[0]:.2f}x (train), {recall[1]:.2f}x (held out)."]
    return "\n".join(lines)


def block_serving() -> str:
    latency, lat_ok = latency_current()
    serving, srv_ok = serving_current()
    proc, http = latency["in_process"], latency["http"]["student"]
    m = latency["machine"]
    lines = [] if lat_ok else [f"**Latency {STALE}** (the architecture is the shipped one, so the timings should "
                               "carry over, but `latency.json` does not record which student it timed).", ""]
    lines += [f"Batch 1, median of {latency['config']['repeats']} warm calls (ms); {m['cpu']}, {m['cpus']} CPUs, "
              f"{m['torch_threads']} torch threads, torch {m['torch']}, no GPU; `{RESULTS}/latency.json`:", "",
              "| stage | student, 1 step (NFE 1) | teacher, 16 steps CFG (NFE 32) | teacher / student |",
              "|---|---|---|---|"]
    names = {"text_encoding": "text encoding", "transformer": "transformer", "vae_decode": "VAE decode",
             "image_encoding": "image encoding (PNG)", "total": "in-process total"}
    for stage, label in names.items():
        s, t = proc["student"][stage], proc["teacher"][stage]
        lines.append(f"| {label} | {s:.1f} | {t:.1f} | {t / s:.2f}x |")
    lines.append(f"| HTTP POST /generate, 1 client | {http['p50_ms']:.1f} | - | - |")
    lines += ["", "| generator batch | ms per call | images/s |", "|---|---|---|"]
    for row in latency["throughput"]["rows"]:
        lines.append(f"| {row['batch']} | {row['ms_per_call']:.1f} | {row['images_per_s']:.1f} |")
    lines += [""] + ([] if srv_ok else [f"**Serving {STALE}** (`serving.json` records the earlier student's "
                                        "manifest).", ""])
    sm = serving["machine"]
    lines += [f"Serving goals, `{RESULTS}/serving.json` ({sm['cpu']}, {sm['cpus']} CPUs, the service's defaults: "
              f"max_batch {serving['server_args']['max_batch']}, microbatch {serving['server_args']['microbatch']}):",
              "", "| goal | value | met |", "|---|---|---|"]
    for goal, result in serving["goals"].items():
        value = result["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else f"`{json.dumps(value)}`"
        lines.append(f"| {goal} | {shown} | {'yes' if result['met'] else '**no**'} |")
    cached = cached_prompts_note(serving)
    return "\n".join(lines + (["", cached] if cached else []) + ["", *serving_side_by_side(serving)])




BLOCKS = {"README.md": {"numbers": block_numbers},
          "docs/results.md": {"table1": block_table1, "seeds": block_seeds, "steps": block_steps,
                              "table2": block_table2, "serving": block_serving,
                              "published_detached": block_published_detached, "grid": block_grid}}


def render(text: str, blocks: dict) -> tuple[str, list[str]]:
    """text with every named block regenerated; the names of blocks whose markers are missing."""
    missing = []
    for name, make in blocks.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            missing.append(name)
            continue
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text, missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is stale")
    args = parser.parse_args(argv)
    problems = []
    for name, blocks in BLOCKS.items():
        path = ROOT / name
        old = path.read_text()
        new, missing = render(old, blocks)
        problems += [f"{name}: no <!-- {block}:begin/end --> markers" for block in missing]
        if new != old:
            if args.check:
                problems.append(f"{name}: numbers tables are stale; run `make docs`")
            else:
                path.write_text(new)
                print(f"wrote {name}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
