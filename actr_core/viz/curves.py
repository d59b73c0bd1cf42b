"""PCK@α curves of several models beside the reference predictors (paper Fig. 4), and a training
run's learning curve beside the same references.

Axis legend: alpha PCK tolerances · predictor (the model and the reference predictors).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from actr_core.files import write_figure
from actr_core.metrics.evaluate import MODEL, pck_curve
from actr_core.metrics.references import CLASSICAL_PEER, IDENTITY

__all__ = ["plot_learning_curve", "plot_pck_curves"]

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
    return write_figure(fig, path)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two results were scored on the same pairs (unknown pairs count as the same)."""
    if a is None or b is None:
        return True
    return a.shape == b.shape and bool(np.all(a == b))


def plot_learning_curve(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    alpha: float = 0.1,
    title: str | None = None,
) -> Path:
    """Training loss and validation PCK per epoch, with identity and the classical peer as
    horizontal lines (their scores on the same validation pairs). Writes a PNG.

    Args:
        history: one mapping per epoch (rows of a training run's ``metrics.csv``) with ``epoch``,
            ``train_loss`` (the model's objective; NaN for the epoch-0 row scored before training)
            and ``val_pck``, and optionally ``val_flow_epe`` (Eq. 4 in pixels, drawn beside the
            objective: the same quantity for every model) and ``identity_val_pck`` /
            ``peer_val_pck`` (fractions; NaN when not run).
        path: where the PNG goes.
        alpha: the PCK tolerance of ``val_pck`` (for the labels).
        title: default "learning curve".
    """
    if not history:
        raise ValueError("history is empty: give at least one epoch's row")
    missing = [key for key in ("epoch", "train_loss", "val_pck") if key not in history[0]]
    if missing:
        raise ValueError(f"history rows lack {missing} (keys: {sorted(history[0])})")
    epochs = np.array([float(row["epoch"]) for row in history])
    fig = Figure(figsize=(8.4, 3.4), dpi=FIGURE_DPI)
    loss_ax, pck_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    loss = np.array([float(row["train_loss"]) for row in history])
    trained = np.isfinite(loss)
    loss_ax.plot(epochs[trained], loss[trained], marker="o", markersize=3, label="training objective (mean over the epoch)")
    epe = np.array([float(row.get("val_flow_epe", np.nan)) for row in history])
    if np.isfinite(epe).any():
        shown = np.isfinite(epe)
        loss_ax.plot(epochs[shown], epe[shown], marker="s", markersize=3, label="validation end-point error, Eq. 4 (px)")
    for ax in (loss_ax, pck_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize=7)
    pck = 100.0 * np.array([float(row["val_pck"]) for row in history])
    pck_ax.plot(epochs, pck, marker="o", markersize=3, label="model")
    for key, reference in (("identity_val_pck", IDENTITY), ("peer_val_pck", CLASSICAL_PEER)):
        values = np.array([float(row.get(key, np.nan)) for row in history])
        values = values[np.isfinite(values)]
        if len(values):  # the references do not change between epochs: one line at their value
            style = dict(REFERENCE_STYLES[reference])
            style["label"] = f"{style['label']}: {100.0 * values[-1]:.1f} %"
            pck_ax.axhline(100.0 * values[-1], linewidth=1.4, **style)
    pck_ax.set_xlabel("epoch")
    pck_ax.set_ylabel(f"validation PCK@{alpha:g} (%)")
    pck_ax.set_ylim(0, 100)
    pck_ax.grid(True, alpha=0.3)
    pck_ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or "learning curve", fontsize=9)
    fig.tight_layout()
    return write_figure(fig, path)
