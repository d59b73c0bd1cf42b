"""Cross-entropy of a correlation against the ground-truth match: a loss that reaches Eq. 2 directly.

# b batch · hs ws source grid · ht wt target grid · h w flow grid (a multiple of the source grid) ·
# 2 (x, y), channel 0 = x

Not in the paper (ACTR trains with Eq. 4 alone). From random weights, Eq. 4 reaches the
correlation only through the soft-argmax and the super-resolution module, and a model can lower
it by predicting the data set's mean flow while its correlation stays flat (docs/training.md
measures this). This term scores the correlation itself: every source cell's distribution over
the target cells (Eq. 2) should put its mass where the source cell's match is.
"""

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from actr_core.blocks._checks import check_bool, check_positive, check_rank
from actr_core.flow import coords_grid, pool_flow

__all__ = ["CorrelationCrossEntropy", "correlation_cross_entropy"]


def correlation_cross_entropy(
    corr: Float[Tensor, "b hs ws ht wt"],
    target: Float[Tensor, "b 2 hs ws"],
    valid: Bool[Tensor, "b hs ws"],
) -> Float[Tensor, ""]:
    """``−Σ_t q_t log C_st`` per valid source cell, averaged per sample, then over samples.

    ``corr`` holds, for every source cell, a distribution over the target cells (Eq. 2: rows sum
    to 1). ``target`` is the ground-truth flow on the source grid in target-grid cells; the match
    ``p = pos_s + target`` is spread bilinearly over the four target cells around it (``q``, the
    weights of a bilinear interpolation at ``p``; positions outside the grid are clamped to its
    border), so a sub-cell match has a target distribution whose expectation is the match itself.

    Convention:
        Cell centres sit at integer coordinates; the source grid equals the target grid
        (``hs, ws == ht, wt``: both images enter at one size). ``log C`` is floored at the dtype's
        smallest normal number, so a zero probability gives a large finite loss, not inf (and no
        gradient: an entry that has underflowed to below the floor is not pushed back up by this
        term; a softmax correlation reaches it through its other entries).
        Invalid cells are never read; the per-sample mean runs over valid cells and samples
        without one are left out (as in :func:`~actr_core.blocks.masked_flow_loss`).
    """
    check_rank("corr", corr, 5, "b hs ws ht wt")
    check_rank("target", target, 4, "b 2 hs ws")
    check_bool("valid", valid)
    b, hs, ws, ht, wt = corr.shape
    if (hs, ws) != (ht, wt) or ht < 2 or wt < 2:
        raise ValueError(f"corr has shape {tuple(corr.shape)}: expected equal source and target grids of at least 2 × 2")
    if target.shape != (b, 2, hs, ws) or valid.shape != (b, hs, ws):
        raise ValueError(
            f"target {tuple(target.shape)} and valid {tuple(valid.shape)} must be (b, 2, hs, ws) and (b, hs, ws) "
            f"= ({b}, 2, {hs}, {ws}) and ({b}, {hs}, {ws}) for corr {tuple(corr.shape)}"
        )
    inside = valid.unsqueeze(1)
    match = coords_grid(hs, ws, device=corr.device, dtype=corr.dtype) + torch.where(inside, target, 0.0)
    x = match[:, 0].clamp(0, wt - 1)
    y = match[:, 1].clamp(0, ht - 1)
    x0 = x.floor().clamp(max=wt - 2)
    y0 = y.floor().clamp(max=ht - 2)
    fx, fy = x - x0, y - y0
    log_c = torch.log(rearrange(corr, "b hs ws ht wt -> b hs ws (ht wt)").clamp_min(torch.finfo(corr.dtype).tiny))
    corners = (
        (x0, y0, (1 - fx) * (1 - fy)),
        (x0 + 1, y0, fx * (1 - fy)),
        (x0, y0 + 1, (1 - fx) * fy),
        (x0 + 1, y0 + 1, fx * fy),
    )
    nll = torch.zeros_like(x)
    for cx, cy, weight in corners:
        index = (cy * wt + cx).long().unsqueeze(-1)
        nll = nll - weight * torch.gather(log_c, -1, index)[..., 0]
    nll = torch.where(valid, nll, 0.0)
    count = valid.sum(dim=(1, 2))
    per_sample = nll.sum(dim=(1, 2)) / count.clamp_min(1).to(nll.dtype)
    has_valid = count > 0
    return torch.where(has_valid, per_sample, 0.0).sum() / has_valid.sum().clamp_min(1).to(nll.dtype)


class CorrelationCrossEntropy(nn.Module):
    """A loss term on a matcher's per-path correlations: ``weight`` × the mean over paths of
    :func:`correlation_cross_entropy` against the ground-truth flow pooled to the token grid.

    ``forward(correlations, flow, valid)``: correlations ``(b, m, hs, ws, ht, wt)``; the flow
    ``(b, 2, h, w)`` and its mask on the model's flow grid, ``h = k·hs`` for a whole ``k``
    (pooled with :func:`actr_core.flow.pool_flow`).
    """

    def __init__(self, weight: float) -> None:
        super().__init__()
        check_positive("weight", weight)
        self.weight = float(weight)

    def forward(
        self,
        correlations: Float[Tensor, "b m hs ws ht wt"],
        flow: Float[Tensor, "b 2 h w"],
        valid: Bool[Tensor, "b h w"],
    ) -> Float[Tensor, ""]:
        check_rank("correlations", correlations, 6, "b m hs ws ht wt")
        check_rank("flow", flow, 4, "b 2 h w")
        hs = correlations.shape[2]
        factor, rest = divmod(flow.shape[2], hs)
        if rest or factor < 1 or flow.shape[3] != factor * correlations.shape[3]:
            raise ValueError(
                f"flow grid {tuple(flow.shape[2:])} is not a whole multiple of the correlation's source grid "
                f"{tuple(correlations.shape[2:4])}"
            )
        target, target_valid = pool_flow(flow, valid, factor)
        terms = [correlation_cross_entropy(c, target, target_valid) for c in correlations.unbind(dim=1)]
        return self.weight * torch.stack(terms).mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
