"""Multi-head correlation (Eq. 2): layout, [cls] convention, agreement with the cross-attention map."""

import pytest
import torch
from einops import rearrange
from tolerances import float32_tolerance

from actr_core.blocks import (
    MultiHeadCorrelation,
    correlation_from_attention,
    cross_attention_probs,
    multihead_correlation,
)


def test_shapes_and_rows_sum_to_one():
    module = MultiHeadCorrelation(16, 4)
    corr = module(torch.randn(3, 1 + 2 * 5, 16), torch.randn(3, 1 + 4 * 3, 16), src_size=(2, 5), trg_size=(4, 3))
    assert corr.shape == (3, 2, 5, 4, 3)
    ones = torch.ones(3, 2, 5)
    # softmax over 12 target cells, a mean over 4 heads, then the test's sum over 12
    torch.testing.assert_close(corr.sum((-2, -1)), ones, atol=float32_tolerance(ones, terms=31), rtol=0)
    assert (corr >= 0).all()


def test_grid_layout_is_row_major():
    """Source cell k carries target cell perm[k]'s feature: the peak must sit at that cell."""
    hs, ws, ht, wt = 2, 3, 3, 2
    c = ht * wt
    trg_cells = torch.eye(c) * 4.0
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    src = torch.cat((torch.zeros(1, c), trg_cells[perm]))[None]
    trg = torch.cat((torch.zeros(1, c), trg_cells))[None]
    qk = torch.cat((torch.eye(c), torch.eye(c)))
    corr = multihead_correlation(src, trg, qk, None, num_heads=1, src_size=(hs, ws), trg_size=(ht, wt), scale=10.0)
    flat = rearrange(corr, "b hs ws ht wt -> b (hs ws) (ht wt)")
    assert torch.equal(flat.argmax(-1)[0], perm)
    # source cell (row 1, col 0) is patch 1·ws + 0 = 3 → target patch perm[3] = 2 = (row 1, col 0)
    assert corr[0, 1, 0].argmax().item() == 2 and corr[0, 1, 0, 1, 0] > 0.99


def test_mean_over_heads_of_per_head_softmax():
    torch.manual_seed(0)
    c, g = 8, 2
    src, trg = torch.randn(1, 1 + 6, c), torch.randn(1, 1 + 4, c)
    qk_w, qk_b = torch.randn(2 * c, c), torch.randn(2 * c)
    corr = multihead_correlation(src, trg, qk_w, qk_b, num_heads=g, src_size=(2, 3), trg_size=(2, 2))
    src, trg, qk_w, qk_b = (t.double() for t in (src, trg, qk_w, qk_b))
    q = torch.nn.functional.linear(src[:, 1:], qk_w[:c], qk_b[:c])
    k = torch.nn.functional.linear(trg[:, 1:], qk_w[c:], qk_b[c:])
    scores = [q[..., h * 4 : (h + 1) * 4] @ k[..., h * 4 : (h + 1) * 4].mT / 2.0 for h in range(g)]
    expected = (scores[0].softmax(-1) + scores[1].softmax(-1)) / 2
    # probabilities err by the scores' error: projections over 8 channels, dots over 4, softmax over 4, mean of 2
    tol = float32_tolerance(torch.stack(scores), terms=8 + 4 + 6 + 3)
    torch.testing.assert_close(corr.reshape(1, 6, 4).double(), expected, atol=tol, rtol=0)


def test_convention_correlation_cls_removed_before_softmax():
    """[cls] is dropped before the softmax; the misreading (softmax with [cls], then drop) differs."""
    torch.manual_seed(1)
    c = 4
    src, trg = torch.randn(1, 1 + 2, c), torch.randn(1, 1 + 3, c)
    trg[0, 0] = 3.0 * src[0, 1:].mean(0)  # a [cls] that draws attention
    qk = torch.cat((torch.eye(c), torch.eye(c)))
    corr = multihead_correlation(src, trg, qk, None, num_heads=1, src_size=(1, 2), trg_size=(1, 3), scale=1.0)
    scores = src[0, 1:] @ trg[0, 1:].T
    # identity projections are exact; probabilities err by the scores' error (dots over 4, softmax over 3)
    torch.testing.assert_close(corr.reshape(2, 3), torch.softmax(scores, -1), atol=float32_tolerance(scores, terms=9), rtol=0)
    misread = torch.softmax(src[0, 1:] @ trg[0].T, -1)[:, 1:]
    assert not torch.allclose(corr.reshape(2, 3), misread, atol=1e-3)


def test_from_attention_equals_direct_eq2():
    """The cross-attention's map (softmax incl. [cls]) renormalised gives exactly Eq. 2 with the same W^Q, W^K."""
    torch.manual_seed(2)
    c, g = 8, 2
    src, trg = torch.randn(2, 1 + 3 * 2, c, dtype=torch.float64), torch.randn(2, 1 + 2 * 4, c, dtype=torch.float64)
    qkv_w, qkv_b = torch.randn(3 * c, c, dtype=torch.float64), torch.randn(3 * c, dtype=torch.float64)
    attn = cross_attention_probs(src, trg, qkv_w, qkv_b, num_heads=g)
    via_attn = correlation_from_attention(attn, src_size=(3, 2), trg_size=(2, 4))
    direct = multihead_correlation(src, trg, qkv_w[: 2 * c], qkv_b[: 2 * c], num_heads=g, src_size=(3, 2), trg_size=(2, 4))
    torch.testing.assert_close(via_attn, direct)


def test_no_prefix_tokens():
    module = MultiHeadCorrelation(8, 2, num_prefix_tokens=0)
    corr = module(torch.randn(2, 6, 8), torch.randn(2, 4, 8), src_size=(3, 2), trg_size=(1, 4))
    assert corr.shape == (2, 3, 2, 1, 4)


def test_gradcheck():
    c = 4
    src = torch.randn(2, 1 + 3, c, dtype=torch.float64, requires_grad=True)
    trg = torch.randn(2, 1 + 2, c, dtype=torch.float64, requires_grad=True)
    qk_w = torch.randn(2 * c, c, dtype=torch.float64, requires_grad=True)
    qk_b = torch.randn(2 * c, dtype=torch.float64, requires_grad=True)

    def f(src, trg, qk_w, qk_b):
        return multihead_correlation(src, trg, qk_w, qk_b, num_heads=2, src_size=(1, 3), trg_size=(2, 1))

    assert torch.autograd.gradcheck(f, (src, trg, qk_w, qk_b), fast_mode=True)
    attn = torch.softmax(torch.randn(1, 2, 4, 3, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a: correlation_from_attention(a, src_size=(1, 3), trg_size=(1, 2)), (attn,), fast_mode=True
    )


@pytest.mark.usefixtures("no_typecheck")
def test_errors():
    module = MultiHeadCorrelation(8, 2)
    with pytest.raises(ValueError, match="src has 7 tokens but its grid is \\(2, 2\\) with 1 prefix tokens: expected 5"):
        module(torch.randn(1, 7, 8), torch.randn(1, 5, 8), src_size=(2, 2), trg_size=(2, 2))
    with pytest.raises(ValueError, match=r"trg has shape \(5, 8\)"):
        module(torch.randn(1, 5, 8), torch.randn(5, 8), src_size=(2, 2), trg_size=(2, 2))
    with pytest.raises(ValueError, match=r"qk_weight has shape \(24, 8\): expected \(16, 8\)"):
        multihead_correlation(
            torch.randn(1, 5, 8),
            torch.randn(1, 5, 8),
            torch.randn(24, 8),
            None,
            num_heads=2,
            src_size=(2, 2),
            trg_size=(2, 2),
        )
    with pytest.raises(ValueError, match=r"attn \(target axis\) has 5 tokens"):
        correlation_from_attention(torch.rand(1, 2, 5, 5), src_size=(2, 2), trg_size=(1, 3))
    with pytest.raises(ValueError, match=r"attn has shape \(2, 5, 5\)"):
        correlation_from_attention(torch.rand(2, 5, 5), src_size=(2, 2), trg_size=(2, 2))
