"""Calibrated match confidence: a monotone map from a match's measures of doubt to P(match is correct).

Axis legend: b batch · n keypoints · 2 (x, y) · h w flow grid · hs ws / ht wt source / target token
grid · m paths (in the correlation) or matches pooled over pairs (in the fit).

Four model-agnostic measures of how far a match can be trusted, each ≥ 0 and larger when the
match is more doubtful:

* **cycle**: the source point is sent into the target with the forward flow and back with the
  backward flow; the distance to where it started (:func:`cycle_displacement`);
* **flip**: the pair is matched once more with both images mirrored left–right; the distance between
  the two predicted target points, the mirrored one mapped back (:func:`flip_displacement`);
* **spread**: how widely the correlation row of the source point's token spreads over the target
  (:func:`correlation_spread`: 1 when all of it sits on one target cell); only for a model whose
  output carries ``correlations``;
* **flatness**: how little the source image varies around the point (:func:`image_flatness`: the
  inverse of the grey level's local standard deviation), where nothing can be matched well.

Cycle and flip are measured in source-image pixels and, divided by the source image's longer
side, as **relative errors** — the same ``d = max(height, width)`` that PCK's image threshold uses,
so they are read on the scale of α. The measures rank matches but say nothing about probability
by themselves. A :class:`ConfidenceCalibration` turns them into one: a logistic model in their
logarithms,

    P(correct at α) = σ(a + Σ_k b_k · log(max(e_k, ε))),   every b_k < 0,

fitted by maximum likelihood (Newton's method, numpy only) on the validation split of a shard set,
where correctness is the library's PCK rule (:func:`actr_core.metrics.pck_per_keypoint`, standard
protocol). A measure whose fitted slope is not negative (it does not add to the others on these
matches) is left out and the rest refitted, so more doubt never raises the confidence. The result
is stored as a few numbers in ``calibration.json`` beside the checkpoint, where
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
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from actr_core.batch import PairBatch
from actr_core.flow import FLOW_STRIDE, rescale_keypoints, sample_flow, sample_map, transfer_keypoints

__all__ = [
    "CALIBRATION_FILE",
    "FEATURES",
    "FEATURE_DESCRIPTIONS",
    "CalibrationError",
    "ConfidenceCalibration",
    "calibration_scores",
    "collect_match_features",
    "correlation_spread",
    "cycle_displacement",
    "displacement_error",
    "fit_calibration",
    "flip_displacement",
    "image_flatness",
    "match_measures",
    "mirror_flow",
]

CALIBRATION_FILE = "calibration.json"  # beside a checkpoint; read by Matcher.from_checkpoint
FEATURES: tuple[str, ...] = ("cycle", "flip", "spread", "flatness")  # the measures, in the order they are fitted
FEATURE_DESCRIPTIONS = {  # for reports: each measure in a few words
    "cycle": "relative cycle error (to the target by the forward flow and back by the backward flow)",
    "flip": "relative flip error (how far the match moves when both images are mirrored left–right)",
    "spread": "correlation spread (how widely the model's correlation at the point spreads over the target)",
    "flatness": "source flatness (how uniform the source image is around the point)",
}
EPS = 1e-6  # floor of a measure before the log (for cycle and flip: a millionth of the image side)
FLATNESS_WINDOW = 4 * FLOW_STRIDE - 1  # side of the window of image_flatness, in model-input pixels (4 flow cells)
FLATNESS_FLOOR = 0.01  # added to the local standard deviation: a uniform patch is very flat, not infinitely
_RIDGE = 1e-6  # L2 penalty of the Newton fit: keeps it finite when the classes separate perfectly


class CalibrationError(ValueError):
    """The matches cannot be calibrated: too few of one kind, or no measure that ranks them."""


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


def mirror_flow(flow: Float[Tensor, "b 2 h w"]) -> Float[Tensor, "b 2 h w"]:
    """The flow of the left–right mirrored pair, expressed on the unmirrored grid (an involution).

    Convention:
        Mirroring an image of width W maps pixel x to W − 1 − x (pixel centres at integers); on the
        flow grid of width w = W/4 that is cell x to w − 1 − x, so the grid is reversed along x and
        the x component changes sign.
    """
    return torch.cat([-flow[:, :1], flow[:, 1:]], dim=1).flip(-1)


def flip_displacement(
    flow_st: Float[Tensor, "b 2 h w"], flow_st_mirrored: Float[Tensor, "b 2 h w"], points: Float[Tensor, "b n 2"]
) -> Float[Tensor, "b n 2"]:
    """Where ``flow_st`` sends each point minus where the mirrored pair's flow sends it (grid cells).

    ``flow_st_mirrored`` is the model's flow for both images mirrored left–right, as it came out of
    the model (:func:`mirror_flow` maps it back here).
    """
    return sample_flow(flow_st, points) - sample_flow(mirror_flow(flow_st_mirrored), points)


def displacement_error(
    displacement: Float[Tensor, "b n 2"], grid_size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[Float[Tensor, "b n"], Float[Tensor, "b n"]]:
    """A displacement in grid cells (cycle or flip) → ``(length in image pixels, length / max(image H, W))``.

    Each axis is scaled by its own cell size (``W/w`` for x, ``H/h`` for y), so an image resized
    unequally along its axes gets its error in its own pixels.
    """
    (gh, gw), (h, w) = grid_size, image_size
    cell = displacement.new_tensor([w / gw, h / gh])
    pixels = (displacement * cell).norm(dim=-1)
    return pixels, pixels / max(h, w)


def correlation_spread(correlations: Float[Tensor, "b m hs ws ht wt"]) -> Float[Tensor, "b hs ws"]:
    """How widely each source token's correlation row spreads over the target grid.

    Each row is shifted to a minimum of 0 (attention rows, already ≥ 0, barely move; a dot-product
    correlation becomes a mass); its largest cell's share of the row's mass is averaged over the
    paths, and the spread is its inverse: 1 when every path puts all of it on one target cell,
    ``ht · wt`` when the rows are flat. No temperature: the model's soft-argmax is not involved.
    """
    rows = correlations.flatten(-2).to(torch.promote_types(correlations.dtype, torch.float32))
    rows = rows - rows.amin(-1, keepdim=True)
    total, peak = rows.sum(-1), rows.amax(-1)
    share = torch.where(peak > 0, peak / total.clamp_min(torch.finfo(rows.dtype).tiny), 1.0 / rows.shape[-1])
    return 1.0 / share.mean(1)


def image_flatness(image: Float[Tensor, "b 3 H W"], window: int = FLATNESS_WINDOW) -> Float[Tensor, "b H W"]:
    """``1 / (σ + 0.01)``: σ the standard deviation of the grey level (channel mean of the
    ImageNet-normalised model input) in a ``window`` × ``window`` square around each pixel (odd;
    15 px by default, four flow cells; clipped at the border). Large where there is nothing to match.
    Computed in float64 (a device without it, such as Apple's MPS, gives the image on the CPU)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number of pixels, got {window}")
    grey = image.double().mean(1, keepdim=True)  # float64: E[g²] − E[g]² of a uniform patch stays ~0
    grey = grey - grey.mean((2, 3), keepdim=True)
    mean, mean_sq = (F.avg_pool2d(v, window, 1, window // 2, count_include_pad=False) for v in (grey, grey.square()))
    flatness = 1.0 / ((mean_sq - mean.square()).clamp_min(0).sqrt() + FLATNESS_FLOOR)[:, 0]
    return flatness.to(torch.promote_types(image.dtype, torch.float32))


def match_measures(
    flow_st: Float[Tensor, "b 2 h w"],
    flow_ts: Float[Tensor, "b 2 h w"],
    points: Float[Tensor, "b n 2"],
    image_size: tuple[int, int],
    *,
    mirrored: Float[Tensor, "b 2 h w"] | None = None,
    spread: Float[Tensor, "b hs ws"] | None = None,
    flatness: Float[Tensor, "b H W"] | None = None,
) -> dict[str, Float[Tensor, "b n"]]:
    """The measures of :data:`FEATURES` at ``points`` (flow-grid cells) that the inputs allow.

    ``cycle`` always; ``flip`` with the mirrored pair's flow; ``spread`` and ``flatness`` with their
    maps (:func:`correlation_spread` on the token grid, :func:`image_flatness` on the model input),
    sampled where the points fall on them. Cycle and flip are relative to ``max(image_size)``, the
    frame the points' image is measured in.
    """
    grid = (int(flow_st.shape[-2]), int(flow_st.shape[-1]))
    measures = {"cycle": displacement_error(cycle_displacement(flow_st, flow_ts, points), grid, image_size)[1]}
    if mirrored is not None:
        measures["flip"] = displacement_error(flip_displacement(flow_st, mirrored, points), grid, image_size)[1]
    for name, values in (("spread", spread), ("flatness", flatness)):
        if values is not None:
            frame = (int(values.shape[-2]), int(values.shape[-1]))
            measures[name] = sample_map(values[:, None], rescale_keypoints(points, grid, frame))[..., 0]
    return measures


@dataclasses.dataclass(frozen=True)
class ConfidenceCalibration:
    """``P(correct at α) = σ(intercept + Σ_k slopes[k] · log(max(measure features[k], 1e-6)))``.

    Attributes:
        intercept, slopes: the logistic model, one slope per feature, each negative (more doubt, a
            lower confidence).
        alpha: the PCK tolerance that defined a correct match when fitting.
        features: the measures it reads, names from :data:`FEATURES` (``"cycle"``, ``"flip"``,
            ``"spread"``, ``"flatness"``; :func:`match_measures`).
        fitted_on: where the fitting matches came from (e.g. ``"shards/synthetic split val"``).
        n_matches: how many matches it was fitted on.
    """

    intercept: float
    slopes: tuple[float, ...]
    alpha: float
    features: tuple[str, ...] = ("cycle",)
    fitted_on: str = ""
    n_matches: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "slopes", tuple(float(v) for v in self.slopes))
        object.__setattr__(self, "features", tuple(self.features))
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown or len(set(self.features)) != len(self.features) or len(self.slopes) != len(self.features):
            raise ValueError(
                f"a calibration needs one slope per distinct feature of {FEATURES}, got {self.features}, {self.slopes}"
            )
        if not (math.isfinite(self.intercept) and all(math.isfinite(v) and v < 0 for v in self.slopes)):
            raise ValueError(f"a calibration needs a finite intercept and negative slopes, got {self.intercept}, {self.slopes}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")

    def __call__(self, **measures: Float[Tensor, "*m"]) -> Float[Tensor, "*m"]:
        """Confidence in (0, 1) from each feature's measure (``cycle=..., flip=...``; NaN stays NaN;
        measures it does not read are ignored)."""
        missing = [name for name in self.features if name not in measures]
        if missing:
            raise ValueError(f"this calibration reads {self.features}; missing {missing}")
        first = measures[self.features[0]]
        logit = torch.full_like(first, self.intercept, dtype=torch.float64)
        for name, slope in zip(self.features, self.slopes, strict=True):
            logit = logit + slope * measures[name].double().clamp_min(EPS).log()
        return torch.sigmoid(logit).to(first.dtype)

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
            if "slope" in data and "slopes" not in data:  # the one-feature form of earlier 0.2.0 builds
                data.update(slopes=[data.pop("slope")], features=["cycle"])
            fields: dict[str, Any] = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
            fields.update({k: tuple(v) for k, v in fields.items() if isinstance(v, list)})  # JSON has lists
            return cls(**fields)
        except (json.JSONDecodeError, TypeError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: not a confidence calibration ({err})") from None


def fit_calibration(
    measures: Mapping[str, Float[np.ndarray, " m"]],
    correct: Bool[np.ndarray, " m"],
    *,
    alpha: float,
    fitted_on: str = "",
) -> ConfidenceCalibration:
    """Fit :class:`ConfidenceCalibration` by maximum likelihood (Newton's method on the logistic loss).

    Args:
        measures: feature name (of :data:`FEATURES`) → ``(m,)`` measures of the matches (finite,
            ≥ 0; :func:`match_measures`); every feature given is tried.
        correct: ``(m,)`` bool, whether each match is correct at ``alpha``.
        alpha: the PCK tolerance behind ``correct`` (recorded).
        fitted_on: a note on the data (recorded).

    A feature whose slope comes out ≥ 0 is dropped (the one with the largest slope first) and the
    rest refitted, until every slope is negative.

    Raises:
        CalibrationError: fewer than two matches of each kind, or no feature in which a larger
            measure means a lower confidence (nothing ranks this model's matches).
    """
    y = np.asarray(correct, dtype=bool).ravel()
    names = [name for name in FEATURES if name in measures]
    if not names or set(measures) - set(FEATURES):
        raise ValueError(f"measures must map names of {FEATURES} to arrays, got {sorted(measures)}")
    logs = {}
    for name in names:
        e = np.asarray(measures[name], dtype=np.float64).ravel()
        if e.shape != y.shape or not np.isfinite(e).all() or (e < 0).any():
            raise ValueError(f"{name} measures must be finite and >= 0, one per match; got {e.shape} for {y.shape} labels")
        logs[name] = np.log(np.maximum(e, EPS))
    if min(y.sum(), (~y).sum()) < 2:
        raise CalibrationError(f"fitting needs at least 2 correct and 2 wrong matches, got {int(y.sum())} and {int((~y).sum())}")
    while names:
        intercept, slopes = _logistic_fit(np.stack([logs[name] for name in names], 1), y)
        if (slopes < 0).all():
            return ConfidenceCalibration(intercept, tuple(slopes), float(alpha), tuple(names), fitted_on, int(y.size))
        names.pop(int(np.argmax(slopes)))
    raise CalibrationError("no measure ranks these matches (every fitted slope >= 0); no calibration")


def _logistic_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Maximum-likelihood logistic regression of ``y`` on the columns of ``x``: (intercept, slopes)."""
    mean, std = x.mean(0), np.maximum(x.std(0), EPS)
    design = np.concatenate([np.ones((len(x), 1)), (x - mean) / std], 1)  # standardised for conditioning
    theta = np.zeros(design.shape[1])
    for _ in range(100):
        p = 0.5 * (1.0 + np.tanh(0.5 * (design @ theta)))  # the logistic function, without overflow
        grad = design.T @ (p - y) + _RIDGE * theta
        hess = (design * (p * (1 - p))[:, None]).T @ design + _RIDGE * np.eye(len(theta))
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    slopes = theta[1:] / std
    return float(theta[0] - slopes @ mean), slopes


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
def collect_match_features(
    model: nn.Module,
    batches: Iterable[PairBatch],
    *,
    alpha: float = 0.1,
    protocol: str = "standard",
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Float[np.ndarray, " m"]], Bool[np.ndarray, " m"]]:
    """Every valid keypoint of ``batches``: its measures and whether it is correct at ``alpha``.

    ``model`` runs each pair forward, then backward and mirrored (one call on those two stacked); the
    forward output's keypoints are scored with the library's PCK rule under ``protocol`` (as
    :func:`actr_core.metrics.evaluate` scores them), and the measures of :data:`FEATURES` that the
    model allows (``spread`` needs its ``correlations``) are taken at the source keypoints in the
    model's input frame (:func:`match_measures`).
    """
    from actr_core.data.pipeline import prepare_batch
    from actr_core.metrics import get_protocol, pck_per_keypoint
    from actr_core.metrics.protocols import ground_truth_keypoints, pair_thresholds, predict_keypoints

    scoring = get_protocol(protocol)
    model.eval()
    collected: dict[str, list[np.ndarray]] = {}
    labels = []
    for raw in batches:
        batch = prepare_batch(raw, device)
        src, trg, valid = batch.src_image, batch.trg_image, batch.valid_kps
        b = src.shape[0]
        forward = model(src, trg)  # the model's own output type: its transfer may read more than the flow
        others = model(torch.cat([trg, src.flip(-1)]), torch.cat([src, trg.flip(-1)])).flow.float()
        pred = predict_keypoints(scoring, model, forward, batch)
        gt = ground_truth_keypoints(scoring, batch)
        threshold, _ = pair_thresholds(scoring, batch)
        correct = pck_per_keypoint(pred.to(gt.dtype), gt, threshold.to(gt.dtype), alpha, valid).correct
        input_size = (int(src.shape[-2]), int(src.shape[-1]))
        flow_st = forward.flow.float()
        grid = (int(flow_st.shape[-2]), int(flow_st.shape[-1]))
        measures = match_measures(
            flow_st, others[:b], rescale_keypoints(batch.src_kps.float(), input_size, grid), input_size,
            mirrored=others[b:],
            spread=None if getattr(forward, "correlations", None) is None else correlation_spread(forward.correlations),
            flatness=image_flatness(src.cpu()).to(src.device),
        )  # fmt: skip
        for name, values in measures.items():
            collected.setdefault(name, []).append(values[valid].cpu().numpy())
        labels.append(correct[valid].cpu().numpy())
    if not labels:
        raise ValueError("no batches to collect match features from")
    return {name: np.concatenate(v) for name, v in collected.items()}, np.concatenate(labels)
