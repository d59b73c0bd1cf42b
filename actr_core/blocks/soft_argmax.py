"""Soft-argmax: correlation → coarse flow (paper Eq. 3).

# b batch · hs ws source grid · ht wt target grid · 2 (x, y), channel 0 = x
"""

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from actr_core.blocks._checks import check_positive, check_rank
from actr_core.flow import coords_grid, rescale_coords

__all__ = ["SoftArgmax", "soft_argmax"]


def soft_argmax(corr: Float[Tensor, "b hs ws ht wt"], tau: float) -> Float[Tensor, "b 2 hs ws"]:
    """Paper Eq. 3: ``Δ = soft_argmax(C_st)``, the expected match of every source cell, as a flow.

    ``p = softmax(corr / tau)`` over the ``ht · wt`` target cells of each source cell; the flow is
    ``Σ_t p_t · pos_t − pos_s``, where ``pos_t`` are target-cell centres and ``pos_s`` the source
    cell's centre expressed in target-grid cells.

    Convention:
        Output ``(b, 2, hs, ws)`` on the source grid, channel 0 = x (columns), channel 1 = y (rows),
        pointing into the target, in target-grid cells. The temperature divides (``tau → 0`` tends
        to the hard argmax; large ``tau`` to the uniform mean). Cell centres sit at integer
        coordinates; when the grids differ, the source cell ``(x_s, y_s)`` sits at
        ``x = (x_s + 0.5) · wt / ws − 0.5`` (and likewise y) on the target grid, so a one-hot
        correlation on equal grids gives an exact integer flow.

    ``tau`` has no default: the model chooses it (the released code uses 0.02 on head-summed
    attention in [0, H]).
    """
    check_rank("corr", corr, 5, "b hs ws ht wt")
    check_positive("tau", tau)
    _b, hs, ws, ht, wt = corr.shape
    probs = torch.softmax(rearrange(corr, "b hs ws ht wt -> b (hs ws) (ht wt)") / tau, dim=-1)
    trg_pos = rearrange(coords_grid(ht, wt, device=corr.device, dtype=corr.dtype), "two ht wt -> (ht wt) two")
    expected = torch.einsum("bst,tk->bsk", probs, trg_pos)
    src_pos = rearrange(coords_grid(hs, ws, device=corr.device, dtype=corr.dtype), "two hs ws -> (hs ws) two")
    src_in_trg = rescale_coords(src_pos, (hs, ws), (ht, wt))
    return rearrange(expected - src_in_trg, "b (hs ws) two -> b two hs ws", hs=hs, ws=ws)


class SoftArgmax(nn.Module):
    """Module form of :func:`soft_argmax` (paper Eq. 3); ``tau`` is a plain float, not a parameter."""

    def __init__(self, tau: float) -> None:
        super().__init__()
        check_positive("tau", tau)
        self.tau = float(tau)

    def forward(self, corr: Float[Tensor, "b hs ws ht wt"]) -> Float[Tensor, "b 2 hs ws"]:
        return soft_argmax(corr, self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"
