"""Salient target reweighting (Eq. 1): weights, normalisation, the target block, gradients, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import float32_tolerance

from actr_core.blocks import (
    BiasedCrossAttention,
    ReweightedTargetBlock,
    TargetReweighting,
    target_reweighting,
    target_token_weights,
)


def _attn(b: int, g: int, ns: int, nt: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, g, ns, nt, generator=gen, dtype=dtype) * 2, dim=-1)


@given(b=st.integers(1, 3), g=st.integers(1, 4), ns=st.integers(1, 9), nt=st.integers(1, 9), seed=st.integers(0, 99))
def test_weights_average_one_per_sample_and_are_the_scaled_raw_sum(b, g, ns, nt, seed):
    """v = (Σ_g Σ_s A) / mean; the raw sum averages g·ns/nt because every attention row sums to 1."""
    attn = _attn(b, g, ns, nt, seed)
    v = target_token_weights(attn)
    assert v.shape == (b, nt)
    # the raw sum over g·ns rows, its mean over nt, a division, the test's mean over nt
    torch.testing.assert_close(v.mean(-1), torch.ones(b), atol=float32_tolerance(1.0, terms=g * ns + 2 * nt + 1), rtol=0)
    # and the softmax rows, which sum to 1 up to the rounding of nt + 2 steps
    raw = attn.sum(dim=(1, 2))
    tol = float32_tolerance(raw, terms=g * ns + 2 * nt + 4)
    torch.testing.assert_close(v * (g * ns / nt), raw, atol=tol, rtol=0)


def test_known_values():
    """Two heads, two source tokens, three target tokens; hand-computed weights."""
    attn = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]]])
    # raw sums per target token: 2.5, 1.0, 0.5 (total 4 = g·ns); mean 4/3
    expected = torch.tensor([[1.875, 0.75, 0.375]])
    tol = float32_tolerance(expected, terms=4 + 3 + 2)  # sums of g·ns = 4 (exact here), mean over 3, divide, scale
    torch.testing.assert_close(target_token_weights(attn), expected, atol=tol, rtol=0)
    tokens = torch.ones(1, 3, 2)
    torch.testing.assert_close(target_reweighting(tokens, attn), expected[..., None].expand(1, 3, 2), atol=tol, rtol=0)


def test_uniform_attention_leaves_tokens_unchanged():
    tokens = torch.randn(2, 5, 4)
    attn = torch.full((2, 3, 7, 5), 0.2)
    # equal raw sums (21 terms each, same order); their mean over 5 need not return them exactly
    torch.testing.assert_close(TargetReweighting()(tokens, attn), tokens, atol=float32_tolerance(tokens, terms=5 + 2), rtol=0)


def test_reweighting_does_not_grow_the_stream_over_blocks():
    """Normalised weights keep the mean token scale; the raw sum (mean H·ns/nt) would grow it H-fold per block."""
    tokens = torch.ones(1, 17, 4)
    attn = _attn(1, 8, 17, 17)
    out = tokens
    for _ in range(6):
        out = target_reweighting(out, attn)
    assert out.mean().item() < 8.0  # raw-sum reweighting: mean ≥ 8⁶


def test_block_equals_eq1_by_hand():
    torch.manual_seed(0)
    block = ReweightedTargetBlock(8, 2, mlp_ratio=2.0)
    tokens, attn = torch.randn(2, 5, 8), _attn(2, 2, 4, 5)
    z = tokens + block.attn(block.norm1(tokens))
    z = z * target_token_weights(attn)[..., None]
    expected = z + block.mlp(block.norm2(z))
    torch.testing.assert_close(block(tokens, attn), expected, atol=0, rtol=0)  # exact: forward runs these very steps


def test_block_composes_with_cross_attention_on_input_tokens():
    """The intended composition: Eq. 1's map from the block's input tokens, then the target block."""
    src, trg = torch.randn(2, 1 + 3 * 4, 16), torch.randn(2, 1 + 2 * 5, 16)
    cross, block, norm = BiasedCrossAttention(16, 4), ReweightedTargetBlock(16, 4), torch.nn.LayerNorm(16)
    out = block(trg, cross.attention(norm(src), norm(trg)))
    assert out.shape == trg.shape
    out.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradcheck():
    tokens = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    attn = _attn(2, 2, 3, 4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(target_reweighting, (tokens, attn), fast_mode=True)


@pytest.mark.usefixtures("no_typecheck")
def test_errors():
    with pytest.raises(ValueError, match=r"attn has shape \(2, 3, 4\)"):
        target_token_weights(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 4\)"):
        target_reweighting(torch.rand(2, 4), torch.rand(2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 5, 3\) and attn has shape \(2, 1, 3, 4\)"):
        target_reweighting(torch.rand(2, 5, 3), torch.rand(2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 4, 3\) and attn has shape \(1, 1, 3, 4\)"):
        target_reweighting(torch.rand(2, 4, 3), torch.rand(1, 1, 3, 4))
