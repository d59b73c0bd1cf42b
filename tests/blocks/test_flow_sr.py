"""Dual-window flow super-resolution (Sec. 3.4): shapes, batched paths, residual structure, gradients, errors."""

import copy
import dataclasses

import pytest
import torch
from tolerances import float32_tolerance

from actr_core.blocks import DualWindowFlowSR, FlowSRConfig, flow_sr_input, refine_paths
from actr_core.flow import resize_flow

TINY = FlowSRConfig(dim=16, num_heads=2, mlp_ratio=2.0, head_hidden=8)


def test_paper_defaults():
    cfg = FlowSRConfig()
    assert (cfg.dim, cfg.num_heads, cfg.window_sizes, cfg.shift, cfg.upscale, cfg.head_hidden) == (
        96,
        8,
        (4, 8),
        2,
        4,
        32,
    )
    sr = DualWindowFlowSR(768)
    assert sr.feature_proj.out_channels == 94  # 2 flow channels + 94 = 96
    assert [b.attn.window_size for b in sr.rounds[0].branches] == [4, 8]
    assert [b.attn.shift for r in sr.rounds for b in r.branches] == [0, 0, 2, 2]


@pytest.mark.parametrize(("h", "w"), [(3, 5), (4, 2), (1, 1)])
def test_shapes_any_grid(h, w):
    sr = DualWindowFlowSR(12, TINY)
    out = sr(torch.randn(2, 2, h, w), torch.randn(2, 12, h, w))
    assert out.shape == (2, 2, 4 * h, 4 * w)
    assert torch.isfinite(out).all()


def test_rounds_alternate_unshifted_and_shifted():
    sr = DualWindowFlowSR(4, dataclasses.replace(TINY, num_rounds=3))
    assert [r.branches[0].attn.shift for r in sr.rounds] == [0, 2, 0]


def test_zero_head_returns_the_upsampled_coarse_flow():
    """The head predicts a residual: zeroed, the output is the bilinearly upsampled flow ×4 (pixels of the fine grid)."""
    sr = DualWindowFlowSR(6, TINY)
    torch.nn.init.zeros_(sr.head[-1].weight)
    torch.nn.init.zeros_(sr.head[-1].bias)
    flow = torch.randn(2, 2, 3, 5)
    out = sr(flow, torch.randn(2, 6, 3, 5))
    # exact: a zero convolution gives exactly 0, added to the same resize_flow call
    torch.testing.assert_close(out, resize_flow(flow, (12, 20)), atol=0, rtol=0)
    constant = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(1, 2, 3, 5)
    expected = 4 * constant[..., :1, :1].expand(1, 2, 12, 20)
    # bilinear weights over 4 cells, then the scaling
    torch.testing.assert_close(sr(constant, torch.randn(1, 6, 3, 5)), expected, atol=float32_tolerance(expected, terms=5), rtol=0)


def test_input_upsamples_scales_and_repeats_features_per_path():
    flow = torch.randn(6, 2, 2, 3)  # 3 paths × batch 2, path-major
    features = torch.randn(2, 5, 2, 3)
    up_flow, x = flow_sr_input(flow, features, 4)
    assert up_flow.shape == (6, 2, 8, 12) and x.shape == (6, 7, 8, 12)
    # exact: copies of one upsampling, and the same interpolate call
    torch.testing.assert_close(x[:, :2], up_flow, atol=0, rtol=0)
    torch.testing.assert_close(x[2:4, 2:], x[0:2, 2:], atol=0, rtol=0)
    torch.testing.assert_close(x[4:6, 2:], x[0:2, 2:], atol=0, rtol=0)
    up = torch.nn.functional.interpolate(features, size=(8, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x[0:2, 2:], up, atol=0, rtol=0)


def test_batched_paths_equal_separate_calls():
    torch.manual_seed(0)
    sr = DualWindowFlowSR(6, TINY).eval()
    flows = [torch.randn(2, 2, 3, 4) for _ in range(3)]
    features = torch.randn(2, 6, 3, 4)
    batched = sr(torch.cat(flows), features)
    sr64 = copy.deepcopy(sr).double()
    separate = torch.cat([sr64(f.double(), features.double()) for f in flows])
    residual = separate - resize_flow(torch.cat(flows).double(), (12, 16))
    # the residual passes 1x1 over 6, per round and window branch LayerNorm (32), qkv (16), scores (8), softmax
    # and weighted sum (66 + 64), proj (16), LayerNorm (32) and MLP (16 + 32), per round a 3x3 fuse over 32 (288),
    # then the head's 3x3 over 16 and over 8 (144 + 72); one rounding adds it to the upsampled flow
    tol = float32_tolerance(residual, terms=1400) + float32_tolerance(separate, terms=1)
    torch.testing.assert_close(batched.double(), separate, atol=tol, rtol=0)


def test_every_parameter_gets_a_gradient():
    sr = DualWindowFlowSR(6, TINY)
    sr(torch.randn(2, 2, 2, 3), torch.randn(2, 6, 2, 3)).square().sum().backward()
    for name, p in sr.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradcheck_tiny():
    torch.manual_seed(0)
    sr = DualWindowFlowSR(3, TINY).double()
    flow = torch.randn(2, 2, 1, 2, dtype=torch.float64, requires_grad=True)
    features = torch.randn(2, 3, 1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sr, (flow, features), fast_mode=True)


@pytest.mark.usefixtures("no_typecheck")
def test_errors():
    sr = DualWindowFlowSR(6, TINY)
    with pytest.raises(ValueError, match=r"features has shape \(2, 5, 3, 4\): expected 6 channels"):
        sr(torch.randn(2, 2, 3, 4), torch.randn(2, 5, 3, 4))
    with pytest.raises(ValueError, match=r"flow has shape \(3, 2, 3, 4\) and features has shape \(2, 14, 3, 4\)"):
        sr(torch.randn(3, 2, 3, 4), torch.randn(2, 6, 3, 4))
    with pytest.raises(ValueError, match=r"flow has shape \(2, 2, 3, 5\) and features"):
        sr(torch.randn(2, 2, 3, 5), torch.randn(2, 6, 3, 4))
    with pytest.raises(ValueError, match=r"flow has shape \(2, 3, 3, 4\)"):
        sr(torch.randn(2, 3, 3, 4), torch.randn(2, 6, 3, 4))
    with pytest.raises(ValueError, match=r"features has shape \(6, 3, 4\)"):
        sr(torch.randn(2, 2, 3, 4), torch.randn(6, 3, 4))


@pytest.mark.usefixtures("no_typecheck")
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"shift": 4}, "shift = 4: expected 0 <= shift < smallest window = 4"),
        ({"dim": 18, "num_heads": 4}, "dim = 18 is not divisible by num_heads = 4"),
        ({"dim": 2, "num_heads": 1}, "dim = 2: must exceed the 2 flow channels"),
        ({"num_rounds": 0}, "num_rounds = 0"),
        ({"window_sizes": ()}, r"window_sizes = \(\)"),
    ],
)
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **changes)


@pytest.mark.parametrize("chunk", [0, 1, 2, 4])
def test_convention_refine_paths_is_path_major(chunk):
    """Flow i of an (m b) batch reads feature i mod b (path-major), not i // m (the (b m) misreading)."""
    m, b = 3, 2
    up_flow = torch.zeros(m * b, 2, 4, 5)
    features = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 4, 5)
    out = refine_paths(up_flow, features, lambda x: x[:, 2:4], chunk=chunk)  # "refine" = copy two feature channels
    read = out[:, 0, 0, 0]
    assert torch.equal(read, torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))  # exact: copies
    assert not torch.equal(read, torch.arange(m * b) // m * 1.0)
