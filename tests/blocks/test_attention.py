"""Attention probabilities and biased cross-attention (Sec. 3.2): shapes, fused vs reference, known
values, gradients, errors."""

import pytest
import torch
from tolerances import float32_tolerance

from actr_core.blocks import BiasedCrossAttention, attention_probs, biased_cross_attention, cross_attention_probs


def _weights(c: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(3 * c, c, generator=g, dtype=dtype) / c**0.5,
        torch.randn(3 * c, generator=g, dtype=dtype) * 0.1,
        torch.randn(c, c, generator=g, dtype=dtype) / c**0.5,
        torch.randn(c, generator=g, dtype=dtype) * 0.1,
    )


def test_attention_probs_known_values_and_default_scale():
    """Per head, softmax(q kᵀ · scale) over the keys; the default scale is d^-1/2 (not c^-1/2, not 1)."""
    q = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    q[0, :, 0, 0] = 1.0
    k = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    k[0, 0, 1, 0] = 2.0  # head 0: key 1 scores 2, the others 0
    k[0, 1, 2, 0] = -2.0  # head 1: key 2 scores -2
    probs = attention_probs(q, k)
    e = torch.exp(torch.tensor(2.0 * 4**-0.5, dtype=torch.float64))
    expected0 = torch.stack((1 / (e + 2), e / (e + 2), 1 / (e + 2)))
    expected1 = torch.stack((e / (2 * e + 1), e / (2 * e + 1), 1 / (2 * e + 1)))
    torch.testing.assert_close(probs[0, 0, 0], expected0)  # float64 defaults: 1e-7
    torch.testing.assert_close(probs[0, 1, 0], expected1)
    unscaled = torch.softmax(torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64), -1)
    assert not torch.allclose(probs[0, 0, 0], unscaled)  # the misreading without the scale
    torch.testing.assert_close(attention_probs(q, k, scale=1.0)[0, 0, 0], unscaled)


def test_attention_probs_gradcheck():
    q = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: attention_probs(a, b, scale=0.7), (q, k))


def test_attention_probs_error_names_the_shape(no_typecheck):
    with pytest.raises(ValueError, match=r"q has shape \(2, 3, 2\): expected 4 dimensions"):
        attention_probs(torch.randn(2, 3, 2), torch.randn(1, 2, 4, 2))


def test_shapes_batch_and_unequal_token_counts():
    src, trg = torch.randn(3, 1 + 4 * 6, 16), torch.randn(3, 1 + 5 * 2, 16)
    update, attn = BiasedCrossAttention(16, 4)(src, trg)
    assert update.shape == (3, 25, 16)
    assert attn.shape == (3, 4, 25, 11)
    ones = torch.ones(3, 4, 25)
    # softmax over 11 tokens (exp, sum of 11, divide), then a sum of 11
    torch.testing.assert_close(attn.sum(-1), ones, atol=float32_tolerance(ones, terms=24), rtol=0)


def test_fused_path_equals_reference_path():
    src, trg = torch.randn(2, 7, 12, dtype=torch.float64), torch.randn(2, 9, 12, dtype=torch.float64)
    w = _weights(12, torch.float64)
    ref, attn = biased_cross_attention(src, trg, *w, num_heads=3, need_weights=True)
    fused, none = biased_cross_attention(src, trg, *w, num_heads=3, need_weights=False)
    assert none is None and attn is not None
    torch.testing.assert_close(fused, ref)


def test_module_attention_matches_forward_weights_and_function():
    module = BiasedCrossAttention(8, 2)
    src, trg = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    update, attn = module(src, trg)
    # exact: the module calls these functions with its own parameters, so the same kernels run on the same inputs
    torch.testing.assert_close(module.attention(src, trg), attn, atol=0, rtol=0)
    expected, _ = biased_cross_attention(
        src, trg, module.qkv.weight, module.qkv.bias, module.proj.weight, module.proj.bias, num_heads=2
    )
    torch.testing.assert_close(update, expected, atol=0, rtol=0)


def test_known_value_identical_target_tokens_give_their_value():
    """If every target token is the same, attention is uniform and the update is proj(W_v t)."""
    c = 8
    qkv_w, qkv_b, proj_w, proj_b = _weights(c)
    token = torch.randn(c)
    trg = token.expand(2, 5, c)
    src = torch.randn(2, 4, c)
    update, attn = biased_cross_attention(src, trg, qkv_w, qkv_b, proj_w, proj_b, num_heads=2)
    uniform = torch.full((2, 2, 4, 5), 0.2)
    # equal keys up to the rounding of their projections (8 terms) and of the scores (4), softmax over 5
    torch.testing.assert_close(attn, uniform, atol=float32_tolerance(uniform, terms=19), rtol=0)
    v = torch.nn.functional.linear(token, qkv_w[2 * c :], qkv_b[2 * c :])
    expected = torch.nn.functional.linear(v, proj_w, proj_b).expand(2, 4, c)
    # v over 8 channels, a weighted sum of 5, proj over 8
    torch.testing.assert_close(update, expected, atol=float32_tolerance(expected, terms=21), rtol=0)


def test_source_rows_are_independent():
    """Source tokens are queries only: changing one source token changes only its own row."""
    module = BiasedCrossAttention(8, 2)
    src, trg = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    out1, _ = module(src, trg)
    src2 = src.clone()
    src2[0, 2] += 1.0
    out2, _ = module(src2, trg)
    changed = (out1 - out2).abs().amax(-1)[0] > 0
    assert changed.tolist() == [False, False, True, False]


def test_scale_default_is_head_dim():
    c, g = 8, 2
    qkv_w, qkv_b, _, _ = _weights(c)
    src, trg = torch.randn(1, 3, c), torch.randn(1, 4, c)
    torch.testing.assert_close(  # exact: the default is this very float
        cross_attention_probs(src, trg, qkv_w, qkv_b, num_heads=g),
        cross_attention_probs(src, trg, qkv_w, qkv_b, num_heads=g, scale=(c // g) ** -0.5),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("need_weights", [True, False])
def test_gradcheck(need_weights):
    src = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    trg = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = [t.requires_grad_() for t in _weights(4, torch.float64)]

    def f(*args):
        update, attn = biased_cross_attention(*args, num_heads=2, need_weights=need_weights)
        return (update, attn) if need_weights else update

    assert torch.autograd.gradcheck(f, (src, trg, *w), fast_mode=True)


def test_every_parameter_gets_a_gradient():
    module = BiasedCrossAttention(8, 2)
    update, attn = module(torch.randn(2, 3, 8), torch.randn(2, 4, 8))
    (update.square().sum() + attn.square().sum()).backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.usefixtures("no_typecheck")
@pytest.mark.parametrize(
    ("src_shape", "trg_shape", "match"),
    [
        ((3, 8), (2, 3, 8), r"src has shape \(3, 8\)"),
        ((2, 3, 8), (2, 3, 8, 1), r"trg has shape \(2, 3, 8, 1\)"),
        ((2, 3, 8), (1, 3, 8), r"batch and channel sizes must match"),
        ((2, 3, 8), (2, 3, 6), r"trg has shape \(2, 3, 6\)"),
    ],
)
def test_errors_shapes(src_shape, trg_shape, match):
    module = BiasedCrossAttention(8, 2)
    with pytest.raises(ValueError, match=match):
        module(torch.randn(src_shape), torch.randn(trg_shape))


@pytest.mark.usefixtures("no_typecheck")
def test_errors_heads_and_weights():
    with pytest.raises(ValueError, match="dim = 10 is not divisible by num_heads = 4"):
        BiasedCrossAttention(10, 4)
    src, trg = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="channels = 8 is not divisible by num_heads = 3"):
        biased_cross_attention(src, trg, *_weights(8), num_heads=3)
    with pytest.raises(ValueError, match=r"qkv_weight has shape \(16, 8\): expected \(24, 8\)"):
        cross_attention_probs(src, trg, torch.randn(16, 8), None, num_heads=2)
