#!/usr/bin/env bash
# Issue-3 result: TRADES (eps 0.1, beta 6) on Fashion-MNIST at 99% sparsity (c = 0.01), 20 epochs, for
# bcs, random (static mask) and dense. Resumable: rerun the same command after an interruption.
# Usage: scripts/reproduce_fmnist_trades.sh [bcs random dense]   (methods run in parallel)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
methods=("${@:-bcs random dense}")
read -r -a methods <<< "${methods[*]}"
mkdir -p runs results/fmnist_trades
for m in "${methods[@]}"; do
  out=runs/fmnist_trades_${m}
  flags=(--objective trades --method "$m" --connectivity 0.01 --dataset fashion_mnist --model small_cnn
         --epochs 20 --batch-size 128 --eps 0.1 --attack-steps 10 --beta 6 --seed 0 --out "$out" --verbose 2)
  if [ -f "$out/checkpoint/state.json" ]; then flags+=(--resume); fi
  if [ -f "$out/metrics.json" ]; then echo "$m: done already"; continue; fi
  ( PYTHONPATH=. "$PY" -m training.run "${flags[@]}" > "results/fmnist_trades/${m}.log" 2>&1 \
      && cp "$out/metrics.json" "results/fmnist_trades/${m}_metrics.json" ) &
done
wait
