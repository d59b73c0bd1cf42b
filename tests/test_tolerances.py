"""The float32 tolerance rule of the test suite (tests/tolerances.py)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import EPS32, float32_tolerance


def test_float32_tolerance_formula():
    assert EPS32 == 2.0**-23
    assert float32_tolerance(torch.tensor([-3.0, 2.0]), terms=5) == 4 * 2.0**-23 * 5 * 3.0
    assert float32_tolerance(np.array([1.0, np.nan, -0.5]), terms=1) == 4 * 2.0**-23
    assert float32_tolerance(2.0, terms=10) == float32_tolerance(torch.tensor(-2.0, dtype=torch.float64), terms=10)
    assert float32_tolerance(torch.zeros(3), terms=7) == 0.0
    with pytest.raises(ValueError, match="terms = 0"):
        float32_tolerance(1.0, terms=0)
    with pytest.raises(ValueError, match="infinite"):
        float32_tolerance(float("inf"), terms=1)


def _float32_sums(x: np.ndarray) -> list[float]:
    """The same sum in float32 along several orders and kernels."""
    x32 = x.astype(np.float32)
    forward = np.float32(0.0)
    for v in x32:
        forward = np.float32(forward + v)
    backward = np.float32(0.0)
    for v in x32[::-1]:
        backward = np.float32(backward + v)
    return [float(forward), float(backward), float(x32.sum()), torch.from_numpy(x32).sum().item()]


@given(n=st.integers(1, 4096), seed=st.integers(0, 2**32 - 1))
def test_float32_tolerance_bounds_reordered_sums(n, seed):
    """Sums of n terms in any order, in float32, agree with each other and with the float64 sum
    within the tolerance for ``terms=n`` (scale: the sum when the terms share a sign, else Σ|terms|)."""
    rng = np.random.default_rng(seed)
    positive = rng.uniform(0.0, 10.0, n)
    signed = rng.standard_normal(n)
    for x, magnitude in ((positive, positive.sum()), (signed, np.abs(signed).sum())):
        sums = _float32_sums(x)
        exact = x.astype(np.float32).astype(np.float64).sum()
        tol = float32_tolerance(magnitude, terms=n)
        assert max(abs(s - exact) for s in sums) <= tol / 2
        assert max(sums) - min(sums) <= tol


@pytest.mark.parametrize("n", [2, 16, 256, 1024])
def test_float32_tolerance_catches_a_dropped_term(n):
    """For the reduction lengths of this suite (up to about a thousand terms), leaving out one
    term of a positive sum is an error larger than the tolerance."""
    x = np.random.default_rng(n).uniform(0.5, 1.5, n).astype(np.float32)
    full, dropped = float(x.sum(dtype=np.float64)), float(x[1:].sum())
    assert abs(full - dropped) > float32_tolerance(full, terms=n)
