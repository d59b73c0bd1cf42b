"""The machine's dense matrix-product rate: the yardstick for achieved FLOP/s.

# n matrix side

One square ``n × n`` by ``n × n`` product costs ``2 n³`` FLOPs; :func:`matmul_seconds` times one
(after the caller's warm-up), :func:`matmul_rate` the best of several in GFLOP/s. The rate is
measured with the same thread count as the model in the same process, interleaved with the
model's timings by the benchmark, so both see the same load.
"""

import time

import torch

__all__ = ["MATMUL_SIDE", "matmul_flops", "matmul_rate", "matmul_seconds"]

MATMUL_SIDE = 2048  # large enough for the BLAS to reach its steady rate, small enough for ~0.1 s on 2 cores


def matmul_flops(n: int = MATMUL_SIDE) -> int:
    """FLOPs of one ``n × n`` product (``2 n³``: a multiply and an add per term)."""
    return 2 * n**3


def _operands(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=generator).to(dtype)
    b = torch.randn(n, n, generator=generator).to(dtype)
    return a, b


def matmul_seconds(dtype: torch.dtype = torch.float32, n: int = MATMUL_SIDE, *, operands=None) -> float:
    """Wall seconds of one ``n × n`` product in ``dtype`` on CPU (operands made outside the timing)."""
    a, b = operands if operands is not None else _operands(n, dtype)
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = MATMUL_SIDE, *, repeats: int = 5, warmup: int = 1) -> float:
    """Dense product rate in GFLOP/s: ``2 n³`` over the fastest of ``repeats`` timed products."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats = {repeats}, warmup = {warmup}: expected repeats >= 1 and warmup >= 0")
    operands = _operands(n, dtype)
    for _ in range(warmup):
        matmul_seconds(dtype, n, operands=operands)
    best = min(matmul_seconds(dtype, n, operands=operands) for _ in range(repeats))
    return matmul_flops(n) / best / 1e9
