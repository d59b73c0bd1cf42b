"""Pure geometry on flows, grids and keypoints (no ``nn.Module`` here).

See ``docs/conventions.md``: flows are ``(b, 2, h, w)``, channel 0 = x, on the source grid,
pointing into the target, in pixels of the target grid at the same level; pixel centres sit at
integer coordinates.
"""

from actr_core.flow.grid import FLOW_STRIDE, check_size, coords_grid, normalise_coords, rescale_coords, unnormalise_coords
from actr_core.flow.ops import (
    flow_to_mapping,
    keypoints_to_flow,
    mapping_to_flow,
    pool_flow,
    rescale_keypoints,
    resize_flow,
    sample_flow,
    sample_map,
    transfer_keypoints,
    warp,
)

__all__ = [
    "FLOW_STRIDE",
    "check_size",
    "coords_grid",
    "normalise_coords",
    "unnormalise_coords",
    "rescale_coords",
    "flow_to_mapping",
    "mapping_to_flow",
    "resize_flow",
    "pool_flow",
    "warp",
    "sample_flow",
    "sample_map",
    "transfer_keypoints",
    "rescale_keypoints",
    "keypoints_to_flow",
]
