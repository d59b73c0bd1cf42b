"""Per-path flows of a multi-path model, the fused flow and the ground truth (paper Fig. 3).

Axis legend: m paths · h w flow grid · 2 (x, y), channel 0 = x.
"""

from pathlib import Path

import numpy as np
from jaxtyping import Bool, Float
from matplotlib.figure import Figure
from torch import Tensor

from actr_core.files import write_figure
from actr_core.viz.colour import flow_legend, flow_to_colour, to_numpy

__all__ = ["plot_path_flows"]

FIGURE_DPI = 120


def plot_path_flows(
    flows_per_path: Float[Tensor, "m 2 h w"] | Float[np.ndarray, "m 2 h w"] | None,
    fused: Float[Tensor, "2 h w"] | Float[np.ndarray, "2 h w"],
    path: str | Path,
    gt: Float[Tensor, "2 h w"] | Float[np.ndarray, "2 h w"] | None = None,
    valid_gt: Bool[Tensor, "h w"] | Bool[np.ndarray, "h w"] | None = None,
    title: str | None = None,
) -> Path:
    """Colour-coded flows: path 1..m, fused, ground truth (black where it has no value), and the
    colour key. One saturation scale for every panel, so colours compare. Writes a PNG.
    """
    fused = to_numpy(fused)
    paths = [] if flows_per_path is None else list(to_numpy(flows_per_path))
    panels = [(f"path {i + 1}", f, None) for i, f in enumerate(paths)] + [("fused", fused, None)]
    if gt is not None:
        panels.append(("ground truth", to_numpy(gt), None if valid_gt is None else to_numpy(valid_gt)))
    for name, flow, _ in panels:
        if flow.shape != fused.shape:
            raise ValueError(f"{name} flow has shape {flow.shape}, but the fused flow has {fused.shape}")
    magnitudes = [np.hypot(f[0], f[1])[np.isfinite(f).all(0) & (True if v is None else v)] for _, f, v in panels]
    scale = max((float(m.max()) for m in magnitudes if m.size), default=0.0)
    columns = len(panels) + 1
    fig = Figure(figsize=(2.4 * columns, 2.8), dpi=FIGURE_DPI)
    axes = fig.subplots(1, columns)
    for ax, (name, flow, valid) in zip(axes[:-1], panels, strict=True):
        ax.imshow(flow_to_colour(flow, scale or None, valid), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    axes[-1].imshow(flow_legend())
    axes[-1].set_title(f"key: full colour at |flow| = {scale:.3g} px", fontsize=8)
    axes[-1].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return write_figure(fig, path)
