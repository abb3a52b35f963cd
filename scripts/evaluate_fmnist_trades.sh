#!/usr/bin/env bash
# Robustness evaluation of the three Fashion-MNIST TRADES runs (scripts/reproduce_fmnist_trades.sh).
# Usage: scripts/evaluate_fmnist_trades.sh [ATTACKS] [N_EXAMPLES]   (rerun to continue an interrupted evaluation)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
attacks=${1:-clean,fgsm,pgd50,pgd100,apgd-ce,apgd-t,autoattack,bb}
n=${2:-1000}
for m in bcs random dense; do
  PYTHONPATH=. "$PY" -m training.evaluate "runs/fmnist_trades_$m" --attacks "$attacks" --n-examples "$n" \
    --resume --verbose 2 > "results/fmnist_trades/${m}_eval.log" 2>&1 || true
  cp "runs/fmnist_trades_$m/eval.json" "results/fmnist_trades/${m}_eval.json"
  cp "runs/fmnist_trades_$m/eval.md" "results/fmnist_trades/${m}_eval.md"
done
