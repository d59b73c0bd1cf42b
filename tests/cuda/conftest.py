"""The CUDA tests run the checks of ``benchmarks/cuda_checks.py`` (shared with ``benchmarks/gpu_check.py``),
imported by name as the benchmark scripts import each other: their folder goes on the path."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
