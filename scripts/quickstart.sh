#!/usr/bin/env bash
# README set-up command 1: create the environment and run the main job on the embedded default data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
python -m pipelines.quickstart "$@"
