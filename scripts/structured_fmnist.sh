#!/usr/bin/env bash
# Issue-10 result: structured connectivity on Fashion-MNIST with the quick preset's AT settings (5 epochs,
# eps 0.1, PGD-10, 1,000 validation images, seed 0): each run trained, evaluated (clean, PGD-50, AutoAttack on
# 1,000 test images) and measured on the device against its twin (bench.device). Resumable: rerun the same
# command after an interruption; finished steps are skipped.
# Usage: scripts/structured_fmnist.sh [NAME ...]   (default: every run below, in this order)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=.
declare -A RUNS=(
  [block_c0.01]="--method bcs --granularity block --connectivity 0.01"
  [block16_c0.01]="--method bcs --granularity block --block-size 16 --connectivity 0.01"
  [channel_c0.3]="--method bcs --granularity channel --connectivity 0.3 --alpha 0 --budget global"  # made before the gates' prior and the per-layer default
  [mobilenet_c0.1]="--method bcs --model mobilenet --connectivity 0.1"
  [bcs_c0.1]="--method bcs --connectivity 0.1"
  [mobilenet_dense]="--method dense --model mobilenet --connectivity 1"
)
ORDER=(block_c0.01 channel_c0.3 mobilenet_c0.1 bcs_c0.1 mobilenet_dense block16_c0.01)
names=("${@:-${ORDER[@]}}")
read -r -a names <<< "${names[*]}"
COMMON=(--objective at --dataset fashion_mnist --epochs 5 --val-split 1000 --eps 0.1 --seed 0 --no-report
        --verbose 2)
mkdir -p runs/structured results/structured
for name in "${names[@]}"; do
  out=runs/structured/$name
  read -r -a flags <<< "${RUNS[$name]}"
  if [ ! -f "$out/metrics.json" ]; then
    resume=(); [ -f "$out/config.json" ] && resume=(--resume)
    echo "$(date +%T) train $name"
    "$PY" -m training.run "${COMMON[@]}" "${flags[@]}" --out "$out" "${resume[@]}" >> "$out.log" 2>&1 \
      || { echo "training $name failed: see $out.log"; continue; }
  fi
  echo "$(date +%T) evaluate $name"
  "$PY" -m training.evaluate "$out" --attacks clean,pgd50,autoattack --n-examples 1000 --resume --verbose 2 \
    >> "$out.log" 2>&1 || { echo "evaluating $name failed: see $out.log"; continue; }
  if [ ! -f "results/structured/${name}_device.md" ]; then
    echo "$(date +%T) device $name"
    "$PY" -m bench.device "$out" --quantize none,int8 > "results/structured/${name}_device.md" 2>> "$out.log"
  fi
  cp "$out/metrics.json" "results/structured/${name}_metrics.json"
  cp "$out/eval.json" "results/structured/${name}_eval.json"
done
