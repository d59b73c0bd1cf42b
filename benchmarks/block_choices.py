"""Micro-benchmarks behind the execution choices of the blocks, one thread, in this process.

    python benchmarks/block_choices.py --out bench_out/micro

# b batch (flows) · h w map · c channels · g heads · n tokens per window

* :func:`window_attention_timings`: the fused kernel against the explicit softmax for each window
  size, at the super-resolution's shape (64 × 64 maps, 96 channels, 8 heads, 6 flows):
  ``actr_core.blocks.windows.FUSED_MIN_WINDOW_TOKENS`` comes from it.
* :func:`refiner_chunk_timings`: the released refiner and the dual-window SR run on all six paths
  at once or one path at a time (their ``chunk``): time and peak resident memory.

Times are ``torch.utils.benchmark.Timer.blocked_autorange`` medians measured with the CPU clock of
the calling thread (``time.thread_time``; one torch thread, so the work runs in that thread), which
other processes' load disturbs little. Writes the tables to ``micro.md`` under ``--out``.
"""

import argparse
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from harness import peak_mb, reset_peak, rss_mb
from torch.utils.benchmark import Timer

from actr_core.blocks import DualWindowFlowSR, window_self_attention
from actr_core.blocks.released import ReleasedFlowRefiner
from actr_core.models import ACTRReleasedConfig

DESCRIBED_DIM = 768  # the described SR's feature channels (ViT-B tokens)
UPSCALE = 4  # the SR's token grid → flow grid factor


def thread_seconds(fn: Callable[[], Any], *, min_run_time: float = 0.5) -> float:
    """Median CPU seconds of this thread per call of ``fn`` (Timer's blocked autorange, one thread)."""
    timer = Timer("fn()", globals={"fn": fn}, timer=time.thread_time, num_threads=1)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def window_attention_timings(
    *,
    flows: int = 6,
    size: int = 64,
    channels: int = 96,
    heads: int = 8,
    windows: Sequence[int] = (4, 8),
    min_run_time: float = 0.5,
) -> list[dict[str, Any]]:
    """Fused kernel vs explicit softmax for each window size, inference mode, no shift."""
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
                call = partial(window_self_attention, x, *params, window_size=window, fused=fused)
                row[name] = thread_seconds(call, min_run_time=min_run_time)
        rows.append(row)
    return rows


def refiner_chunk_timings(*, paths: int = 6, size: int = 16, min_run_time: float = 0.5) -> list[dict[str, Any]]:
    """The released refiner and the dual-window SR on ``paths`` flows from a ``size``² token grid
    (×4 upsampled), all flows in one call (chunk 0) or one at a time (chunk 1): seconds, and the
    peak resident memory of one call above the memory before it (MiB)."""
    torch.manual_seed(0)
    cfg = ACTRReleasedConfig()
    fine = UPSCALE * size
    released = ReleasedFlowRefiner(
        cfg.sr_dim, cfg.sr_heads, cfg.sr_windows, rounds=cfg.sr_rounds, hidden=cfg.sr_hidden, reduction=cfg.channel_reduction
    ).eval()
    described = DualWindowFlowSR(DESCRIBED_DIM).eval()
    flow_up, guidance = torch.randn(paths, 2, fine, fine), torch.randn(1, cfg.guidance_dim, fine, fine)
    coarse, features = torch.randn(paths, 2, size, size), torch.randn(1, DESCRIBED_DIM, size, size)
    rows = []
    for name, module, call in (
        ("released refiner", released, lambda: released(flow_up, guidance)),
        ("dual-window SR", described, lambda: described(coarse, features)),
    ):
        for chunk in (0, 1):
            module.chunk = chunk
            with torch.inference_mode():
                call()  # first-call allocations
                reset_peak()
                before = rss_mb()
                call()
                peak = peak_mb() - before
                seconds = thread_seconds(call, min_run_time=min_run_time)
            rows.append({"module": name, "chunk": chunk, "seconds": seconds, "peak_mb": peak})
    return rows


def main(out: str, *, min_run_time: float = 0.5, small: bool = False) -> str:
    """Run both micro-benchmarks with one thread, print and write the tables (``small``: tiny sizes)."""
    torch.set_num_threads(1)
    window_sizes = dict(flows=1, size=16, channels=16, heads=2) if small else {}
    chunk_sizes = dict(paths=2, size=4) if small else {}
    lines = [
        f"one thread, CPU seconds of the thread (Timer blocked_autorange median); load average {os.getloadavg()[0]:.2f}",
        "",
        "| window | tokens | fused kernel (ms) | explicit softmax (ms) |",
        "|---|---|---|---|",
    ]
    for row in window_attention_timings(**window_sizes, min_run_time=min_run_time):
        lines.append(
            f"| {row['window']}×{row['window']} | {row['tokens']} | {1e3 * row['fused_s']:.1f} | {1e3 * row['explicit_s']:.1f} |"
        )
    lines += [
        "",
        "| module (6 paths, 64 × 64) | paths per call | time (ms) | peak RSS above the start (MiB) |",
        "|---|---|---|---|",
    ]
    for row in refiner_chunk_timings(**chunk_sizes, min_run_time=min_run_time):
        chunk = "all" if row["chunk"] == 0 else str(row["chunk"])
        lines.append(f"| {row['module']} | {chunk} | {1e3 * row['seconds']:.0f} | {row['peak_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "micro.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/micro", help="output folder (default: %(default)s)")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="Timer seconds per measurement (default: %(default)s)")
    parser.add_argument("--small", action="store_true", help="tiny sizes: a dry run of the script")
    args = parser.parse_args()
    main(args.out, min_run_time=args.min_run_time, small=args.small)
