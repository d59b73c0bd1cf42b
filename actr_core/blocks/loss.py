"""Masked flow loss (paper Eq. 4): end-point error over the valid cells, normalised per sample.

# b batch · h w flow grid · 2 (x, y)
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from actr_core.blocks._checks import check_bool, check_rank

__all__ = ["MaskedFlowLoss", "check_flow_pair", "masked_flow_loss"]


def check_flow_pair(pred: Tensor, target: Tensor, valid: Tensor) -> None:
    """Raise ``ValueError`` naming the shapes unless ``pred`` and ``target`` are both ``(b, 2, h, w)``
    and ``valid`` is a boolean ``(b, h, w)`` mask (the contract of every flow loss)."""
    check_rank("pred", pred, 4, "b 2 h w")
    check_bool("valid", valid)
    if pred.shape[1] != 2 or target.shape != pred.shape:
        raise ValueError(
            f"pred has shape {tuple(pred.shape)} and target has shape {tuple(target.shape)}: expected both (b, 2, h, w)"
        )
    if valid.shape != (pred.shape[0], *pred.shape[2:]):
        raise ValueError(
            f"valid has shape {tuple(valid.shape)}: expected {(pred.shape[0], *pred.shape[2:])} (b, h, w) "
            f"for pred of shape {tuple(pred.shape)}"
        )


def masked_flow_loss(
    pred: Float[Tensor, "b 2 h w"],
    target: Float[Tensor, "b 2 h w"],
    valid: Bool[Tensor, "b h w"],
    *,
    squared: bool = False,
) -> Float[Tensor, ""]:
    """Paper Eq. 4: ``L = (1/N) Σ_samples (Σ_cells S ⊗ ‖pred − target‖) / |S|``.

    Per sample, the end-point error ``‖pred − target‖₂`` (``squared=True``: its square, the norm
    Eq. 4 writes) is averaged over the sample's valid cells (``|S|`` of Eq. 4), so a sample with one
    valid cell weighs as much as one with a hundred; the per-sample values are then averaged over
    the samples that have at least one valid cell (a sample without any has no ``|S|`` to divide
    by and is left out, not counted as 0).

    Invalid cells are replaced before any arithmetic (``torch.where``), so NaN or inf there reach
    neither the value nor the gradient; where ``pred == target`` exactly, the gradient of the
    unsquared norm is taken as 0. A batch with no valid cell gives 0, still connected to ``pred``
    (its gradient is 0), never NaN.
    """
    check_flow_pair(pred, target, valid)
    cell_valid = valid.unsqueeze(1)
    diff = torch.where(cell_valid, pred - torch.where(cell_valid, target, torch.zeros_like(target)), 0.0)
    sq = diff.square().sum(dim=1)
    if squared:
        err = sq
    else:
        positive = sq != 0  # NaN counts as non-zero, so a NaN prediction in a valid cell shows in the loss
        err = torch.where(positive, torch.sqrt(torch.where(positive, sq, 1.0)), 0.0)
    count = valid.sum(dim=(1, 2))
    per_sample = err.sum(dim=(1, 2)) / count.clamp_min(1).to(err.dtype)
    has_valid = count > 0
    num_samples = has_valid.sum().clamp_min(1).to(err.dtype)
    return torch.where(has_valid, per_sample, 0.0).sum() / num_samples


class MaskedFlowLoss(nn.Module):
    """Module form of :func:`masked_flow_loss` (paper Eq. 4)."""

    def __init__(self, *, squared: bool = False) -> None:
        super().__init__()
        self.squared = squared

    def forward(
        self, pred: Float[Tensor, "b 2 h w"], target: Float[Tensor, "b 2 h w"], valid: Bool[Tensor, "b h w"]
    ) -> Float[Tensor, ""]:
        return masked_flow_loss(pred, target, valid, squared=self.squared)

    def extra_repr(self) -> str:
        return f"squared={self.squared}"
