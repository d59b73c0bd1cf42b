"""Percentage of correct keypoints (PCK@α).

Axis legend: b batch (pairs) · n keypoints · 2 (x, y), channel 0 = x.

A predicted keypoint is correct when its Euclidean distance to the ground truth is at most
α·d, with d the pair's threshold (see :mod:`actr_core.metrics.thresholds`); the comparison is
inclusive (``≤``), as in the released evaluators (``torch.le``). Invalid keypoints are never
counted: they are neither correct nor wrong, and their values (NaN padding included) are never
read. A pair with no valid keypoint has no PCK: it is NaN and every aggregation skips it.
"""

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["KeypointCorrectness", "keypoint_distances", "pck", "pck_per_keypoint"]


class KeypointCorrectness(NamedTuple):
    """Per-keypoint outcome of PCK@α: ``correct`` implies ``valid``; both ``(b, n)`` booleans."""

    correct: Bool[Tensor, "b n"]
    valid: Bool[Tensor, "b n"]


def _check_inputs(pred: Tensor, gt: Tensor, threshold: Tensor | None, valid: Tensor | None) -> Tensor:
    if pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"pred must have shape (b, n, 2), got {tuple(pred.shape)}")
    if tuple(gt.shape) != tuple(pred.shape):
        raise ValueError(f"gt has shape {tuple(gt.shape)} but pred has shape {tuple(pred.shape)}; they must match")
    if not pred.is_floating_point() or not gt.is_floating_point():
        raise ValueError(f"pred and gt must be floating point, got {pred.dtype} and {gt.dtype}")
    b, n = pred.shape[:2]
    if threshold is not None and tuple(threshold.shape) != (b,):
        raise ValueError(f"threshold must have shape (b,) = ({b},), got {tuple(threshold.shape)}")
    if valid is None:
        return torch.ones((b, n), dtype=torch.bool, device=pred.device)
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a boolean mask, got dtype {valid.dtype}")
    if tuple(valid.shape) != (b, n):
        raise ValueError(f"valid must have shape (b, n) = ({b}, {n}), got {tuple(valid.shape)}")
    return valid


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not alpha > 0.0:
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    return alpha


def keypoint_distances(
    pred: Float[Tensor, "b n 2"], gt: Float[Tensor, "b n 2"], valid: Bool[Tensor, "b n"] | None = None
) -> Float[Tensor, "b n"]:
    """Euclidean distance ``‖pred − gt‖₂`` per keypoint; NaN where ``valid`` is False.

    Uses ``hypot`` so that exactly representable cases stay exact (3-4-5 gives 5).
    """
    valid = _check_inputs(pred, gt, None, valid)
    mask = valid.unsqueeze(-1)
    diff = torch.where(mask, pred, torch.zeros_like(pred)) - torch.where(mask, gt, torch.zeros_like(gt))
    dist = torch.hypot(diff[..., 0], diff[..., 1])
    return torch.where(valid, dist, torch.full_like(dist, float("nan")))


def pck_per_keypoint(
    pred: Float[Tensor, "b n 2"],
    gt: Float[Tensor, "b n 2"],
    threshold: Float[Tensor, " b"],
    alpha: float,
    valid: Bool[Tensor, "b n"] | None = None,
) -> KeypointCorrectness:
    """Per-keypoint correctness of PCK@α: ``valid & (‖pred − gt‖₂ ≤ α · threshold)``.

    Args:
        pred: predicted keypoints, pixels of the frame where the error is measured.
        gt: ground-truth keypoints, same frame.
        threshold: ``d`` per pair, same frame (bbox / img / bkp, see :mod:`.thresholds`).
        alpha: the PCK tolerance, > 0.
        valid: which keypoints count; all of them when None.

    Returns:
        ``KeypointCorrectness(correct, valid)``. A valid keypoint whose prediction is not finite
        is counted as wrong.

    Convention:
        The boundary counts: a distance of exactly α·d is correct (``≤``), as in the released
        CATs/ACTR/DHPF evaluators; some others use ``<``.
    """
    valid = _check_inputs(pred, gt, threshold, valid)
    alpha = _check_alpha(alpha)
    dist = keypoint_distances(pred, gt, valid)
    radius = (alpha * threshold).unsqueeze(-1)
    correct = valid & (dist <= radius)  # NaN distances compare False
    return KeypointCorrectness(correct=correct, valid=valid)


def pck(
    pred: Float[Tensor, "b n 2"],
    gt: Float[Tensor, "b n 2"],
    threshold: Float[Tensor, " b"],
    alpha: float,
    valid: Bool[Tensor, "b n"] | None = None,
) -> Float[Tensor, " b"]:
    """PCK@α per pair: the fraction of the pair's valid keypoints that are correct.

    Returns a ``(b,)`` float tensor in [0, 1]; NaN for a pair with no valid keypoint (such a
    pair is excluded from means, never counted as 0 or 1). See :func:`pck_per_keypoint` for the
    rule and the arguments.
    """
    correct, valid = pck_per_keypoint(pred, gt, threshold, alpha, valid)
    n_valid = valid.sum(dim=1)
    n_correct = correct.sum(dim=1)
    fraction = n_correct.to(pred.dtype) / n_valid.clamp(min=1).to(pred.dtype)
    return torch.where(n_valid > 0, fraction, torch.full_like(fraction, float("nan")))
