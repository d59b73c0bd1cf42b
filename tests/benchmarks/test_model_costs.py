"""benchmarks/model_costs.py: planning, ratios and tables, a failed training step, and a dry run on
tiny models in worker processes."""

import json
import math

import model_costs
import pytest
from harness import WorkerError
from model_costs import BenchConfig, CaseResult, CaseSpec, comparisons, format_table, main, parse_args, plan_cases, summary

from actr_core.models import actr_base_512, actr_tiny


def test_plan_groups_model_families_and_sizes():
    groups = plan_cases(BenchConfig(models=("actr_base", "mmnet", "actr_released"), sizes=("256", "512")))
    labels = [[s.label for s in g] for g in groups]
    assert labels == [
        ["actr_base@256", "actr_base@512"],
        ["mmnet@256", "mmnet@512", "mmnet@224x320"],
        ["actr_released@256"],  # as released takes 256 only
    ]
    base_512 = groups[0][1]
    assert base_512.factory is actr_base_512 and (base_512.height, base_512.width) == (512, 512)
    assert all(s.threads == 2 and s.batch == 1 and s.train_batch == 2 for g in groups for s in g)
    assert all(s.memory_limit_mb is None or s.memory_limit_mb > 0 for g in groups for s in g)
    capped = plan_cases(BenchConfig(models=("actr_small",), sizes=("256",), memory_limit_gb=2, train_sizes=("512",)))
    assert capped[0][0].memory_limit_mb == 2048 and not capped[0][0].train


def test_plan_variants_and_the_released_pair(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "ACTR.py").write_text("")
    groups = plan_cases(BenchConfig(models=("actr_small",), sizes=("256",), variants=("fp32", "bf16"), actr_repo=str(tmp_path)))
    assert [s.label for s in groups[0]] == ["actr_small@256", "actr_small@256[bf16]"]
    assert groups[0][1].autocast == "bfloat16" and groups[0][0].autocast is None
    pair = groups[1]
    assert [s.label for s in pair] == ["released_code@256", "actr_released@256", "actr_released@256[bf16]"]
    assert pair[0].kwargs == {"repo": str(tmp_path)} and pair[0].factory is model_costs.released_code_model


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (BenchConfig(models=("nope",)), "unknown models"),
        (BenchConfig(variants=("fp8",)), "unknown variants"),
        (BenchConfig(models=("released_code",)), "needs --actr-repo"),
        (BenchConfig(actr_repo="/nonexistent"), "not a checkout"),
        (BenchConfig(models=("actr_released",), sizes=("512",)), "nothing to measure"),
        (BenchConfig(models=("mmnet",), sizes=("2x2x2",)), "expected S or HxW"),
    ],
)
def test_plan_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        plan_cases(cfg)


def test_parse_args_quick_run():
    cfg = parse_args(["--models", "actr_base", "--sizes", "256", "--repeats", "5", "--no-train", "--threads", "1"])
    assert cfg.models == ("actr_base",) and cfg.sizes == ("256",) and cfg.repeats == 5
    assert not cfg.train and cfg.threads == 1
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])


def _fake(label: str, forward: list[float], train: list[float], peak: float) -> CaseResult:
    side = int(label.partition("@")[2].split("[")[0])
    r = CaseResult(
        CaseSpec(label, actr_tiny, side, side, autocast="bfloat16" if "[bf16]" in label else None),
        {"params": 1e8, "trainable_params": 5e7, "rss_baseline_mb": 900.0, "rss_model_mb": 1500.0},
    )
    r.forward_s, r.forward_cpu_s, r.train_s, r.train_cpu_s = forward, forward, train, train
    r.matmul_gflops = {"float32": [100.0] * len(forward), "bfloat16": [50.0] * len(forward)}
    r.flops, r.forward_peak_mb, r.train_peak_mb = int(100e9), peak, 3000.0
    return r


def test_comparisons_are_medians_of_per_round_ratios():
    results = [
        _fake("released_code@256", [2.0, 4.0, 2.0], [10.0, 10.0, 10.0], 1900.0),
        _fake("actr_released@256", [1.0, 2.0, 1.4], [5.0, 6.0, 7.0], 1500.0),
        _fake("actr_base@256", [1.0, 1.0, 1.0], [], 1500.0),
        _fake("actr_base@512", [4.0, 5.0, 3.0], [], 1600.0),
        _fake("actr_base@256[bf16]", [2.0, 2.0, 2.0], [], 1500.0),
    ]
    ratios = comparisons(results, {"max_flow_difference": 1e-5})
    assert ratios["actr_released/released_code forward"] == pytest.approx(0.5)  # rounds: 0.5, 0.5, 0.7
    assert ratios["actr_released/released_code train step"] == pytest.approx(0.6)
    assert ratios["actr_released/released_code forward peak - baseline"] == pytest.approx(600 / 1000)
    assert ratios["actr_base 512/256 forward"] == pytest.approx(4.0)
    assert ratios["actr_base@256 [bf16]/fp32 forward"] == pytest.approx(2.0)
    assert ratios["max |flow(actr_released) - flow(released_code)|"] == 1e-5
    rows = {r.spec.label: summary(r) for r in results}
    assert rows["actr_base@512"]["fraction_of_matmul"] == pytest.approx(100 / 4 / 100)
    assert rows["actr_base@256[bf16]"]["fraction_of_matmul"] == pytest.approx(100 / 2 / 50)
    assert math.isnan(rows["actr_base@256"]["train_step_median_s"])
    table = format_table(list(rows.values()))
    assert "| actr_base@512 | 100.0 | 100.0 | 4.000 |" in table
    assert "100% of bf16" in table and "25% of fp32" in table
    assert "fp32: 100.0 GFLOP/s, bf16: 50.0 GFLOP/s" in table


class _FakeWorker:
    """Canned replies; training fails for the case labelled ``fail`` (as a memory cap would make it)."""

    def __init__(self, served, memory_limit_mb=None):
        self.calls: list[str] = []
        self.fail_training = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def call(self, name, **kwargs):
        self.calls.append(name)
        if name == "setup":
            self.fail_training = kwargs["spec"].label.startswith("fail")
            return {"params": 1, "trainable_params": 1, "rss_baseline_mb": 1.0, "rss_model_mb": 2.0}
        if name == "train_step" and self.fail_training:
            raise WorkerError("'train_step' failed in the worker:\nRuntimeError: can't allocate memory")
        return {
            "forward": (0.5, 1.0),
            "train_step": (0.5, 1.0),
            "matmul": 100.0,
            "peak": 1000.0,
            "flops": (10**9, {"mm": 10**9}),
        }.get(name)


def test_a_failed_training_step_is_recorded_and_the_others_go_on(monkeypatch):
    workers = []
    monkeypatch.setattr(model_costs, "Worker", lambda *a, **k: workers.append(_FakeWorker(*a, **k)) or workers[-1])
    specs = [
        CaseSpec("fail@32", actr_tiny, 32, 32),
        CaseSpec("fine@32", actr_tiny, 32, 32),
        CaseSpec("off@32", actr_tiny, 32, 32, train=False),
    ]
    cfg = BenchConfig(repeats=2, train_repeats=3, matmul_dtypes=("float32",))
    (failed, fine, untrained), _ = model_costs.measure_group(specs, cfg, log=lambda m: None)
    assert failed.train_error.endswith("can't allocate memory") and failed.train_s == [] and failed.train_peak_mb is None
    assert workers[0].calls.count("train_step") == 1  # given up after the failure
    assert fine.train_error is None and fine.train_s == [0.5] * 3 and fine.train_peak_mb == 1000.0
    assert "train_setup" not in workers[2].calls and untrained.train_s == []
    assert all(r.forward_s == [0.5, 0.5] and r.flops == 10**9 and r.forward_peak_mb == 1000.0 for r in (failed, fine, untrained))
    assert summary(failed)["train_note"] == "out of memory"


def test_dry_run_on_tiny_models(tmp_path, capsys):
    """Every figure of a real run, from tiny models in their own worker processes (one repeat)."""
    cfg = parse_args(
        [
            "--models",
            "actr_tiny",
            "mmnet_tiny",
            "--sizes",
            "64x96",
            "--threads",
            "1",
            "--repeats",
            "1",
            "--train-repeats",
            "1",
            "--matmul-dtypes",
            "float32",
            "--out",
            str(tmp_path),
        ]
    )
    rows = {row["case"]: row for row in main(cfg)}
    assert set(rows) == {"actr_tiny@64x96", "mmnet_tiny@64x96"}
    for row in rows.values():
        assert row["params"] > 0 and row["gflop_per_pair"] > 0
        assert row["forward_median_s"] > 0 and row["forward_cpu_median_s"] > 0 and row["train_step_median_s"] > 0
        assert row["forward_peak_mb"] >= row["rss_baseline_mb"] > 0 and row["train_peak_mb"] > 0
        assert row["matmul_fp32_gflops"] > 0 and 0 < row["fraction_of_matmul"] < math.inf
    raw = json.loads((tmp_path / "results.json").read_text())
    assert [r["spec"]["factory"] for r in raw["results"]] == ["actr_tiny", "mmnet_tiny"]
    assert (tmp_path / "bench.csv").read_text().count("\n") == 3 and (tmp_path / "bench.md").is_file()
    assert "actr_tiny@64x96" in capsys.readouterr().out
