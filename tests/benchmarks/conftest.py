"""The benchmark scripts import each other by name (``from harness import ...``), as they do when run
as ``python benchmarks/<name>.py``: their folder goes on the path, which worker processes inherit."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
