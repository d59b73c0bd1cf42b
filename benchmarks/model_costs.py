"""What each model costs, side by side: parameters, GFLOP per pair, forward latency, peak memory,
training-step time and achieved FLOP/s against this machine's dense matmul rate, in one run on the
same inputs, optionally beside the released ACTR code.

    python benchmarks/model_costs.py                                     # every model, 256 and 512 (MMNet also 224x320)
    python benchmarks/model_costs.py --models actr_base --sizes 256 --repeats 5 --no-train   # a quick run
    python benchmarks/model_costs.py --models actr_released --actr-repo /tmp/actr_ref       # ours vs the released code
    python benchmarks/model_costs.py --models actr_base --variants fp32 bf16 compile        # optimised paths

Every case (one model at one input size with its options) lives in its own worker process
(``harness.Worker``), so that its memory is its own: the resident set after the imports (the
baseline), after building, and the peak of the forward pass and of the training steps (RSS on CPU,
``max_memory_allocated`` on CUDA); "peak − baseline" is what the model itself costs. The cases of
one model family (all its sizes and variants; the released code with ACTR as released) are
measured together in rounds, one timed forward pass of each case in turn (the order alternating
round by round), each followed in the same process by one timed dense 2048² product per
yardstick dtype. Achieved FLOP/s over that rate is computed per round, and ratios between cases
(ours / theirs, 512 / 256) are medians of per-round ratios, so that a shared, loaded machine hits
all of them alike. Times come from ``torch.utils.benchmark.Timer`` (two untimed warm-up calls
before each timed one; CUDA synchronised inside the timed interval), FLOPs from
``torch.utils.flop_counter`` with fused attention counted (``harness.py``).

With ``--actr-repo PATH`` (a checkout of github YXSUNMADMAX/ACTR; never bundled) the released code
is built with its own random initialisation, its weights go into ACTR as released
(``load_official_actr``), both run on the same inputs and the largest flow difference is reported.

Writes ``results.json`` (everything, per-repeat timings included), ``bench.csv`` (one row per case)
and ``bench.md`` (the table and the ratios) under ``--out``, and prints the table.
"""

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from harness import (
    Worker,
    WorkerError,
    available_mb,
    count_flops,
    matmul_operands,
    matmul_rate,
    peak_mb,
    release_free_memory,
    reset_peak,
    rss_mb,
    time_call,
)

from actr_core.batch import PairBatch
from actr_core.blocks.released import released_epe_loss
from actr_core.models import (
    MatchOutput,
    actr_base,
    actr_base_512,
    actr_released,
    actr_small,
    actr_small_512,
    actr_tiny,
    baseline,
    baseline_512,
    load_official_actr,
    mmnet_resnet101,
    mmnet_tiny,
    parameter_count,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
NUM_KEYPOINTS = 10  # keypoints per pair of the synthetic training batch
VALID_FLOW_FRACTION = 0.2  # share of flow cells with ground truth in the synthetic batch
FLOW_RANGE = 8.0  # synthetic ground-truth displacements are uniform in ±FLOW_RANGE flow-grid pixels
LEARNING_RATE = 1e-6  # AdamW step size of the timed training steps (small: the weights barely move)
FLOW_STRIDE = 4  # the models' flow grid is the input frame / 4
RELEASED_CODE_PREFIX = "net."  # ReleasedCode keeps the released network under this name
MMNET_NATIVE_SIZE = "224x320"  # MMNet's released resize (H x W), measured beside the square sizes
VARIANTS: dict[str, dict[str, Any]] = {  # name → CaseSpec options
    "fp32": {},
    "bf16": {"autocast": "bfloat16"},
    "compile": {"compile": True},
    "bf16+compile": {"autocast": "bfloat16", "compile": True},
    # ACTR builders only: the backbone frozen (as the released code trains), gradient checkpointing
    "frozen": {"kwargs": {"freeze_backbone": True}},
    "bf16+frozen": {"autocast": "bfloat16", "kwargs": {"freeze_backbone": True}},
    "ckpt": {"kwargs": {"grad_checkpointing": True}},
    "bf16+ckpt": {"autocast": "bfloat16", "kwargs": {"grad_checkpointing": True}},
}


# ------------------------------------------------------------------------------------------------
# the released ACTR code as a model the worker can measure


class ReleasedCode(torch.nn.Module):
    """The released ``ACTR`` network behind the worker's model interface: ``forward`` returns a
    :class:`MatchOutput`, ``loss`` is the released end-point error (what the as-released model's ``loss``
    computes). Its state dict is the released one under ``net.``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, src: torch.Tensor, trg: torch.Tensor) -> MatchOutput:
        return MatchOutput(flow=self.net(src, trg))

    def loss(self, output: MatchOutput, batch: PairBatch) -> torch.Tensor:
        return released_epe_loss(output.flow, batch.flow, batch.valid_flow)


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
    return load_official_actr({key.removeprefix(RELEASED_CODE_PREFIX): value for key, value in state.items()})


#: model name → {size: builder}; "*" serves any size; a model without the size is skipped
MODELS: dict[str, dict[str, Callable[..., torch.nn.Module]]] = {
    "actr_base": {"256": actr_base, "512": actr_base_512},
    "actr_small": {"256": actr_small, "512": actr_small_512},
    "baseline": {"256": baseline, "512": baseline_512},
    "mmnet": {"*": mmnet_resnet101},
    "actr_released": {"256": actr_released},
    "released_code": {"256": released_code_model},
    # tiny models for dry runs of the script (any size; not among the defaults)
    "actr_tiny": {"*": actr_tiny},
    "mmnet_tiny": {"*": mmnet_tiny},
}
DEFAULT_MODELS = ("actr_base", "actr_small", "baseline", "mmnet", "actr_released")


# ------------------------------------------------------------------------------------------------
# one case, in its worker process


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One model at one input size with its options."""

    label: str  # row name in the tables, e.g. "actr_base@256"
    factory: Callable[..., torch.nn.Module]  # builds the model (pickled by name to the worker)
    height: int  # input frame H
    width: int  # input frame W
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # the factory's arguments
    batch: int = 1  # forward batch (latency is per call, FLOPs per pair)
    train_batch: int = 2  # pairs per timed training step
    seed: int = 0  # inputs are drawn from this seed: the same in every worker
    threads: int = 2  # torch threads of the worker
    device: str = "cpu"  # "cpu" or "cuda"
    autocast: str | None = None  # "bfloat16": the forward runs under torch.autocast
    compile: bool = False  # run the model through torch.compile
    memory_limit_mb: float | None = None  # cap of the worker's data segment (None: no cap)
    train: bool = True  # time training steps for this case (when the run asks for training)


def synthetic_batch(batch: int, height: int, width: int, *, seed: int, device: str = "cpu") -> PairBatch:
    """A seeded training batch: images, keypoints and a sparse flow target."""
    g = torch.Generator().manual_seed(seed + 1)
    h, w = height // FLOW_STRIDE, width // FLOW_STRIDE
    size = torch.tensor([width - 1.0, height - 1.0])
    return PairBatch.build(
        torch.randn(batch, 3, height, width, generator=g),
        torch.randn(batch, 3, height, width, generator=g),
        torch.rand(batch, NUM_KEYPOINTS, 2, generator=g) * size,
        torch.rand(batch, NUM_KEYPOINTS, 2, generator=g) * size,
        flow=(torch.rand(batch, 2, h, w, generator=g) * 2 - 1) * FLOW_RANGE,
        valid_flow=torch.rand(batch, h, w, generator=g) < VALID_FLOW_FRACTION,
    ).to(device)


class Case:
    """What one worker holds: a model, its inputs, and the calls the driver makes.

    A model is anything whose ``forward(src, trg)`` returns an object with a ``flow`` attribute and
    whose ``loss(output, batch)`` gives a scalar (every ``actr_core.models.CorrespondenceModel``).
    """

    def __init__(self) -> None:
        self.baseline_mb = rss_mb()  # after the imports, the same in every worker
        self.operands: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, spec: CaseSpec) -> dict[str, Any]:
        torch.set_num_threads(spec.threads)
        self.spec = spec
        torch.manual_seed(spec.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random-initialisation notices and the like
            self.model = spec.factory(**spec.kwargs).to(spec.device).eval()
        self.runner = torch.compile(self.model) if spec.compile else self.model
        self.src, self.trg = self._inputs(spec.batch)
        release_free_memory()
        return {
            "params": parameter_count(self.model),
            "trainable_params": parameter_count(self.model, trainable_only=True),
            "rss_baseline_mb": self.baseline_mb,
            "rss_model_mb": rss_mb(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }

    def _inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.spec.seed)
        shape = (batch, 3, self.spec.height, self.spec.width)
        return torch.randn(shape, generator=g).to(self.spec.device), torch.randn(shape, generator=g).to(self.spec.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.spec.autocast
        return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(self.spec.device).type, DTYPES[dtype])

    def _forward(self) -> Any:
        with torch.inference_mode(), self._autocast():
            return self.runner(self.src, self.trg)

    def forward(self) -> tuple[float, float]:
        """Wall and process CPU seconds of one forward pass (inference mode, autocast if asked)."""
        return time_call(self._forward)

    def warm(self) -> None:
        """One untimed forward pass (the first call's one-off allocations)."""
        self._forward()

    def matmul(self, dtype: str) -> float:
        """The dense product rate (GFLOP/s) in ``dtype``, the yardstick timed right after a forward pass."""
        if dtype not in self.operands:
            self.operands[dtype] = matmul_operands(DTYPES[dtype], device=self.spec.device)
        return matmul_rate(self.operands[dtype])

    def reset_peak(self) -> bool:
        """Drop the yardstick's operands and restart the peak from the current memory."""
        self.operands.clear()
        return reset_peak(self.spec.device)

    def peak(self) -> float:
        return peak_mb(self.spec.device)

    def flops(self) -> tuple[int, dict[str, int]]:
        """FLOPs of one forward pass of one pair."""
        src, trg = self._inputs(1)
        with torch.inference_mode(), self._autocast():
            return count_flops(self.model, src, trg)

    def train_setup(self) -> None:
        """Training mode, AdamW over the trainable parameters and a seeded batch of the shard schema."""
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
        s = self.spec
        self.batch = synthetic_batch(s.train_batch, s.height, s.width, seed=s.seed, device=s.device)

    def _train_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.runner(self.batch.src_image, self.batch.trg_image)
            loss = self.model.loss(out, self.batch)
        loss.backward()
        self.optimizer.step()

    def train_step(self) -> tuple[float, float]:
        """Wall and process CPU seconds of one step (forward, ``model.loss``, backward, optimiser step)."""
        return time_call(self._train_step)

    def save_output(self, path: str) -> None:
        """The flow of the fixed inputs, for equality checks (eval mode)."""
        self.model.eval()
        torch.save(self._forward().flow.float().cpu(), path)

    def save_state(self, path: str) -> None:
        torch.save(self.model.state_dict(), path)


# ------------------------------------------------------------------------------------------------
# planning


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to measure (the command line's options)."""

    models: tuple[str, ...] = DEFAULT_MODELS  # keys of MODELS
    sizes: tuple[str, ...] = ("256", "512")  # "S" (square) or "HxW"; models take the sizes they support
    variants: tuple[str, ...] = ("fp32",)  # keys of VARIANTS
    threads: int = 2  # torch threads per worker
    batch: int = 1  # forward batch
    train_batch: int = 2  # training batch
    repeats: int = 5  # timed forward passes per case (rounds)
    train: bool = True  # time training steps
    train_repeats: int = 5  # timed training steps per case
    matmul_dtypes: tuple[str, ...] = ("float32", "bfloat16")  # yardsticks timed after each forward
    device: str = "cpu"  # where the models run
    seed: int = 0  # seed of the inputs and the weights
    actr_repo: str | None = None  # checkout of the released ACTR code: adds it beside actr_released
    train_sizes: tuple[str, ...] | None = None  # sizes whose training steps are timed (None: all)
    memory_limit_gb: float | None = None  # cap per worker; None: the memory available at start over
    #   (workers in the group + 1), so a group never takes all of a shared machine (CPU only: on
    #   CUDA the models live in device memory, and None sets no cap)
    out: str = "bench_out"  # output folder


def parse_size(size: str) -> tuple[int, int]:
    """``"256"`` → (256, 256); ``"224x320"`` → (224, 320)."""
    try:
        values = [int(p) for p in size.lower().split("x")]
    except ValueError:
        raise ValueError(f"size {size!r}: expected S or HxW (e.g. 256 or 224x320)") from None
    values = values * 2 if len(values) == 1 else values
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"size {size!r}: expected S or HxW with positive sides")
    return values[0], values[1]


def _size_name(size: str) -> str:
    height, width = parse_size(size)
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
        models += [] if "actr_released" in models else ["actr_released"]
    elif "released_code" in models:
        raise ValueError("released_code needs --actr-repo PATH (a checkout of the released ACTR code)")
    common = dict(batch=cfg.batch, train_batch=cfg.train_batch, seed=cfg.seed, threads=cfg.threads, device=cfg.device)
    train_sizes = None if cfg.train_sizes is None else {_size_name(s) for s in cfg.train_sizes}
    groups: list[list[CaseSpec]] = []
    for model in (m for m in models if m != "released_code"):
        table = MODELS[model]
        sizes = list(cfg.sizes) + ([MMNET_NATIVE_SIZE] if model == "mmnet" else [])
        group = []
        for size in dict.fromkeys(_size_name(s) for s in sizes):
            factory = table.get(size, table.get("*"))
            if factory is None:
                continue
            train = train_sizes is None or size in train_sizes
            for variant in cfg.variants:
                label = f"{model}@{size}" + ("" if variant == "fp32" else f"[{variant}]")
                group.append(CaseSpec(label, factory, *parse_size(size), train=train, **common, **VARIANTS[variant]))
        if model == "actr_released" and cfg.actr_repo is not None:
            theirs = CaseSpec("released_code@256", released_code_model, 256, 256, kwargs={"repo": str(cfg.actr_repo)}, **common)
            group = [theirs, *group]
        if group:
            groups.append(group)
    if not groups:
        raise ValueError(f"nothing to measure: models {models} offer none of the sizes {cfg.sizes}")
    available = available_mb()
    capped = []
    for group in groups:  # the workers of a group live together: their caps share the memory available
        if cfg.memory_limit_gb is not None:
            limit = cfg.memory_limit_gb * 1024
        else:
            limit = available / (len(group) + 1) if torch.device(cfg.device).type == "cpu" else 0
        capped.append([dataclasses.replace(s, memory_limit_mb=float(limit) if limit > 0 else None) for s in group])
    return capped


# ------------------------------------------------------------------------------------------------
# measuring


@dataclasses.dataclass
class CaseResult:
    """Everything measured for one case; times in seconds, memory in MiB, rates in GFLOP/s."""

    spec: CaseSpec
    setup: dict[str, Any]
    forward_s: list[float] = dataclasses.field(default_factory=list)
    forward_cpu_s: list[float] = dataclasses.field(default_factory=list)
    matmul_gflops: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    train_s: list[float] = dataclasses.field(default_factory=list)
    train_cpu_s: list[float] = dataclasses.field(default_factory=list)
    flops: int | None = None  # per pair
    flops_per_op: dict[str, int] = dataclasses.field(default_factory=dict)
    forward_peak_mb: float | None = None
    train_peak_mb: float | None = None
    train_error: str | None = None  # why training steps could not be timed (e.g. out of memory)

    def achieved_fraction(self, dtype: str) -> float | None:
        """Median over rounds of (FLOPs / forward seconds) / (the matmul rate timed right after it)."""
        rates = self.matmul_gflops.get(dtype)
        if self.flops is None or not rates:
            return None
        per_call = self.flops * self.spec.batch / 1e9
        return statistics.median(per_call / s / r for s, r in zip(self.forward_s, rates, strict=True))


def rounds(count: int, repeats: int) -> list[list[int]]:
    """Case order per round: forwards, then backwards, and so on (no case always goes first)."""
    order = list(range(count))
    return [order if r % 2 == 0 else order[::-1] for r in range(repeats)]


def _set_up(
    specs: Sequence[CaseSpec], workers: Sequence[Worker], tmp: str, log: Callable[[str], None]
) -> tuple[list[CaseResult], dict[str, Any]]:
    """Build every case; ACTR as released takes the released code's weights when the group holds both."""
    results, extra, state_path = [], {}, None
    for spec, worker in zip(specs, workers, strict=True):
        if spec.label.startswith("actr_released") and state_path is not None:
            spec = dataclasses.replace(spec, factory=actr_released_from_released_code, kwargs={"path": state_path})
        log(f"  set up {spec.label}")
        results.append(CaseResult(spec, worker.call("setup", spec=spec)))
        if spec.label.startswith("released_code"):
            state_path = str(Path(tmp) / "released_state.pth")
            worker.call("save_state", path=state_path)
    outputs = {}
    for spec, worker in zip(specs, workers, strict=True):  # before any training step moves the weights
        if state_path is not None and spec.label in ("released_code@256", "actr_released@256"):
            outputs[spec.label] = str(Path(tmp) / f"{spec.label}.pt")
            worker.call("save_output", path=outputs[spec.label])
    if len(outputs) == 2:
        theirs, ours = (torch.load(outputs[k]) for k in ("released_code@256", "actr_released@256"))
        extra["max_flow_difference"] = float((theirs - ours).abs().max())
        log(f"  max |flow difference| to the released code: {extra['max_flow_difference']:.3g}")
    return results, extra


def measure_group(
    specs: Sequence[CaseSpec], cfg: BenchConfig, log: Callable[[str], None] = print
) -> tuple[list[CaseResult], dict[str, Any]]:
    """Measure one group of cases, each in its own worker, in interleaved rounds.

    Phases, each round-robin across the cases: (1) memory: the peak is reset, one untimed forward
    pass runs (the first call's one-off allocations included) and the peak is read, before any
    yardstick operand exists; (2) timing: ``cfg.repeats`` rounds of one timed forward pass per
    case, each followed by one timed matrix product per ``cfg.matmul_dtypes``; (3) the FLOPs of one
    forward pass; (4) with ``cfg.train``, for the cases whose spec asks for it: training mode, the
    peak reset, ``cfg.train_repeats`` rounds of timed steps, the training peak. A case whose
    training step fails (e.g. its memory cap) records the error and drops out of training.
    """
    with tempfile.TemporaryDirectory(prefix="actr_bench_") as tmp, contextlib.ExitStack() as stack:
        workers = [stack.enter_context(Worker(Case, memory_limit_mb=s.memory_limit_mb)) for s in specs]
        results, extra = _set_up(specs, workers, tmp, log)
        log(f"  measuring {', '.join(s.label for s in specs)}")
        for worker, result in zip(workers, results, strict=True):
            worker.call("reset_peak")
            worker.call("warm")
            result.forward_peak_mb = worker.call("peak")
        for order in rounds(len(workers), cfg.repeats):
            for i in order:
                wall, cpu = workers[i].call("forward")
                results[i].forward_s.append(wall)
                results[i].forward_cpu_s.append(cpu)
                for dtype in cfg.matmul_dtypes:
                    results[i].matmul_gflops.setdefault(dtype, []).append(workers[i].call("matmul", dtype=dtype))
        for worker, result in zip(workers, results, strict=True):
            result.flops, result.flops_per_op = worker.call("flops")
        training = [i for i, r in enumerate(results) if cfg.train and r.spec.train]
        for i in training:
            workers[i].call("train_setup")
            workers[i].call("reset_peak")
        for order in rounds(len(training), cfg.train_repeats):
            for i in (training[j] for j in order):
                if results[i].train_error is not None:
                    continue
                try:
                    wall, cpu = workers[i].call("train_step")
                except WorkerError as error:  # e.g. the memory cap: this case's training is given up
                    results[i].train_error = str(error).strip().splitlines()[-1]
                    results[i].train_s.clear()
                    results[i].train_cpu_s.clear()
                    continue
                results[i].train_s.append(wall)
                results[i].train_cpu_s.append(cpu)
        for i in training:
            if results[i].train_error is None:
                results[i].train_peak_mb = workers[i].call("peak")
    return results, extra


# ------------------------------------------------------------------------------------------------
# results


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[i] / b[i] (rounds interleave the two)."""
    return _median([x / y for x, y in zip(a, b, strict=False)])


def comparisons(results: Sequence[CaseResult], extra: dict[str, Any]) -> dict[str, float]:
    """Ratios the targets are stated in: ours / released code (forward, train, memory), 512 / 256
    per model, a variant / fp32 (medians of per-round ratios), the largest flow difference to the
    released code."""
    by_label = {r.spec.label: r for r in results}
    out: dict[str, float] = {}
    ours, theirs = by_label.get("actr_released@256"), by_label.get("released_code@256")
    if ours is not None and theirs is not None:
        name = "actr_released/released_code"
        out[f"{name} forward"] = _paired_ratio(ours.forward_s, theirs.forward_s)
        out[f"{name} forward CPU time"] = _paired_ratio(ours.forward_cpu_s, theirs.forward_cpu_s)
        if ours.train_s and theirs.train_s:
            out[f"{name} train step"] = _paired_ratio(ours.train_s, theirs.train_s)
            out[f"{name} train step CPU time"] = _paired_ratio(ours.train_cpu_s, theirs.train_cpu_s)
        out[f"{name} forward peak"] = ours.forward_peak_mb / theirs.forward_peak_mb
        if torch.device(ours.spec.device).type == "cpu":  # RSS counts the imports; CUDA's allocator does not
            out[f"{name} forward peak - baseline"] = (ours.forward_peak_mb - ours.setup["rss_baseline_mb"]) / (
                theirs.forward_peak_mb - theirs.setup["rss_baseline_mb"]
            )
        if ours.train_peak_mb is not None and theirs.train_peak_mb is not None:
            out[f"{name} train peak"] = ours.train_peak_mb / theirs.train_peak_mb
        if "max_flow_difference" in extra:
            out["max |flow(actr_released) - flow(released_code)|"] = extra["max_flow_difference"]
    for label, r in by_label.items():
        model, _, rest = label.partition("@")
        size, _, variant = rest.partition("[")
        suffix = f"[{variant}" if variant else ""
        other = by_label.get(f"{model}@256{suffix}")
        if size == "512" and other is not None:
            out[f"{model}{suffix} 512/256 forward"] = _paired_ratio(r.forward_s, other.forward_s)
            out[f"{model}{suffix} 512/256 forward CPU time"] = _paired_ratio(r.forward_cpu_s, other.forward_cpu_s)
        plain = by_label.get(f"{model}@{size}")
        if variant and plain is not None:
            out[f"{model}@{size} [{variant.rstrip(']')}]/fp32 forward"] = _paired_ratio(r.forward_s, plain.forward_s)
    return out


def summary(result: CaseResult) -> dict[str, Any]:
    """One case's figures (a row of ``bench.csv`` and of the table)."""
    r, nan = result, float("nan")
    forward = _median(r.forward_s)
    bf16 = r.spec.autocast == "bfloat16"
    fraction = r.achieved_fraction("bfloat16" if bf16 else "float32")
    rss = torch.device(r.spec.device).type == "cpu"
    train_note = r.train_error or ("" if r.train_s else "not measured")
    if r.train_error is not None and ("memory" in r.train_error.lower() or "died" in r.train_error):
        limit = r.spec.memory_limit_mb
        train_note = "out of memory" + (f" (cap {limit / 1024:.0f} GiB)" if limit else "")
    return {
        "case": r.spec.label,
        "params": r.setup["params"],
        "trainable_params": r.setup["trainable_params"],
        "gflop_per_pair": r.flops / 1e9 if r.flops is not None else nan,
        "forward_median_s": forward,
        "forward_min_s": min(r.forward_s, default=nan),
        "forward_cpu_median_s": _median(r.forward_cpu_s),
        "train_step_median_s": _median(r.train_s),
        "train_batch": r.spec.train_batch,
        "train_note": train_note,
        "rss_baseline_mb": r.setup["rss_baseline_mb"],
        "rss_model_mb": r.setup["rss_model_mb"],
        "forward_peak_mb": r.forward_peak_mb,
        "forward_peak_minus_baseline_mb": r.forward_peak_mb - (r.setup["rss_baseline_mb"] if rss else 0.0),
        "train_peak_mb": r.train_peak_mb if r.train_peak_mb is not None else nan,
        "achieved_gflops": r.flops * r.spec.batch / 1e9 / forward if r.flops is not None else nan,
        "matmul_fp32_gflops": _median(r.matmul_gflops.get("float32", [])),
        "matmul_bf16_gflops": _median(r.matmul_gflops.get("bfloat16", [])),
        "fraction_of_matmul": nan if fraction is None else fraction,
        "fraction_dtype": "bf16" if bf16 else "fp32",
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the per-case figures and the matmul rates."""

    def f(value: float, fmt: str) -> str:
        return "–" if value != value else format(value, fmt)  # NaN: not measured

    header = (
        "| case | params (M) | GFLOP/pair | forward (s, median) | forward CPU (s) | train step (s) [batch] | peak memory (MiB) "
        "| peak − baseline (MiB) | GFLOP/s | of matmul rate |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        note = row["train_note"]
        train = note if note and note != "not measured" else f(row["train_step_median_s"], ".3f") + f" [{row['train_batch']}]"
        fraction = row["fraction_of_matmul"]
        of_rate = "–" if fraction != fraction else f"{fraction:.0%} of {row['fraction_dtype']}"
        lines.append(
            f"| {row['case']} | {row['params'] / 1e6:.1f} | {f(row['gflop_per_pair'], '.1f')} | {f(row['forward_median_s'], '.3f')} "
            f"| {f(row['forward_cpu_median_s'], '.2f')} | {train} | {f(row['forward_peak_mb'], '.0f')} "
            f"| {f(row['forward_peak_minus_baseline_mb'], '.0f')} | {f(row['achieved_gflops'], '.1f')} | {of_rate} |"
        )
    rates = [
        f"{name}: {_median([r[key] for r in rows if r[key] == r[key]]):.1f} GFLOP/s"
        for name, key in (("fp32", "matmul_fp32_gflops"), ("bf16", "matmul_bf16_gflops"))
        if any(r[key] == r[key] for r in rows)
    ]
    return "\n".join([*lines, "", f"dense 2048² matmul rate (median over the cases): {', '.join(rates)}"])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _as_json(result: CaseResult) -> dict[str, Any]:
    spec = {f.name: getattr(result.spec, f.name) for f in dataclasses.fields(result.spec)}
    spec["factory"] = result.spec.factory.__name__
    return {**{f.name: getattr(result, f.name) for f in dataclasses.fields(result)}, "spec": spec}


def main(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Measure every planned case, print the table and the ratios, write JSON, CSV and markdown;
    returns the table's rows."""
    groups = plan_cases(cfg)
    load_before, start = _load(), time.perf_counter()
    results: list[CaseResult] = []
    extra: dict[str, Any] = {}
    for group in groups:
        print(f"group: {', '.join(s.label for s in group)} (load average {_load()})", flush=True)
        got, more = measure_group(group, cfg, log=lambda m: print(m, flush=True))
        results += got
        extra.update(more)
    extra.update(load_average_start=load_before, load_average_end=_load(), wall_s=time.perf_counter() - start)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios = comparisons(results, extra)
    config = {**dataclasses.asdict(cfg), "cpu": _cpu_name(), "platform": platform.platform()}
    raw = {"config": config, "extra": extra, "ratios": ratios, "results": [_as_json(r) for r in results]}
    (out / "results.json").write_text(json.dumps(raw, indent=1))
    rows = [summary(r) for r in results]
    with open(out / "bench.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = (
        f"threads {cfg.threads}, device {cfg.device} ({_cpu_name()}), torch {torch.__version__}, forward batch {cfg.batch}, "
        f"train batch {cfg.train_batch}, {cfg.repeats} timed repeats (torch.utils.benchmark.Timer, 2 warm-up calls each); "
        f"load average {extra['load_average_start']} → {extra['load_average_end']}"
    )
    text = "\n".join([header, "", format_table(rows), "", *(f"- {k}: {v:.3g}" for k, v in ratios.items())]) + "\n"
    (out / "bench.md").write_text(text)
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'bench.csv'}, {out / 'bench.md'}")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    """Command-line arguments → :class:`BenchConfig`."""
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(d.models), help=f"of {sorted(MODELS)} (default: %(default)s)")
    p.add_argument("--sizes", nargs="+", default=list(d.sizes), help="S or HxW (default: %(default)s; MMNet adds 224x320)")
    p.add_argument("--variants", nargs="+", default=list(d.variants), help=f"of {list(VARIANTS)} (default: %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--batch", type=int, default=d.batch, help="forward batch (default: %(default)s)")
    p.add_argument("--train-batch", type=int, default=d.train_batch)
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed forward passes per case (default: %(default)s)")
    p.add_argument("--no-train", action="store_true", help="skip the training steps")
    p.add_argument("--train-repeats", type=int, default=d.train_repeats)
    p.add_argument("--train-sizes", nargs="+", default=None, help="time training steps at these sizes only (default: all)")
    p.add_argument(
        "--memory-limit-gb",
        type=float,
        default=None,
        help="cap per worker process (default: available memory / (workers in the group + 1)); a case beyond it is reported, not run",
    )
    p.add_argument("--matmul-dtypes", nargs="*", default=list(d.matmul_dtypes), help="yardsticks (default: %(default)s)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--actr-repo", default=None, help="checkout of the released ACTR code, measured beside actr_released")
    p.add_argument("--out", default=d.out, help="output folder (default: %(default)s)")
    a = p.parse_args(argv)
    if min(a.repeats, a.train_repeats, a.threads, a.batch, a.train_batch) < 1:
        p.error("--repeats, --train-repeats, --threads, --batch and --train-batch must be >= 1")
    values = {key: tuple(v) if isinstance(v, list) else v for key, v in vars(a).items() if key != "no_train"}
    return BenchConfig(**values, train=not a.no_train)


if __name__ == "__main__":
    main(parse_args())
