"""PCK@α curves of several models beside the reference predictors (paper Fig. 4).

Axis legend: alpha PCK tolerances · predictor (the model and the reference predictors).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from actr_core.metrics.evaluate import MODEL, pck_curve
from actr_core.metrics.references import CLASSICAL_PEER, IDENTITY

__all__ = ["plot_pck_curves"]

FIGURE_DPI = 120
# How the reference predictors are drawn: grey, dashed / dotted, no markers, so that they read as
# baselines and never as another model.
REFERENCE_STYLES: Mapping[str, dict] = {
    IDENTITY: {"color": "0.45", "linestyle": "--", "label": "identity (zero motion)"},
    CLASSICAL_PEER: {"color": "0.15", "linestyle": ":", "label": "classical peer (ORB + RANSAC homography)"},
}
OTHER_REFERENCE_STYLE = {"color": "0.6", "linestyle": "-."}


def _curves(res: xr.Dataset | xr.DataArray, alphas: Sequence[float] | np.ndarray | None, average: str) -> xr.DataArray:
    """(predictor, alpha) curves of one result (a curve without a predictor axis is the model's)."""
    if isinstance(res, xr.Dataset):
        if alphas is not None:
            return pck_curve(res, alphas, average)
        curve = res[f"pck_{average}_overall"]
    else:
        curve = res
    if "predictor" not in curve.dims:
        curve = curve.expand_dims(predictor=[MODEL])
    return curve


def plot_pck_curves(
    results: Mapping[str, xr.Dataset | xr.DataArray],
    path: str | Path,
    alphas: Sequence[float] | np.ndarray | None = None,
    average: str = "image",
    title: str | None = None,
) -> Path:
    """One PCK-vs-α curve per model, and one per reference predictor the results hold. Writes a PNG.

    Args:
        results: model name → evaluation results (:func:`actr_core.metrics.evaluate`) or a curve
            (a DataArray over ``alpha``, or ``(predictor, alpha)``). Each model's curve is its
            ``"model"`` predictor, labelled with its name. The references (identity, classical
            peer) are drawn once, in grey dashed / dotted lines; results scored on other pairs
            add their own reference lines, labelled with the model's name.
        path: where the PNG goes.
        alphas: recompute the curves at these α from the stored keypoints (default: the α the
            results were computed at).
        average: ``"image"`` or ``"keypoint"``.
        title: default names the protocol, threshold and frame of the first result.
    """
    if not results:
        raise ValueError("results is empty: give at least one model's results")
    fig = Figure(figsize=(5.6, 4.0), dpi=FIGURE_DPI)
    ax = fig.add_subplot()
    attrs: dict = {}
    drawn: list[tuple[str, np.ndarray | None]] = []  # (reference, pairs) already on the figure
    references: list[tuple[str, str, xr.DataArray]] = []
    for name, res in results.items():
        curves = _curves(res, alphas, average)
        attrs = attrs or dict(res.attrs)
        pairs = res["pair"].values if isinstance(res, xr.Dataset) and "pair" in res.coords else None
        for predictor in (str(p) for p in curves["predictor"].values):
            curve = curves.sel(predictor=predictor)
            if predictor == MODEL:
                ax.plot(curve["alpha"].values, 100.0 * curve.values, marker="o", markersize=3, label=name)
                continue
            seen = any(r == predictor and _same(p, pairs) for r, p in drawn)
            if not seen:
                drawn.append((predictor, pairs))
                references.append((predictor, name, curve))
    several = len({r for r, _, _ in references}) < len(references)
    for predictor, name, curve in references:
        style = dict(REFERENCE_STYLES.get(predictor, {**OTHER_REFERENCE_STYLE, "label": predictor}))
        if several:
            style["label"] = f"{style['label']}, pairs of {name}"
        ax.plot(curve["alpha"].values, 100.0 * curve.values, linewidth=1.4, **style)
    ax.set_xlabel("α")
    ax.set_ylabel(f"PCK per {average} (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    default = f"{attrs.get('protocol', '')} · {attrs.get('threshold_type', '')} · {attrs.get('coordinate_frame', '')}"
    ax.set_title(title or default, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two results were scored on the same pairs (unknown pairs count as the same)."""
    if a is None or b is None:
        return True
    return a.shape == b.shape and bool(np.all(a == b))
