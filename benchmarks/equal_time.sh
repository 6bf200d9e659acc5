#!/usr/bin/env bash
# Table 2, equal wall-clock time: the `make student` recipe (STUDENT_RECIPE, tbcm+synthetic+dmd: a bank of teacher
# rollouts, then sCM with DMD's term on it), against DATA_RECIPE (data-scm: Sana-Sprint's sCM on real renders, given
# the shipped recipe's schedule and weighting below; data-scm+dmd gives it DMD's term too), each with BUDGET seconds
# (default 3600). The bank's wall time counts against the TBCM side's budget.
# The two run side by side, one thread each, so a drift in this machine's speed hits both alike. Each runs the
# shipped 1400-step schedule fitted to its budget (--fit-schedule-to-budget), so each anneals as its time ends.
# Then both students at 1, 2 and 4 steps, n = 512, and the FD-against-time figure.
# Run it as `make equal-time [BUDGET=S] [EQUAL_TIME_RUNS=DIR]`: the Makefile passes STUDENT_BANK_OPTS (the bank),
# STUDENT_SOURCE (teacher, prompts and seed of both sides) and STUDENT_RECIPE; the recipes are tbcm/distill/recipes.py.
# Usage: benchmarks/equal_time.sh [BUDGET] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET="${1:-3600}"
OUT="${2:-runs/equal-time}"
TBCM=".venv/bin/tbcm"
read -ra BANK <<< "${STUDENT_BANK_OPTS:?is unset: run this script through make equal-time}"
read -ra SOURCE <<< "${STUDENT_SOURCE:?is unset: run this script through make equal-time}"
RECIPE="${STUDENT_RECIPE:?is unset: run this script through make equal-time}"
DATA_RECIPE="${DATA_RECIPE:-data-scm}"
# both sides: the recipe's step schedule fitted to the budget, evaluated every 100 steps
SCHEDULE=("${SOURCE[@]}" --fit-schedule-to-budget --eval-every 100 --export-eval-n 0)
mkdir -p "$OUT"

tbcm_side() {
    local start bank_s
    start=$(date +%s.%N)
    "$TBCM" rollout "${BANK[@]}" --out "$OUT/bank"
    bank_s=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
    echo "$bank_s" > "$OUT/bank_s.txt"
    "$TBCM" distill --recipe "$RECIPE" "${SCHEDULE[@]}" --rollouts "$OUT/bank" \
        --time-budget-s "$(python3 -c "print(round($BUDGET - $bank_s, 1))")" --out "$OUT/tbcm" --export "$OUT/tbcm/export"
}

# data-sCM on the shipped recipe's schedule and weighting (its manifest lists these as recipe_changes), on real
# renders, 4 noised images per prompt (TBCM's 2 trajectory + 2 re-noised pairs)
data_side() {
    "$TBCM" distill --recipe "$DATA_RECIPE" "${SCHEDULE[@]}" --no-learn-logvar --prior-weight uniform --cosine-decay \
        --p-mean -0.8 --tangent-warmup 100 --points-per-trajectory 4 --time-budget-s "$BUDGET" \
        --out "$OUT/data" --export "$OUT/data/export"
}

export OMP_NUM_THREADS=1
tbcm_side > "$OUT/tbcm.log" 2>&1 &
tbcm_pid=$!
data_side > "$OUT/data.log" 2>&1 &
data_pid=$!
wait "$tbcm_pid" || { echo "TBCM side failed: $OUT/tbcm.log"; exit 1; }
wait "$data_pid" || { echo "data-sCM side failed: $OUT/data.log"; exit 1; }
echo "bank: $(cat "$OUT/bank_s.txt") s of TBCM's $BUDGET s"

export OMP_NUM_THREADS=2
for run in tbcm data; do
    .venv/bin/python -m benchmarks.bench_quality --n 512 --json "$OUT/quality-$run.json" --model "$OUT/$run/export:1,2,4"
done
.venv/bin/python -m benchmarks.plot_fd_curves "$OUT/tbcm" "$OUT/data" --offset "$OUT/tbcm=$(cat "$OUT/bank_s.txt")" \
    --out "$OUT/fd_vs_time.png"
