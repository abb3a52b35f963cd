#!/usr/bin/env bash
# Install, then the main job: a short BCS + TRADES training on real Fashion-MNIST at 99% sparsity
# (connectivity 0.01, eps 0.1, 2 epochs, about 5 minutes on 2 CPU cores) with a clean / PGD-20 test
# evaluation at the end. Extra arguments are passed to `python -m training.run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONWARNINGS=ignore
exec env PYTHONPATH=. .venv/bin/python -m training.run --objective trades --method bcs --connectivity 0.01 \
  --dataset fashion_mnist --epochs 2 --out "runs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
