"""Benchmark helpers: FLOP counting with fused attention, the machine's matmul rate, memory peaks,
and a runner that measures each model in its own process, interleaved with the others.

- :mod:`~actr_core.bench.flops`: :func:`count_flops`, :func:`register_sdpa_flop_formulas`.
- :mod:`~actr_core.bench.rates`: :func:`matmul_rate` (dense GFLOP/s, fp32 or bf16).
- :mod:`~actr_core.bench.memory`: resident set, its peak and a reset of the peak.
- :mod:`~actr_core.bench.runner`: :class:`CaseSpec`, :class:`BenchWorker`, :func:`measure_interleaved`.

``pipelines/bench.py`` (``actr bench``) puts them together; docs/benchmarks.md has the figures.
"""

from actr_core.bench.flops import count_flops, register_flop_formulas, register_sdpa_flop_formulas
from actr_core.bench.memory import peak_rss_mb, release_free_memory, reset_peak_rss, rss_mb
from actr_core.bench.rates import matmul_rate
from actr_core.bench.runner import BenchWorker, CaseResult, CaseSpec, MeasureSettings, WorkerError, measure_interleaved

__all__ = [
    "BenchWorker",
    "CaseResult",
    "CaseSpec",
    "MeasureSettings",
    "WorkerError",
    "count_flops",
    "matmul_rate",
    "measure_interleaved",
    "peak_rss_mb",
    "register_flop_formulas",
    "register_sdpa_flop_formulas",
    "release_free_memory",
    "reset_peak_rss",
    "rss_mb",
]
