"""Tolerances for float32 comparisons, derived from the magnitudes compared (imported as ``tolerances``).

The float32 results of two CPUs, or of two ATen vector paths on one CPU, differ in the last bits:
a reduction may add its terms in another order, a kernel may fuse a multiply and an add. A test
that compares float32 values therefore allows the rounding error those differences can make, and
no more (docs/conventions.md, "Testing: floating-point tolerances")::

    atol = 4 · ε · terms · scale        (rtol = 0)

- ``ε = 2⁻²³`` is float32's machine epsilon; one rounding is off by at most ``ε/2`` relative.
- ``terms`` is the number of terms summed into each compared value (the reduction length), added
  up over successive reductions when one feeds the next (a 3×3 convolution over 4 channels then
  a 1×1 convolution over 8: ``36 + 8``); elementwise steps count one each.
- ``scale`` is the magnitude of the values involved: the largest absolute value of ``reference``.

Summing ``n`` terms in float32 errs by at most ``(n - 1)·ε/2·Σ|terms|``; two float32 paths err
independently, so they differ by at most ``n·ε·Σ|terms|``. The factor 4 covers the products'
own roundings and transcendental functions (exp, sqrt: a few ulp each) and intermediates
somewhat larger than the result (and the √n-fold cancellation of random-sign terms). Where the
terms cancel so far that the result is much smaller than they are (a difference of near-equal
values, a sum compared near zero), pass a reference of the terms' magnitude, not of the result.
"""

import math

import numpy as np
import torch

EPS32 = float(torch.finfo(torch.float32).eps)
ULPS = 4.0


def float32_tolerance(reference, *, terms: int) -> float:
    """Absolute tolerance ``4 · ε₃₂ · terms · max|reference|`` for a float32 comparison.

    ``reference``: a tensor, array or number whose largest absolute value (NaN ignored) is the
    magnitude of the compared values. ``terms``: the number of terms summed into each compared
    value, added up over chained reductions (at least 1). Use it with ``rtol=0``.
    """
    if terms < 1:
        raise ValueError(f"terms = {terms}: expected at least 1")
    if isinstance(reference, torch.Tensor):
        reference = reference.detach().to("cpu", torch.float64).numpy()
    values = np.abs(np.asarray(reference, dtype=np.float64))
    scale = float(np.nanmax(values)) if values.size and not np.isnan(values).all() else 0.0
    if not math.isfinite(scale):
        raise ValueError("reference has an infinite value: no finite tolerance")
    return ULPS * EPS32 * terms * scale
