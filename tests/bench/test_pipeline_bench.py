"""pipelines/bench.py: planning, result tables and one end-to-end run on a tiny model."""

import math

import pytest

from actr_core.bench import CaseResult, CaseSpec
from pipelines.bench import BenchConfig, comparisons, format_table, main, parse_args, plan_cases, to_dataset


def test_plan_groups_model_families_and_sizes():
    groups = plan_cases(BenchConfig(models=("actr_base", "mmnet", "actr_released"), sizes=("256", "512")))
    labels = [[s.label for s in g] for g in groups]
    assert labels == [
        ["actr_base@256", "actr_base@512"],
        ["mmnet@256", "mmnet@512", "mmnet@224x320"],
        ["actr_released@256"],  # as released takes 256 only
    ]
    base_512 = groups[0][1]
    assert base_512.factory == "actr_core.models:actr_base_512" and (base_512.height, base_512.width) == (512, 512)
    assert all(s.threads == 2 and s.batch == 1 and s.train_batch == 2 for g in groups for s in g)
    assert all(s.memory_limit_mb is None or s.memory_limit_mb > 0 for g in groups for s in g)
    capped = plan_cases(BenchConfig(models=("actr_small",), sizes=("256",), memory_limit_gb=2, train_sizes=("512",)))
    assert capped[0][0].memory_limit_mb == 2048 and not capped[0][0].train


def test_plan_variants_and_the_released_pair(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "ACTR.py").write_text("")
    groups = plan_cases(
        BenchConfig(models=("actr_small",), sizes=("256",), variants=("fp32", "bf16"), actr_repo=str(tmp_path))
    )
    assert [s.label for s in groups[0]] == ["actr_small@256", "actr_small@256[bf16]"]
    assert groups[0][1].autocast == "bfloat16" and groups[0][0].autocast is None
    pair = groups[1]
    assert [s.label for s in pair] == ["released_code@256", "actr_released@256", "actr_released@256[bf16]"]
    assert pair[0].kwargs == {"repo": str(tmp_path)}


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
    model, _, size = label.partition("@")
    side = int(size.split("[")[0])
    r = CaseResult(
        CaseSpec(label, "x:y", side, side, autocast="bfloat16" if "[bf16]" in label else None),
        {"params": 1e8, "trainable_params": 5e7, "rss_baseline_mb": 900.0, "rss_model_mb": 1500.0, "torch": "t"},
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
    ds = to_dataset(results, BenchConfig(repeats=3, train_repeats=3), {})
    assert ds.sizes == {"case": 5, "repeat": 3, "train_repeat": 3}
    assert float(ds.sel(case="actr_base@512").fraction_of_fp32_matmul) == pytest.approx(100 / 4 / 100)
    assert float(ds.sel(case="actr_base@256[bf16]").fraction_of_bf16_matmul) == pytest.approx(100 / 2 / 50)
    assert math.isnan(float(ds.sel(case="actr_base@256").train_step_median_s))
    table = format_table(ds)
    assert "| actr_base@512 | 100.0 | 100.0 | 4.000 |" in table
    assert "100% of bf16" in table and "25% of fp32" in table


def test_end_to_end_on_a_tiny_model(tmp_path, capsys):
    cfg = BenchConfig(
        models=("actr_tiny",),
        sizes=("32x48",),
        threads=1,
        warmup=0,
        repeats=1,
        train_warmup=0,
        train_repeats=1,
        matmul_dtypes=("float32",),
        out=str(tmp_path),
    )
    ds = main(cfg)
    assert list(ds.case.values) == ["actr_tiny@32x48"]
    row = ds.sel(case="actr_tiny@32x48")
    assert float(row.gflop_per_pair) > 0 and float(row.forward_median_s) > 0 and float(row.train_step_median_s) > 0
    assert float(row.forward_peak_minus_baseline_mb) > 0
    for name in ("bench.csv", "bench.nc", "bench.md", "results.json"):
        assert (tmp_path / name).is_file()
    assert "actr_tiny@32x48" in capsys.readouterr().out
