"""benchmarks/harness.py: timing inside the synchronised interval, the matmul rate, FLOPs with fused
attention, memory peaks and worker processes."""

import pytest
import torch
import torch.nn.functional as F
from harness import (
    FUSED_ATTENTION_OPS,
    Worker,
    WorkerError,
    count_flops,
    matmul_operands,
    matmul_rate,
    peak_rss_mb,
    register_sdpa_flop_formulas,
    reset_peak,
    rss_mb,
    synchronising_clock,
    time_call,
)
from torch.utils import flop_counter


class FakeDevice:
    """An asynchronous device on a virtual clock: a launch queues work, a synchronise runs it."""

    def __init__(self) -> None:
        self.now, self.queued = 0.0, 0.0

    def launch(self, seconds: float = 5.0) -> None:
        self.queued += seconds

    def synchronise(self) -> None:
        self.now, self.queued = self.now + self.queued, 0.0

    def synchronising_clock(self) -> float:  # what torch's Timer clock does on a GPU
        self.synchronise()
        return self.now

    def plain_clock(self) -> float:
        return self.now


def test_time_call_counts_queued_device_work():
    """The former yardstick read the clock right after the launch and synchronised later: on an
    asynchronous device it timed only the launch. The Timer's clock synchronises before reading."""
    device = FakeDevice()
    wall, cpu = time_call(device.launch, clock=device.synchronising_clock)
    assert wall == 5.0 and cpu >= 0.0
    # the old order of operations on the same device: clock, launch, clock, then synchronise
    start = device.plain_clock()
    device.launch()
    assert device.plain_clock() - start == 0.0
    device.synchronise()


def test_time_call_uses_the_clock_that_synchronises_the_accelerator():
    assert time_call.__kwdefaults__["clock"] is synchronising_clock
    assert synchronising_clock is torch.utils.benchmark.utils.timer.timer


def test_time_call_keeps_the_thread_count():
    threads = torch.get_num_threads()
    seen = []
    time_call(lambda: seen.append(torch.get_num_threads()))
    assert seen == [threads] * 3  # two warm-up calls and the timed one, all with the caller's threads


def test_matmul_rate_is_positive_and_plausible(monkeypatch):
    import harness

    timers = []
    original = harness.Timer

    def spy(*args, **kwargs):
        timers.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(harness, "Timer", spy)
    rate = matmul_rate(matmul_operands(torch.float32, n=256))
    assert len(timers) == 1 and timers[0]["timer"].clock is synchronising_clock
    assert 0.01 < rate < 1e6  # GFLOP/s: above a slow interpreter, below any CPU


def _explicit(q, k, v, mask=None):
    scores = torch.einsum("bgsd,bgtd->bgst", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    return torch.einsum("bgst,bgtd->bgsd", torch.softmax(scores, dim=-1), v)


def _qkv(b=2, g=3, s=7, t=5, d=4):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(b, g, n, d, generator=gen) for n in (s, t, t))


def test_register_is_idempotent_and_covers_the_cpu_kernel():
    register_sdpa_flop_formulas()
    assert register_sdpa_flop_formulas() == ()
    forward, backward = FUSED_ATTENTION_OPS[0]
    assert getattr(torch.ops.aten, forward) in flop_counter.flop_registry
    assert getattr(torch.ops.aten, backward) in flop_counter.flop_registry


def test_fused_forward_counts_what_the_explicit_path_counts():
    q, k, v = _qkv(s=7, t=5, d=4)  # queries and keys of different lengths: no symmetric accident
    fused, per_op = count_flops(F.scaled_dot_product_attention, q, k, v)
    explicit, _ = count_flops(_explicit, q, k, v)
    assert explicit == 4 * 2 * 3 * 7 * 5 * 4  # two products of 2·b·g·s·t·d
    assert fused == explicit
    assert "_scaled_dot_product_flash_attention_for_cpu" in per_op


def test_fused_forward_with_a_mask_counts_the_same():
    q, k, v = _qkv(s=6, t=6, d=8)
    mask = torch.randn(6, 6)
    fused, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert fused == count_flops(lambda: _explicit(q, k, v, mask))[0]


def test_fused_backward_counts_the_explicit_backward_plus_the_recomputed_scores():
    def step(attention):
        q, k, v = (x.requires_grad_() for x in _qkv(s=7, t=5, d=4))
        attention(q, k, v).sum().backward()

    fused, _ = count_flops(step, F.scaled_dot_product_attention)
    explicit, _ = count_flops(step, _explicit)
    products = 2 * 2 * 3 * 7 * 5 * 4  # one product of 2·b·g·s·t·d
    # explicit: 2 forward + 4 backward products; fused: 2 forward + the scores again + 4 backward
    assert explicit == 6 * products
    assert fused == explicit + products


def test_count_flops_of_a_linear_layer():
    total, per_op = count_flops(torch.nn.Linear(16, 8), torch.randn(3, 16))
    assert total == 2 * 3 * 16 * 8 and set(per_op) == {"addmm"}


def test_memory_peak_resets_to_the_current_resident_set():
    assert rss_mb() > 0
    if not reset_peak():
        pytest.skip("this kernel does not allow resetting the peak")
    assert peak_rss_mb() <= rss_mb() + 1.0
    block = bytearray(64 * 2**20)  # touch 64 MiB
    block[::4096] = b"\x01" * len(block[::4096])
    assert peak_rss_mb() >= rss_mb() - 1.0 >= 0
    del block


class Served:
    """What the worker tests run in another process."""

    def pid(self) -> int:
        import os

        return os.getpid()

    def fail(self) -> None:
        raise ValueError("told to fail")

    def allocate(self, mib: int) -> int:
        return len(bytearray(mib * 2**20))

    def exit(self) -> None:
        import os

        os._exit(3)


def test_worker_runs_calls_in_its_own_process_and_survives_errors():
    import os

    with Worker(Served) as first, Worker(Served) as second:
        assert first.call("pid") != second.call("pid") != os.getpid()
        with pytest.raises(WorkerError, match="told to fail"):
            first.call("fail")
        with pytest.raises(WorkerError, match="no_such_call"):
            first.call("no_such_call")
        assert first.call("allocate", mib=1) == 2**20  # the process lives on
    assert first.process.exitcode == 0 and second.process.exitcode == 0


def test_memory_cap_turns_an_allocation_into_an_error_reply():
    with Worker(Served, memory_limit_mb=50) as worker:  # below what the imports took: no new mapping fits
        with pytest.raises(WorkerError, match="MemoryError"):
            worker.call("allocate", mib=256)
        assert worker.call("pid") > 0  # the process lives on


def test_a_dead_worker_is_an_error_not_a_hang():
    with Worker(Served) as worker, pytest.raises(WorkerError, match="died during 'exit'.*exit status 3"):
        worker.call("exit")
