#!/usr/bin/env bash
# Install, then run the test suite (≈ 25 min on 2 idle CPU cores; BUILD.md → Tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests "$@"
