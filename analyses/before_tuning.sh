#!/usr/bin/env bash
# The before-tuning path on the embedded model and Nahuatl (issue 5), timed stage by stage:
# a short full fine-tuning probe run, its revert sweeps, the four selection rules, then
# (analyses/before_tuning_compare.py) tuning each derived set and scoring it against full FT.
#   bash analyses/before_tuning.sh [RUN_DIR]      (default runs/before-tuning; ~50 min on 2 CPU cores)
# Every stage is idempotent: a rerun skips finished training and swept checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${COGPROBE:-.venv/bin/cogprobe}
R=${1:-runs/before-tuning}/probe
EVAL=(--pairs 64 --max-sentence-tokens 32)   # dev pairs (the verbs' default split): decisions on dev
stage() { local name=$1; shift; local t0; t0=$(date +%s); "$@"; echo "TIME $name $(( $(date +%s) - t0 )) s"; }
stage train  $B train --model smollm2-135m --corpus axolotl --out "$R" --strategy full --steps 30 --batch-size 4 \
    --seq-len 128 --lr 3e-4 --save-steps 0,10,20,30 --threads 2 --no-progress
stage sweep  $B sweep "$R" "${EVAL[@]}" --mode revert
stage fixed  $B select "$R" --rule fixed --name selection-fixed.json
stage curves $B select "$R" --rule curves --tau 0.8 --name selection-curves.json
stage keep   $B select "$R" --rule curves --criterion keep --tau 0.8 --name selection-curves-keep.json
stage budget $B select "$R" --rule budget --tau 0.8 "${EVAL[@]}" --name selection-budget.json
