"""Dot-product correlation, nearest upsampling and MMNet's coarse-to-fine accumulation."""

import pytest
import torch
import torch.nn.functional as F
from tolerances import float32_tolerance

from actr_core.blocks.coarse_to_fine import (
    coarse_to_fine_correlation,
    correlation_pyramid,
    dot_product_correlation,
    reverse_correlation,
    upsample_correlation,
)


def _released_upsample(corr: torch.Tensor, ratio: int = 2) -> torch.Tensor:
    """The released two-pass nearest interpolation (target grid first, then source grid)."""
    n, h0, w0, h1, w1 = corr.shape
    x = F.interpolate(corr.reshape(n, h0 * w0, h1, w1), size=[h1 * ratio, w1 * ratio])
    x = x.permute(0, 2, 3, 1).reshape(n, ratio * ratio * h1 * w1, h0, w0)
    x = F.interpolate(x, size=[h0 * ratio, w0 * ratio])
    return x.permute(0, 2, 3, 1).reshape(n, ratio * h0, ratio * w0, ratio * h1, ratio * w1)


def test_dot_product_matches_einsum_h_ne_w():
    f_src, f_trg = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 2, 6)
    corr = dot_product_correlation(f_src, f_trg)
    assert corr.shape == (2, 3, 4, 2, 6)
    expected = torch.einsum("ijkl,ijmn->iklmn", f_src.double(), f_trg.double())
    tol = float32_tolerance(expected, terms=5)  # dot products over 5 channels
    torch.testing.assert_close(corr.double(), expected, atol=tol, rtol=0)


def test_dot_product_accepts_channels_last():
    f_src, f_trg = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    cl = torch.channels_last
    expected = dot_product_correlation(f_src, f_trg)
    torch.testing.assert_close(  # dot products over 5 channels, perhaps by another matrix-product kernel
        dot_product_correlation(f_src.contiguous(memory_format=cl), f_trg.contiguous(memory_format=cl)),
        expected,
        atol=float32_tolerance(expected, terms=5),
        rtol=0,
    )


def test_upsample_matches_released_interpolation():
    corr = torch.randn(2, 2, 3, 3, 2)
    torch.testing.assert_close(upsample_correlation(corr), _released_upsample(corr), atol=0, rtol=0)  # exact: copies
    assert upsample_correlation(corr, 1) is corr


def test_fused_equals_reference_and_blocks_gradient_to_coarser():
    torch.manual_seed(0)
    f_src = torch.randn(2, 4, 4, 6, requires_grad=True)
    f_trg = torch.randn(2, 4, 4, 6, requires_grad=True)
    coarser = torch.randn(2, 2, 3, 2, 3, requires_grad=True)
    fused = coarse_to_fine_correlation(f_src, f_trg, coarser)
    reference = dot_product_correlation(f_src, f_trg) + upsample_correlation(coarser).detach()
    torch.testing.assert_close(fused, reference, atol=0, rtol=0)  # exact: one matrix product, the same additions
    weight = torch.randn_like(fused)
    g_fused = torch.autograd.grad((fused * weight).sum(), (f_src, f_trg), retain_graph=True)
    g_ref = torch.autograd.grad((reference * weight).sum(), (f_src, f_trg))
    # the gradient reaches the product through a strided view: sums over the 24 cells of the other grid
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, atol=float32_tolerance(b, terms=24), rtol=0)
    (fused.sum()).backward()
    assert coarser.grad is None


def test_equal_grids_add_directly():
    f = torch.randn(1, 3, 2, 3)
    coarser = torch.randn(1, 2, 3, 2, 3)
    torch.testing.assert_close(  # exact: the same product and addition
        coarse_to_fine_correlation(f, f, coarser), dot_product_correlation(f, f) + coarser, atol=0, rtol=0
    )
    assert coarse_to_fine_correlation(f, f).shape == (1, 2, 3, 2, 3)


def test_convention_reverse_is_the_target_to_source_pyramid():
    """The released code computes C^BA with its own products and sums; ours is a permuted view."""
    torch.manual_seed(0)
    coarse_s, coarse_t = torch.randn(1, 3, 2, 3), torch.randn(1, 3, 2, 3)
    fine_s, fine_t = torch.randn(1, 3, 4, 6), torch.randn(1, 3, 4, 6)
    ab = coarse_to_fine_correlation(fine_s, fine_t, coarse_to_fine_correlation(coarse_s, coarse_t))
    ba_coarse = torch.einsum("ijkl,ijmn->iklmn", coarse_t, coarse_s)
    ba = torch.einsum("ijkl,ijmn->iklmn", fine_t, fine_s) + _released_upsample(ba_coarse)
    rev = reverse_correlation(ab)
    # dot products over 3 channels at both levels, in another order, and one addition
    torch.testing.assert_close(rev, ba, atol=float32_tolerance(ba, terms=7), rtol=0)
    assert rev.data_ptr() == ab.data_ptr()  # a view, no copy


def test_gradcheck():
    torch.manual_seed(0)
    f_src = torch.randn(1, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    f_trg = torch.randn(1, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    coarser = torch.randn(1, 1, 2, 1, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: coarse_to_fine_correlation(a, b, coarser), (f_src, f_trg), fast_mode=True)


class TestErrors:
    def test_features_must_match(self, no_typecheck):
        with pytest.raises(ValueError, match="share batch and channels"):
            dot_product_correlation(torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2))
        with pytest.raises(ValueError, match="4 dimensions"):
            dot_product_correlation(torch.randn(3, 2, 2), torch.randn(1, 3, 2, 2))

    def test_factor_must_be_one_integer(self, no_typecheck):
        f = torch.randn(1, 2, 4, 6)
        with pytest.raises(ValueError, match="not an integer multiple"):
            coarse_to_fine_correlation(f, f, torch.randn(1, 3, 3, 3, 3))
        with pytest.raises(ValueError, match="one integer factor"):
            coarse_to_fine_correlation(f, f, torch.randn(1, 2, 3, 4, 6))
        with pytest.raises(ValueError, match="5 dimensions"):
            coarse_to_fine_correlation(f, f, torch.randn(2, 3, 2, 3))

    def test_upsample_factor(self, no_typecheck):
        with pytest.raises(ValueError, match="factor"):
            upsample_correlation(torch.randn(1, 2, 2, 2, 2), 0)


def test_pyramid_equals_chained_coarse_to_fine_values_and_gradients():
    torch.manual_seed(0)
    sizes = [(1, 2), (2, 4), (4, 8)]
    f_src = [torch.randn(2, 3, *s, requires_grad=True) for s in sizes]
    f_trg = [torch.randn(2, 3, *s, requires_grad=True) for s in sizes]
    fast = correlation_pyramid(f_src, f_trg)
    chained = []
    for s, t in zip(f_src, f_trg):
        chained.append(coarse_to_fine_correlation(s, t, chained[-1] if chained else None))
    weights = [torch.randn_like(c) for c in chained]
    # one dot product over the 9 stacked channels against three of 3 added level by level
    for a, b in zip(fast, chained):
        torch.testing.assert_close(a, b, atol=float32_tolerance(b, terms=9 + 2), rtol=0)
    inputs = (*f_src, *f_trg)
    g_fast = torch.autograd.grad(sum((c * w).sum() for c, w in zip(fast, weights)), inputs)
    g_chain = torch.autograd.grad(sum((c * w).sum() for c, w in zip(chained, weights)), inputs)
    # each level's gradient: sums over the 32 cells of the other grid at most
    for a, b in zip(g_fast, g_chain):
        torch.testing.assert_close(a, b, atol=float32_tolerance(b, terms=32), rtol=0)


def test_pyramid_level_factor_must_match(no_typecheck):
    f = [torch.randn(1, 2, 2, 3), torch.randn(1, 2, 4, 9)]
    with pytest.raises(ValueError, match="one factor"):
        correlation_pyramid(f, f)
    with pytest.raises(ValueError, match="same number"):
        correlation_pyramid(f, f[:1])
