"""PCK thresholds ``d``: the length that α multiplies.

Axis legend: b batch (pairs) · n keypoints · 2 (x, y), channel 0 = x · 4 box (x1, y1, x2, y2).

Three kinds, all measured in the frame where the error is measured (pass boxes, sizes and
keypoints in that frame; :func:`rescale_boxes` moves a box between frames):

- ``bbox`` (α_bbox, SPair-71k): the longer side of the **target** object's box, ``max(x2 − x1, y2 − y1)``.
- ``img`` (α_img, PF-PASCAL): the longer side of the **target** image, ``max(H, W)``.
- ``bkp`` (α_bkp, PF-WILLOW, which has no object boxes): the longer side of the box around the
  target's *valid* keypoints, ``max(max x − min x, max y − min y)``; padding is ignored. The
  paper words it as the "maximum distance of annotated key points"; the code every published
  number comes from (DHPF, CATs, ACTR) takes this box side, which is at most the keypoints'
  largest pairwise distance and at least 1/√2 of it.

The released ACTR code differs (source side, padding included): see
:mod:`actr_core.metrics.protocols`.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from actr_core.flow import rescale_keypoints

__all__ = ["THRESHOLD_KINDS", "bbox_threshold", "img_threshold", "bkp_threshold", "rescale_boxes"]

THRESHOLD_KINDS = ("bbox", "img", "bkp")


def _check_boxes(bbox: Tensor) -> None:
    if bbox.ndim != 2 or bbox.shape[-1] != 4:
        raise ValueError(f"bbox must have shape (b, 4) as (x1, y1, x2, y2), got {tuple(bbox.shape)}")
    if not bbox.is_floating_point():
        raise ValueError(f"bbox must be floating point, got dtype {bbox.dtype}")


def bbox_threshold(bbox: Float[Tensor, "b 4"]) -> Float[Tensor, " b"]:
    """α_bbox's ``d``: ``max(x2 − x1, y2 − y1)`` of each (target) box, in the box's frame."""
    _check_boxes(bbox)
    return torch.maximum(bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1])


def img_threshold(size: Int[Tensor, "b 2"] | Float[Tensor, "b 2"], dtype: torch.dtype = torch.float32) -> Float[Tensor, " b"]:
    """α_img's ``d``: ``max(H, W)`` of each (target) image; ``size`` rows are (height, width)."""
    if size.ndim != 2 or size.shape[-1] != 2:
        raise ValueError(f"size must have shape (b, 2) as (height, width), got {tuple(size.shape)}")
    return size.to(dtype).amax(dim=1)


def bkp_threshold(kps: Float[Tensor, "b n 2"], valid: Bool[Tensor, "b n"] | None = None) -> Float[Tensor, " b"]:
    """α_bkp's ``d``: longer side of the box around each pair's valid (target) keypoints.

    Padding rows (``valid`` False) are ignored, whatever their values. NaN for a pair with no
    valid keypoint; 0 for a pair with a single one (then only exact predictions are correct).
    """
    if kps.ndim != 3 or kps.shape[-1] != 2:
        raise ValueError(f"kps must have shape (b, n, 2), got {tuple(kps.shape)}")
    if not kps.is_floating_point():
        raise ValueError(f"kps must be floating point, got dtype {kps.dtype}")
    if valid is None:
        valid = torch.ones(kps.shape[:2], dtype=torch.bool, device=kps.device)
    if valid.dtype != torch.bool or tuple(valid.shape) != tuple(kps.shape[:2]):
        raise ValueError(f"valid must be a boolean mask of shape {tuple(kps.shape[:2])}, got {valid.dtype} {tuple(valid.shape)}")
    mask = valid.unsqueeze(-1)
    upper = torch.where(mask, kps, torch.full_like(kps, float("-inf"))).amax(dim=1)
    lower = torch.where(mask, kps, torch.full_like(kps, float("inf"))).amin(dim=1)
    side = (upper - lower).amax(dim=1)
    return torch.where(valid.any(dim=1), side, torch.full_like(side, float("nan")))


def rescale_boxes(bbox: Float[Tensor, "b 4"], from_size: Sequence[int], to_size: Sequence[int]) -> Float[Tensor, "b 4"]:
    """Boxes ``(x1, y1, x2, y2)`` from a frame of ``from_size = (h, w)`` into one of ``to_size``.

    Convention:
        Corners move like keypoints (pixel-centre convention, :func:`actr_core.flow.rescale_keypoints`),
        so box sides scale by exactly W'/W and H'/H.
    """
    _check_boxes(bbox)
    corners = bbox.reshape(-1, 2, 2)  # b (top-left, bottom-right) (x, y)
    return rescale_keypoints(corners, from_size, to_size).reshape(-1, 4)
