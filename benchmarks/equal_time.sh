#!/usr/bin/env bash
# Table 2, equal wall-clock time: TBCM, the `make student` recipe (a bank of teacher rollouts, then sCM with DMD's
# term on it), against data-sCM (the same options on real renders; the bank and DMD need rollouts, so it has
# neither), each with BUDGET seconds (default 3600). The bank's wall time counts against TBCM's budget.
# The two run side by side, one thread each, so a drift in this machine's speed hits both alike. Each runs the
# shipped 1400-step schedule fitted to its budget (--fit-schedule-to-budget), so each anneals as its time ends.
# Then both students at 1, 2 and 4 steps, n = 512, and the FD-against-time figure.
# Run it as `make equal-time [BUDGET=S] [EQUAL_TIME_RUNS=DIR]`: the Makefile holds the recipe's options, once, and
# passes them here as STUDENT_BANK_OPTS (the bank), STUDENT_SCHEDULE_OPTS (both sides) and STUDENT_TBCM_OPTS.
# Usage: benchmarks/equal_time.sh [BUDGET] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET="${1:-3600}"
OUT="${2:-runs/equal-time}"
TBCM=".venv/bin/tbcm"
read -ra BANK <<< "${STUDENT_BANK_OPTS:?is unset: run this script through make equal-time}"
read -ra SCHEDULE <<< "${STUDENT_SCHEDULE_OPTS:?is unset: run this script through make equal-time}"
read -ra TBCM_OPTS <<< "${STUDENT_TBCM_OPTS:?is unset: run this script through make equal-time}"
SCHEDULE+=(--fit-schedule-to-budget --eval-every 100 --export-eval-n 0)
mkdir -p "$OUT"

tbcm_side() {
    local start bank_s
    start=$(date +%s.%N)
    "$TBCM" rollout "${BANK[@]}" --out "$OUT/bank"
    bank_s=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
    echo "$bank_s" > "$OUT/bank_s.txt"
    "$TBCM" distill "${SCHEDULE[@]}" "${TBCM_OPTS[@]}" --rollouts "$OUT/bank" \
        --time-budget-s "$(python3 -c "print(round($BUDGET - $bank_s, 1))")" --out "$OUT/tbcm" --export "$OUT/tbcm/export"
}

# data-sCM: the same schedule on real renders, 4 noised images per prompt (TBCM's 2 trajectory + 2 re-noised pairs)
data_side() {
    "$TBCM" distill "${SCHEDULE[@]}" --pairs data --points-per-trajectory 4 --time-budget-s "$BUDGET" \
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
    .venv/bin/python benchmarks/bench_quality.py --n 512 --json "$OUT/quality-$run.json" --model "$OUT/$run/export:1,2,4"
done
.venv/bin/python benchmarks/plot_fd_curves.py "$OUT/tbcm" "$OUT/data" --offset "$OUT/tbcm=$(cat "$OUT/bank_s.txt")" \
    --out "$OUT/fd_vs_time.png"
