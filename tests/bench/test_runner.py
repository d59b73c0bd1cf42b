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


def test_memory_cap_turns_an_allocation_into_an_error_reply():
    with BenchWorker(threads=1) as worker:
        with pytest.raises(WorkerError, match="allocate memory"):
            worker.call("setup", factory="actr_core.models:actr_tiny", height=32, width=32, memory_limit_mb=50)
        assert worker.call("matmul", dtype="float32", n=8)["seconds"] >= 0  # the process lives on


class _FakeWorker:
    """Canned replies; training fails for ``fail_training`` (as a memory cap would make it)."""

    def __init__(self, fail_training: bool) -> None:
        self.fail_training = fail_training
        self.calls: list[str] = []

    def call(self, op, **kwargs):
        self.calls.append(op)
        if op == "train_step" and self.fail_training:
            raise WorkerError("'train_step' failed in the worker:\nRuntimeError: can't allocate memory")
        return {
            "reset": True,
            "seconds": 0.5,
            "cpu_seconds": 1.0,
            "flops": 10**9,
            "per_op": {"mm": 10**9},
            "peak_mb": 1000.0,
            "kind": "rss",
            "loss": 1.0,
        }


def test_a_failed_training_step_is_recorded_and_the_others_go_on():
    specs = [CaseSpec("a@32", "x:y", 32, 32), CaseSpec("b@32", "x:y", 32, 32), CaseSpec("c@32", "x:y", 32, 32, train=False)]
    workers = [_FakeWorker(fail_training=True), _FakeWorker(fail_training=False), _FakeWorker(fail_training=False)]
    results = [CaseResult(s, {}) for s in specs]
    measure_interleaved(workers, results, MeasureSettings(warmup=0, repeats=2, train_warmup=1, train_repeats=3))
    failed, fine, untrained = results
    assert failed.train_error.endswith("can't allocate memory") and failed.train_s == [] and failed.train_peak_mb is None
    assert workers[0].calls.count("train_step") == 1  # given up after the failure
    assert fine.train_error is None and fine.train_s == [0.5] * 3 and fine.train_peak_mb == 1000.0
    assert "train_setup" not in workers[2].calls and untrained.train_s == []
    assert all(r.forward_s == [0.5, 0.5] and r.flops == 10**9 for r in results)
