"""The prepared GPU check: the CUDA checks of every registered model and of the fast paths, then the
GPU benchmark of ACTR-B, ACTR-S, the Baseline and MMNet beside the released ACTR code, in one command.

    python benchmarks/gpu_check.py --actr-repo /path/to/ACTR          # on a CUDA machine (~5 minutes)
    python benchmarks/gpu_check.py --dry-run                            # on CPU: tiny models, every code path

Needs the core install only (torch, timm, einops, jaxtyping, numpy; Python 3.10+, torch 2.3+).

1. Checks (``benchmarks/cuda_checks.py``, tolerances stated there): per registered model, forward
   on the device in float32 with TF32 off against CPU float64; bf16 and fp16 autocast forward and
   backward finite (fp16 through a GradScaler); attention under
   ``sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])`` (a math fallback raises) in float32
   and bf16; channels-last, gradient checkpointing and one ``torch.compile`` case against eager.
   ``--checks pytest`` runs them as the tests ``tests/cuda`` (``pytest -m cuda``) when pytest and
   the test requirements are installed (``auto`` picks pytest then), ``direct`` runs them here.
2. Benchmark (``benchmarks/model_costs.py``: each case in its own process, interleaved rounds,
   ``torch.utils.benchmark.Timer`` synchronising CUDA, peak ``max_memory_allocated``):
   ``models``: ACTR-B, ACTR-S, Baseline, MMNet and ACTR as released at 256 and 512, float32 and
   bf16 autocast, forward batch 1, training steps at batch 8, with ``--actr-repo`` the released
   code beside ACTR as released (same batch, same weights, largest flow difference reported);
   ``frozen``: ACTR-B at 256 with its backbone frozen (the released code's trainable set),
   float32 and bf16; ``actr_h``: ACTR_h (ACTR-B at 512) training at batch 6, float32 and bf16,
   with and without gradient checkpointing.
3. Targets: ACTR-B against the released code (train throughput at batch 8 ≥ 2×, forward latency
   ≤ 0.5×, peak memory ≤ 0.6×; frozen and fully trained, fp32 and bf16) and ACTR_h's training
   peak at batch 6 against 24 GiB.

Prints the tables and writes ``checks.csv``, ``bench.csv``, ``targets.csv``, ``environment.json``
(and ``gpu_check.nc`` when xarray and a netCDF engine are importable) under ``--out``, each
written to a temporary name and renamed. On a CPU that refuses bf16 attention (PyTorch under
``ATEN_CPU_CAPABILITY=default`` on an AMX machine; :func:`cpu_bf16_refusal`) the dry run skips its
bf16 checks and cases and says why. Exit status 0 when every check passed, 1 when one failed,
2 for a user error (no CUDA device without ``--dry-run``, a bad ``--actr-repo``).
"""

import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cuda_checks
import torch
from model_costs import BenchConfig, CaseResult, format_table, measure_group, plan_cases, summary

from actr_core.blocks import cpu_bf16_refusal

REPO = Path(__file__).resolve().parents[1]
GIB = 1024.0  # MiB per GiB
ACTR_H_BUDGET_GIB = 24.0  # the paper trained ACTR_h on 24 GB TITAN RTX cards
PYTEST_NEEDS = ("pytest", "hypothesis", "beartype")  # tests/conftest.py and the pytest options of pyproject.toml


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures: the check models and the benchmark configurations by name."""

    device: str
    check_models: list[str] | None  # None: every registered model
    compile_backend: str
    compile_size: tuple[int, int]
    compile_model: str  # the one torch.compile case
    bench: dict[str, BenchConfig]
    ours: str  # ACTR-B (or its dry-run stand-in) in the benchmark labels
    sizes: tuple[str, str]  # ACTR-B's frame and ACTR_h's
    h_batch: int  # ACTR_h's training batch; its cases are labelled "<case>/b<h_batch>"
    bf16_refusal: str | None = None  # why this CPU cannot run bf16 attention (its bf16 cases skipped), None: it can


def make_plan(device: str, dry_run: bool, actr_repo: str | None, repeats: int, out: str) -> Plan:
    """The full plan on a GPU; with ``dry_run`` the same code paths on tiny models and sizes."""
    if dry_run:
        common = dict(device=device, repeats=1, train_repeats=1, batch=1, train_batch=2, threads=1, matmul_dtypes=("float32",))
        models: tuple[str, ...] = ("actr_tiny", "mmnet_tiny")
        ours, small, big, h_batch = "actr_tiny", "64", "96", 1
        model_sizes, h_variants = (small,), ("fp32", "bf16+ckpt")
        checks: list[str] | None = ["actr_tiny", "mmnet_tiny"]  # a ViT and a CNN model: every kind of check
        backend, compile_size, compile_model = "eager", cuda_checks.EQUALITY_SIZE, "mmnet_tiny"  # traced in seconds
    else:
        common = dict(device=device, repeats=repeats, train_repeats=repeats, batch=1, train_batch=8, threads=4)
        models, ours, small, big, h_batch = ("actr_base", "actr_small", "baseline", "mmnet"), "actr_base", "256", "512", 6
        model_sizes, h_variants = (small, big), ("fp32", "bf16", "ckpt", "bf16+ckpt")
        checks, backend, compile_size, compile_model = None, "inductor", (256, 256), cuda_checks.COMPILE_MODEL
    bench = {
        "models": BenchConfig(models=models, sizes=model_sizes, variants=("fp32", "bf16"), actr_repo=actr_repo, **common),
        "frozen": BenchConfig(models=(ours,), sizes=(small,), variants=("frozen", "bf16+frozen"), **common),
        "actr_h": BenchConfig(models=(ours,), sizes=(big,), variants=h_variants, **{**common, "train_batch": h_batch}),
    }
    refusal = cpu_bf16_refusal() if torch.device(device).type == "cpu" else None
    bench = {
        k: dataclasses.replace(v, out=str(Path(out) / k), variants=tuple(x for x in v.variants if not (refusal and "bf16" in x)))
        for k, v in bench.items()
    }
    return Plan(device, checks, backend, compile_size, compile_model, bench, ours, (small, big), h_batch, refusal)


# ------------------------------------------------------------------------------------------------ checks


def pytest_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in PYTEST_NEEDS)


def pytest_command(out: Path) -> list[str]:
    """The command that runs the CUDA-marked tests with a JUnit report."""
    junit = out / "cuda_tests.xml"
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/cuda", f"--junitxml={junit}"]


def run_checks_direct(plan: Plan, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every check of :func:`cuda_checks.all_checks`, one row each (a failure is a row, not an exit)."""
    rows = []
    for check_id, call in cuda_checks.all_checks(
        plan.device,
        plan.check_models,
        compile_backend=plan.compile_backend,
        compile_size=plan.compile_size,
        compile_model=plan.compile_model,
    ):
        start = time.perf_counter()
        try:
            if plan.bf16_refusal and "bf16" in check_id:
                figures, status = {"reason": f"bf16 refused by this CPU: {plan.bf16_refusal}"}, "skip"
            else:
                figures, status = call(), "pass"
        except AssertionError as error:
            figures, status = {"error": str(error)}, "FAIL"
        except Exception as error:  # an error in a check is a failed check; the others still run
            figures, status = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}, "FAIL"
        seconds = time.perf_counter() - start
        detail = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
        rows.append({"check": check_id, "status": status, "seconds": round(seconds, 2), "detail": detail})
        log(f"  {status:4s} {check_id} ({seconds:.1f} s) {detail}")
    return rows


def run_checks_pytest(out: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The CUDA-marked tests through pytest; one row with its exit status and summary line."""
    command = pytest_command(out)
    log("  " + " ".join(command))
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    lines = (done.stdout + done.stderr).strip().splitlines()
    log("\n".join(lines[-15:]))
    return [
        {
            "check": "pytest -m cuda tests/cuda",
            "status": "pass" if done.returncode == 0 else "FAIL",
            "seconds": 0.0,
            "detail": lines[-1] if lines else "",
        }
    ]


def checks_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| check | status | s | figures |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['status']} | {r['seconds']} | {r['detail']} |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ benchmark


def run_bench(plan: Plan, log: Callable[[str], None] = print) -> tuple[list[CaseResult], dict[str, Any], list[str]]:
    """Every benchmark group of the plan; a group that fails is logged and left out."""
    results: list[CaseResult] = []
    extra: dict[str, Any] = {}
    errors: list[str] = []
    for name, cfg in plan.bench.items():
        for group in plan_cases(cfg):
            if name == "actr_h":  # the same models and sizes as "models" at another batch: labelled apart
                group = [dataclasses.replace(s, label=f"{s.label}/b{cfg.train_batch}") for s in group]
            log(f"  [{name}] {', '.join(s.label for s in group)}")
            try:
                got, more = measure_group(group, cfg, log=lambda m: log("  " + m))
            except Exception as error:  # e.g. the released code fails on this machine: the rest goes on
                errors.append(f"{name}: {', '.join(s.label for s in group)}: {traceback.format_exc().strip().splitlines()[-1]}")
                log(f"  failed: {error}")
                continue
            results += got
            extra.update(more)
    return results, extra, errors


def _figure(rows: dict[str, dict[str, Any]], label: str, key: str) -> float:
    row = rows.get(label)
    value = None if row is None else row.get(key)
    return float("nan") if value is None else float(value)


def targets(rows: Sequence[dict[str, Any]], ours: str, sizes: tuple[str, str], h_batch: int) -> list[dict[str, Any]]:
    """The targets against the released code and ACTR_h's memory, from the bench rows (NaN: not measured).

    ``ratio`` is ours / theirs (time or memory; throughput: theirs / ours time) and ``target`` the
    bound it must meet (``≥`` for throughput, ``≤`` otherwise)."""
    by = {r["case"]: r for r in rows}
    small, big = sizes
    theirs = f"released_code@{small}"
    out = []
    for variant, trainable in (("[frozen]", "frozen backbone"), ("", "all trained")):
        for precision, suffix in (("fp32", variant), ("bf16", f"[bf16+{variant[1:-1]}]" if variant else "[bf16]")):
            case = f"{ours}@{small}{suffix}"
            step = _figure(by, case, "train_step_median_s") / _figure(by, case, "train_batch")
            theirs_step = _figure(by, theirs, "train_step_median_s") / _figure(by, theirs, "train_batch")
            rows_ = [
                ("training throughput", theirs_step / step, "≥", 2.0),
                ("train peak memory", _figure(by, case, "train_peak_mb") / _figure(by, theirs, "train_peak_mb"), "≤", 0.6),
            ]
            if not variant:  # the forward does not depend on what is trained
                rows_ += [
                    (
                        "forward latency",
                        _figure(by, case, "forward_median_s") / _figure(by, theirs, "forward_median_s"),
                        "≤",
                        0.5,
                    ),
                    (
                        "forward peak memory",
                        _figure(by, case, "forward_peak_mb") / _figure(by, theirs, "forward_peak_mb"),
                        "≤",
                        0.6,
                    ),
                ]
            for what, ratio, sense, bound in rows_:
                out.append(
                    dict(
                        target=what,
                        ours=case,
                        vs=theirs,
                        trainable=trainable,
                        precision=precision,
                        value=ratio,
                        sense=sense,
                        bound=bound,
                    )
                )
    for suffix in ("", "[bf16]", "[ckpt]", "[bf16+ckpt]"):
        case = f"{ours}@{big}{suffix}/b{h_batch}"
        peak = _figure(by, case, "train_peak_mb") / GIB
        out.append(
            dict(
                target="ACTR_h train peak (GiB)",
                ours=case,
                vs="24 GiB",
                trainable="all trained",
                precision=suffix.strip("[]") or "fp32",
                value=peak,
                sense="≤",
                bound=ACTR_H_BUDGET_GIB,
            )
        )
    for row in out:
        value = row["value"]
        met = value >= row["bound"] if row["sense"] == "≥" else value <= row["bound"]
        row["met"] = "not measured" if value != value else ("yes" if met else "no")
    return out


def targets_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| target | ours | vs | trainable | precision | value | bound | met |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        value = "–" if r["value"] != r["value"] else f"{r['value']:.3g}"
        lines.append(
            f"| {r['target']} | {r['ours']} | {r['vs']} | {r['trainable']} | {r['precision']} | {value} | {r['sense']} {r['bound']} | {r['met']} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ output


@contextlib.contextmanager
def _atomic(path: Path, mode: str = "w"):
    """Write to a temporary file in ``path``'s folder and rename it to ``path`` on success."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, mode, newline="" if "b" not in mode else None) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with _atomic(path) as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


def write_netcdf(path: Path, bench: Sequence[dict[str, Any]], attrs: dict[str, Any]) -> bool:
    """The bench table as a netCDF file (dimension ``case``) when xarray and an engine are importable."""
    if importlib.util.find_spec("xarray") is None or not bench:
        return False
    import xarray as xr

    numeric = [k for k in bench[0] if k != "case" and all(isinstance(r.get(k), (int, float)) for r in bench)]
    data = {k: ("case", [float(r[k]) for r in bench]) for k in numeric}
    ds = xr.Dataset(data, coords={"case": [r["case"] for r in bench]}, attrs={k: str(v) for k, v in attrs.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        ds.to_netcdf(tmp)
    except (ValueError, ImportError):  # no netCDF engine installed
        tmp.unlink(missing_ok=True)
        return False
    os.replace(tmp, path)
    return True


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "platform": platform.platform(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    return env


# ------------------------------------------------------------------------------------------------ main


@dataclasses.dataclass(frozen=True)
class Args:
    device: str = "cuda"
    dry_run: bool = False
    actr_repo: str | None = None
    checks: str = "auto"  # auto | pytest | direct | none
    bench: bool = True
    repeats: int = 5
    out: str = "gpu_check_out"


def main(args: Args) -> int:
    device = "cpu" if args.dry_run else args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(f"error: no CUDA device (torch {torch.__version__}); use --dry-run to run the check on CPU", file=sys.stderr)
        return 2
    if args.actr_repo is not None and not (Path(args.actr_repo) / "models" / "ACTR.py").is_file():
        print(
            f"error: --actr-repo {args.actr_repo}: not a checkout of the released ACTR code (no models/ACTR.py)", file=sys.stderr
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(device, args.dry_run, args.actr_repo, args.repeats, args.out)
    env = environment(device)
    start = time.perf_counter()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    mode = args.checks
    if mode == "auto":
        mode = "pytest" if pytest_available() and not args.dry_run else "direct"
    check_rows: list[dict[str, Any]] = []
    if mode != "none":
        print(f"checks ({mode}):", flush=True)
        check_rows = run_checks_pytest(out) if mode == "pytest" else run_checks_direct(plan, log=lambda m: print(m, flush=True))
        write_csv(out / "checks.csv", check_rows)
    bench_rows: list[dict[str, Any]] = []
    target_rows: list[dict[str, Any]] = []
    errors: list[str] = []
    if args.bench:
        print("benchmark:", flush=True)
        results, extra, errors = run_bench(plan, log=lambda m: print(m, flush=True))
        bench_rows = [summary(r) for r in results]
        target_rows = targets(bench_rows, plan.ours, plan.sizes, plan.h_batch)
        env.update({k: v for k, v in extra.items() if isinstance(v, (int, float, str))})
        if bench_rows:
            write_csv(out / "bench.csv", bench_rows)
        write_csv(out / "targets.csv", target_rows)
    env["wall_s"] = round(time.perf_counter() - start, 1)
    env["bench_errors"] = errors
    with _atomic(out / "environment.json") as f:
        json.dump(env, f, indent=1)
    netcdf = write_netcdf(out / "gpu_check.nc", bench_rows, env)
    text = io.StringIO()
    if check_rows:
        print(f"\n## Checks ({device}, {mode})\n\n{checks_table(check_rows)}", file=text)
    if bench_rows:
        print(
            f"\n## Benchmark ({env.get('gpu', device)}, torch {torch.__version__}, TF32 matmul {env['tf32_matmul']}, cuDNN {env['tf32_cudnn']})\n",
            file=text,
        )
        print(format_table(bench_rows), file=text)
        if "max_flow_difference" in extra:
            print(f"\nmax |flow(actr_released) − flow(released_code)|: {extra['max_flow_difference']:.3g}", file=text)
        print(f"\n## Targets\n\n{targets_table(target_rows)}", file=text)
    for error in errors:
        print(f"benchmark group failed: {error}", file=text)
    print(text.getvalue())
    failed = [r["check"] for r in check_rows if r["status"] == "FAIL"]
    written = ", ".join(p.name for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith("."))
    print(f"wrote {written} under {out}{'' if netcdf else ' (no netCDF: xarray or an engine missing)'}; {env['wall_s']} s")
    skipped = sum(r["status"] == "skip" for r in check_rows)
    passed = f"all {len(check_rows) - skipped} checks passed" + (f", {skipped} skipped ({plan.bf16_refusal})" if skipped else "")
    print(f"{len(failed)} of {len(check_rows)} checks failed: {failed}" if failed else passed)
    return 1 if failed or errors else 0


def parse_args(argv: Sequence[str] | None = None) -> Args:
    d = Args()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=d.device, help="the CUDA device (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="on CPU, tiny models and sizes: every code path in about a minute")
    p.add_argument("--actr-repo", default=None, help="checkout of the released ACTR code, benchmarked beside ours")
    p.add_argument(
        "--checks",
        choices=("auto", "pytest", "direct", "none"),
        default=d.checks,
        help="how the checks run (default: %(default)s)",
    )
    p.add_argument("--no-bench", action="store_true", help="the checks only")
    p.add_argument(
        "--repeats", type=int, default=d.repeats, help="timed forward passes and training steps per case (default: %(default)s)"
    )
    p.add_argument("--out", default=d.out, help="output folder (default: %(default)s)")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    return Args(a.device, a.dry_run, a.actr_repo, a.checks, not a.no_bench, a.repeats, a.out)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
