"""Every example runs (CPU-only, each under a minute on an idle 2-core machine)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("[0-9][0-9]_*.py"))


def test_examples_are_numbered_and_present():
    assert len(EXAMPLES) >= 4
    assert [p.name[:2] for p in EXAMPLES] == [f"{i:02d}" for i in range(1, len(EXAMPLES) + 1)]


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.pop("PYTEST_CURRENT_TEST", None)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "an example should say what it did"
