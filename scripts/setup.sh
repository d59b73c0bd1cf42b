#!/usr/bin/env bash
# Create (or reuse) .venv and install actr_core with its test extras. CPU-only machines work as is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[all,test,lint]'
