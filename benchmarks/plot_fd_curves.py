"""FD (and accuracy) against training wall-clock time, from the eval_curve.jsonl of distill runs.

    python -m benchmarks.plot_fd_curves runs/student runs/scm-data --out docs/fd_vs_time.png

A run that trained on a rollout bank is shifted right by the bank's wall time: --offset runs/tbcm=121.8.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curve(run: Path) -> list[dict]:
    path = run / "eval_curve.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: missing (train with --eval-every N to record it)")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", default="docs/fd_vs_time.png")
    parser.add_argument("--offset", action="append", default=[], metavar="RUN=SECONDS",
                        help="time spent before training that counts against RUN (a `tbcm rollout` bank)")
    args = parser.parse_args()
    offsets = {}
    for item in args.offset:
        run, _, seconds = item.rpartition("=")
        if Path(run) not in args.runs:
            raise SystemExit(f"--offset {item}: {run!r} is not one of the runs")
        offsets[Path(run)] = float(seconds)
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    summary = {}
    for run in args.runs:
        curve = read_curve(run)
        method = json.loads((run / "config.json").read_text())["pairs"]
        label = f"{'TBCM' if method == 'trajectory' else 'data sCM'} ({run.name})"
        offset = offsets.get(run, 0.0)
        label += f", incl. {offset:.0f} s bank" if offset else ""
        minutes = [(offset + p["train_time_s"]) / 60 for p in curve]
        ax_fd.plot(minutes, [p["fd"] for p in curve], marker="o", label=label)
        ax_acc.plot(minutes, [p["accuracy"] for p in curve], marker="o", label=label)
        summary[str(run)] = [{**p, "bank_s": offset} for p in curve] if offset else curve
    ax_fd.set(xlabel="training time (min)", ylabel="FD, 1 step (lower is better)", yscale="log")
    ax_acc.set(xlabel="training time (min)", ylabel="all-attribute accuracy, 1 step")
    for ax in (ax_fd, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
