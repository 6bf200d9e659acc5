#!/usr/bin/env bash
# Table 2, equal wall-clock time: TBCM against data-sCM, each with BUDGET seconds (default 900) and the options
# of the student shipped before the DMD term (`make student` without --dmd-*). TBCM first rolls a bank of teacher
# trajectories out (`tbcm rollout`, 8 route points: the teacher saturates at 8 steps) and trains on it; the bank's
# wall time counts against TBCM's budget.
# Run it alone on an idle machine: the budget is wall time. Usage: benchmarks/equal_time.sh [BUDGET] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET="${1:-900}"
OUT="${2:-runs/equal-time}"
TBCM=".venv/bin/tbcm"
RECIPE=(--teacher weights/teacher --prompts world --seed 0 --steps 1400 --no-learn-logvar --prior-weight uniform
        --cosine-decay --calm-down-start 800 --calm-down-steps 300 --eval-every 50 --export-eval-n 0)
mkdir -p "$OUT"

SHARDS=8
PER_SHARD=256
start=$(date +%s.%N)
"$TBCM" rollout --teacher weights/teacher --prompts world --seed 0 --route-points 8 --shards "$SHARDS" \
    --prompts-per-shard "$PER_SHARD" --batch-size 32 --out "$OUT/bank"
bank_s=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
train_budget=$(python3 -c "print(round($BUDGET - $bank_s, 1))")
echo "bank: $((SHARDS * PER_SHARD)) rollouts in $bank_s s; TBCM trains for $train_budget s" | tee "$OUT/bank-timing.txt"
"$TBCM" distill "${RECIPE[@]}" --pairs trajectory --points-per-trajectory 2 --renoised-per-trajectory 2 \
    --route-points 8 --rollouts "$OUT/bank" --time-budget-s "$train_budget" --out "$OUT/tbcm" --export "$OUT/tbcm/export"
"$TBCM" distill "${RECIPE[@]}" --pairs data --points-per-trajectory 4 --time-budget-s "$BUDGET" \
    --out "$OUT/data" --export "$OUT/data/export"

for run in tbcm data; do
    .venv/bin/python benchmarks/bench_quality.py --n 512 --json "$OUT/quality-$run.json" --model "$OUT/$run/export:1,2,4"
done
.venv/bin/python benchmarks/plot_fd_curves.py "$OUT/tbcm" "$OUT/data" --offset "$OUT/tbcm=$bank_s" --out "$OUT/fd_vs_time.png"
