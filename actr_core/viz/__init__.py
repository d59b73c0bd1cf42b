"""Figures (matplotlib, PNG; no pyplot state): PCK curves (paper Fig. 4), learning curves, matches (Fig. 5),
thin-plate-spline warps (Fig. 1), per-path flows (Fig. 3), and the flow colour code."""

from actr_core.viz.colour import colour_wheel, flow_legend, flow_to_colour, to_display_image
from actr_core.viz.curves import plot_learning_curve, plot_pck_curves
from actr_core.viz.flows import plot_path_flows
from actr_core.viz.matches import plot_matches
from actr_core.viz.tps import plot_tps_warps, tps_warp

__all__ = [
    "colour_wheel",
    "flow_legend",
    "flow_to_colour",
    "plot_learning_curve",
    "plot_matches",
    "plot_path_flows",
    "plot_pck_curves",
    "plot_tps_warps",
    "tps_warp",
    "to_display_image",
]
