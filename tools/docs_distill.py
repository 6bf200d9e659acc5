"""The distillation studies' blocks of docs/results.md (sections 2 and 9), for tools/docs_table.py."""
from __future__ import annotations

from docs_common import DRAWS, RESULTS, bars_met, fa, load, ratio, se, steps_header, steps_row

# Table 2: (file, budget label, bank, training seed); the TBCM side is reported as its JSON's export says
PAIRS = (("equal-time-r1-3600.json", "1 h", "8 shards", 0), ("equal-time-r1-seed1-3600.json", "1 h", "8 shards", 1),
         ("equal-time-r1-bank4-3600.json", "1 h", "4 shards", 0), ("equal-time-r1-1200.json", "20 min", "8 shards", 0),
         ("equal-time-r1-bank4-1200.json", "20 min", "4 shards", 0),
         ("equal-time-dmd-both-1200.json", "20 min, DMD on both sides", "4 shards", 0))
PAIR_DRAWS = (("train-seed0", "train"), ("train-seed1", "train, `--seed 1`"), ("heldout-seed0", "held out"),
              ("heldout-seed1", "held out, `--seed 1`"))


def block_table2() -> str:
    lines = ["| budget, bank, training seed | TBCM: bank s, steps, export | data-sCM: steps | draw (n = 2048) "
             "| TBCM: FD / accuracy | data-sCM: FD / accuracy | accuracy difference (SE) |",
             "|---|---|---|---|---|---|---|"]
    for name, budget, bank, seed in PAIRS:
        pair = load(f"{RESULTS}/{name}")
        rows = pair["rows"]
        # the reported TBCM export: as trained where the JSON says so (rows tbcm-a1-* when both were evaluated)
        as_trained = pair["tbcm"]["export_extrapolation"] == 1.0
        prefix = "tbcm-a1" if as_trained and "tbcm-a1-train-seed0" in rows else "tbcm"
        export = "as trained" if as_trained else f"at {pair['tbcm']['export_extrapolation']}"
        for i, (key, label) in enumerate(PAIR_DRAWS):
            t, d = rows[f"{prefix}-{key}"], rows[f"data-{key}"]
            diff = t["accuracy"] - d["accuracy"]
            plot = f"results/{pair['figure'].split('.{')[0]}.png"
            first = (f"{budget}, {bank}, seed {seed} ([plot]({plot}))",
                     f"{pair['bank_s']:.0f} s, {pair['tbcm']['steps']}, {export}", f"{pair['data']['steps']}")
            head = first if i == 0 else ("", "", "")
            lines.append(f"| {' | '.join(head)} | {label} | {fa(t)} | {fa(d)} | {diff:+.3f} "
                         f"({se(t['accuracy'], d['accuracy'], t['n']):.3f}) |")
    return "\n".join(lines)


# section 9's arms, the ablation chain from the published recipe: (label, bench_quality JSON at 1, 2 and 4 steps,
# tbcm eval JSON of held out at --seed 1)
CHAIN_ARMS = (("`tbcm` + `--logvar-detached`", "steps-tbcm-detached-1400.json",
               "eval-tbcm-detached-1400-heldout-seed1.json"),
              ("`tbcm+synthetic` + `--logvar-detached`", "steps-tbcm-synthetic-detached-1400.json",
               "eval-tbcm-synthetic-detached-1400-heldout-seed1.json"),
              ("`tbcm+synthetic` + uniform weighting", "steps-tbcm-synthetic-uniform-1400.json",
               "eval-tbcm-synthetic-uniform-1400-heldout-seed1.json"),
              ("`tbcm+synthetic` + uniform weighting, 2 of 15 states", "steps-tbcm-synthetic-uniform-2pts-1400.json",
               "eval-tbcm-synthetic-uniform-2pts-1400-heldout-seed1.json"),
              ("`tbcm+synthetic` + uniform weighting, 2 states, cosine schedule",
               "steps-tbcm-synthetic-uniform-2pts-cosine-1400.json",
               "eval-tbcm-synthetic-uniform-2pts-cosine-1400-heldout-seed1.json"),
              ("`tbcm+synthetic+dmd` (the shipped recipe; this bank)", "steps-tbcm-synthetic-dmd-1400.json",
               "eval-tbcm-synthetic-dmd-1400-heldout-seed1.json"))


def block_published_detached() -> str:
    """docs/results.md section 9: the published `tbcm` recipe with the detached log-variance head, and the chain's
    next links, 1400 steps each, at n = 2048 against the teacher (Table 1's rows) and beside the shipped
    student, then at 1, 2 and 4 steps."""
    rows = load(f"{RESULTS}/table1.json")["rows"]
    shipped = {(r.get("steps", 0), r["split"]): r for r in load(f"{RESULTS}/steps-n2048.json")["rows"]}
    arms = []
    for label, steps_file, seed1_file in CHAIN_ARMS:
        ours = {(r.get("steps", 0), r["split"]): r for r in load(f"{RESULTS}/{steps_file}")["rows"]
                if r["model"] != "real"}
        ours[(1, "heldout-seed1")] = load(f"{RESULTS}/{seed1_file}")
        arms.append((label, ours))
    lines = ["| arm, 1 step | split, draw (n = 2048) | teacher, 16 steps | arm: FD / accuracy "
             "| FD / teacher's (bar <= 1.3x) | accuracy / teacher's (bar >= 0.95x) | bars met | recall / teacher's "
             "| shipped student: FD, accuracy / teacher's |", "|---|---|---|---|---|---|---|---|---|"]
    for label, ours in arms:
        for key, draw in DRAWS:
            s, t, shipped_row = ours[(1, key)], rows[f"teacher-{key}"], rows[f"student-{key}"]
            teacher_recall = shipped.get((16, key), {}).get("recall")
            recall = f"{s['recall'] / teacher_recall:.2f}x" if teacher_recall else "-"
            lines.append(f"| {label} | {draw} | {fa(t)} | {fa(s)} | {ratio(s, t, 'fd')} | "
                         f"{ratio(s, t, 'accuracy')} | {bars_met(s, t)} | {recall} | "
                         f"{ratio(shipped_row, t, 'fd')}, {ratio(shipped_row, t, 'accuracy')} |")
    lines += ["", steps_header("arm, steps (NFE)")]
    lines += [steps_row(f"{label}, {count} ({count})", ours[(count, "train")], ours[(count, "heldout")])
              for label, ours in arms for count in (1, 2, 4)]
    return "\n".join(lines)


def block_grid() -> str:
    """docs/results.md section 2: the symmetric equal-time study, one row per arm and training seed, against the
    teacher's rows at n = 2048 (bench_quality's, the same images as Table 1's)."""
    grid = load(f"{RESULTS}/grid-1200.json")
    teacher = {r["split"]: r for r in load(f"{RESULTS}/steps-n2048.json")["rows"] if r["model"] == "teacher"}
    lines = [f"Teacher (16 steps, n = 2048, seed 0): train {fa(teacher['train'])}, held out {fa(teacher['heldout'])}. "
             f"Curve bars: FD <= {grid['bars']['fd']}x and accuracy >= {grid['bars']['accuracy']}x of the teacher's "
             f"{grid['teacher_curve_reference']['fd']:.1f} / {grid['teacher_curve_reference']['accuracy']:.3f} "
             f"(n = {grid['teacher_curve_reference']['n']}, train).", "",
             "| arm, training seed | bank s | steps | s / step | peak RSS GB | curve meets the bars at | train: FD / "
             "accuracy (x teacher's) | held out: FD / accuracy (x teacher's) | bars met, train / held out "
             "| held-out recall / teacher's |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in grid["arms"]:
        cells = []
        for split in ("train", "heldout"):
            s, t = arm["final"][split], teacher[split]
            cells.append(f"{fa(s)} ({ratio(s, t, 'fd')}, {ratio(s, t, 'accuracy')})")
        met = " / ".join(bars_met(arm["final"][split], teacher[split]) for split in ("train", "heldout"))
        reached = "-" if arm["time_to_bars_s"] is None else f"{arm['time_to_bars_s'] / 60:.1f} min"
        bank = "-" if arm["bank_s"] is None else f"{arm['bank_s']:.0f}"
        peak = "-" if arm["peak_rss_gb"] is None else f"{arm['peak_rss_gb']:.2f}"
        recall = arm["final"]["heldout"]["recall"] / teacher["heldout"]["recall"]
        lines.append(f"| `{arm['arm']}`, {arm['seed']} | {bank} | {arm['steps']} | {arm['step_s']:.2f} | {peak} | "
                     f"{reached} | {' | '.join(cells)} | {met} | {recall:.2f}x |")
    lines += ["", "Mean over the training seeds run, against the teacher's:", "",
              "| arm | seeds | train: FD / teacher's | train: accuracy / teacher's | held out: FD / teacher's "
              "| held out: accuracy / teacher's | held-out recall / teacher's |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(arm["arm"] for arm in grid["arms"]):
        runs = [arm["final"] for arm in grid["arms"] if arm["arm"] == name]
        cells = [f"{sum(r[split][key] for r in runs) / len(runs) / teacher[split][key]:.{2 if key == 'fd' else 3}f}x"
                 for split in ("train", "heldout") for key in ("fd", "accuracy")]
        recall = sum(r["heldout"]["recall"] for r in runs) / len(runs) / teacher["heldout"]["recall"]
        lines.append(f"| `{name}` | {len(runs)} | {' | '.join(cells)} | {recall:.2f}x |")
    return "\n".join(lines)
