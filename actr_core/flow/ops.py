"""Flows, warps and keypoint transfer: pure functions, no modules.

Axis legend: b batch · h w flow grid (the source grid) · ht wt target image · c channels ·
n keypoints · 2 (x, y), channel 0 = x.

Convention:
    A flow ``(b, 2, h, w)`` is defined on the source grid and points into the target: the match
    of source pixel (x, y) is (x + flow[0, y, x], y + flow[1, y, x]) in pixels of the target grid
    at the same level. Pixel centres sit at integer coordinates (see :mod:`actr_core.flow.grid`).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from actr_core.flow.grid import check_size, coords_grid, normalise_coords, rescale_coords

__all__ = [
    "flow_to_mapping",
    "mapping_to_flow",
    "resize_flow",
    "pool_flow",
    "warp",
    "sample_flow",
    "transfer_keypoints",
    "rescale_keypoints",
    "keypoints_to_flow",
]


def _check_flow(flow: Tensor, name: str = "flow") -> None:
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"{name} must have shape (b, 2, h, w), got {tuple(flow.shape)}")
    if not flow.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {flow.dtype}")


def _check_keypoints(kps: Tensor, batch: int | None = None, name: str = "kps") -> None:
    if kps.ndim != 3 or kps.shape[-1] != 2:
        raise ValueError(f"{name} must have shape (b, n, 2), got {tuple(kps.shape)}")
    if not kps.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {kps.dtype}")
    if batch is not None and kps.shape[0] != batch:
        raise ValueError(f"{name} has batch size {kps.shape[0]} but the flow has batch size {batch}")


def _check_valid(valid: Tensor | None, kps: Tensor, name: str = "valid") -> Tensor:
    if valid is None:
        return torch.ones(kps.shape[:2], dtype=torch.bool, device=kps.device)
    if valid.dtype != torch.bool:
        raise ValueError(f"{name} must be a boolean mask, got dtype {valid.dtype}")
    if tuple(valid.shape) != tuple(kps.shape[:2]):
        raise ValueError(f"{name} must have shape {tuple(kps.shape[:2])} (b, n), got {tuple(valid.shape)}")
    return valid


def flow_to_mapping(flow: Float[Tensor, "b 2 h w"]) -> Float[Tensor, "b 2 h w"]:
    """Absolute target positions ``grid + flow`` of every source pixel."""
    _check_flow(flow)
    return flow + coords_grid(*flow.shape[-2:], device=flow.device, dtype=flow.dtype)


def mapping_to_flow(mapping: Float[Tensor, "b 2 h w"]) -> Float[Tensor, "b 2 h w"]:
    """Inverse of :func:`flow_to_mapping`: ``mapping - grid``."""
    _check_flow(mapping, "mapping")
    return mapping - coords_grid(*mapping.shape[-2:], device=mapping.device, dtype=mapping.dtype)


def resize_flow(flow: Float[Tensor, "b 2 h w"], size: Sequence[int], mode: str = "bilinear") -> Float[Tensor, "b 2 h2 w2"]:
    """Resample a flow to ``size = (h2, w2)`` and rescale its values into pixels of the new grid.

    Convention:
        Positions follow the pixel-centre convention (``align_corners=False``); displacement values
        scale by w2/w (x) and h2/h (y), so a constant flow of d pixels becomes d·w2/w.
    """
    _check_flow(flow)
    h2, w2 = check_size(size)
    h, w = flow.shape[-2:]
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(flow, size=(h2, w2), mode=mode, **kwargs)
    scale = torch.tensor([w2 / w, h2 / h], dtype=flow.dtype, device=flow.device)
    return out * scale.view(1, 2, 1, 1)


def pool_flow(
    flow: Float[Tensor, "b 2 h w"], valid: Bool[Tensor, "b h w"], factor: int
) -> tuple[Float[Tensor, "b 2 h2 w2"], Bool[Tensor, "b h2 w2"]]:
    """A flow on a grid ``factor`` times coarser: the mean of each ``factor × factor`` block of
    cells, in pixels of the coarse grid, valid where every cell of the block is valid.

    Convention:
        Coarse cell (x_c, y_c) covers fine cells ``factor·x_c … factor·x_c + factor − 1``; its centre
        sits at the mean of their centres (x = (x_c + 0.5)·factor − 0.5 on the fine grid, the
        pixel-centre rule), so the block mean of an affine flow is the flow at the coarse centre,
        and values divide by ``factor``. Invalid cells are never read (NaN there is harmless).
        ``h`` and ``w`` must be multiples of ``factor``.
    """
    _check_flow(flow)
    if valid.dtype != torch.bool or valid.shape != (flow.shape[0], *flow.shape[-2:]):
        raise ValueError(
            f"valid has shape {tuple(valid.shape)} and dtype {valid.dtype}: expected a boolean (b, h, w) "
            f"mask for flow {tuple(flow.shape)}"
        )
    h, w = flow.shape[-2:]
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"factor = {factor}: expected a positive divisor of the grid {(h, w)}")
    inside = valid.unsqueeze(1)
    summed = F.avg_pool2d(torch.where(inside, flow, torch.zeros_like(flow)), factor)
    coarse_valid = F.avg_pool2d(valid.unsqueeze(1).to(flow.dtype), factor)[:, 0] == 1
    return summed / factor, coarse_valid


def warp(
    image: Float[Tensor, "b c h w"], flow: Float[Tensor, "b 2 h w"], padding_mode: str = "zeros"
) -> Float[Tensor, "b c h w"]:
    """Backward-warp the target ``image`` into the source frame: ``out[y, x] = image[mapping(y, x)]``.

    ``image`` lives on the target grid, which has the flow's size (resize the flow first with
    :func:`resize_flow` otherwise). Bilinear sampling, pixel-centre convention.
    """
    _check_flow(flow)
    if image.ndim != 4 or image.shape[0] != flow.shape[0] or image.shape[-2:] != flow.shape[-2:]:
        raise ValueError(
            f"image {tuple(image.shape)} must be (b, c, h, w) with the flow's batch and grid "
            f"{(flow.shape[0], '*', *flow.shape[-2:])}"
        )
    mapping = flow_to_mapping(flow).permute(0, 2, 3, 1)
    grid = normalise_coords(mapping, flow.shape[-2:])
    return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def sample_map(values: Float[Tensor, "b c h w"], kps: Float[Tensor, "b n 2"]) -> Float[Tensor, "b n c"]:
    """Bilinear (sub-pixel) values of any map at keypoints given in its own pixels.

    Points outside the grid take the value at the nearest border (``padding_mode="border"``). The
    points are taken in the map's dtype (a float64 map read at float32 points stays float64).
    """
    if values.ndim != 4:
        raise ValueError(f"values must be (b, c, h, w), got shape {tuple(values.shape)}")
    _check_keypoints(kps, values.shape[0])
    grid = normalise_coords(kps.to(values.dtype), values.shape[-2:]).unsqueeze(1)  # b 1 n 2
    sampled = F.grid_sample(values, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled[:, :, 0, :].transpose(1, 2)


def sample_flow(flow: Float[Tensor, "b 2 h w"], kps: Float[Tensor, "b n 2"]) -> Float[Tensor, "b n 2"]:
    """Bilinear (sub-pixel) flow values at keypoints given in pixels of the flow grid (:func:`sample_map`)."""
    _check_flow(flow)
    return sample_map(flow, kps)


def transfer_keypoints(
    flow: Float[Tensor, "b 2 h w"],
    kps: Float[Tensor, "b n 2"],
    valid: Bool[Tensor, "b n"] | None = None,
) -> Float[Tensor, "b n 2"]:
    """Move source keypoints along the flow: ``kps + flow(kps)``, bilinear, sub-pixel.

    Keypoints enter and leave in pixels of the flow's grid (use :func:`rescale_keypoints` to move
    between an image frame and the flow grid). Invalid keypoints come out as NaN, so that they can
    never be mistaken for a prediction; their input values (NaN padding included) are never read.
    """
    _check_flow(flow)
    _check_keypoints(kps, flow.shape[0])
    valid = _check_valid(valid, kps)
    safe = torch.where(valid.unsqueeze(-1), kps, torch.zeros_like(kps))
    moved = safe + sample_flow(flow, safe)
    return torch.where(valid.unsqueeze(-1), moved, torch.full_like(moved, float("nan")))


def rescale_keypoints(
    kps: Float[Tensor, "*batch n 2"], from_size: Sequence[int], to_size: Sequence[int]
) -> Float[Tensor, "*batch n 2"]:
    """Keypoints from a frame of ``from_size = (h, w)`` into one of ``to_size`` (pixel-centre convention).

    Convention:
        x' = (x + 0.5) · W'/W − 0.5 and likewise for y; see :func:`actr_core.flow.rescale_coords`.
    """
    if kps.ndim < 2 or kps.shape[-1] != 2:
        raise ValueError(f"kps must have shape (..., n, 2), got {tuple(kps.shape)}")
    return rescale_coords(kps, from_size, to_size)


def keypoints_to_flow(
    src_kps: Float[Tensor, "b n 2"],
    trg_kps: Float[Tensor, "b n 2"],
    valid: Bool[Tensor, "b n"],
    size: Sequence[int],
    *,
    neighbourhood: float = 35.0,
    reference_size: float = 512.0,
) -> tuple[Float[Tensor, "b 2 h w"], Bool[Tensor, "b h w"]]:
    """Pseudo ground-truth flow from sparse keypoint matches (the paper's Sec. 3.5 / Eq. 4 target).

    Each valid source keypoint's displacement ``trg - src`` fills the square neighbourhood around
    it on the flow grid of ``size = (h, w)``; the returned mask marks the filled cells (the paper's
    mask S). Keypoints are in pixels of the flow grid.

    The neighbourhood side is ``neighbourhood`` pixels at a ``reference_size``-pixel image side:
    ``neighbourhood / reference_size`` of the grid's width (x) and height (y). The default, 35 px
    at 512, is the paper's 35×35 neighbourhood and the released code's coverage (17.5 px at a 256
    input). A cell belongs to a keypoint's neighbourhood when its centre lies within half a side
    of the keypoint along both axes (inclusive).

    Overlaps: a cell covered by several keypoints takes the displacement of the keypoint whose
    Euclidean distance to the cell centre is smallest; on an exact tie the lower keypoint index
    wins. Invalid keypoints are ignored (their values, NaN included, are never read).
    """
    _check_keypoints(src_kps, name="src_kps")
    _check_keypoints(trg_kps, src_kps.shape[0], name="trg_kps")
    if src_kps.shape != trg_kps.shape:
        raise ValueError(f"src_kps {tuple(src_kps.shape)} and trg_kps {tuple(trg_kps.shape)} must match")
    valid = _check_valid(valid, src_kps)
    h, w = check_size(size)
    if not neighbourhood > 0 or not reference_size > 0:
        raise ValueError(f"neighbourhood ({neighbourhood}) and reference_size ({reference_size}) must be > 0")

    mask = valid.unsqueeze(-1)
    src = torch.where(mask, src_kps, torch.zeros_like(src_kps))
    disp = torch.where(mask, trg_kps - src_kps, torch.zeros_like(src_kps))
    half = torch.tensor(
        [neighbourhood / reference_size * w / 2, neighbourhood / reference_size * h / 2],
        dtype=src.dtype,
        device=src.device,
    )
    cells = coords_grid(h, w, device=src.device, dtype=src.dtype).flatten(1).T  # (h w) 2
    offset = cells[None, None] - src[:, :, None]  # b n (h w) 2
    inside = (offset.abs() <= half).all(-1) & valid[:, :, None]
    dist = torch.where(inside, offset.square().sum(-1), torch.full_like(offset[..., 0], float("inf")))
    nearest = dist.argmin(dim=1)  # b (h w); first index on ties
    filled = inside.any(dim=1)
    flow = torch.gather(disp, 1, nearest.unsqueeze(-1).expand(-1, -1, 2))  # b (h w) 2
    flow = torch.where(filled.unsqueeze(-1), flow, torch.zeros_like(flow))
    return flow.transpose(1, 2).reshape(-1, 2, h, w), filled.reshape(-1, h, w)
