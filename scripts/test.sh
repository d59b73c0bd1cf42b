#!/usr/bin/env bash
# README set-up command 2: create the environment and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
python -m pytest -q -n 2 -p no:cacheprovider "$@"
