"""TBCM ablations at equal training time: time sampling and points per trajectory (results of an earlier
teacher: git history).

Time sampling along the teacher trajectory (route / lognormal / uniform, K-1 points), points per trajectory
(1 / 4 / K-1, route sampling), K = --route-points, and the baseline plus the LADD branch (--ladd); the baseline
(route, K-1 points) is shared: 6 arms. A run of some --arms keeps the other arms' rows already in --json when
they were made with the same budget, n, seed and extra args.

Each arm is one `tbcm distill --time-budget-s B` run in its own process (training time, evals excluded), exported
with its 1-step FD and accuracy on both splits; the table reads the export manifest and metrics.jsonl, the figure
draws loss against training time.

    python -m benchmarks.bench_ablations --budget-s 270 --n 256 --out-dir runs/ablations \
        --json docs/results/ablations.json --skip-existing
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from benchmarks.provenance import command as provenance_command
from tbcm.distill.config import DistillConfig

REPO = Path(__file__).resolve().parents[1]

MANY_STEPS = 10**6  # the time budget, not the step count, ends every arm


def route_points(extra: list[str]) -> int:
    """K as the arms' distill runs will see it: --route-points in the extra args, else the config default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--route-points", type=int, default=DistillConfig.route_points)
    return parser.parse_known_args(extra)[0].route_points


def make_arms(k: int) -> dict[str, tuple[str, int, tuple[str, ...]]]:
    """name -> (time sampling, points per trajectory, more distill flags); the baseline uses all K-1 states."""
    full, few = k - 1, min(4, k - 2)
    arms = {"baseline": ("route", full, ()), "lognormal": ("lognormal", full, ()), "uniform": ("uniform", full, ()),
            "points-1": ("route", 1, ()), f"points-{few}": ("route", few, ()), "ladd": ("route", full, ("--ladd",))}
    return {name: arm for name, arm in arms.items() if 1 <= arm[1] <= full}


def kept_rows(path: Path, same: dict) -> dict[str, dict]:
    """Rows of an earlier --json made with the same settings (budget, n, seed, extra), by arm name."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    return {row["arm"]: row for row in earlier["rows"]} if all(earlier.get(k) == v for k, v in same.items()) else {}


def train_arm(name: str, sampling: str, points: int, flags: tuple, run: Path, args, extra: list[str]) -> float:
    """Run (or continue, with --skip-existing) one arm's distill + export; returns its wall-clock seconds."""
    if args.skip_existing and (run / "export" / "tbcm.json").exists():
        print(f"[{name}] reusing {run / 'export'}")
        return 0.0
    resume = args.skip_existing and (run / "checkpoint.safetensors").exists()
    if not resume:  # a fresh run: the trainer appends to these logs, so stale lines must go
        for stale in ("metrics.jsonl", "eval_curve.jsonl"):
            (run / stale).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tbcm.cli.main", "distill", "--teacher", args.teacher, "--prompts", "world",
           "--pairs", "trajectory", "--time-sampling", sampling, "--points-per-trajectory", str(points),
           "--time-budget-s", str(args.budget_s), "--steps", str(MANY_STEPS), "--eval-every", "0",
           "--seed", str(args.seed), "--out", str(run), "--export", str(run / "export"),
           "--export-eval-n", str(args.n), *flags, *extra, *(["--resume"] if resume else [])]
    print(f"\n[{name}] {'resuming: ' if resume else ''}{shlex.join(['tbcm', *cmd[3:]])}", flush=True)
    t0 = time.perf_counter()
    if subprocess.run(cmd, cwd=REPO).returncode:  # output streams through: the progress bar stays visible
        sys.exit(f"[{name}] distill failed; {run}: the same command with --skip-existing continues from its "
                 "checkpoint")
    return time.perf_counter() - t0


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def arm_row(name: str, sampling: str, points: int, flags: tuple, run: Path, wall_s: float) -> dict:
    """One table row from the export manifest (steps, pairs, train time, evals) and the loss log."""
    manifest = json.loads((run / "export" / "tbcm.json").read_text())["manifest"]
    log = read_metrics(run)
    losses = [m["loss"] for m in log]
    tail = losses[-max(1, len(losses) // 10):]  # the last 10% of steps
    row = {"arm": name, "time_sampling": sampling, "points_per_trajectory": points, "flags": list(flags),
           "steps": manifest["step"],
           "pairs": manifest["counters"]["pairs"], "train_time_s": manifest["counters"]["train_time_s"],
           "final_loss": sum(tail) / len(tail), "skipped_steps": manifest["counters"]["skipped_steps"],
           "wall_s": wall_s, "run": str(run),
           "loss_curve": {"train_time_s": [m["train_time_s"] for m in log], "loss": losses}}  # the figure's data
    for split, result in manifest["eval"].items():
        row |= {f"fd_{split}": result["fd"], f"accuracy_{split}": result["accuracy"],
                f"images_per_s_{split}": result["images_per_s"]}
    return row


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = [("arm", "arm", "s"), ("time sampling", "time_sampling", "s"), ("points/trajectory",
           "points_per_trajectory", "d"), ("steps done", "steps", "d"), ("pairs", "pairs", "d"),
           ("train time s", "train_time_s", ".0f"), ("final loss", "final_loss", ".4f"),
           ("FD train", "fd_train", ".3f"), ("acc train", "accuracy_train", ".3f"),
           ("FD heldout", "fd_heldout", ".3f"), ("acc heldout", "accuracy_heldout", ".3f")]


def markdown_table(rows: list[dict], command: str) -> str:
    lines = [f"`{command}`", "", "| " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(key), spec) for _, key, spec in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        curve = r["loss_curve"]
        window = max(1, len(curve["loss"]) // 20)
        ax.plot(curve["train_time_s"], moving_average(curve["loss"], window),
                label=f"{r['arm']} ({r['time_sampling']}, {r['points_per_trajectory']} pts)")
    ax.set(xlabel="training time (s)", ylabel="sCM loss (moving average, 5% of steps)",
           title="TBCM ablations at equal training time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="teacher", help="teacher folder or shipped name")
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds per arm (evals excluded)")
    parser.add_argument("--n", type=int, default=256, help="eval images per split (0: no evals, shown as -)")
    parser.add_argument("--out-dir", default="runs/ablations", help="one run folder per arm under this")
    parser.add_argument("--json", default="docs/results/ablations.json", help="the .md and .png go beside it")
    parser.add_argument("--arms", default=None, help="comma list of arm names to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", default="", help='more distill args, e.g. "--prompts-per-step 4" '
                        '(a single flag needs --extra=--flag)')
    parser.add_argument("--skip-existing", action="store_true",
                        help="reuse arms already exported and resume arms with a checkpoint")
    args = parser.parse_args()
    extra = shlex.split(args.extra)
    arms = make_arms(route_points(extra))
    chosen = args.arms.split(",") if args.arms else list(arms)
    unknown = [a for a in chosen if a not in arms]
    if unknown:
        sys.exit(f"--arms: unknown {unknown}; the arms are {list(arms)}")
    command = provenance_command()
    out, same = Path(args.json), {"budget_s": args.budget_s, "n": args.n, "seed": args.seed, "extra": extra}
    by_arm, load_start = kept_rows(out, same), os.getloadavg()
    for name in chosen:
        sampling, points, flags = arms[name]
        run = Path(args.out_dir) / name
        wall_s = train_arm(name, sampling, points, flags, run, args, extra)
        by_arm[name] = arm_row(name, sampling, points, flags, run, wall_s)
    rows = [by_arm[name] for name in arms if name in by_arm]
    machine = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
               "torch": version("torch"), "load_average_start": load_start, "load_average_end": os.getloadavg()}
    table = markdown_table(rows, command)
    print(f"\nTBCM ablations, {args.budget_s:g} s of training per arm, n = {args.n} per split — "
          f"{machine['machine']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
          f"load {machine['load_average_start'][0]:.2f} -> {machine['load_average_end'][0]:.2f}\n")
    print("\n".join(table.splitlines()[2:]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "machine": machine, **same, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(table)
    plot_losses(rows, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
