"""The paired bootstrap: observed value inside its interval, seeded, zero width when nothing varies,
equal to a plain per-resample loop, and its error paths."""

import numpy as np
import pytest

from actr_core.metrics import paired_bootstrap


def _differences(n: int = 60, k: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 11, size=(n, k)) / 10.0  # per-pair PCK of two predictors, 10 keypoints each
    b = rng.integers(0, 11, size=(n, k)) / 10.0
    return a - b


def test_interval_contains_the_observed_mean_and_narrows_with_more_pairs():
    x = _differences()
    observed, low, high = paired_bootstrap(x, np.ones(len(x)))
    np.testing.assert_allclose(observed, x.mean(axis=0), rtol=0, atol=1e-12)
    assert np.all(low <= observed) and np.all(observed <= high) and np.all(low < high)
    wide = high - low
    x4 = np.concatenate([x] * 4)
    _, low4, high4 = paired_bootstrap(x4, np.ones(len(x4)))
    assert np.all(high4 - low4 < wide)  # four times the pairs: about half the width


def test_deterministic_for_a_seed():
    x = _differences()
    first = paired_bootstrap(x, np.ones(len(x)), seed=3)
    again = paired_bootstrap(x, np.ones(len(x)), seed=3)
    other = paired_bootstrap(x, np.ones(len(x)), seed=4)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("value", [0.3, -0.25, 1 / 7])
def test_zero_width_when_every_pair_has_the_same_difference(value):
    x = np.full((40, 2), value)
    observed, low, high = paired_bootstrap(x, np.ones(40))
    atol = 4 * np.finfo(np.float64).eps * 40 * abs(value)  # 40 float64 terms of this magnitude
    np.testing.assert_allclose(observed, value, rtol=0, atol=atol)
    np.testing.assert_allclose(high - low, 0.0, rtol=0, atol=atol)
    np.testing.assert_allclose(low, value, rtol=0, atol=atol)


def test_ratio_statistic_equals_a_plain_loop_over_resamples():
    """Reference path: the same draws, one resample at a time, sum(x) / sum(y) over the drawn pairs."""
    rng = np.random.default_rng(1)
    x = rng.integers(-5, 6, size=(25, 2)).astype(float)  # differences of correct keypoints
    y = rng.integers(1, 9, size=25).astype(float)  # valid keypoints
    observed, low, high = paired_bootstrap(x, y, n_resamples=300, seed=7, level=0.9)
    draws = np.random.default_rng(7).integers(0, 25, size=(300, 25))
    stats = np.stack([x[d].sum(axis=0) / y[d].sum() for d in draws])
    expected_low, expected_high = np.percentile(stats, [5.0, 95.0], axis=0)
    atol = 4 * np.finfo(np.float64).eps * 25 * np.abs(x).max()
    np.testing.assert_allclose(observed, x.sum(axis=0) / y.sum(), rtol=0, atol=atol)
    np.testing.assert_allclose(low, expected_low, rtol=0, atol=atol)
    np.testing.assert_allclose(high, expected_high, rtol=0, atol=atol)


def test_no_pairs_gives_nan_and_bad_inputs_raise(no_typecheck):
    observed, low, high = paired_bootstrap(np.zeros((0, 2)), np.zeros(0))
    assert np.isnan(observed).all() and np.isnan(low).all() and np.isnan(high).all()
    with pytest.raises(ValueError, match="numerator must be"):
        paired_bootstrap(np.zeros(5), np.ones(5))
    with pytest.raises(ValueError, match="denominator must be > 0"):
        paired_bootstrap(np.zeros((2, 1)), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(np.zeros((2, 1)), np.ones(2), level=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap(np.zeros((2, 1)), np.ones(2), n_resamples=0)
