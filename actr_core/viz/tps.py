"""Thin-plate-spline warps driven by keypoint matches (paper Fig. 1).

Axis legend: hs ws source image · ht wt target image · n keypoints · 2 (x, y) · c channels.

The source image is drawn in the target frame: a thin-plate spline (Bookstein 1989, the paper's
ref. [4]) fitted to the matches maps every target pixel to a source position, where the source is
sampled bilinearly. Driven by predicted matches it shows how the model aligns the whole object;
driven by ground-truth matches it gives the reference.
"""

from pathlib import Path

import numpy as np
from jaxtyping import Bool, Float, Shaped
from matplotlib.figure import Figure
from scipy.interpolate import RBFInterpolator
from scipy.ndimage import map_coordinates
from torch import Tensor

from actr_core.files import write_figure
from actr_core.viz.colour import to_display_image, to_numpy

__all__ = ["MIN_TPS_POINTS", "plot_tps_warps", "tps_warp"]

MIN_TPS_POINTS = 3  # a thin-plate spline carries an affine part: three non-collinear points at least
# Regularisation of the spline fit (pixels²): keeps the system solvable when two matches coincide.
TPS_SMOOTHING = 1e-3
FIGURE_DPI = 120


def tps_warp(
    image: Float[np.ndarray, "hs ws c"],
    src_pts: Float[Tensor, "n 2"] | Float[np.ndarray, "n 2"],
    trg_pts: Float[Tensor, "n 2"] | Float[np.ndarray, "n 2"],
    out_size: tuple[int, int],
    valid: Bool[Tensor, " n"] | Bool[np.ndarray, " n"] | None = None,
) -> tuple[Float[np.ndarray, "ht wt c"], Bool[np.ndarray, "ht wt"]]:
    """Warp ``image`` (the source) into a frame of ``out_size = (ht, wt)`` so that ``src_pts`` land on ``trg_pts``.

    Returns the warped image and the mask of target pixels whose source position lies inside the
    source image (the others are filled with white).

    Convention:
        Pixel centres at integer coordinates; (x, y) points.
    """
    image = np.asarray(image, dtype=np.float64)
    src_pts, trg_pts = (to_numpy(p).astype(np.float64) for p in (src_pts, trg_pts))
    if src_pts.shape != trg_pts.shape or src_pts.ndim != 2 or src_pts.shape[-1] != 2:
        raise ValueError(f"src_pts and trg_pts must both be (n, 2), got {src_pts.shape} and {trg_pts.shape}")
    keep = np.isfinite(src_pts).all(1) & np.isfinite(trg_pts).all(1)
    if valid is not None:
        keep &= to_numpy(valid).astype(bool)
    if keep.sum() < MIN_TPS_POINTS:
        raise ValueError(f"a thin-plate spline needs at least {MIN_TPS_POINTS} valid matches, got {int(keep.sum())}")
    spline = RBFInterpolator(trg_pts[keep], src_pts[keep], kernel="thin_plate_spline", smoothing=TPS_SMOOTHING)
    ht, wt = out_size
    ys, xs = np.mgrid[0:ht, 0:wt]
    where = spline(np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64))  # (ht wt) 2, source (x, y)
    sx, sy = where[:, 0].reshape(ht, wt), where[:, 1].reshape(ht, wt)
    hs, ws = image.shape[:2]
    inside = (sx >= -0.5) & (sx <= ws - 0.5) & (sy >= -0.5) & (sy <= hs - 0.5)
    channels = [map_coordinates(image[..., c], [sy, sx], order=1, mode="nearest") for c in range(image.shape[-1])]
    warped = np.stack(channels, axis=-1)
    warped[~inside] = 1.0
    return warped, inside


def plot_tps_warps(
    src_image: Float[Tensor, "3 hs ws"] | Shaped[np.ndarray, "hs ws 3"],
    trg_image: Float[Tensor, "3 ht wt"] | Shaped[np.ndarray, "ht wt 3"],
    src_kps: Float[Tensor, "n 2"] | Float[np.ndarray, "n 2"],
    pred_kps: Float[Tensor, "n 2"] | Float[np.ndarray, "n 2"],
    gt_kps: Float[Tensor, "n 2"] | Float[np.ndarray, "n 2"],
    path: str | Path,
    valid: Bool[Tensor, " n"] | Bool[np.ndarray, " n"] | None = None,
    title: str | None = None,
) -> Path:
    """Source, target, source warped by predicted matches, source warped by ground truth. Writes a PNG.

    Keypoints are in pixels of their own image (source / target).
    """
    src = to_display_image(src_image)
    trg = to_display_image(trg_image)
    size = trg.shape[:2]
    by_pred, _ = tps_warp(src, src_kps, pred_kps, size, valid)
    by_gt, _ = tps_warp(src, src_kps, gt_kps, size, valid)
    panels = (("source", src), ("target", trg), ("warped by prediction", by_pred), ("warped by ground truth", by_gt))
    fig = Figure(figsize=(3.2 * len(panels), 3.4), dpi=FIGURE_DPI)
    axes = fig.subplots(1, len(panels))
    for ax, (name, picture) in zip(axes, panels, strict=True):
        ax.imshow(picture)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return write_figure(fig, path)
