#!/usr/bin/env bash
# Installs everything bcs-tf needs on Debian with Python 3.11: the Fashion-MNIST package (when missing)
# and a virtual environment .venv with requirements.txt. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing Debian package dataset-fashion-mnist"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "warning: could not install dataset-fashion-mnist; training will look in ~/.keras/datasets or TFDS" >&2
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 \
  | grep -v "^WARNING: Location" || true
# the project itself, editable, its extras held to the pinned set (console scripts bcs-train, bcs-evaluate, …)
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -c requirements.txt \
  -e '.[eval,export,micro,ray,dev]' 2>&1 | grep -v "^WARNING: Location" || true
TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=. .venv/bin/python -c "import tensorflow, keras, bcs_tf" 2>/dev/null || { echo "error: installation incomplete" >&2; exit 1; }
