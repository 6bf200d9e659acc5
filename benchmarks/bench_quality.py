"""Quality on the shapes world: teacher at several step counts (CFG) and students at 1, 2 and 4 steps, on
training and held-out attribute combinations: FD, improved precision and recall (diversity: a student's recall
against the teacher's), all-attribute accuracy, NFE, images/s on this machine.

    python -m benchmarks.bench_quality --n 512 --json runs/bench/quality.json \
        --model teacher:4,8,16 --model student:1,2,4 --model runs/scm-data/export:1,2,4

A student's spec may end in @T,T,...: its sampling times between pi/2 and 0 (steps - 1 of them), instead of
SanaSprintPipeline's (`--model student:2@0.4` samples at pi/2, then re-noises to t = 0.4 and samples again).
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from benchmarks.provenance import command as provenance_command, transformer_sha256
from tbcm.models.pipeline import resolve_model
from tbcm.world.evaluate import EvalConfig, evaluate

METRICS = ("fd", "precision", "recall", "accuracy", "nfe", "images_per_s")  # per row; "real" rows have no images/s


def parse_model(spec: str) -> tuple[str, list[int], tuple[float, ...]]:
    """NAME:STEPS,STEPS[@T,T,...] -> (name, step counts, intermediate times)."""
    spec, _, times = spec.partition("@")
    name, _, steps = spec.rpartition(":")
    return name, [int(s) for s in steps.split(",")], tuple(float(t) for t in times.split(",") if t)


def label(row: dict) -> str:
    """The row's model as its spec names it (with @times when it has its own sampling times)."""
    times = row.get("intermediate_times")
    return row["model"] + (f"@{','.join(f'{t:g}' for t in times)}" if times else "")


def markdown_table(rows: list[dict], command: str) -> str:
    lines = [f"`{command}`", "", "| model | steps | split | FD | precision | recall | accuracy | NFE | images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ips = f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "-"
        lines.append(f"| {label(r)} | {r.get('steps', 0)} | {r['split']} | {r['fd']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['accuracy']:.3f} | {r['nfe']} | {ips} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME_OR_FOLDER:STEPS,STEPS,...")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--splits", default="train,heldout")
    parser.add_argument("--json", default="runs/bench/quality.json")
    args = parser.parse_args()
    rows = [{"model": "real", "split": split, **{k: v for k, v in evaluate(EvalConfig(model="real", prompts=split,
                                                                                      n=args.n)).items()
                                                 if k in METRICS[:-1]}}
            for split in args.splits.split(",")]
    for spec in args.model:
        name, step_list, times = parse_model(spec)
        for steps in step_list:
            for split in args.splits.split(","):
                result = evaluate(EvalConfig(model=name, steps=steps, prompts=split, n=args.n,
                                             intermediate_times=times))
                rows.append({"model": name, "steps": steps, "split": split, "intermediate_times": list(times),
                             "transformer_sha256": transformer_sha256(resolve_model(name)),
                             **{k: result[k] for k in METRICS}})
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"\nQuality on the shapes world (n = {args.n} per row) — {machine}")
    print(f"{'model':<28}{'steps':>6}{'split':>9}{'FD':>9}{'prec':>7}{'recall':>7}{'acc':>8}{'NFE':>5}{'img/s':>9}")
    for r in rows:
        ips = f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "-"
        print(f"{label(r):<28}{r.get('steps', 0):>6}{r['split']:>9}{r['fd']:>9.3f}{r['precision']:>7.3f}"
              f"{r['recall']:>7.3f}{r['accuracy']:>8.3f}{r['nfe']:>5}{ips:>9}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "n": args.n, "rows": rows, "command": provenance_command()},
                              indent=2))
    out.with_suffix(".md").write_text(markdown_table(rows, provenance_command()))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
