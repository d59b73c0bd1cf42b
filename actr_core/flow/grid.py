"""Coordinate grids and the pixel-centre convention.

Axis legend: b batch · h w grid rows, columns · n keypoints · 2 (x, y), channel 0 = x.

Convention:
    Pixel (column i, row j) has its centre at the integer coordinates (x=i, y=j); an image of
    width W covers x in [-0.5, W - 0.5]. Resizing a frame of width W to W' maps
    x -> (x + 0.5) * W'/W - 0.5, which is the mapping of ``align_corners=False`` in
    ``F.interpolate`` and ``F.grid_sample``. Normalised coordinates for ``grid_sample`` are
    xn = (2x + 1) / W - 1, so -1 and +1 are the outer edges of the border pixels.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

#: A matcher's flow, and a data set's ground-truth flow, live on the input frame divided by this
#: (paper Sec. 3.4: 4h × 4w for a 16-pixel token grid); docs/conventions.md.
FLOW_STRIDE = 4

__all__ = [
    "FLOW_STRIDE",
    "coords_grid",
    "normalise_coords",
    "unnormalise_coords",
    "rescale_coords",
    "check_size",
]


def check_size(size: Sequence[int], name: str = "size") -> tuple[int, int]:
    """Validate a ``(height, width)`` pair of positive integers and return it as a tuple."""
    if len(size) != 2:
        raise ValueError(f"{name} must be (height, width), got {tuple(size)!r}")
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0 or h != size[0] or w != size[1]:
        raise ValueError(f"{name} must be two positive integers (height, width), got {tuple(size)!r}")
    return h, w


def coords_grid(
    h: int, w: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "2 h w"]:
    """Pixel-centre coordinates of an ``h × w`` grid: ``grid[0, j, i] = i`` (x), ``grid[1, j, i] = j`` (y).

    Convention:
        Channel 0 is x (the column index), channel 1 is y (the row index); pixel centres sit at
        integer coordinates.
    """
    h, w = check_size((h, w))
    ys = torch.arange(h, device=device, dtype=dtype)
    xs = torch.arange(w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy))


def _size_tensor(size: Sequence[int], like: Tensor) -> Tensor:
    h, w = check_size(size)
    return torch.tensor([w, h], dtype=like.dtype, device=like.device)


def normalise_coords(coords: Float[Tensor, "*batch 2"], size: Sequence[int]) -> Float[Tensor, "*batch 2"]:
    """Pixel (x, y) → ``grid_sample`` coordinates in [-1, 1] for a frame of ``size = (h, w)``.

    Convention:
        ``align_corners=False``: xn = (2x + 1) / W - 1; pixel centre 0 maps to -1 + 1/W.
    """
    wh = _size_tensor(size, coords)
    return (2.0 * coords + 1.0) / wh - 1.0


def unnormalise_coords(coords: Float[Tensor, "*batch 2"], size: Sequence[int]) -> Float[Tensor, "*batch 2"]:
    """Inverse of :func:`normalise_coords`: x = ((xn + 1) W - 1) / 2."""
    wh = _size_tensor(size, coords)
    return ((coords + 1.0) * wh - 1.0) / 2.0


def rescale_coords(
    coords: Float[Tensor, "*batch 2"], from_size: Sequence[int], to_size: Sequence[int]
) -> Float[Tensor, "*batch 2"]:
    """Map pixel (x, y) positions from a frame of ``from_size`` to one of ``to_size`` (both (h, w)).

    Convention:
        x' = (x + 0.5) · W'/W − 0.5 (pixel centres at integers), so the frame's edges map onto
        each other; the naive x' = x · W'/W would shift every point by half a pixel.
    """
    scale = _size_tensor(to_size, coords) / _size_tensor(from_size, coords)
    return (coords + 0.5) * scale - 0.5
