"""benchmarks/gpu_check.py: the CPU dry run (every code path on tiny models), the targets table, the
user errors, and the shared checks catching what they should catch."""

import csv
import json

import cuda_checks
import gpu_check
import pytest
import torch
from gpu_check import Args, main, make_plan, parse_args, targets


@pytest.mark.slow
def test_dry_run_runs_every_code_path_on_cpu(tmp_path, capsys):
    assert main(Args(dry_run=True, out=str(tmp_path))) == 0
    printed = capsys.readouterr().out
    refusal = gpu_check.cpu_bf16_refusal()  # e.g. PyTorch's AMX kernels under ATEN_CPU_CAPABILITY=default
    checks = list(csv.DictReader((tmp_path / "checks.csv").open()))
    kinds = {row["check"].split("[")[0] for row in checks}
    assert kinds == {
        "forward_equality",
        "autocast_bf16",
        "autocast_fp16",
        "fused_attention_fp32",
        "fused_attention_bf16",
        "channels_last",
        "grad_checkpointing",
        "compile",
    }
    expected = {row["check"]: "skip" if refusal and "bf16" in row["check"] else "pass" for row in checks}
    assert {row["check"]: row["status"] for row in checks} == expected, checks
    bench = {row["case"]: row for row in csv.DictReader((tmp_path / "bench.csv").open())}
    cases = {
        "actr_tiny@64",
        "actr_tiny@64[bf16]",
        "mmnet_tiny@64",
        "mmnet_tiny@64[bf16]",
        "actr_tiny@64[frozen]",
        "actr_tiny@64[bf16+frozen]",
        "actr_tiny@96/b1",
        "actr_tiny@96[bf16+ckpt]/b1",
    }
    assert set(bench) == {c for c in cases if not (refusal and "bf16" in c)}
    assert all(float(row["forward_median_s"]) > 0 and float(row["train_step_median_s"]) > 0 for row in bench.values())
    frozen, trained = bench["actr_tiny@64[frozen]"], bench["actr_tiny@64"]
    assert int(frozen["trainable_params"]) < int(trained["trainable_params"]) == int(trained["params"])
    rows = list(csv.DictReader((tmp_path / "targets.csv").open()))
    h_peaks = [r for r in rows if r["target"].startswith("ACTR_h")]
    measured = ["yes", "not measured", "not measured", "not measured" if refusal else "yes"]
    assert [r["met"] for r in h_peaks] == measured  # the dry run: fp32 and bf16+ckpt
    assert all(r["met"] == "not measured" for r in rows if r["vs"].startswith("released_code"))  # no checkout given
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["device"] == "cpu" and env["bench_errors"] == []
    assert "## Targets" in printed
    skipped = sum(status == "skip" for status in expected.values())
    assert (f"all {13 - skipped} checks passed, {skipped} skipped ({refusal})" if refusal else "all 13 checks passed") in printed


def test_a_cpu_that_refuses_bf16_skips_those_checks_and_cases(monkeypatch):
    monkeypatch.setattr(gpu_check, "cpu_bf16_refusal", lambda: "pack_vnni2 is only supported when avx512 is supported")
    plan = make_plan("cpu", True, None, 1, "out")
    assert plan.bf16_refusal and all("bf16" not in v for cfg in plan.bench.values() for v in cfg.variants)
    assert plan.bench["models"].variants == ("fp32",) and plan.bench["actr_h"].variants == ("fp32",)

    def broken():
        raise RuntimeError("a real bf16 bug")

    monkeypatch.setattr(cuda_checks, "all_checks", lambda *a, **k: [("autocast_bf16[m]", broken), ("forward_equality[m]", dict)])
    rows = gpu_check.run_checks_direct(plan, log=lambda m: None)
    assert [(r["check"], r["status"]) for r in rows] == [("autocast_bf16[m]", "skip"), ("forward_equality[m]", "pass")]
    assert "bf16 refused by this CPU: pack_vnni2" in rows[0]["detail"]
    monkeypatch.setattr(gpu_check, "cpu_bf16_refusal", lambda: None)
    assert gpu_check.run_checks_direct(make_plan("cpu", True, None, 1, "out"), log=lambda m: None)[0]["status"] == "FAIL"


def test_plan_on_a_gpu_measures_the_targets_cases():
    plan = make_plan("cuda", False, None, 5, "out")
    labels = {name: [s.label for group in gpu_check.plan_cases(cfg) for s in group] for name, cfg in plan.bench.items()}
    assert {"actr_base@256", "actr_base@512[bf16]", "actr_small@256", "baseline@512", "mmnet@224x320[bf16]"} <= set(
        labels["models"]
    )
    assert labels["frozen"] == ["actr_base@256[frozen]", "actr_base@256[bf16+frozen]"]
    assert plan.bench["actr_h"].train_batch == 6 and plan.bench["models"].train_batch == 8
    assert labels["actr_h"] == ["actr_base@512", "actr_base@512[bf16]", "actr_base@512[ckpt]", "actr_base@512[bf16+ckpt]"]
    assert all(s.memory_limit_mb is None for cfg in plan.bench.values() for g in gpu_check.plan_cases(cfg) for s in g)
    assert plan.check_models is None and plan.compile_backend == "inductor"


def _row(case, forward, train, batch, train_peak, forward_peak=1000.0):
    return dict(
        case=case,
        forward_median_s=forward,
        train_step_median_s=train,
        train_batch=batch,
        train_peak_mb=train_peak,
        forward_peak_mb=forward_peak,
    )


def test_targets_are_ratios_to_the_released_code():
    rows = [
        _row("released_code@256", 0.10, 1.0, 8, 10_000.0, 2000.0),
        _row("actr_base@256[frozen]", 0.04, 0.4, 8, 5000.0),
        _row("actr_base@256", 0.04, 0.6, 8, 7000.0),
        _row("actr_base@512/b6", 0.2, 2.0, 6, 30 * 1024.0),
        _row("actr_base@512[ckpt]/b6", 0.2, 3.0, 6, 12 * 1024.0),
    ]
    out = {(r["target"], r["ours"]): r for r in targets(rows, "actr_base", ("256", "512"), 6)}
    throughput = out[("training throughput", "actr_base@256[frozen]")]
    assert throughput["value"] == pytest.approx(2.5) and throughput["met"] == "yes"
    assert out[("training throughput", "actr_base@256")]["met"] == "no"  # 1.67×
    assert out[("train peak memory", "actr_base@256[frozen]")]["value"] == pytest.approx(0.5)
    latency = out[("forward latency", "actr_base@256")]
    assert latency["value"] == pytest.approx(0.4) and latency["met"] == "yes"
    assert out[("forward latency", "actr_base@256[bf16]")]["met"] == "not measured"
    assert out[("ACTR_h train peak (GiB)", "actr_base@512/b6")]["met"] == "no"
    assert out[("ACTR_h train peak (GiB)", "actr_base@512[ckpt]/b6")]["value"] == pytest.approx(12.0)
    assert "| training throughput | actr_base@256[frozen] |" in gpu_check.targets_table(list(out.values()))


def test_user_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(Args(out=str(tmp_path))) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert main(Args(dry_run=True, actr_repo=str(tmp_path), out=str(tmp_path))) == 2
    assert "not a checkout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])
    assert parse_args(["--dry-run", "--no-bench", "--checks", "direct"]) == Args(dry_run=True, checks="direct", bench=False)


def test_checks_run_through_pytest_when_it_is_there(tmp_path):
    command = gpu_check.pytest_command(tmp_path)
    assert command[1:3] == ["-m", "pytest"] and "tests/cuda" in command and command[6:8] == ["-m", "cuda"]
    assert gpu_check.pytest_available()  # this environment has the test requirements


def test_a_failing_check_is_a_row_and_exit_status_1(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("max |difference| 1 > tolerance 0.001")

    monkeypatch.setattr(
        cuda_checks, "all_checks", lambda *a, **k: [("forward_equality[x]", broken), ("ok[y]", lambda: {"v": 1.0})]
    )
    assert main(Args(dry_run=True, bench=False, checks="direct", out=str(tmp_path))) == 1
    rows = list(csv.DictReader((tmp_path / "checks.csv").open()))
    assert [(r["check"], r["status"]) for r in rows] == [("forward_equality[x]", "FAIL"), ("ok[y]", "pass")]
    assert "tolerance 0.001" in rows[0]["detail"]


def test_forward_equality_catches_a_device_that_computes_differently(monkeypatch):
    real = cuda_checks._flow
    calls = []

    def skewed(model, src, trg):  # the third call is the "device" run
        calls.append(1)
        out = real(model, src, trg)
        return out + 1e-2 if len(calls) == 3 else out

    monkeypatch.setattr(cuda_checks, "_flow", skewed)
    with pytest.raises(AssertionError, match="max \\|flow − float64\\|"):
        cuda_checks.check_forward_equality("mmnet_tiny", "cpu")


def test_fused_attention_check_refuses_the_math_path():
    from torch.nn.attention import SDPBackend

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError), torch.nn.attention.sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # CPU has no memory-efficient kernel: no fallback
