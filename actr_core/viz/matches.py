"""Keypoint matches coloured by correctness (paper Fig. 5).

Axis legend: h w image rows, columns · n keypoints · 2 (x, y) · 3 RGB.
"""

from pathlib import Path

import numpy as np
from jaxtyping import Bool, Float, Shaped
from matplotlib.figure import Figure
from torch import Tensor

from actr_core.files import write_figure
from actr_core.viz.colour import to_display_image, to_numpy

__all__ = ["CORRECT_COLOUR", "WRONG_COLOUR", "plot_matches"]

CORRECT_COLOUR = "#2ca02c"  # green
WRONG_COLOUR = "#d62728"  # red
GT_COLOUR = "#ffdd00"  # ground-truth crosses (yellow)
FIGURE_DPI = 120


def plot_matches(
    src_image: Float[Tensor, "3 hs ws"] | Shaped[np.ndarray, "hs ws 3"],
    trg_image: Float[Tensor, "3 ht wt"] | Shaped[np.ndarray, "ht wt 3"],
    src_kps: Float[Tensor, "n 2"] | Float[np.ndarray, "n 2"],
    pred_kps: Float[Tensor, "n 2"] | Float[np.ndarray, "n 2"],
    gt_kps: Float[Tensor, "n 2"] | Float[np.ndarray, "n 2"] | None,
    correct: Bool[Tensor, " n"] | Bool[np.ndarray, " n"],
    path: str | Path,
    valid: Bool[Tensor, " n"] | Bool[np.ndarray, " n"] | None = None,
    title: str | None = None,
) -> Path:
    """Source and target side by side; a line from each source keypoint to its predicted match,
    green when correct and red when not; ground-truth targets as crosses. Writes a PNG.

    Keypoints are in pixels of the image they belong to (source / target), as drawn. Without
    ground truth (``gt_kps=None``) no crosses are drawn and ``correct`` is whatever the caller
    judges good (e.g. cycle-consistent); say so in ``title``.
    """
    src = to_display_image(src_image)
    trg = to_display_image(trg_image)
    has_gt = gt_kps is not None
    src_kps, pred_kps, gt_kps = (
        to_numpy(k).astype(np.float64) for k in (src_kps, pred_kps, pred_kps if gt_kps is None else gt_kps)
    )
    n = src_kps.shape[0]
    if pred_kps.shape != (n, 2) or gt_kps.shape != (n, 2) or src_kps.shape != (n, 2):
        raise ValueError(f"src/pred/gt keypoints must all be (n, 2); got {src_kps.shape}, {pred_kps.shape}, {gt_kps.shape}")
    correct = to_numpy(correct).astype(bool)
    valid = np.ones(n, dtype=bool) if valid is None else to_numpy(valid).astype(bool)
    if correct.shape != (n,) or valid.shape != (n,):
        raise ValueError(f"correct and valid must be (n,) = ({n},), got {correct.shape}, {valid.shape}")

    height = max(src.shape[0], trg.shape[0])
    canvas = np.ones((height, src.shape[1] + trg.shape[1], 3))
    canvas[: src.shape[0], : src.shape[1]] = src
    canvas[: trg.shape[0], src.shape[1] :] = trg
    offset = np.array([src.shape[1], 0.0])

    fig = Figure(figsize=(canvas.shape[1] / 80 + 1, canvas.shape[0] / 80 + 1), dpi=FIGURE_DPI)
    ax = fig.add_subplot()
    ax.imshow(canvas, extent=(-0.5, canvas.shape[1] - 0.5, canvas.shape[0] - 0.5, -0.5))
    for i in np.flatnonzero(valid):
        colour = CORRECT_COLOUR if correct[i] else WRONG_COLOUR
        start, end = src_kps[i], pred_kps[i] + offset
        ax.plot([start[0], end[0]], [start[1], end[1]], "-", color=colour, linewidth=1.2)
        ax.plot(*start, "o", color=colour, markersize=4)
        ax.plot(*end, "o", color=colour, markersize=4)
        if has_gt:
            ax.plot(*(gt_kps[i] + offset), "x", color=GT_COLOUR, markersize=6, markeredgewidth=1.5)
    n_valid = int(valid.sum())
    n_correct = int((correct & valid).sum())
    ax.set_title(title or f"{n_correct}/{n_valid} correct (green), wrong (red), ground truth (x)", fontsize=9)
    ax.set_axis_off()
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
    fig.tight_layout()
    return write_figure(fig, path)
