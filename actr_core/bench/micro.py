"""Micro-benchmarks behind the execution choices of the blocks (``actr bench --micro``).

# b batch (flows) · h w map · c channels · g heads · n tokens per window

* :func:`window_attention_timings`: the fused kernel against the explicit softmax for each window
  size, at the super-resolution's shape (64 × 64 maps, 96 channels, 8 heads, 6 flows):
  :data:`actr_core.blocks.windows.FUSED_MIN_WINDOW_TOKENS` comes from it.
* :func:`refiner_chunk_timings`: the released refiner and the dual-window SR run on all six paths
  at once or one path at a time: time and peak resident memory.

Times are CPU seconds of the calling thread (``time.thread_time``), the best of ``repeats`` after a
warm-up, so that other processes' load disturbs them little; run with one thread
(``torch.set_num_threads(1)``) for that to hold.
"""

import time
from collections.abc import Callable
from typing import Any

import torch

from actr_core.bench.memory import peak_rss_mb, release_free_memory, reset_peak_rss, rss_mb

__all__ = ["best_thread_seconds", "refiner_chunk_timings", "window_attention_timings"]


def best_thread_seconds(fn: Callable[[], Any], *, repeats: int = 5) -> float:
    """The fastest of ``repeats`` calls in CPU seconds of this thread, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def window_attention_timings(
    *, flows: int = 6, size: int = 64, channels: int = 96, heads: int = 8, windows: tuple[int, ...] = (4, 8), repeats: int = 5
) -> list[dict[str, Any]]:
    """Fused kernel vs explicit softmax for each window size, inference mode, no shift."""
    from actr_core.blocks.windows import window_self_attention

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(flows, size, size, channels, generator=gen)
    rows = []
    for window in windows:
        params = (
            torch.randn(3 * channels, channels, generator=gen) * channels**-0.5,
            torch.zeros(3 * channels),
            torch.randn(channels, channels, generator=gen) * channels**-0.5,
            torch.zeros(channels),
            torch.randn((2 * window - 1) ** 2, heads, generator=gen),
        )
        row: dict[str, Any] = {"window": window, "tokens": window * window}
        with torch.inference_mode():
            for name, fused in (("fused_s", True), ("explicit_s", False)):
                row[name] = best_thread_seconds(
                    lambda fused=fused: window_self_attention(x, *params, window_size=window, fused=fused), repeats=repeats
                )
        rows.append(row)
    return rows


def _peak_and_time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    fn()  # first-call allocations
    release_free_memory()
    before = rss_mb()
    reset_peak_rss()
    fn()
    peak = peak_rss_mb() - before
    return best_thread_seconds(fn, repeats=repeats), peak


def refiner_chunk_timings(*, paths: int = 6, size: int = 16, repeats: int = 3) -> list[dict[str, Any]]:
    """The released refiner and the dual-window SR on ``paths`` flows from a ``size``² token grid
    (×4 upsampled), all flows in one call (chunk 0) or one at a time (chunk 1)."""
    from actr_core.blocks import DualWindowFlowSR
    from actr_core.blocks.released import ReleasedFlowRefiner
    from actr_core.models.released import ACTRReleasedConfig

    torch.manual_seed(0)
    cfg = ACTRReleasedConfig()
    fine = 4 * size
    released = ReleasedFlowRefiner(
        cfg.sr_dim, cfg.sr_heads, cfg.sr_windows, rounds=cfg.sr_rounds, hidden=cfg.sr_hidden, reduction=cfg.channel_reduction
    ).eval()
    described = DualWindowFlowSR(768).eval()
    flow_up = torch.randn(paths, 2, fine, fine)
    guidance = torch.randn(1, cfg.guidance_dim, fine, fine)
    coarse = torch.randn(paths, 2, size, size)
    features = torch.randn(1, 768, size, size)
    rows = []
    for name, module, call in (
        ("released refiner", released, lambda: released(flow_up, guidance)),
        ("dual-window SR", described, lambda: described(coarse, features)),
    ):
        for chunk in (0, 1):
            module.chunk = chunk
            with torch.inference_mode():
                seconds, peak = _peak_and_time(call, repeats)
            rows.append({"module": name, "chunk": chunk, "seconds": seconds, "peak_mb": peak})
    return rows
