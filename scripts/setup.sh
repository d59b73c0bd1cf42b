#!/usr/bin/env bash
# Create (or reuse) .venv and install actr_core with its test extras. CPU-only machines work as is.
# A broken connection to the package index (a truncated download) is retried up to three times;
# pip keeps what it already installed, so a retry only fetches what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip_install() {
    local attempt
    for attempt in 1 2 3; do
        python -m pip install -q --retries 10 --timeout 60 "$@" && return 0
        echo "setup.sh: pip install $* failed (attempt $attempt of 3); retrying" >&2
        sleep $((attempt * 10))
    done
    echo "setup.sh: pip install $* failed three times; see the error above" >&2
    return 1
}
pip_install --upgrade pip
pip_install -e '.[all,test,lint]'
