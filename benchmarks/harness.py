"""What the benchmark scripts share: timing, the dense matmul yardstick, memory peaks, FLOP counting
and worker processes. Standard tools do the work; this module holds the few choices around them.

# n matrix side · b batch · g heads · s query tokens · t key tokens · d channels per head

Timing
    :func:`time_call` times one call with ``torch.utils.benchmark.Timer`` (``timeit(1)``: two
    untimed warm-up calls, then the timed one, with the caller's thread count). The Timer's clock,
    ``torch.utils.benchmark.utils.timer.timer``, synchronises the accelerator before every
    reading, so a CUDA kernel launched by the call is inside the measured interval. (The former
    yardstick stopped its clock before synchronising, so on a GPU it timed only the launch.)
Yardstick
    :func:`matmul_rate`: one dense ``n × n`` product (``2 n³`` FLOPs) timed by :func:`time_call`,
    in GFLOP/s. The benchmarks time it right after each forward pass in the same process, so that
    "achieved FLOP/s over the matmul rate" compares two figures taken under the same load.
Memory
    On CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU the
    kernel's high-water mark of the resident set (``VmHWM`` of ``/proc/self/status``, the figure
    ``resource.getrusage(...).ru_maxrss`` gives), reset to the current resident set by writing
    ``5`` to ``/proc/self/clear_refs``, so a peak can cover one phase (a forward pass) rather than
    the life of the process; where ``/proc`` is missing ``ru_maxrss``, never reset.
FLOPs
    ``torch.utils.flop_counter.FlopCounterMode``. It has no formula for CPU fused attention
    (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, torch 2.14), so it would
    count 0 for them: :func:`register_sdpa_flop_formulas` registers torch's own SDPA formulas for
    them, and a fused forward then counts ``2·b·g·s·t·d`` for ``q kᵀ`` plus as much for ``· v``,
    what the explicit softmax path counts (tested). Kernels torch counts itself are left alone.
Processes
    :class:`Worker` serves one object in a fresh process (``multiprocessing``, spawn), so that its
    memory is its own; calls are pickled through a pipe. A memory cap (``RLIMIT_DATA``) turns an
    allocation beyond it into an error reply instead of the kernel's out-of-memory killer.
"""

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.benchmark import Timer
from torch.utils.benchmark.utils.timer import timer as synchronising_clock

MATMUL_SIDE = 2048  # large enough for the BLAS to reach its steady rate, small enough for ~0.1 s on 2 cores
MIB = 2**20
_KIB_PER_MIB = 1024
_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
_RESET_HIWATER = "5"  # clear_refs command: reset the peak resident set size to the current one
#: fused attention kernels torch has no FLOP formula for (forward, backward); registered when present
FUSED_ATTENTION_OPS: tuple[tuple[str, str], ...] = (
    ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"),
    ("_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_fused_attention_overrideable_backward"),
)


# ------------------------------------------------------------------------------------------------ timing


class _Clock:
    """A Timer clock: ``clock()`` (wall seconds) that also notes the process CPU time at each reading."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock, self.cpu = clock, []

    def __call__(self) -> float:
        wall = self.clock()
        self.cpu.append(time.process_time())
        return wall


def time_call(fn: Callable[[], Any], *, clock: Callable[[], float] = synchronising_clock) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one call of ``fn``, after two untimed warm-up calls.

    ``clock`` is the Timer's: the default synchronises the accelerator before each reading. The
    stdlib ``timeit`` loop under the Timer reads the clock right before and right after the timed
    call, so the last two CPU notes bound that call.
    """
    clock_ = _Clock(clock)
    timer = Timer("fn()", globals={"fn": fn}, timer=clock_, num_threads=torch.get_num_threads())
    wall = timer.timeit(1).median
    return wall, clock_.cpu[-1] - clock_.cpu[-2]


def matmul_operands(dtype: torch.dtype, n: int = MATMUL_SIDE, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Two seeded ``n × n`` matrices in ``dtype`` on ``device``."""
    generator = torch.Generator().manual_seed(n)
    return tuple(torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))


def matmul_rate(operands: tuple[torch.Tensor, torch.Tensor], **kwargs: Any) -> float:
    """Dense product rate in GFLOP/s: ``2 n³`` over the time of one product (:func:`time_call`)."""
    a, b = operands
    seconds, _ = time_call(lambda: torch.mm(a, b), **kwargs)
    return 2 * a.shape[0] ** 3 / seconds / 1e9


# ------------------------------------------------------------------------------------------------ memory


def _status_mb(field: str) -> float | None:
    try:
        text = _STATUS.read_text()
    except OSError:  # pragma: no cover - non-Linux
        return None
    return next((int(line.split()[1]) / _KIB_PER_MIB for line in text.splitlines() if line.startswith(field + ":")), None)


def rss_mb() -> float:
    """Current resident set size in MiB (``VmRSS``; the peak where ``/proc`` is missing)."""
    value = _status_mb("VmRSS")
    return peak_rss_mb() if value is None else value


def peak_rss_mb() -> float:
    """Peak resident set size in MiB since the process started or the last :func:`reset_peak`."""
    value = _status_mb("VmHWM")
    if value is None:  # pragma: no cover - non-Linux: ru_maxrss is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / (_KIB_PER_MIB**2 if sys.platform == "darwin" else _KIB_PER_MIB)
    return value


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``; nothing elsewhere), so
    the resident set no longer counts memory freed by an earlier phase (e.g. building a model)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to do
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def reset_peak(device: str = "cpu") -> bool:
    """Restart the peak from the current memory; ``False`` where the kernel does not allow it (CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    release_free_memory()
    try:
        _CLEAR_REFS.write_text(_RESET_HIWATER)
    except OSError:
        return False
    return True


def peak_mb(device: str = "cpu") -> float:
    """Peak memory in MiB since :func:`reset_peak`: allocated on CUDA, resident set on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return peak_rss_mb()


def available_mb() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` in MiB (0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / _KIB_PER_MIB
    except OSError:  # pragma: no cover - non-Linux
        pass
    return 0.0


# ------------------------------------------------------------------------------------------------ FLOPs


def _sdpa_forward(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    del args, kwargs  # dropout, causal flag, mask and scale change no matrix product
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    del args, kwargs
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def register_sdpa_flop_formulas() -> tuple[str, ...]:
    """Register torch's SDPA FLOP formulas for the fused attention kernels it does not count.

    Changes a process-wide table, so it happens only when called, and is idempotent: returns the
    operators registered by this call (empty when an earlier call or torch itself did).
    """
    registered = []
    for forward, backward in FUSED_ATTENTION_OPS:
        for name, formula in ((forward, _sdpa_forward), (backward, _sdpa_backward)):
            packet = getattr(torch.ops.aten, name, None)
            if packet is not None and packet not in flop_counter.flop_registry:
                flop_counter.register_flop_formula(packet)(formula)
                registered.append(name)
    return tuple(registered)


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
    """FLOPs of one call ``fn(*args, **kwargs)``: ``(total, per operator name)``, fused attention counted."""
    register_sdpa_flop_formulas()
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    per_op = {str(op).split(".")[-1]: int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


# ------------------------------------------------------------------------------------------------ processes


class WorkerError(RuntimeError):
    """A call failed in the worker process (its traceback is the message), or the process died."""


def _serve(connection: Any, served: type, memory_limit_mb: float | None) -> None:
    if memory_limit_mb is not None:  # an allocation beyond it fails (an error reply), not the machine
        limit = int(memory_limit_mb * MIB)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    instance = None
    while True:
        name, kwargs = connection.recv()
        if name == "quit":
            return
        try:
            if instance is None:
                instance = served()
            connection.send((True, getattr(instance, name)(**kwargs)))
        except BaseException:  # reported to the client, which raises
            connection.send((False, traceback.format_exc()))


class Worker:
    """An instance of ``served`` (built in the worker on the first call) in its own process.

    ``worker.call("method", **kwargs)`` runs ``instance.method(**kwargs)`` there and returns its
    result, or raises :class:`WorkerError`. ``served`` must be importable by name (a module-level
    class); a context manager: the process quits on exit.
    """

    def __init__(self, served: type, *, memory_limit_mb: float | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, served, memory_limit_mb), daemon=True)
        self.process.start()
        child.close()

    def call(self, name: str, **kwargs: Any) -> Any:
        try:
            self.connection.send((name, kwargs))
            ok, value = self.connection.recv()
        except (EOFError, OSError):
            self.process.join()
            raise WorkerError(f"worker died during {name!r} (exit status {self.process.exitcode})") from None
        if not ok:
            raise WorkerError(f"{name!r} failed in the worker:\n{value}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):  # the pipe is gone
                self.connection.send(("quit", {}))
            self.process.join(timeout=30)
            if self.process.is_alive():  # pragma: no cover - a hung worker
                self.process.kill()
                self.process.join()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
