"""Dot-product correlation and MMNet's coarse-to-fine accumulation (Zhao et al., ICCV 2021, Sec. 3).

# b batch · c channels · hs ws source grid · ht wt target grid · f upsampling factor

``C_l = ⟨F^src_l, F^trg_l⟩ + up(C_{l+1}).detach()``: each level's raw dot-product correlation plus
the coarser level's accumulated correlation, nearest-upsampled on both grids and cut from the graph
(no gradient flows from a finer level into a coarser one).

Three paths compute the same thing, tested equal: the reference (:func:`dot_product_correlation`,
:func:`upsample_correlation`, an addition); :func:`coarse_to_fine_correlation`, which adds the
coarser level in place through a broadcast view instead of materialising the upsampled tensor (at
56 × 80 cells both are ``(hs ws)² = 2 · 10⁷`` values); and :func:`correlation_pyramid`, which
never adds correlations at all. Nearest upsampling commutes with the dot product,
``up(⟨F^s, F^t⟩) = ⟨up F^s, up F^t⟩``, so ``C_l = ⟨[F_l, up G_{l-1}], [F_l, up G_{l-1}]⟩`` with
``G_{l-1} = [F_{l-1}, up G_{l-2}]`` the (detached) channel stack of the coarser levels: one matrix
product per level with ``c · (l + 1)`` channels, and no pass over the big tensor besides writing it.

Convention:
    The reverse direction needs no second product: for raw dot products ``C^BA[t, s] = C^AB[s, t]``,
    and nearest upsampling and sums keep that symmetry, so the target → source correlation of every
    level is :func:`reverse_correlation` of the source → target one (a permuted view, no copy).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from actr_core.blocks._checks import check_rank

__all__ = [
    "coarse_to_fine_correlation",
    "correlation_pyramid",
    "dot_product_correlation",
    "reverse_correlation",
    "upsample_correlation",
]


def _check_features(f_src: Tensor, f_trg: Tensor) -> None:
    check_rank("f_src", f_src, 4, "b c hs ws")
    check_rank("f_trg", f_trg, 4, "b c ht wt")
    if f_src.shape[:2] != f_trg.shape[:2]:
        raise ValueError(f"f_src {tuple(f_src.shape)} and f_trg {tuple(f_trg.shape)} must share batch and channels")


def dot_product_correlation(
    f_src: Float[Tensor, "b c hs ws"], f_trg: Float[Tensor, "b c ht wt"]
) -> Float[Tensor, "b hs ws ht wt"]:
    """Raw dot product of every source cell with every target cell: ``C[s, t] = Σ_c F^src[c, s] F^trg[c, t]``.

    No normalisation, no temperature (as in MMNet). One batched matrix product.
    """
    _check_features(f_src, f_trg)
    b, c, hs, ws = f_src.shape
    ht, wt = f_trg.shape[-2:]
    # cells-major views: free for channels-last features, a small copy otherwise
    cells_src = f_src.permute(0, 2, 3, 1).reshape(b, hs * ws, c)
    cells_trg = f_trg.permute(0, 2, 3, 1).reshape(b, ht * wt, c)
    return torch.bmm(cells_src, cells_trg.transpose(1, 2)).view(b, hs, ws, ht, wt)


def _factor(name: str, fine: int, coarse: int) -> int:
    if coarse <= 0 or fine % coarse != 0:
        raise ValueError(f"{name}: the fine size {fine} is not an integer multiple of the coarse size {coarse}")
    return fine // coarse


def upsample_correlation(corr: Float[Tensor, "b hs ws ht wt"], factor: int = 2) -> Float[Tensor, "b hs2 ws2 ht2 wt2"]:
    """Nearest-neighbour upsampling by ``factor`` on all four grid axes: ``out[s, t] = corr[s // f, t // f]``.

    This is ``F.interpolate(mode="nearest")`` on the target grid followed by the source grid, as
    in the released code; a ``factor`` of 1 returns the input.
    """
    check_rank("corr", corr, 5, "b hs ws ht wt")
    if factor < 1:
        raise ValueError(f"factor = {factor}: expected an integer >= 1")
    if factor == 1:
        return corr
    b, hs, ws, ht, wt = corr.shape
    f = factor
    view = corr[:, :, None, :, None, :, None, :, None].expand(b, hs, f, ws, f, ht, f, wt, f)
    return view.reshape(b, hs * f, ws * f, ht * f, wt * f)


def coarse_to_fine_correlation(
    f_src: Float[Tensor, "b c hs ws"],
    f_trg: Float[Tensor, "b c ht wt"],
    coarser: Float[Tensor, "b hc wc htc wtc"] | None = None,
) -> Float[Tensor, "b hs ws ht wt"]:
    """``dot_product_correlation(f_src, f_trg) + upsample_correlation(coarser).detach()`` in one pass.

    The factor is the ratio of the grids (the same integer on all four axes, 2 between ResNet
    stages). The coarser correlation is added in place through a broadcast view of the product, so
    the upsampled tensor is never built; no gradient reaches ``coarser``.
    """
    corr = dot_product_correlation(f_src, f_trg)
    if coarser is None:
        return corr
    check_rank("coarser", coarser, 5, "b hc wc htc wtc")
    b, hs, ws, ht, wt = corr.shape
    _, hc, wc, htc, wtc = coarser.shape
    factors = {
        _factor("hs", hs, hc),
        _factor("ws", ws, wc),
        _factor("ht", ht, htc),
        _factor("wt", wt, wtc),
    }
    if len(factors) != 1 or coarser.shape[0] != b:
        raise ValueError(
            f"coarser {tuple(coarser.shape)} must share the batch and be one integer factor coarser on all "
            f"four axes than the correlation {tuple(corr.shape)}"
        )
    (f,) = factors
    coarse = coarser.detach()
    if f == 1:
        return corr + coarse
    blocks = corr.view(b, hc, f, wc, f, htc, f, wtc, f)
    blocks.add_(coarse[:, :, None, :, None, :, None, :, None])
    return corr


def correlation_pyramid(
    f_src: Sequence[Float[Tensor, "b c _ _"]], f_trg: Sequence[Float[Tensor, "b c _ _"]]
) -> list[Float[Tensor, "b _ _ _ _"]]:
    """Every level of the coarse-to-fine pyramid, coarsest first, by stacking upsampled features.

    Equal to chaining :func:`coarse_to_fine_correlation` from the coarsest level, values and
    gradients (the coarser features enter each finer product detached), up to float rounding.
    Each level must be one integer factor finer than the previous on both axes.
    """
    if len(f_src) != len(f_trg) or not f_src:
        raise ValueError(f"got {len(f_src)} source and {len(f_trg)} target levels: expected the same number >= 1")
    pyramid: list[Tensor] = []
    stack_src: Tensor | None = None
    stack_trg: Tensor | None = None
    for level, (s, t) in enumerate(zip(f_src, f_trg, strict=True)):
        _check_features(s, t)
        if s.shape[-2:] != t.shape[-2:]:
            raise ValueError(f"level {level}: source {tuple(s.shape)} and target {tuple(t.shape)} grids differ")
        if stack_src is not None and stack_trg is not None:
            (h, w), (hc, wc) = s.shape[-2:], stack_src.shape[-2:]
            f = _factor(f"level {level} height", h, hc)
            if _factor(f"level {level} width", w, wc) != f:
                raise ValueError(f"level {level} is {h}x{w} but the coarser one is {hc}x{wc}: expected one factor")
            s = torch.cat((s, _upsample_nearest(stack_src.detach(), f)), dim=1)
            t = torch.cat((t, _upsample_nearest(stack_trg.detach(), f)), dim=1)
        stack_src, stack_trg = s, t
        pyramid.append(dot_product_correlation(s, t))
    return pyramid


def _upsample_nearest(x: Tensor, factor: int) -> Tensor:
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="nearest")


def reverse_correlation(corr: Float[Tensor, "b hs ws ht wt"]) -> Float[Tensor, "b ht wt hs ws"]:
    """The target → source correlation of a symmetric (dot-product) correlation: a permuted view."""
    check_rank("corr", corr, 5, "b hs ws ht wt")
    return corr.permute(0, 3, 4, 1, 2)
