"""Frozen oneDNN convolutions: equal to the modules they freeze; the cache never serves stale weights."""

import copy

import pytest
import torch
from tolerances import float32_tolerance
from torch import nn

from actr_core.models.onednn import FrozenConv, FrozenConvCache, available

pytestmark = pytest.mark.skipif(not available(), reason="this PyTorch has no oneDNN fused convolutions")


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


@pytest.mark.parametrize(
    ("stride", "dilation", "groups", "channels_last"),
    [(1, 1, 1, True), (2, 1, 1, True), (1, 3, 2, True), (1, 1, 1, False)],
)
def test_equals_conv_bn_relu_residual(stride, dilation, groups, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups).eval()
    bn = _bn(6)
    x = torch.randn(2, 4, 9, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
        expected = bn64(conv64(x.double()))
        residual = torch.randn_like(expected)
        frozen = FrozenConv(conv, bn, x.shape)
        # a 3x3 convolution over 4 / groups channels, the batch norm folded in (5 steps), the residual
        terms = 9 * 4 // groups + 5 + 1
        for got, want in (
            (frozen(x), expected),
            (frozen(x, relu=True), expected.relu()),
            (frozen(x, relu=True, residual=residual.float()), (expected + residual).relu()),
            (FrozenConv(conv, None, x.shape)(x), conv64(x.double())),
        ):
            torch.testing.assert_close(got.double(), want, atol=float32_tolerance(want, terms=terms), rtol=0)


def test_cache_rebuilds_after_changes_and_keeps_few_shapes():
    conv = nn.Conv2d(3, 2, 1).eval()
    cache = FrozenConvCache(conv, max_shapes=1)
    x = torch.randn(1, 3, 4, 5)
    with torch.no_grad():
        cache.validate()
        first = cache.get("c", conv, None, x, shape_key=(1,))
        assert cache.get("c", conv, None, x, shape_key=(1,)) is first
        conv.weight.mul_(2.0)
        cache.validate()
        second = cache.get("c", conv, None, x, shape_key=(1,))
        assert second is not first
        # a 1x1 convolution over 3 channels and the bias, by oneDNN here and by torch there
        tol = float32_tolerance(conv(x), terms=4)
        torch.testing.assert_close(second(x), conv(x), atol=tol, rtol=0)
        conv.load_state_dict({"weight": torch.ones(2, 3, 1, 1), "bias": torch.zeros(2)})
        cache.validate()
        expected = conv(x)
        torch.testing.assert_close(
            cache.get("c", conv, None, x, shape_key=(1,))(x), expected, atol=float32_tolerance(expected, terms=4), rtol=0
        )
        cache.get("c", conv, None, torch.randn(2, 3, 4, 5), shape_key=(2,))
        assert list(cache._shapes) == [(2,)]


def test_copies_start_empty():
    conv = nn.Conv2d(3, 2, 1).eval()
    cache = FrozenConvCache(conv)
    with torch.no_grad():
        cache.get("c", conv, None, torch.randn(1, 3, 2, 2), shape_key=(1,))
    assert not copy.deepcopy(cache)._shapes


def test_rejects_non_zero_padding():
    with pytest.raises(ValueError, match="zero padding"):
        FrozenConv(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), None, (1, 2, 4, 4))
