"""Window attention helpers: partition round trip, relative index, shift mask (no attention across the wrap), padding."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from actr_core.blocks import (
    WindowAttention,
    WindowTransformerBlock,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
    window_self_attention,
)


def _params(c: int, g: int, window: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(3 * c, c, generator=gen, dtype=dtype) / c**0.5,
        torch.randn(3 * c, generator=gen, dtype=dtype) * 0.1,
        torch.randn(c, c, generator=gen, dtype=dtype) / c**0.5,
        torch.randn(c, generator=gen, dtype=dtype) * 0.1,
        torch.randn((2 * window - 1) ** 2, g, generator=gen, dtype=dtype),
    )


def _support(x: torch.Tensor, fn) -> torch.Tensor:
    """Boolean (h, w, h, w): output token (i, j) changes when input token (k, l) is perturbed.

    One batched call: batch element k·w + l perturbs input token (k, l) by 1 in every channel.
    """
    _, h, w, _ = x.shape
    base = fn(x)
    perturbed = x.repeat(h * w, 1, 1, 1)
    perturbed.view(h * w, h * w, -1)[torch.arange(h * w), torch.arange(h * w)] += 1.0
    changed = (fn(perturbed) - base).abs().amax(-1) > 1e-9  # (h·w inputs, h, w outputs)
    return changed.view(h, w, h, w).permute(2, 3, 0, 1)


@given(nh=st.integers(1, 3), nw=st.integers(1, 3), window=st.integers(1, 4), b=st.integers(1, 2))
def test_partition_reverse_round_trip(nh, nw, window, b):
    x = torch.randn(b, nh * window, nw * window, 3)
    windows = window_partition(x, window)
    assert windows.shape == (b, nh * nw, window * window, 3)
    assert torch.equal(window_reverse(windows, window, (nh * window, nw * window)), x)


def test_partition_is_row_major():
    x = torch.arange(4 * 6).float().view(1, 4, 6, 1)
    windows = window_partition(x, 2)
    assert windows[0, 1, :, 0].tolist() == [2.0, 3.0, 8.0, 9.0]  # second window of the first row
    assert windows[0, 3, :, 0].tolist() == [12.0, 13.0, 18.0, 19.0]  # first window of the second row


@pytest.mark.parametrize("window", [1, 2, 4, 8])
def test_relative_position_index(window):
    index = relative_position_index(window)
    n, m = window**2, (2 * window - 1) ** 2
    centre = (window - 1) * (2 * window - 1) + (window - 1)
    assert index.shape == (n, n) and index.min() >= 0 and index.max() == m - 1
    assert torch.equal(index.diagonal(), torch.full((n,), centre))
    assert torch.equal(index + index.T, torch.full((n, n), 2 * centre))  # offset and its opposite
    # pairs with the same offset share an entry: query (1,1) vs key (0,0) and query (w-1,w-1) vs key (w-2,w-2)
    if window > 1:
        assert index[window + 1, 0] == index[n - 1, n - window - 2] == centre + (2 * window - 1) + 1


def test_shifted_window_mask_regions():
    assert shifted_window_mask((8, 8), 4, 0).all()
    mask = shifted_window_mask((8, 8), 4, 2)
    assert mask.shape == (4, 16, 16)
    assert mask[0].all()  # top-left window: nothing wrapped
    # bottom-right window: four 2×2 regions, each token sees the 4 tokens of its own region
    assert torch.equal(mask[3].sum(-1), torch.full((16,), 4))
    assert torch.equal(mask[1].sum(-1), torch.full((16,), 8))  # top-right: two column regions


@pytest.mark.parametrize(("size", "window"), [((8, 12), 4), ((16, 8), 8), ((7, 10), 4)])
def test_shifted_windows_never_attend_across_the_wrapped_border(size, window):
    """With shift 2, output token (i, j) depends only on tokens of its own (shifted) window, never on
    tokens the roll brought across the border: every dependency is less than a window apart."""
    h, w = size
    c, g, shift = 4, 2, 2
    params = _params(c, g, window)
    x = torch.randn(1, h, w, c, dtype=torch.float64)
    support = _support(x, lambda t: window_self_attention(t, *params, window_size=window, shift=shift))
    ii, jj, kk, ll = support.nonzero(as_tuple=True)
    assert ((ii - kk).abs() < window).all() and ((jj - ll).abs() < window).all()
    # the corner token sees exactly the shift×shift corner block (the rest of its rolled window wrapped)
    corner = torch.zeros(h, w, dtype=torch.bool)
    corner[:shift, :shift] = True
    assert torch.equal(support[0, 0], corner)
    # expected support from the definition: same window of the rolled map, same side of the seam
    hp, wp = -(-h // window) * window, -(-w // window) * window
    ry, rx = (torch.arange(h) - shift) % hp, (torch.arange(w) - shift) % wp
    win = (ry[:, None] // window) * 1000 + (rx[None, :] // window)
    region = (ry[:, None] >= hp - shift).long() * 2 + (rx[None, :] >= wp - shift).long()
    key = win * 10 + region
    assert torch.equal(support, key[:, :, None, None] == key[None, None])


def test_unshifted_corner_sees_its_whole_window():
    params = _params(4, 2, 4)
    x = torch.randn(1, 8, 8, 4, dtype=torch.float64)
    support = _support(x, lambda t: window_self_attention(t, *params, window_size=4, shift=0))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    assert torch.equal(support[0, 0], expected)


def test_padding_is_invisible():
    """A 6×10 map with 4×4 windows is padded to 8×12; the bottom-right window holds 2×2 real tokens,
    whose output must be plain attention among those four (padded keys masked), computed here by hand."""
    qkv_w, qkv_b, proj_w, proj_b, table = _params(4, 2, 4)
    x = torch.randn(2, 6, 10, 4, dtype=torch.float64)
    out = window_self_attention(x, qkv_w, qkv_b, proj_w, proj_b, table, window_size=4)
    assert out.shape == x.shape
    tokens = x[:, 4:6, 8:10].reshape(2, 4, 4)
    q, k, v = torch.nn.functional.linear(tokens, qkv_w, qkv_b).view(2, 4, 3, 2, 2).permute(2, 0, 3, 1, 4)
    cells = torch.tensor([0, 1, 4, 5])  # positions of the real tokens inside the 4×4 window
    bias = table[relative_position_index(4)[cells][:, cells]].permute(2, 0, 1)
    attn = torch.softmax(q @ k.mT * 2**-0.5 + bias, dim=-1)
    expected = torch.nn.functional.linear((attn @ v).permute(0, 2, 1, 3).reshape(2, 4, 4), proj_w, proj_b)
    torch.testing.assert_close(out[:, 4:6, 8:10].reshape(2, 4, 4), expected)


@pytest.mark.parametrize(("size", "shift"), [((8, 8), 0), ((6, 10), 2), ((5, 3), 1)])
def test_fused_equals_reference(size, shift):
    params = _params(8, 2, 4)
    x = torch.randn(2, *size, 8, dtype=torch.float64)
    fused = window_self_attention(x, *params, window_size=4, shift=shift, fused=True)
    ref = window_self_attention(x, *params, window_size=4, shift=shift, fused=False)
    torch.testing.assert_close(fused, ref)


def test_gradcheck():
    params = [p.requires_grad_() for p in _params(4, 2, 2)]
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: window_self_attention(*a, window_size=2, shift=1), (x, *params), fast_mode=True)


def test_block_shapes_and_gradients():
    block = WindowTransformerBlock(8, 2, 4, shift=2, mlp_ratio=2.0)
    out = block(torch.randn(3, 5, 9, 8))
    assert out.shape == (3, 5, 9, 8)
    out.square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_module_has_no_constant_parameters():
    names = {n for n, _ in WindowAttention(8, 2, 4).named_parameters()}
    assert names == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table"}


@pytest.mark.usefixtures("no_typecheck")
def test_errors():
    params = _params(4, 2, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="shift = 4: expected 0 <= shift < window_size = 4"):
        window_self_attention(torch.randn(1, 8, 8, 4), *params, window_size=4, shift=4)
    with pytest.raises(ValueError, match=r"bias_table has shape \(49, 2\): expected 9 rows for window_size = 2"):
        window_self_attention(torch.randn(1, 8, 8, 4), *params, window_size=2)
    with pytest.raises(ValueError, match=r"x has shape \(8, 8, 4\)"):
        window_self_attention(torch.randn(8, 8, 4), *params, window_size=4)
    with pytest.raises(ValueError, match="height = 6 is not divisible by window_size = 4"):
        window_partition(torch.randn(1, 6, 8, 2), 4)
    with pytest.raises(ValueError, match=r"windows has shape \(1, 3, 16, 2\)"):
        window_reverse(torch.randn(1, 3, 16, 2), 4, (8, 8))
    with pytest.raises(ValueError, match="shift = 5"):
        WindowAttention(8, 2, 4, shift=5)
