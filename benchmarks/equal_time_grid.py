"""The symmetric equal-time study (docs/results.md, section 2): TBCM, endpoint-only synthetic sCM and data-sCM, each
with and without DMD's term, BUDGET seconds each, on one schedule, weighting and pair count. Writes JSON and a plot.

    python -m benchmarks.equal_time_grid --budget 1200 --seeds 0 1 --out runs/grid --json docs/results/grid-1200.json

Every arm is its recipe (tbcm/distill/recipes.py) with the shipped recipe's schedule and weighting over it (uniform
prior, no learned weighting, cosine decay, 100-step tangent warm-up, no calm-down, log-normal times at p_mean -0.8
where times are drawn) and 4 pairs per prompt (TBCM: 4 trajectory states; synthetic: 4 re-noised endpoints; data:
4 noised renders), its 1400-step schedule fitted to the budget. A seed's rollout bank (4 x 256 rollouts, the size
Table 2 finds right near 20 minutes) is built once and its wall time counts against the budget of every arm that
trains on it. Arms run two at a time, one thread each, so a drift of the machine's speed hits both alike; each
pair is then evaluated at 1 step on the training and held-out combinations (n = --eval-n, draw seed 0). The
periodic evaluations (n = 256, training combinations) give FD and accuracy against training time, and the time at
which each arm first meets the one-step bars against the teacher's own score at that n. Resumable: an evaluated arm
is skipped, an arm stopped midway continues from its checkpoint (`tbcm distill --resume`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.plot_fd_curves import read_curve
from benchmarks.provenance import command, transformer_sha256

TBCM = ".venv/bin/tbcm"
TEACHER = "weights/teacher"
# the shipped recipe's schedule and weighting (tbcm+synthetic+dmd), put over every arm's recipe
SHARED = ["--no-learn-logvar", "--prior-weight", "uniform", "--cosine-decay", "--tangent-warmup", "100",
          "--calm-down-start", "1000000000", "--p-mean", "-0.8", "--p-std", "1.6"]
PAIRS = {"tbcm": ["--points-per-trajectory", "4"],  # what 4 pairs per prompt are, by method
         "synthetic-scm": ["--points-per-trajectory", "0", "--renoised-per-trajectory", "4"],
         "data-scm": ["--points-per-trajectory", "4"]}
ARMS = [name + dmd for name in PAIRS for dmd in ("", "+dmd")]  # each a recipe of tbcm/distill/recipes.py
BANK = ["--shards", "4", "--prompts-per-shard", "256", "--batch-size", "32"]
BARS = {"fd": 1.3, "accuracy": 0.95}  # one-step bars: FD at most 1.3x the teacher's, accuracy at least 0.95x
CURVE_N = 256  # the periodic evaluations' n (DistillConfig.eval_n)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1200, help="seconds of training per arm, bank included")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS, help="arms, paired in this order")
    parser.add_argument("--eval-n", type=int, default=2048, help="images per split of each arm's final evaluation")
    parser.add_argument("--out", type=Path, default=Path("runs/grid"), help="run folders, banks and logs")
    parser.add_argument("--json", type=Path, default=Path("docs/results/grid-1200.json"))
    return parser.parse_args()


def run_together(jobs: list[tuple[list[str], Path]]) -> dict[Path, float]:
    """Run the (command, log) jobs at once, one thread each; {log: peak RSS in GB of its process}. A failure is
    named with its log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = {}
    for cmd, log in jobs:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:
            running[subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env).pid] = log
    peaks = {}
    while running:
        pid, status, usage = os.wait4(-1, 0)
        log = running.pop(pid)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{log}: the job failed (exit {os.waitstatus_to_exitcode(status)}); see its last lines")
        peaks[log] = round(usage.ru_maxrss / 2**20, 3)  # ru_maxrss is in KiB on Linux
    return peaks


def build_banks(args, seeds: list[int]) -> dict[int, float]:
    """{seed: wall seconds of its bank}, building the missing ones side by side."""
    todo = [s for s in seeds if not (args.out / f"bank-s{s}" / "bank_s.txt").exists()]
    for group in (todo[i:i + 2] for i in range(0, len(todo), 2)):
        start = time.perf_counter()
        run_together([([TBCM, "rollout", "--teacher", TEACHER, "--prompts", "world", "--seed", str(s), *BANK,
                        "--out", str(args.out / f"bank-s{s}")], args.out / f"bank-s{s}.log") for s in group])
        for s in group:  # side by side, both took this long; the later one's end is each one's wall time
            (args.out / f"bank-s{s}" / "bank_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return {s: float((args.out / f"bank-s{s}" / "bank_s.txt").read_text()) for s in seeds}


def arm_command(args, arm: str, seed: int, bank_s: float | None) -> list[str]:
    run = args.out / f"{arm}-s{seed}"
    cmd = [TBCM, "distill", "--recipe", arm, "--teacher", TEACHER, "--prompts", "world", "--seed", str(seed),
           *SHARED, *PAIRS[arm.removesuffix("+dmd")], "--fit-schedule-to-budget", "--eval-every", "100",
           "--export-eval-n", "0", "--time-budget-s", f"{args.budget - (bank_s or 0):.1f}",
           "--out", str(run), "--export", str(run / "export")]
    if bank_s is not None:
        cmd += ["--rollouts", str(args.out / f"bank-s{seed}")]
    return cmd + (["--resume"] if (run / "checkpoint.safetensors").exists() else [])


def training_clock(run: Path) -> list[float]:
    """The run's training time (evaluations excluded) after each step, from its metrics.jsonl."""
    return [json.loads(line)["train_time_s"] for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def time_to_bars(curve: list[dict], offset: float, teacher: dict) -> float | None:
    """Seconds of budget (bank included) at the first periodic evaluation meeting both bars, or None."""
    for point in curve:
        if point["fd"] <= BARS["fd"] * teacher["fd"] and point["accuracy"] >= BARS["accuracy"] * teacher["accuracy"]:
            return round(offset + point["train_time_s"], 1)
    return None


def evaluate(models: list[tuple[str, str, int, int, Path]]) -> None:
    """`tbcm eval` (draw seed 0) of each (model, split, steps, n, json) missing its JSON, two at a time."""
    todo = [m for m in models if not m[-1].exists()]
    for group in (todo[i:i + 2] for i in range(0, len(todo), 2)):
        run_together([([TBCM, "eval", "--model", model, "--steps", str(steps), "--prompts", split, "--n", str(n),
                        "--json", str(out)], out.with_suffix(".log")) for model, split, steps, n, out in group])


def record(args, arm: str, seed: int, bank_s: float | None, peak_gb: float | None, teacher: dict) -> dict:
    run = args.out / f"{arm}-s{seed}"
    clock, curve = training_clock(run), read_curve(run)
    final = {split: json.loads((run / f"eval-{split}.json").read_text()) for split in ("train", "heldout")}
    step_s = statistics.median(b - a for a, b in zip(clock, clock[1:]))
    cmd = " ".join(arm_command(args, arm, seed, bank_s)).replace(" --resume", "")  # as first started
    return {"arm": arm, "seed": seed, "command": cmd,
            "bank_s": bank_s, "steps": len(clock), "train_time_s": round(clock[-1], 1), "step_s": round(step_s, 3),
            "peak_rss_gb": peak_gb, "time_to_bars_s": time_to_bars(curve, bank_s or 0, teacher), "curve": curve,
            "final": {split: {k: r[k] for k in ("fd", "accuracy", "precision", "recall", "n")}
                      for split, r in final.items()},
            "transformer_sha256": transformer_sha256(run / "export")}


def plot(rows: list[dict], teacher: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {arm: f"C{i}" for i, arm in enumerate(ARMS)}
    for row in rows:
        minutes = [((row["bank_s"] or 0) + p["train_time_s"]) / 60 for p in row["curve"]]
        style = dict(color=colours[row["arm"]], linestyle="-" if row["seed"] == 0 else "--", marker=".",
                     label=f"{row['arm']}, seed {row['seed']}")
        ax_fd.plot(minutes, [p["fd"] for p in row["curve"]], **style)
        ax_acc.plot(minutes, [p["accuracy"] for p in row["curve"]], **style)
    ax_fd.axhline(BARS["fd"] * teacher["fd"], color="k", linewidth=0.8, label="bar: 1.3x the teacher's FD")
    ax_acc.axhline(BARS["accuracy"] * teacher["accuracy"], color="k", linewidth=0.8, label="bar: 0.95x its accuracy")
    ax_fd.set(xlabel="minutes of the budget (bank included)", ylabel=f"FD, 1 step, n = {CURVE_N}", yscale="log")
    ax_acc.set(xlabel="minutes of the budget (bank included)", ylabel="all-attribute accuracy, 1 step", ylim=(0.7, 1))
    for ax in (ax_fd, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    args = parse_args()
    on_banks = any(not arm.startswith("data") for arm in args.arms)
    banks = build_banks(args, args.seeds if on_banks else [])
    reference = args.out / f"teacher-train-n{CURVE_N}.json"  # the teacher at the periodic evaluations' n and draw
    evaluate([(TEACHER, "train", 16, CURVE_N, reference)])
    teacher = json.loads(reference.read_text())
    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    peaks = {(r["arm"], r["seed"]): r["peak_rss_gb"] for r in previous.get("arms", [])}
    rows = []
    for seed in args.seeds:
        for pair in (args.arms[i:i + 2] for i in range(0, len(args.arms), 2)):
            bank = {arm: None if arm.startswith("data") else banks[seed] for arm in pair}
            todo = [a for a in pair if not (args.out / f"{a}-s{seed}" / "export" / "tbcm.json").exists()]
            logs = {a: args.out / f"{a}-s{seed}.log" for a in todo}
            peak = run_together([(arm_command(args, a, seed, bank[a]), logs[a]) for a in todo]) if todo else {}
            peaks |= {(a, seed): peak[logs[a]] for a in todo}
            evaluate([(str(args.out / f"{a}-s{seed}" / "export"), split, 1, args.eval_n,
                       args.out / f"{a}-s{seed}" / f"eval-{split}.json") for a in pair
                            for split in ("train", "heldout")])
            rows += [record(args, a, seed, bank[a], peaks.get((a, seed)), teacher) for a in pair]
            figure = args.json.with_suffix(".png")
            plot(rows, teacher, figure)
            args.json.write_text(json.dumps({
                "command": command(), "budget_s": args.budget, "eval_n": args.eval_n, "bars": BARS,
                "teacher_curve_reference": {k: teacher[k] for k in ("fd", "accuracy", "n", "steps")},
                "shared_options": SHARED, "machine": teacher.get("machine"), "arms": rows}, indent=2))
            print(f"wrote {args.json} and {figure}: {len(rows)} arms", flush=True)


if __name__ == "__main__":
    main()
