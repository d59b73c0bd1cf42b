"""PCK@α curves of several models (paper Fig. 4).

Axis legend: alpha PCK tolerances.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from actr_core.metrics.evaluate import pck_curve

__all__ = ["plot_pck_curves"]

FIGURE_DPI = 120


def plot_pck_curves(
    results: Mapping[str, xr.Dataset | xr.DataArray],
    path: str | Path,
    alphas: Sequence[float] | np.ndarray | None = None,
    average: str = "image",
    title: str | None = None,
) -> Path:
    """One PCK-vs-α curve per model. Writes a PNG.

    Args:
        results: model name → evaluation results (:func:`actr_core.metrics.evaluate`) or a curve
            (a DataArray over ``alpha``).
        path: where the PNG goes.
        alphas: recompute the curves at these α from the stored keypoints (default: the α the
            results were computed at).
        average: ``"image"`` or ``"keypoint"``.
        title: default names the protocol, threshold and frame of the first result.
    """
    if not results:
        raise ValueError("results is empty: give at least one model's results")
    fig = Figure(figsize=(5.0, 3.8), dpi=FIGURE_DPI)
    ax = fig.add_subplot()
    attrs: dict = {}
    for name, res in results.items():
        if isinstance(res, xr.Dataset):
            curve = pck_curve(res, alphas, average) if alphas is not None else res[f"pck_{average}_overall"]
        else:
            curve = res
        attrs = attrs or dict(res.attrs)
        ax.plot(curve["alpha"].values, 100.0 * curve.values, marker="o", markersize=3, label=name)
    ax.set_xlabel("α")
    ax.set_ylabel(f"PCK per {average} (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    default = f"{attrs.get('protocol', '')} · {attrs.get('threshold_type', '')} · {attrs.get('coordinate_frame', '')}"
    ax.set_title(title or default, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
