"""Measure models each in its own process, interleaved, on the same inputs.

# b batch · H W input frame

A :class:`CaseSpec` names one measurement: a model factory, an input size and the options (threads,
bf16 autocast, channels-last, ``torch.compile``). :class:`BenchWorker` runs it in a fresh Python
process (``actr_core.bench.worker``), so its memory is its own: the baseline after the imports, the
model, and the peak of each phase. :func:`measure_interleaved` drives several workers at once,
one forward pass each in turn (alternating the order every round), with a dense matrix product
timed right after each forward in the same process, so that the load of a shared machine hits all
models and the yardstick alike and per-round ratios stay meaningful.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import IO, Any, Protocol, runtime_checkable

__all__ = [
    "BenchWorker",
    "CaseResult",
    "CaseSpec",
    "MeasureSettings",
    "Requester",
    "WorkerError",
    "measure_interleaved",
]

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@runtime_checkable
class Requester(Protocol):
    """What :func:`measure_interleaved` drives: ``call(op, **kwargs) -> reply`` (a :class:`BenchWorker`)."""

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]: ...


class WorkerError(RuntimeError):
    """A request failed in the worker process (its traceback is the message)."""


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One model at one input size with its options (the worker's ``setup`` request)."""

    label: str  # row name in the tables, e.g. "actr_base@256"
    factory: str  # "package.module:function" returning the model
    height: int
    width: int
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch: int = 1  # forward batch (latency is per call, FLOPs per pair)
    train_batch: int = 2
    seed: int = 0  # inputs are drawn from this seed: the same in every worker
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    autocast: str | None = None  # "bfloat16": the forward runs under torch.autocast
    channels_last: bool = False
    compile: bool = False
    memory_limit_mb: float | None = None  # cap of the worker's data segment (None: no cap)
    train: bool = True  # time training steps for this case (when the settings ask for training)

    def setup_request(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["label"], out["train"]
        return out


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    """How much to measure (warm-up calls are never timed)."""

    warmup: int = 1
    repeats: int = 5
    train: bool = True
    train_warmup: int = 1
    train_repeats: int = 5
    matmul_dtypes: tuple[str, ...] = ("float32", "bfloat16")  # yardsticks timed after each forward
    flops: bool = True

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.train_repeats < 1 or self.train_warmup < 0:
            raise ValueError(
                f"warmup = {self.warmup}, repeats = {self.repeats}, train_warmup = {self.train_warmup}, "
                f"train_repeats = {self.train_repeats}: expected repeats >= 1 and warm-ups >= 0"
            )


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
    flops: int | None = None
    flops_per_op: dict[str, int] = dataclasses.field(default_factory=dict)
    forward_peak_mb: float | None = None
    train_peak_mb: float | None = None
    peak_kind: str = "rss"
    peak_reset: bool = True
    train_error: str | None = None  # why training steps could not be timed (e.g. out of memory)

    @property
    def forward_median_s(self) -> float:
        return statistics.median(self.forward_s)

    @property
    def train_median_s(self) -> float | None:
        return statistics.median(self.train_s) if self.train_s else None

    @property
    def gflop_per_pair(self) -> float | None:
        return None if self.flops is None else self.flops / 1e9

    def achieved_fraction(self, dtype: str) -> float | None:
        """Median over rounds of (FLOPs / forward seconds) / (the matmul rate timed right after it)."""
        rates = self.matmul_gflops.get(dtype)
        if self.flops is None or not rates:
            return None
        per_call = self.flops * self.spec.batch / 1e9
        return statistics.median(per_call / s / r for s, r in zip(self.forward_s, rates, strict=True))


class BenchWorker:
    """A worker process serving one case. Use as a context manager (the process quits on exit)."""

    def __init__(self, *, threads: int | None = None, stderr: IO[str] | None = None, python: str = sys.executable):
        env = dict(os.environ)
        if threads is not None:
            env.update({name: str(threads) for name in THREAD_VARIABLES})
        self.process = subprocess.Popen(
            [python, "-m", "actr_core.bench.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; :class:`WorkerError` if it failed."""
        if self.process.poll() is not None:
            raise WorkerError(f"worker exited with status {self.process.returncode} before {op!r}")
        self.process.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            status = self.process.wait()
            raise WorkerError(f"worker died during {op!r} (exit status {status})")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise WorkerError(f"{op!r} failed in the worker:\n{reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.call("quit")
            except (WorkerError, OSError, ValueError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover - a hung worker
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "BenchWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rounds(workers: Sequence[Any], count: int) -> list[list[int]]:
    """Worker order per round: forwards, then backwards, and so on (no worker always goes first)."""
    order = list(range(len(workers)))
    return [order if r % 2 == 0 else order[::-1] for r in range(count)]


def measure_interleaved(
    workers: Sequence[Requester], results: Sequence[CaseResult], settings: MeasureSettings
) -> Sequence[CaseResult]:
    """Measure set-up workers (``results[i]`` belongs to ``workers[i]``) in interleaved rounds.

    Phases, each round-robin across the workers: (1) memory: the peak is reset, ``warmup + 1``
    untimed forward passes run (the first call's one-off allocations included) and the peak is
    read, before any yardstick operand exists; (2) timing: ``repeats`` timed forward passes, each
    followed in the same process by one timed matrix product per ``settings.matmul_dtypes``;
    (3) the FLOPs of one forward pass; (4) with ``settings.train``, for the cases whose spec asks
    for it: training mode, the peak reset (yardstick operands dropped), ``train_warmup`` untimed
    and ``train_repeats`` timed steps, and the training peak. A failed training step (e.g. beyond
    the case's memory cap) is recorded in ``train_error`` and that case's training is given up.
    """
    for w, res in zip(workers, results, strict=True):
        res.peak_reset = bool(w.call("reset_peak")["reset"])
    for order in _rounds(workers, settings.warmup + 1):  # the memory phase: no yardstick allocated
        for i in order:
            workers[i].call("forward")
    for w, res in zip(workers, results, strict=True):
        peak = w.call("peak")
        res.forward_peak_mb, res.peak_kind = peak["peak_mb"], peak["kind"]
    for order in _rounds(workers, settings.repeats):
        for i in order:
            reply = workers[i].call("forward")
            results[i].forward_s.append(reply["seconds"])
            results[i].forward_cpu_s.append(reply["cpu_seconds"])
            for dtype in settings.matmul_dtypes:
                reply = workers[i].call("matmul", dtype=dtype)
                results[i].matmul_gflops.setdefault(dtype, []).append(reply["flops"] / reply["seconds"] / 1e9)
    if settings.flops:
        for w, res in zip(workers, results, strict=True):
            reply = w.call("flops")
            res.flops, res.flops_per_op = int(reply["flops"]), reply["per_op"]  # per pair (batch 1)
    if settings.train:
        training = [i for i, r in enumerate(results) if r.spec.train]

        def step(i: int, timed: bool) -> None:
            if results[i].train_error is not None:
                return
            try:
                reply = workers[i].call("train_step")
            except WorkerError as error:  # e.g. the memory cap: this case's training is given up
                results[i].train_error = str(error).strip().splitlines()[-1]
                results[i].train_s.clear()
                results[i].train_cpu_s.clear()
                return
            if timed:
                results[i].train_s.append(reply["seconds"])
                results[i].train_cpu_s.append(reply["cpu_seconds"])

        for i in training:
            workers[i].call("train_setup")
            workers[i].call("reset_peak")
        for order in _rounds(training, settings.train_warmup):
            for j in order:
                step(training[j], timed=False)
        for order in _rounds(training, settings.train_repeats):
            for j in order:
                step(training[j], timed=True)
        for i in training:
            if results[i].train_error is None:
                results[i].train_peak_mb = workers[i].call("peak")["peak_mb"]
    return results
