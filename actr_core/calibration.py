"""Calibrated match confidence: a monotone map from the relative cycle error to P(match is correct).

Axis legend: b batch · n keypoints · 2 (x, y) · h w flow grid · m matches pooled over pairs.

The cycle error of a match sends its source point into the target with the forward flow and back
with the backward flow; the distance to where it started, in source-image pixels, is the cycle
error, and divided by the source image's longer side it is the **relative cycle error** — the same
``d = max(height, width)`` that PCK's image threshold uses, so a relative error is read on the
scale of α. It ranks matches well but says nothing about probability by itself. A
:class:`ConfidenceCalibration` turns it into one: a logistic curve in the log relative error,

    P(correct at α) = σ(a + b · log(max(e_rel, ε))),   b < 0,

fitted by maximum likelihood (Newton's method, numpy only) on the validation split of a shard set,
where correctness is the library's PCK rule (:func:`actr_core.metrics.pck_per_keypoint`, standard
protocol). It is stored as a few numbers in ``calibration.json`` beside the checkpoint, where
:meth:`actr_core.Matcher.from_checkpoint` finds it.
"""

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from actr_core.flow import sample_flow, transfer_keypoints

__all__ = [
    "CALIBRATION_FILE",
    "CalibrationError",
    "ConfidenceCalibration",
    "calibration_scores",
    "collect_cycle_errors",
    "cycle_displacement",
    "fit_calibration",
    "relative_cycle_error",
]

CALIBRATION_FILE = "calibration.json"  # beside a checkpoint; read by Matcher.from_checkpoint
EPS = 1e-6  # floor of the relative cycle error before the log (a millionth of the image side)
_RIDGE = 1e-6  # L2 penalty of the Newton fit: keeps it finite when the classes separate perfectly


class CalibrationError(ValueError):
    """The matches cannot be calibrated: too few of one kind, or a cycle error that does not rank them."""


def cycle_displacement(
    flow_st: Float[Tensor, "b 2 h w"], flow_ts: Float[Tensor, "b 2 h w"], points: Float[Tensor, "b n 2"]
) -> Float[Tensor, "b n 2"]:
    """Source grid points → target (forward flow) → source (backward flow), minus where they started.

    Convention:
        All in flow-grid cells, pixel centres at integers; both flows are sampled bilinearly at
        sub-cell positions (:func:`actr_core.flow.transfer_keypoints`, :func:`actr_core.flow.sample_flow`).
    """
    there = transfer_keypoints(flow_st, points)
    return there + sample_flow(flow_ts, there) - points


def relative_cycle_error(
    displacement: Float[Tensor, "b n 2"], grid_size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[Float[Tensor, "b n"], Float[Tensor, "b n"]]:
    """Cycle displacement in grid cells → ``(error in image pixels, error / max(image H, W))``.

    Each axis is scaled by its own cell size (``W/w`` for x, ``H/h`` for y), so an image resized
    unequally along its axes gets its error in its own pixels.
    """
    (gh, gw), (h, w) = grid_size, image_size
    cell = displacement.new_tensor([w / gw, h / gh])
    pixels = (displacement * cell).norm(dim=-1)
    return pixels, pixels / max(h, w)


@dataclasses.dataclass(frozen=True)
class ConfidenceCalibration:
    """``P(correct at α) = σ(intercept + slope · log(max(relative cycle error, 1e-6)))``.

    Attributes:
        intercept, slope: the logistic curve (``slope < 0``: a larger cycle error, a lower confidence).
        alpha: the PCK tolerance that defined a correct match when fitting.
        fitted_on: where the fitting matches came from (e.g. ``"shards/synthetic split val"``).
        n_matches: how many matches it was fitted on.
    """

    intercept: float
    slope: float
    alpha: float
    fitted_on: str = ""
    n_matches: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.intercept) and math.isfinite(self.slope) and self.slope < 0):
            raise ValueError(f"a calibration needs a finite intercept and a negative slope, got {self.intercept}, {self.slope}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")

    def __call__(self, relative_error: Float[Tensor, "*m"]) -> Float[Tensor, "*m"]:
        """Confidence in (0, 1) of each relative cycle error (NaN stays NaN)."""
        logit = self.intercept + self.slope * relative_error.double().clamp_min(EPS).log()
        return torch.sigmoid(logit).to(relative_error.dtype)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the numbers as JSON (temporary name, then rename: never half a file)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConfidenceCalibration":
        """Read a file written by :meth:`save`; a damaged one is a one-line ``ValueError`` naming it."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (json.JSONDecodeError, TypeError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: not a confidence calibration ({err})") from None


def fit_calibration(
    relative_error: Float[np.ndarray, " m"], correct: Bool[np.ndarray, " m"], *, alpha: float, fitted_on: str = ""
) -> ConfidenceCalibration:
    """Fit :class:`ConfidenceCalibration` by maximum likelihood (Newton's method on the logistic loss).

    Args:
        relative_error: ``(m,)`` relative cycle errors of the matches (finite, ≥ 0).
        correct: ``(m,)`` bool, whether each match is correct at ``alpha``.
        alpha: the PCK tolerance behind ``correct`` (recorded).
        fitted_on: a note on the data (recorded).

    Raises:
        CalibrationError: fewer than two matches of each kind, or a fit in which a larger cycle error
            does not mean a lower confidence (the cycle error does not rank this model's matches).
    """
    e = np.asarray(relative_error, dtype=np.float64).ravel()
    y = np.asarray(correct, dtype=bool).ravel()
    if e.shape != y.shape or not np.isfinite(e).all() or (e < 0).any():
        raise ValueError(f"relative_error must be finite and >= 0, one per match; got {e.shape} for {y.shape} labels")
    if min(y.sum(), (~y).sum()) < 2:
        raise CalibrationError(f"fitting needs at least 2 correct and 2 wrong matches, got {int(y.sum())} and {int((~y).sum())}")
    x = np.log(np.maximum(e, EPS))
    design = np.stack([np.ones_like(x), (x - x.mean()) / max(x.std(), EPS)], 1)  # standardised for conditioning
    theta = np.zeros(2)
    for _ in range(100):
        p = 0.5 * (1.0 + np.tanh(0.5 * (design @ theta)))  # the logistic function, without overflow
        grad = design.T @ (p - y) + _RIDGE * theta
        hess = (design * (p * (1 - p))[:, None]).T @ design + _RIDGE * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    slope = theta[1] / max(x.std(), EPS)
    intercept = theta[0] - slope * x.mean()
    if not slope < 0:
        raise CalibrationError(f"the cycle error does not rank these matches (fitted slope {slope:.3g} >= 0); no calibration")
    return ConfidenceCalibration(float(intercept), float(slope), float(alpha), fitted_on, int(e.size))


def calibration_scores(
    confidence: Float[np.ndarray, " m"], correct: Bool[np.ndarray, " m"], threshold: float = 0.5
) -> dict[str, float]:
    """How well ``confidence`` separates correct from wrong matches.

    Returns ``precision`` (correct among confidence > threshold), ``recall`` (of all correct
    matches, those above it), ``auc`` (probability that a random correct match outranks a random
    wrong one, ties counting half), ``selected``, ``matches`` and ``correct_rate``. Precision is NaN
    when nothing is selected; AUC is NaN with only one kind of match.
    """
    c = np.asarray(confidence, dtype=np.float64).ravel()
    y = np.asarray(correct, dtype=bool).ravel()
    chosen = c > threshold
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    ranks = _average_ranks(c)
    auc = (ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg) if n_pos and n_neg else float("nan")
    return {
        "precision": float((chosen & y).sum() / chosen.sum()) if chosen.any() else float("nan"),
        "recall": float((chosen & y).sum() / n_pos) if n_pos else float("nan"),
        "auc": float(auc),
        "selected": int(chosen.sum()),
        "matches": int(y.size),
        "correct_rate": float(y.mean()) if y.size else float("nan"),
    }


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (Mann–Whitney U)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


@torch.no_grad()
def collect_cycle_errors(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    alpha: float = 0.1,
    protocol: str = "standard",
    device: torch.device | str = "cpu",
) -> tuple[Float[np.ndarray, " m"], Bool[np.ndarray, " m"]]:
    """Every valid keypoint of ``batches``: its relative cycle error and whether it is correct at ``alpha``.

    ``model`` runs each pair both ways; the forward flow's keypoints are scored with the library's
    PCK rule under ``protocol`` (as :func:`actr_core.metrics.evaluate` scores them), and the
    relative cycle error is measured at the source keypoints in the model's input frame.
    """
    from actr_core.data.pipeline import prepare_batch
    from actr_core.flow import rescale_keypoints
    from actr_core.metrics import get_protocol, pck_per_keypoint
    from actr_core.metrics.protocols import ground_truth_keypoints, pair_thresholds, predict_keypoints

    scoring = get_protocol(protocol)
    model.eval()
    errors, labels = [], []
    for raw in batches:
        batch = prepare_batch(raw, device)
        src, trg, valid = batch["src_image"], batch["trg_image"], batch["valid_kps"]
        forward = model(src, trg)
        flow_st, flow_ts = forward.flow.float(), model(trg, src).flow.float()
        pred = predict_keypoints(scoring, model, forward, batch)
        gt = ground_truth_keypoints(scoring, batch)
        threshold, _ = pair_thresholds(scoring, batch)
        correct = pck_per_keypoint(pred.to(gt.dtype), gt, threshold.to(gt.dtype), alpha, valid).correct
        input_size = (int(src.shape[-2]), int(src.shape[-1]))
        grid = (int(flow_st.shape[-2]), int(flow_st.shape[-1]))
        on_grid = rescale_keypoints(batch["src_kps"].float(), input_size, grid)
        _, relative = relative_cycle_error(cycle_displacement(flow_st, flow_ts, on_grid), grid, input_size)
        errors.append(relative[valid].cpu().numpy())
        labels.append(correct[valid].cpu().numpy())
    if not errors:
        raise ValueError("no batches to collect cycle errors from")
    return np.concatenate(errors), np.concatenate(labels)
