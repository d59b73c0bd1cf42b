"""Benchmark the models side by side: parameters, GFLOP per pair, forward latency, peak memory,
training-step time and achieved FLOP/s against this machine's dense matmul rate, in one run on the
same inputs, optionally beside the released ACTR code.

    actr bench                                   # every model, 256 and 512 (MMNet also 224x320)
    actr bench --models actr_base --sizes 256 --repeats 5 --no-train    # a quick run
    actr bench --models actr_released --actr-repo /tmp/actr_ref         # ours vs the released code
    actr bench --models actr_base --variants fp32 bf16 compile          # optimised paths

Every case (one model at one input size with its options) runs in its own process
(``actr_core.bench.worker``), so that its memory is its own: the resident set after the imports
(the baseline), after building, and the peak of the forward passes and of the training steps (RSS
on CPU, ``max_memory_allocated`` on GPU); "peak − baseline" is what the model itself costs. Cases
of one model family (all its sizes and variants; the released code with ACTR as released) are
measured together, one forward pass each in turn, and each timed forward pass is followed in the
same process by a timed dense fp32 (and bf16) 2048² product: achieved FLOP/s over that rate is
computed per round, and ratios between cases (ours / theirs, 512 / 256) are medians of per-round
ratios, so that a shared, loaded machine hits all of them alike. FLOPs are counted by
``torch.utils.flop_counter`` (fused attention included, see ``actr_core.bench.flops``).

With ``--actr-repo PATH`` (a checkout of github YXSUNMADMAX/ACTR; never bundled) the released code
is built with its own random initialisation, its weights go into ACTR as released
(``load_official_actr``), both run on the same inputs and the largest flow difference is reported.

Writes ``bench.csv``, ``bench.nc`` (xarray; raw per-repeat timings included) and ``bench.md``
(the table) under ``--out``, and prints the table.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actr_core.bench import BenchWorker, CaseResult, CaseSpec, MeasureSettings, measure_interleaved
from actr_core.blocks.released import released_epe_loss
from actr_core.models import load_official_actr
from actr_core.models.base import MatchOutput

if TYPE_CHECKING:  # xarray (and pandas) load only where results are written: workers import this
    import xarray as xr  # module for the released-code factory, and their baseline stays lean

__all__ = [
    "BenchConfig",
    "ReleasedCode",
    "actr_released_from_released_code",
    "cli",
    "main",
    "parse_args",
    "plan_cases",
    "released_code_model",
]

#: model name → {size: factory}; "*" serves any size; a model without the size is skipped
MODELS: dict[str, dict[str, str]] = {
    "actr_base": {"256": "actr_core.models:actr_base", "512": "actr_core.models:actr_base_512"},
    "actr_small": {"256": "actr_core.models:actr_small", "512": "actr_core.models:actr_small_512"},
    "baseline": {"256": "actr_core.models:baseline", "512": "actr_core.models:baseline_512"},
    "mmnet": {"*": "actr_core.models.mmnet:mmnet_resnet101"},
    "actr_released": {"256": "actr_core.models:actr_released"},
    "released_code": {"256": "pipelines.bench:released_code_model"},
    # tiny models for smoke runs of the harness (any size; not among the defaults)
    "actr_tiny": {"*": "actr_core.models:actr_tiny"},
    "mmnet_tiny": {"*": "actr_core.models.mmnet:mmnet_tiny"},
}
DEFAULT_MODELS = ("actr_base", "actr_small", "baseline", "mmnet", "actr_released")
MMNET_NATIVE_SIZE = "224x320"  # MMNet's released resize (H x W), measured beside the square sizes
VARIANTS = {  # name → CaseSpec options
    "fp32": {},
    "bf16": {"autocast": "bfloat16"},
    "compile": {"compile": True},
    "bf16+compile": {"autocast": "bfloat16", "compile": True},
}
RELEASED_CODE_PREFIX = "net."  # ReleasedCode keeps the released network under this name


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to measure (the command line's options)."""

    models: tuple[str, ...] = DEFAULT_MODELS
    sizes: tuple[str, ...] = ("256", "512")  # "S" (square) or "HxW"; models take the sizes they support
    variants: tuple[str, ...] = ("fp32",)  # fp32, bf16 (autocast), compile, bf16+compile (ours only)
    threads: int = 2
    batch: int = 1  # forward batch
    train_batch: int = 2
    warmup: int = 1
    repeats: int = 5
    train: bool = True
    train_warmup: int = 1
    train_repeats: int = 5
    matmul_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    device: str = "cpu"
    seed: int = 0
    actr_repo: str | None = None  # checkout of the released ACTR code: adds it beside actr_released
    train_sizes: tuple[str, ...] | None = None  # sizes whose training steps are timed (None: all)
    micro: bool = False  # instead: the micro-benchmarks behind the blocks' execution choices
    memory_limit_gb: float | None = None  # cap per worker; None: the memory available at start over
    #   (workers in the group + 1), so a group never takes all of a shared machine
    out: str = "bench_out"


# ------------------------------------------------------------------------------------------------
# the released ACTR code as a model the worker can measure


class ReleasedCode(torch.nn.Module):
    """The released ``ACTR`` network behind the worker's model interface: ``forward`` returns a
    :class:`MatchOutput`, ``loss`` is the released end-point error (what ``ACTRReleased.loss``
    computes). Its state dict is the released one under ``net.``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, src: torch.Tensor, trg: torch.Tensor) -> MatchOutput:
        return MatchOutput(flow=self.net(src, trg))

    def loss(self, output: MatchOutput, batch: dict[str, Any]) -> torch.Tensor:
        return released_epe_loss(output.flow, batch["flow"], batch["valid_flow"])


def released_code_model(repo: str) -> ReleasedCode:
    """The released ACTR from a checkout at ``repo``, with its own random initialisation."""
    from pipelines.compare_released import build_released

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty_ibot.pth"
        torch.save({}, empty)
        with contextlib.redirect_stdout(io.StringIO()):
            net = build_released(Path(repo).resolve(), empty)
    return ReleasedCode(net)


def actr_released_from_released_code(path: str) -> torch.nn.Module:
    """ACTR as released with the weights of a :class:`ReleasedCode` state dict saved at ``path``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {key.removeprefix(RELEASED_CODE_PREFIX): value for key, value in state.items()}
    return load_official_actr(state)


# ------------------------------------------------------------------------------------------------
# planning


def _available_mb() -> float:
    """MemAvailable of /proc/meminfo in MiB (0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    return 0.0


def _parse_size(size: str) -> tuple[int, int]:
    parts = size.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"size {size!r}: expected S or HxW (e.g. 256 or 224x320)") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"size {size!r}: expected S or HxW with positive sides")
    return values[0], values[1]


def _size_name(height: int, width: int) -> str:
    return str(height) if height == width else f"{height}x{width}"


def plan_cases(cfg: BenchConfig) -> list[list[CaseSpec]]:
    """The cases to measure, in groups measured together (one model family per group; the released
    code with ACTR as released)."""
    unknown = [m for m in cfg.models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}: choose from {sorted(MODELS)}")
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variants {bad}: choose from {sorted(VARIANTS)}")
    models = list(dict.fromkeys(cfg.models))
    if cfg.actr_repo is not None:
        if not (Path(cfg.actr_repo) / "models" / "ACTR.py").is_file():
            raise ValueError(f"--actr-repo {cfg.actr_repo}: not a checkout of the released ACTR code (no models/ACTR.py)")
        if "actr_released" not in models:
            models.append("actr_released")
    elif "released_code" in models:
        raise ValueError("released_code needs --actr-repo PATH (a checkout of the released ACTR code)")
    common = dict(batch=cfg.batch, train_batch=cfg.train_batch, seed=cfg.seed, threads=cfg.threads, device=cfg.device)
    train_sizes = None if cfg.train_sizes is None else {_size_name(*_parse_size(s)) for s in cfg.train_sizes}
    groups: list[list[CaseSpec]] = []
    released_group: list[CaseSpec] = []
    for model in models:
        if model == "released_code":
            continue
        table = MODELS[model]
        sizes = list(cfg.sizes) + ([MMNET_NATIVE_SIZE] if model == "mmnet" else [])
        group = []
        for size in dict.fromkeys(_size_name(*_parse_size(s)) for s in sizes):
            factory = table.get(size, table.get("*"))
            if factory is None:
                continue
            height, width = _parse_size(size)
            for variant in cfg.variants:
                label = f"{model}@{size}" + ("" if variant == "fp32" else f"[{variant}]")
                train = train_sizes is None or size in train_sizes
                group.append(CaseSpec(label, factory, height, width, train=train, **common, **VARIANTS[variant]))
        if model == "actr_released" and cfg.actr_repo is not None:
            theirs = CaseSpec(
                "released_code@256", MODELS["released_code"]["256"], 256, 256, kwargs={"repo": str(cfg.actr_repo)}, **common
            )
            released_group = [theirs, *group]
        elif group:
            groups.append(group)
    if released_group:
        groups.append(released_group)
    if not groups:
        raise ValueError(f"nothing to measure: models {models} offer none of the sizes {cfg.sizes}")
    available = _available_mb()
    capped = []
    for group in groups:  # the workers of a group live together: their caps share the memory available
        limit = float(cfg.memory_limit_gb * 1024 if cfg.memory_limit_gb is not None else available / (len(group) + 1))
        capped.append([dataclasses.replace(s, memory_limit_mb=limit if limit > 0 else None) for s in group])
    return capped


# ------------------------------------------------------------------------------------------------
# measuring


@contextlib.contextmanager
def _workers(specs: Sequence[CaseSpec], threads: int) -> Iterator[list[BenchWorker]]:
    workers: list[BenchWorker] = []
    try:
        for _ in specs:
            workers.append(BenchWorker(threads=threads))
        yield workers
    finally:
        for w in workers:
            w.close()


def _flow_difference(paths: Sequence[str]) -> float:
    import torch

    ref, out = (torch.load(p) for p in paths)
    return float((ref - out).abs().max())


def measure_group(specs: Sequence[CaseSpec], cfg: BenchConfig, log: Any = print) -> tuple[list[CaseResult], dict[str, Any]]:
    """Set up one worker per case and measure them interleaved; ACTR as released takes the released
    code's weights when the group holds both (and the largest flow difference is returned)."""
    settings = MeasureSettings(
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        train=cfg.train,
        train_warmup=cfg.train_warmup,
        train_repeats=cfg.train_repeats,
        matmul_dtypes=cfg.matmul_dtypes,
    )
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="actr_bench_") as tmp, _workers(specs, cfg.threads) as workers:
        results = []
        state_path = None
        for spec, worker in zip(specs, workers, strict=True):
            request = spec.setup_request()
            if spec.label.startswith("actr_released") and state_path is not None:
                request.update(factory="pipelines.bench:actr_released_from_released_code", kwargs={"path": state_path})
            log(f"  set up {spec.label}")
            setup = worker.call("setup", **request)
            if spec.label.startswith("released_code"):
                state_path = worker.call("save_state", path=str(Path(tmp) / "released_state.pth"))["path"]
            results.append(CaseResult(spec, setup))
        if state_path is not None:
            os.remove(state_path)
            # equality on the released code's weights, before any training step moves them
            outputs = {}
            for spec, worker in zip(specs, workers, strict=True):
                if spec.label in ("released_code@256", "actr_released@256"):
                    outputs[spec.label] = worker.call("save_output", path=str(Path(tmp) / f"{spec.label}.pt"))["path"]
            if len(outputs) == 2:
                extra["max_flow_difference"] = _flow_difference([outputs["released_code@256"], outputs["actr_released@256"]])
                log(f"  max |flow difference| to the released code: {extra['max_flow_difference']:.3g}")
        log(f"  measuring {', '.join(s.label for s in specs)}")
        measure_interleaved(workers, results, settings)
    return results, extra


# ------------------------------------------------------------------------------------------------
# results


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[i] / b[i] (rounds interleave the two)."""
    if not a or not b:
        return float("nan")
    return _median([x / y for x, y in zip(a, b, strict=False)])


def _model_name(label: str) -> str:
    return label.split("@")[0]


def _variant(spec: CaseSpec) -> str:
    for name, options in VARIANTS.items():
        if {"autocast": spec.autocast, "compile": spec.compile} == {"autocast": options.get("autocast"), "compile": options.get("compile", False)}:
            return name
    return "custom"


def to_dataset(results: Sequence[CaseResult], cfg: BenchConfig, extra: dict[str, Any]) -> "xr.Dataset":
    """Everything measured as an xarray Dataset: one row per case, raw timings per repeat."""
    import xarray as xr

    cases = [r.spec.label for r in results]

    def per_case(fn: Any) -> np.ndarray:
        return np.array([fn(r) for r in results], dtype=float)

    def per_repeat(values: Any, length: int) -> np.ndarray:
        out = np.full((len(results), length), np.nan)
        for i, r in enumerate(results):
            v = values(r)
            out[i, : len(v)] = v
        return out

    nan = float("nan")
    ds = xr.Dataset(
        {
            "params": ("case", per_case(lambda r: r.setup["params"])),
            "trainable_params": ("case", per_case(lambda r: r.setup["trainable_params"])),
            "gflop_per_pair": ("case", per_case(lambda r: r.gflop_per_pair if r.flops is not None else nan)),
            "forward_median_s": ("case", per_case(lambda r: r.forward_median_s)),
            "forward_min_s": ("case", per_case(lambda r: min(r.forward_s))),
            "forward_cpu_median_s": ("case", per_case(lambda r: _median(r.forward_cpu_s))),
            "train_step_median_s": ("case", per_case(lambda r: r.train_median_s if r.train_s else nan)),
            "rss_baseline_mb": ("case", per_case(lambda r: r.setup["rss_baseline_mb"])),
            "rss_model_mb": ("case", per_case(lambda r: r.setup["rss_model_mb"])),
            "forward_peak_mb": ("case", per_case(lambda r: r.forward_peak_mb)),
            "forward_peak_minus_baseline_mb": (
                "case",
                per_case(lambda r: r.forward_peak_mb - r.setup["rss_baseline_mb"] if r.peak_kind == "rss" else r.forward_peak_mb),
            ),
            "train_peak_mb": ("case", per_case(lambda r: r.train_peak_mb if r.train_peak_mb is not None else nan)),
            "achieved_gflops": (
                "case",
                per_case(lambda r: r.flops * r.spec.batch / 1e9 / r.forward_median_s if r.flops is not None else nan),
            ),
            "matmul_fp32_gflops": ("case", per_case(lambda r: _median(r.matmul_gflops.get("float32", [])))),
            "matmul_bf16_gflops": ("case", per_case(lambda r: _median(r.matmul_gflops.get("bfloat16", [])))),
            "fraction_of_fp32_matmul": ("case", per_case(lambda r: r.achieved_fraction("float32") or nan)),
            "fraction_of_bf16_matmul": ("case", per_case(lambda r: r.achieved_fraction("bfloat16") or nan)),
            "forward_s": (("case", "repeat"), per_repeat(lambda r: r.forward_s, cfg.repeats)),
            "forward_cpu_s": (("case", "repeat"), per_repeat(lambda r: r.forward_cpu_s, cfg.repeats)),
            "train_step_cpu_s": (("case", "train_repeat"), per_repeat(lambda r: r.train_cpu_s, cfg.train_repeats if cfg.train else 0)),
            "train_step_s": (("case", "train_repeat"), per_repeat(lambda r: r.train_s, cfg.train_repeats if cfg.train else 0)),
            "matmul_fp32_gflops_per_repeat": (
                ("case", "repeat"),
                per_repeat(lambda r: r.matmul_gflops.get("float32", []), cfg.repeats),
            ),
        },
        coords={
            "case": cases,
            "model": ("case", [_model_name(c) for c in cases]),
            "height": ("case", [r.spec.height for r in results]),
            "width": ("case", [r.spec.width for r in results]),
            "variant": ("case", [_variant(r.spec) for r in results]),
            "train_note": ("case", [_train_note(r) for r in results]),
        },
    )
    ds["forward_peak_mb"].attrs["kind"] = ",".join(sorted({r.peak_kind for r in results}))
    ds.attrs.update(
        threads=cfg.threads,
        batch=cfg.batch,
        train_batch=cfg.train_batch,
        device=cfg.device,
        torch=results[0].setup.get("torch", "") if results else "",
        cpu=_cpu_name(),
        platform=platform.platform(),
        **{k: v for k, v in extra.items() if isinstance(v, (int, float, str))},
    )
    return ds


def _train_note(result: CaseResult) -> str:
    """Why a case has no training time ("" when it has one)."""
    if result.train_error is not None:
        limit = result.spec.memory_limit_mb
        if "memory" in result.train_error.lower() or "died" in result.train_error:
            return "out of memory" + (f" (cap {limit / 1024:.0f} GiB)" if limit else "")
        return result.train_error
    if not result.train_s:
        return "not measured"
    return ""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    return platform.processor() or "unknown"


def comparisons(results: Sequence[CaseResult], extra: dict[str, Any]) -> dict[str, float]:
    """Ratios the targets are stated in: ours / released code (forward, train, memory), 512 / 256
    per model (medians of per-round ratios), and the largest flow difference to the released code."""
    by_label = {r.spec.label: r for r in results}
    out: dict[str, float] = {}
    ours, theirs = by_label.get("actr_released@256"), by_label.get("released_code@256")
    if ours is not None and theirs is not None:
        out["actr_released/released_code forward"] = _paired_ratio(ours.forward_s, theirs.forward_s)
        out["actr_released/released_code forward CPU time"] = _paired_ratio(ours.forward_cpu_s, theirs.forward_cpu_s)
        if ours.train_s and theirs.train_s:
            out["actr_released/released_code train step"] = _paired_ratio(ours.train_s, theirs.train_s)
            out["actr_released/released_code train step CPU time"] = _paired_ratio(ours.train_cpu_s, theirs.train_cpu_s)
        out["actr_released/released_code forward peak RSS"] = ours.forward_peak_mb / theirs.forward_peak_mb
        out["actr_released/released_code forward peak - baseline"] = (
            ours.forward_peak_mb - ours.setup["rss_baseline_mb"]
        ) / (theirs.forward_peak_mb - theirs.setup["rss_baseline_mb"])
        if "max_flow_difference" in extra:
            out["max |flow(actr_released) - flow(released_code)|"] = extra["max_flow_difference"]
    for label, r in by_label.items():
        model, _, rest = label.partition("@")
        size, _, variant = rest.partition("[")
        if size == "512":
            other = by_label.get(f"{model}@256" + (f"[{variant}" if variant else ""))
            if other is not None:
                name = f"{model}{'[' + variant if variant else ''} 512/256 forward"
                out[name] = _paired_ratio(r.forward_s, other.forward_s)
                out[name + " CPU time"] = _paired_ratio(r.forward_cpu_s, other.forward_cpu_s)
        if variant and size in ("256", "512"):
            plain = by_label.get(f"{model}@{size}")
            if plain is not None:
                out[f"{model}@{size} [{variant.rstrip(']')}]/fp32 forward"] = _paired_ratio(r.forward_s, plain.forward_s)
    return out


def _fraction(row: "xr.Dataset") -> str:
    """Achieved / dense matmul rate in the dtype the case computes in (bf16 under autocast)."""
    bf16 = "bf16" in str(row.variant.values)
    value = float(row["fraction_of_bf16_matmul" if bf16 else "fraction_of_fp32_matmul"])
    return "–" if np.isnan(value) else f"{value:.0%} of {'bf16' if bf16 else 'fp32'}"


def _train(row: "xr.Dataset", f: Any) -> str:
    note = str(row.train_note.values)
    return note if note and note != "not measured" else f("train_step_median_s", ".2f")


def format_table(ds: "xr.Dataset") -> str:
    """A markdown table of the per-case figures."""
    header = (
        "| case | params (M) | GFLOP/pair | forward (s, median) | forward CPU (s) | train step b=2 (s) | peak RSS (MiB) "
        "| peak − baseline (MiB) | GFLOP/s | of matmul rate |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for case in ds.case.values:
        row = ds.sel(case=case)

        def f(name: str, fmt: str) -> str:
            v = float(row[name])
            return "–" if np.isnan(v) else format(v, fmt)

        lines.append(
            f"| {case} | {float(row.params) / 1e6:.1f} | {f('gflop_per_pair', '.1f')} | {f('forward_median_s', '.3f')} "
            f"| {f('forward_cpu_median_s', '.2f')} | {_train(row, f)} | {f('forward_peak_mb', '.0f')} | {f('forward_peak_minus_baseline_mb', '.0f')} "
            f"| {f('achieved_gflops', '.1f')} | {_fraction(row)} |"
        )
    rates = ", ".join(
        f"{name}: {float(ds[var].median()):.1f} GFLOP/s"
        for name, var in (("fp32", "matmul_fp32_gflops"), ("bf16", "matmul_bf16_gflops"))
        if not np.isnan(float(ds[var].median()))
    )
    lines.append("")
    lines.append(f"dense 2048² matmul rate (median over all rounds): {rates}")
    return "\n".join(lines)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def _as_json(result: CaseResult) -> dict[str, Any]:
    out = dataclasses.asdict(result)
    out["spec"] = dataclasses.asdict(result.spec)
    return out


def micro(cfg: BenchConfig) -> str:
    """The micro-benchmarks of :mod:`actr_core.bench.micro`, one thread, in this process."""
    from actr_core.bench.micro import refiner_chunk_timings, window_attention_timings

    torch.set_num_threads(1)
    lines = [
        f"one thread, CPU seconds of the thread (best of 5); load average {_load()}",
        "",
        "| window | tokens | fused kernel (ms) | explicit softmax (ms) |",
        "|---|---|---|---|",
    ]
    for row in window_attention_timings():
        lines.append(f"| {row['window']}×{row['window']} | {row['tokens']} | {1e3 * row['fused_s']:.1f} | {1e3 * row['explicit_s']:.1f} |")
    lines += ["", "| module (6 paths, 64 × 64) | paths per call | time (ms) | peak RSS above the start (MiB) |", "|---|---|---|---|"]
    for row in refiner_chunk_timings():
        chunk = "all 6" if row["chunk"] == 0 else str(row["chunk"])
        lines.append(f"| {row['module']} | {chunk} | {1e3 * row['seconds']:.0f} | {row['peak_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "micro.md").write_text(text)
    print(text)
    return text


def main(cfg: BenchConfig) -> "xr.Dataset | str":
    """Measure every planned case, print the table and the ratios, write CSV, netCDF and markdown
    (with ``cfg.micro``: the micro-benchmarks instead)."""
    if cfg.micro:
        return micro(cfg)
    groups = plan_cases(cfg)
    load_before = _load()
    start = time.perf_counter()
    results: list[CaseResult] = []
    extra: dict[str, Any] = {}
    for group in groups:
        print(f"group: {', '.join(s.label for s in group)} (load average {_load()})", flush=True)
        got, more = measure_group(group, cfg, log=lambda m: print(m, flush=True))
        results.extend(got)
        extra.update(more)
    extra.update(load_average_start=load_before, load_average_end=_load(), wall_s=time.perf_counter() - start)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = {"config": dataclasses.asdict(cfg), "extra": extra, "results": [_as_json(r) for r in results]}
    (out / "results.json").write_text(json.dumps(raw, indent=1))  # written first: nothing measured is lost
    ds = to_dataset(results, cfg, extra)
    ratios = comparisons(results, extra)
    for name, value in ratios.items():
        ds.attrs[f"ratio: {name}"] = value
    table = format_table(ds)
    ratio_lines = [f"- {name}: {value:.3g}" for name, value in ratios.items()]
    header = (
        f"threads {cfg.threads}, device {cfg.device} ({_cpu_name()}), torch {ds.attrs['torch']}, forward batch {cfg.batch}, "
        f"train batch {cfg.train_batch}, {cfg.repeats} timed repeats after {cfg.warmup} warm-up; "
        f"load average {extra['load_average_start']} → {extra['load_average_end']}"
    )
    text = "\n".join([header, "", table, "", *ratio_lines]) + "\n"
    (out / "bench.md").write_text(text)
    ds.drop_dims(["repeat", "train_repeat"]).to_dataframe().to_csv(out / "bench.csv")
    ds.to_netcdf(out / "bench.nc", engine="h5netcdf")
    print(text)
    print(f"wrote {out / 'bench.csv'}, {out / 'bench.nc'}, {out / 'bench.md'}")
    return ds


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    """Command-line arguments → :class:`BenchConfig`."""
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="actr bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(d.models), help=f"of {sorted(MODELS)} (default: %(default)s)")
    p.add_argument("--sizes", nargs="+", default=list(d.sizes), help="S or HxW (default: %(default)s; MMNet adds 224x320)")
    p.add_argument("--variants", nargs="+", default=list(d.variants), help=f"of {list(VARIANTS)} (default: %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--batch", type=int, default=d.batch, help="forward batch (default: %(default)s)")
    p.add_argument("--train-batch", type=int, default=d.train_batch)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed forward passes per case (default: %(default)s)")
    p.add_argument("--no-train", action="store_true", help="skip the training steps")
    p.add_argument("--train-repeats", type=int, default=d.train_repeats)
    p.add_argument("--train-sizes", nargs="+", default=None, help="time training steps at these sizes only (default: all)")
    p.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="cap per worker process (default: available memory / (workers in the group + 1)); "
        "a case beyond it is reported, not run",
    )
    p.add_argument("--matmul-dtypes", nargs="*", default=list(d.matmul_dtypes), help="yardsticks (default: %(default)s)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--actr-repo", default=None, help="checkout of the released ACTR code, measured beside actr_released")
    p.add_argument("--out", default=d.out, help="output folder (default: %(default)s)")
    p.add_argument("--micro", action="store_true", help="run the micro-benchmarks of the blocks' execution choices instead")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.train_repeats < 1 or a.warmup < 0 or a.threads < 1 or a.batch < 1 or a.train_batch < 1:
        p.error("--repeats, --train-repeats, --threads, --batch, --train-batch must be >= 1 and --warmup >= 0")
    return BenchConfig(
        models=tuple(a.models),
        sizes=tuple(a.sizes),
        variants=tuple(a.variants),
        threads=a.threads,
        batch=a.batch,
        train_batch=a.train_batch,
        warmup=a.warmup,
        repeats=a.repeats,
        train=not a.no_train,
        train_repeats=a.train_repeats,
        matmul_dtypes=tuple(a.matmul_dtypes),
        device=a.device,
        seed=a.seed,
        actr_repo=a.actr_repo,
        train_sizes=None if a.train_sizes is None else tuple(a.train_sizes),
        memory_limit_gb=a.memory_limit_gb,
        micro=a.micro,
        out=a.out,
    )


def cli(argv: Sequence[str] | None = None) -> "xr.Dataset | str":
    """``actr bench``: parse the arguments and run :func:`main`."""
    return main(parse_args(argv))


if __name__ == "__main__":
    cli(sys.argv[1:])
