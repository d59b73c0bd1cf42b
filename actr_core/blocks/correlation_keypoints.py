"""Keypoints read through a correlation: sampling, blurred targets, MMNet's loss, keypoint transfer.

# b batch · n keypoints · hs ws source grid · ht wt target grid · l = ht·wt target cells · 2 (x, y)

MMNet (Zhao et al., ICCV 2021) trains every level of its correlation pyramid with a per-keypoint
classification over target cells: the correlation row of a source keypoint (bilinear in the
source grid) is soft-maxed over the target cells and compared by binary cross-entropy with a
blurred one-hot map at the matching target keypoint. Pieces, each reusable:

- :func:`sample_correlation`: bilinear correlation rows at sub-cell source keypoints.
- :func:`keypoint_target_map`: four-neighbour splat of target keypoints, blurred by a Gaussian.
- :func:`softmax_bce`: BCE between ``softmax(logits)`` and a target, per keypoint.
- :func:`correlation_keypoint_loss` / :class:`CorrelationKeypointLoss`: the three composed.
- :func:`argmax_transfer` and :func:`soft_argmax_transfer`: keypoint transfer through a
  correlation; :func:`argmax_flow`: the dense hard counterpart of ``soft_argmax``.

Convention:
    Keypoints given to these functions are in cells of the grid they index (pixel centres at
    integers; use :func:`actr_core.flow.rescale_keypoints` to move from image pixels). Points off
    the grid are clamped onto its border cells. The released code instead scales image pixels
    by ``x · w / W`` (cell corners) and reports predictions at ``index · W / w`` (the top-left
    corner of the cell); :class:`actr_core.models.MMNet` uses the pixel-centre map both ways.
"""

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from actr_core.blocks._checks import check_bool, check_positive, check_rank
from actr_core.flow import coords_grid, rescale_coords

__all__ = [
    "CorrelationKeypointLoss",
    "argmax_flow",
    "argmax_transfer",
    "correlation_keypoint_loss",
    "gaussian_kernel2d",
    "keypoint_target_map",
    "sample_correlation",
    "soft_argmax_transfer",
    "softmax_bce",
]

TargetWeighting = Literal["inverse_distance", "bilinear"]

# FWHM = 2·sqrt(2 ln 2)·σ ≈ 2.354·σ; the released target blur takes σ = (side / 2) / 2.354.
FWHM_PER_SIGMA = 2.354
# The released loss is torch.nn.BCELoss, which clamps each log term at -100.
BCE_LOG_FLOOR = -100.0
# The released inverse-distance weights floor the distance at 1e-5 before inverting it.
MIN_DISTANCE = 1e-5


def _check_keypoints(name: str, kps: Tensor, batch: int) -> None:
    check_rank(name, kps, 3, "b n 2")
    if kps.shape[0] != batch or kps.shape[-1] != 2:
        raise ValueError(f"{name} has shape {tuple(kps.shape)}: expected ({batch}, n, 2)")


def _check_valid(valid: Tensor, kps: Tensor) -> None:
    check_bool("valid", valid)
    if tuple(valid.shape) != tuple(kps.shape[:2]):
        raise ValueError(f"valid has shape {tuple(valid.shape)}: expected {tuple(kps.shape[:2])} (b, n)")


def _four_neighbours(kps: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Clamp ``kps`` onto the grid and return the corner cells ``x0, x1, y0, y1`` (long) and offsets ``fx, fy``.

    ``x0 = floor(x)``; on the last column ``x1 = x0`` (and ``fx = 0``), likewise for rows.
    """
    h, w = size
    x = kps[..., 0].clamp(0, w - 1)
    y = kps[..., 1].clamp(0, h - 1)
    x0 = x.detach().floor()
    y0 = y.detach().floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1 = (x0 + 1).clamp(max=w - 1)
    y1 = (y0 + 1).clamp(max=h - 1)
    return x0, x1, y0, y1, fx, fy


def sample_correlation(corr: Float[Tensor, "b hs ws ht wt"], kps: Float[Tensor, "b n 2"]) -> Float[Tensor, "b n ht wt"]:
    """Correlation rows at sub-cell source positions, bilinear over the four neighbouring source cells.

    Convention:
        ``kps`` are (x, y) in source-grid cells, centres at integers; positions off the grid are
        clamped onto the border (``grid_sample(padding_mode="border", align_corners=False)``).
        Only the ``4 n`` rows needed are gathered, so ``corr`` may be a permuted view (for example
        :func:`actr_core.blocks.coarse_to_fine.reverse_correlation`) without a copy.
    """
    check_rank("corr", corr, 5, "b hs ws ht wt")
    b, hs, ws, _ht, _wt = corr.shape
    _check_keypoints("kps", kps, b)
    x0, x1, y0, y1, fx, fy = _four_neighbours(kps, (hs, ws))
    rows_y = torch.stack((y0, y0, y1, y1), dim=-1)  # b n 4
    cols_x = torch.stack((x0, x1, x0, x1), dim=-1)
    weights = torch.stack(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), dim=-1).to(corr.dtype)
    batch = torch.arange(b, device=corr.device).view(b, 1, 1)
    corners = corr[batch, rows_y, cols_x]  # b n 4 ht wt: one gather, so one scatter in the backward pass
    return torch.einsum("bnk,bnkxy->bnxy", weights, corners)


def gaussian_kernel2d(
    side: int, sigma: float, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "side side"]:
    """Normalised isotropic Gaussian ``exp(-(x² + y²) / 2σ²) / Z`` on a ``side × side`` grid of integer offsets."""
    if side < 1 or side % 2 != 1:
        raise ValueError(f"side = {side}: expected an odd size >= 1")
    check_positive("sigma", sigma)
    offsets = torch.arange(side, device=device, dtype=dtype) - (side - 1) / 2
    g = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def keypoint_target_map(
    kps: Float[Tensor, "b n 2"],
    size: Sequence[int],
    *,
    kernel: Float[Tensor, "k k"] | None = None,
    weighting: TargetWeighting = "inverse_distance",
) -> Float[Tensor, "b n h w"]:
    """A soft one-hot map per keypoint: its four neighbouring cells weighted, then blurred by ``kernel``.

    ``weighting="inverse_distance"`` (the released code) gives each of the four cells
    ``(floor(x) + {0, 1}, floor(y) + {0, 1})`` that exist a weight ∝ 1 / max(distance, 1e-5),
    normalised to sum 1 (on the last row or column only two cells exist, as released);
    ``"bilinear"`` uses the bilinear weights (also summing to 1, and continuous in the point's
    position; the released weights jump where ``floor`` changes). The blur is a "same" convolution with
    zero padding, so mass leaving the grid is lost, as in the released code.

    Convention:
        ``kps`` in cells of the ``size = (h, w)`` grid, centres at integers, clamped onto the grid
        ``[0, w − 1] × [0, h − 1]`` first. The released code does not clamp: a point in the outer
        half of a border cell keeps its distance to the border cells. Inside the grid both agree.
    """
    check_rank("kps", kps, 3, "b n 2")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size = {tuple(size)}: expected positive (h, w)")
    b, n, _ = kps.shape
    x0, x1, y0, y1, fx, fy = _four_neighbours(kps.detach(), (h, w))
    cells = torch.stack((y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1), dim=-1)  # b n 4
    if weighting == "bilinear":
        weights = torch.stack(((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy), dim=-1)
    elif weighting == "inverse_distance":
        dx = torch.stack((fx, 1 - fx, fx, 1 - fx), dim=-1)
        dy = torch.stack((fy, fy, 1 - fy, 1 - fy), dim=-1)
        inv = 1.0 / torch.sqrt(dx**2 + dy**2).clamp(min=MIN_DISTANCE)
        # on the last column (row) there is no x0 + 1 (y0 + 1) cell: drop it, as released
        has_x1, has_y1 = x1 > x0, y1 > y0
        exists = torch.stack((torch.ones_like(has_x1), has_x1, has_y1, has_x1 & has_y1), dim=-1)
        inv = torch.where(exists, inv, torch.zeros_like(inv))
        weights = inv / inv.sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"weighting = {weighting!r}: expected 'inverse_distance' or 'bilinear'")
    target = torch.zeros(b, n, h * w, device=kps.device, dtype=kps.dtype)
    target.scatter_add_(2, cells, weights.to(kps.dtype))
    target = target.view(b, n, h, w)
    if kernel is None:
        return target
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 != 1:
        raise ValueError(f"kernel has shape {tuple(kernel.shape)}: expected an odd square (k, k)")
    k = kernel.shape[0]
    blurred = F.conv2d(target.view(b * n, 1, h, w), kernel.to(target)[None, None], padding=k // 2)
    return blurred.view(b, n, h, w)


def softmax_bce(
    logits: Float[Tensor, "b n l"],
    target: Float[Tensor, "b n l"],
    valid: Bool[Tensor, "b n"],
    *,
    log_floor: float = BCE_LOG_FLOOR,
) -> Float[Tensor, "b n"]:
    """Binary cross-entropy between ``p = softmax(logits)`` over ``l`` and ``target``, summed over ``l``.

    ``-Σ_l [t_l log p_l + (1 - t_l) log(1 - p_l)]`` per keypoint, each log clamped at ``log_floor``
    (``nn.BCELoss`` clamps at -100). ``log p`` comes from ``log_softmax`` and ``log(1 - p)`` from
    ``log(max(-expm1(log p), floor))``, both stable, with finite gradients even for a saturated
    softmax (raw dot-product correlations reach hundreds); ``floor`` is ``e^log_floor`` but at
    least the dtype's smallest normal number (float32: -87.3 where ``nn.BCELoss`` gives -100 for
    ``p`` rounding to 1). Invalid keypoints give 0 and their logits are replaced by
    zeros before any arithmetic, so NaN or inf there reach neither the value nor the gradient.
    """
    check_rank("logits", logits, 3, "b n l")
    if target.shape != logits.shape:
        raise ValueError(f"target {tuple(target.shape)} must have the shape of logits {tuple(logits.shape)}")
    check_bool("valid", valid)
    if tuple(valid.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"valid has shape {tuple(valid.shape)}: expected {tuple(logits.shape[:2])} (b, n)")
    keep = valid[..., None]
    logits = torch.where(keep, logits, torch.zeros_like(logits))
    target = torch.where(keep, target, torch.zeros_like(target))
    log_p = torch.log_softmax(logits, dim=-1)
    # 1 - p is floored before the log (not after), so that a saturated softmax (p == 1) gives a
    # finite gradient: the floor is e^log_floor, raised to the dtype's smallest normal number
    # (float32: log(1 - p) >= -87.3 instead of -100) so that 1 / (1 - p) stays finite
    floor = max(math.exp(log_floor), torch.finfo(log_p.dtype).tiny)
    log_not_p = torch.log((-torch.expm1(log_p)).clamp(min=floor))
    per_cell = target * log_p.clamp(min=log_floor) + (1 - target) * log_not_p
    return torch.where(valid, -per_cell.sum(dim=-1), torch.zeros_like(per_cell[..., 0]))


def correlation_keypoint_loss(
    corr: Float[Tensor, "b hs ws ht wt"],
    src_kps: Float[Tensor, "b n 2"],
    trg_kps: Float[Tensor, "b n 2"],
    valid: Bool[Tensor, "b n"],
    *,
    kernel: Float[Tensor, "k k"] | None,
    weighting: TargetWeighting = "inverse_distance",
) -> Float[Tensor, ""]:
    """MMNet's loss on one correlation: BCE of the softmaxed row at each source keypoint vs the blurred target.

    ``src_kps`` in source-grid cells and ``trg_kps`` in target-grid cells (see the module's
    convention). Summed over valid keypoints, divided by the batch size (as released).
    """
    check_rank("corr", corr, 5, "b hs ws ht wt")
    b, _, _, ht, wt = corr.shape
    _check_keypoints("src_kps", src_kps, b)
    _check_keypoints("trg_kps", trg_kps, b)
    if src_kps.shape != trg_kps.shape:
        raise ValueError(f"src_kps {tuple(src_kps.shape)} and trg_kps {tuple(trg_kps.shape)} must match")
    _check_valid(valid, src_kps)
    keep = valid[..., None]
    src = torch.where(keep, src_kps, torch.zeros_like(src_kps))
    trg = torch.where(keep, trg_kps, torch.zeros_like(trg_kps))
    rows = sample_correlation(corr, src).flatten(2)
    target = keypoint_target_map(trg, (ht, wt), kernel=kernel, weighting=weighting).flatten(2)
    return softmax_bce(rows, target, valid).sum() / b


class CorrelationKeypointLoss(nn.Module):
    """Module form of :func:`correlation_keypoint_loss`; the Gaussian kernel is a buffer.

    Args:
        blur_side: side of the Gaussian blur (3 in the released code; 1 = no blur).
        blur_sigma: its σ (``blur_side / 2 / 2.354`` ≈ 0.637 when None, the released value).
        weighting: "inverse_distance" (released) or "bilinear" (see :func:`keypoint_target_map`).
    """

    kernel: Tensor

    def __init__(
        self, *, blur_side: int = 3, blur_sigma: float | None = None, weighting: TargetWeighting = "inverse_distance"
    ) -> None:
        super().__init__()
        if weighting not in ("inverse_distance", "bilinear"):
            raise ValueError(f"weighting = {weighting!r}: expected 'inverse_distance' or 'bilinear'")
        sigma = blur_side / 2 / FWHM_PER_SIGMA if blur_sigma is None else blur_sigma
        self.weighting: TargetWeighting = weighting
        self.register_buffer("kernel", gaussian_kernel2d(blur_side, sigma), persistent=False)

    def forward(
        self,
        corr: Float[Tensor, "b hs ws ht wt"],
        src_kps: Float[Tensor, "b n 2"],
        trg_kps: Float[Tensor, "b n 2"],
        valid: Bool[Tensor, "b n"],
    ) -> Float[Tensor, ""]:
        return correlation_keypoint_loss(corr, src_kps, trg_kps, valid, kernel=self.kernel, weighting=self.weighting)


def _cell_positions(index: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    return torch.stack((index % width, torch.div(index, width, rounding_mode="floor")), dim=-1).to(dtype)


def argmax_transfer(corr: Float[Tensor, "b hs ws ht wt"], kps: Float[Tensor, "b n 2"]) -> Float[Tensor, "b n 2"]:
    """Transfer source keypoints to the target cell of highest (bilinearly sampled) correlation.

    Convention:
        Input in source-grid cells, output the **centre** of the winning target cell in target-grid
        cells (integers). Ties go to the lowest flat index (row-major), like ``torch.argmax``.
    """
    rows = sample_correlation(corr, kps).flatten(2)
    return _cell_positions(rows.argmax(dim=-1), corr.shape[-1], kps.dtype)


def _row_argmax(rows: Tensor) -> Tensor:
    """``rows.flatten(1).argmax(1)`` for rows ``(r, ht, wt)``, in two passes that vectorise.

    The maximum of every target row (``amax``, a plain reduction), the first target row holding
    the overall maximum, then the first column holding it in that row: the same first-occurrence
    index as ``argmax`` (for rows without NaN), at a fraction of the cost of PyTorch's
    index-tracking reduction over ~10⁷ values.
    """
    best_row = rows.amax(dim=-1).argmax(dim=-1)  # r
    picked = rows[torch.arange(rows.shape[0], device=rows.device), best_row]  # r wt
    return best_row * rows.shape[-1] + picked.argmax(dim=-1)


def argmax_flow(corr: Float[Tensor, "b hs ws ht wt"]) -> Float[Tensor, "b 2 hs ws"]:
    """The hard counterpart of :func:`actr_core.blocks.soft_argmax`: flow to each source cell's best target cell.

    Convention:
        As ``soft_argmax``: ``(b, 2, hs, ws)``, channel 0 = x, in target-grid cells; the source cell
        ``x_s`` sits at ``(x_s + 0.5) · wt / ws − 0.5`` on the target grid. Not differentiable.
    """
    check_rank("corr", corr, 5, "b hs ws ht wt")
    b, hs, ws, ht, wt = corr.shape
    index = _row_argmax(corr.reshape(b * hs * ws, ht, wt)).view(b, hs * ws)
    dtype = corr.dtype if corr.is_floating_point() else torch.float32
    best = _cell_positions(index, wt, dtype)  # b (hs ws) 2
    src = rescale_coords(coords_grid(hs, ws, device=corr.device, dtype=dtype).flatten(1).T, (hs, ws), (ht, wt))
    return (best - src).transpose(1, 2).reshape(b, 2, hs, ws)


def soft_argmax_transfer(corr: Float[Tensor, "b hs ws ht wt"], kps: Float[Tensor, "b n 2"], tau: float) -> Float[Tensor, "b n 2"]:
    """Transfer source keypoints to the expected target position under ``softmax(row / tau)``.

    Convention:
        As :func:`argmax_transfer` (cells, centres at integers); the temperature divides.
    """
    check_positive("tau", tau)
    rows = sample_correlation(corr, kps).flatten(2)
    probs = torch.softmax(rows / tau, dim=-1)
    ht, wt = corr.shape[-2:]
    positions = coords_grid(ht, wt, device=corr.device, dtype=probs.dtype).flatten(1)  # 2 l
    return torch.einsum("bnl,kl->bnk", probs, positions).to(kps.dtype)
