"""The subprocess runner: a tiny model measured in its own process returns every field."""

import math

import pytest

from actr_core.bench import BenchWorker, CaseResult, CaseSpec, MeasureSettings, WorkerError, measure_interleaved
from actr_core.bench.memory import peak_rss_mb, reset_peak_rss, rss_mb
from actr_core.bench.worker import load_factory, synthetic_batch


def test_tiny_models_measured_interleaved_in_their_own_processes():
    specs = [
        CaseSpec("actr_tiny@32x48", "actr_core.models:actr_tiny", 32, 48, threads=1),
        CaseSpec("mmnet_tiny@64x96", "actr_core.models.mmnet:mmnet_tiny", 64, 96, threads=1),
    ]
    settings = MeasureSettings(warmup=1, repeats=2, train_warmup=0, train_repeats=2, matmul_dtypes=("float32",))
    with BenchWorker(threads=1) as first, BenchWorker(threads=1) as second:
        workers = [first, second]
        results = [CaseResult(s, w.call("setup", **s.setup_request())) for s, w in zip(specs, workers)]
        assert first.process.pid != second.process.pid
        measure_interleaved(workers, results, settings)
    for r in results:
        assert r.setup["params"] > 0 and r.setup["threads"] == 1
        assert r.setup["rss_model_mb"] >= r.setup["rss_baseline_mb"] > 0
        assert len(r.forward_s) == 2 and all(s > 0 for s in r.forward_s)
        assert len(r.train_s) == 2 and r.train_median_s > 0
        assert len(r.matmul_gflops["float32"]) == 2
        assert r.flops > 0 and r.gflop_per_pair == r.flops / 1e9
        assert r.forward_peak_mb >= r.setup["rss_baseline_mb"] and r.train_peak_mb > 0
        assert r.peak_kind == "rss"
        assert 0 < r.achieved_fraction("float32") < math.inf
        assert r.achieved_fraction("bfloat16") is None
    assert first.process.returncode == 0 and second.process.returncode == 0


def test_worker_reports_errors_and_survives_them():
    with BenchWorker(threads=1) as worker:
        with pytest.raises(WorkerError, match="unknown request"):
            worker.call("no_such_request")
        with pytest.raises(WorkerError, match="package.module:function"):
            worker.call("setup", factory="not-a-path", height=32, width=32)
        reply = worker.call("matmul", dtype="float32", n=64)
        assert reply["seconds"] > 0 and reply["flops"] == 2 * 64**3


def test_load_factory_and_synthetic_batch():
    assert load_factory("actr_core.models:actr_tiny").__name__ == "actr_tiny"
    batch = synthetic_batch(2, 32, 48, seed=0)
    assert batch["flow"].shape == (2, 2, 8, 12) and batch["valid_flow"].shape == (2, 8, 12)
    assert batch["src_kps"].shape == (2, 10, 2) and batch["valid_kps"].all()
    again = synthetic_batch(2, 32, 48, seed=0)
    assert all((batch[k] == again[k]).all() for k in batch)


def test_memory_peak_resets_to_the_current_resident_set():
    assert rss_mb() > 0
    if not reset_peak_rss():
        pytest.skip("this kernel does not allow resetting the peak")
    assert peak_rss_mb() <= rss_mb() + 1.0
    block = bytearray(64 * 2**20)  # touch 64 MiB
    block[:: 4096] = b"\x01" * len(block[:: 4096])
    assert peak_rss_mb() >= rss_mb() - 1.0 >= 0
    del block


def test_case_spec_rejects_bad_settings():
    with pytest.raises(ValueError, match="repeats"):
        MeasureSettings(repeats=0)
