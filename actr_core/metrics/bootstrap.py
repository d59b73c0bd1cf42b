"""Paired bootstrap over pairs: confidence intervals for the difference between two predictors.

Axis legend: pair (scored pairs) · k statistics computed side by side (e.g. one per α).

Two predictors scored on the same pairs are compared pair by pair: resampling *pairs* with
replacement (the same draw for both predictors, hence "paired") keeps the correlation between
their scores, which is what makes small differences on a shared test set measurable. The
statistic is a ratio of sums over the resampled pairs, ``Σ wᵢ xᵢ / Σ wᵢ yᵢ`` (``wᵢ`` = times pair
``i`` was drawn): with ``x`` = difference of per-pair PCK and ``y`` = 1 it is the per-image PCK
difference; with ``x`` = difference of correct keypoints and ``y`` = valid keypoints it is the
per-keypoint one. The interval is the percentile interval of the resampled statistics.
"""

import numpy as np
from jaxtyping import Float

__all__ = ["BOOTSTRAP_LEVEL", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "paired_bootstrap"]

BOOTSTRAP_RESAMPLES = 2000  # resamples per interval (Efron & Tibshirani 1993: 1000-2000 for percentile intervals)
BOOTSTRAP_SEED = 0  # numpy Generator seed: the same draws for every comparison, α and run
BOOTSTRAP_LEVEL = 0.95  # two-sided coverage of the percentile interval
DRAWS_PER_CHUNK = 1 << 22  # resampled pair indices held in memory at once


def paired_bootstrap(
    numerator: Float[np.ndarray, "pair k"],
    denominator: Float[np.ndarray, " pair"],
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = BOOTSTRAP_LEVEL,
) -> tuple[Float[np.ndarray, " k"], Float[np.ndarray, " k"], Float[np.ndarray, " k"]]:
    """Observed ``Σ x / Σ y`` per column and its percentile bootstrap interval over pairs.

    Args:
        numerator: ``x`` per pair and statistic (e.g. the difference of two predictors' PCK).
        denominator: ``y`` per pair (> 0), shared by every column (1 for plain means).
        n_resamples: bootstrap resamples; each draws ``pair`` pairs with replacement.
        seed: seed of the ``numpy.random.default_rng`` drawing the pairs (deterministic results).
        level: coverage of the two-sided interval, in (0, 1).

    Returns:
        ``(observed, low, high)``, each ``(k,)``; NaN when there is no pair. When every pair has
        the same ratio ``x / y`` the interval has zero width (up to rounding).
    """
    if numerator.ndim != 2 or denominator.shape != numerator.shape[:1]:
        raise ValueError(f"numerator must be (pair, k) and denominator (pair,), got {numerator.shape} and {denominator.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n, k = numerator.shape
    if n == 0:
        nan = np.full(k, np.nan)
        return nan, nan.copy(), nan.copy()
    if not np.all(denominator > 0) or not np.all(np.isfinite(numerator)):
        raise ValueError("denominator must be > 0 and numerator finite for every pair (leave unscored pairs out)")
    x, y = numerator.astype(np.float64), denominator.astype(np.float64)
    observed = x.sum(axis=0) / y.sum()
    rng = np.random.default_rng(seed)
    stats = np.empty((n_resamples, k))
    chunk = max(1, DRAWS_PER_CHUNK // n)
    for start in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - start)
        draws = rng.integers(0, n, size=(m, n))
        rows = np.arange(m)[:, None] * n
        counts = np.bincount((rows + draws).ravel(), minlength=m * n).reshape(m, n).astype(np.float64)
        stats[start : start + m] = (counts @ x) / (counts @ y)[:, None]
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(stats, [tail, 100.0 - tail], axis=0)
    return observed, low, high
