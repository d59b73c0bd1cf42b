"""Soft-argmax (Eq. 3): conventions (channel 0 = x, direction, temperature divides, pixel centres), limits."""

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st
from tolerances import float32_tolerance

from actr_core.blocks import SoftArgmax, soft_argmax

HARD = 1e-3  # tau for one-hot inputs: exp(-1/HARD) underflows to exactly 0


def _one_hot(b, hs, ws, ht, wt, targets):
    """targets: (b, hs·ws) flat target indices → one-hot correlation (b, hs, ws, ht, wt)."""
    corr = torch.zeros(b, hs * ws, ht * wt)
    corr.scatter_(-1, targets[..., None], 1.0)
    return rearrange(corr, "b (hs ws) (ht wt) -> b hs ws ht wt", hs=hs, ht=ht)


def test_convention_soft_argmax_channel0_is_x_and_points_into_target():
    """Source cell (x=0, y=0) matching target cell (x=3, y=1) gives flow (+3, +1)."""
    corr = torch.zeros(1, 2, 4, 2, 4)
    corr[0, 0, 0, 1, 3] = 1.0
    flow = soft_argmax(corr, HARD)
    assert flow.shape == (1, 2, 2, 4)
    assert flow[0, :, 0, 0].tolist() == [3.0, 1.0]
    assert flow[0, :, 0, 0].tolist() != [1.0, 3.0]  # misreading: channel 0 = y
    assert flow[0, :, 0, 0].tolist() != [-3.0, -1.0]  # misreading: pointing from target to source


def test_convention_temperature_divides():
    """softmax(corr / tau): with corr = [0, 1] over two target cells and tau = 0.5, p = softmax([0, 2])."""
    corr = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 1, 1, 2)
    flow_x = soft_argmax(corr, 0.5)[0, 0, 0, 0]
    divide = torch.softmax(torch.tensor([0.0, 2.0], dtype=torch.float64), 0)[1]
    multiply = torch.softmax(torch.tensor([0.0, 0.5], dtype=torch.float64), 0)[1]
    # the single source cell sits at x = (0 + 0.5)·2/1 − 0.5 = 0.5 on the target grid
    torch.testing.assert_close(flow_x, divide - 0.5)
    assert abs(flow_x.item() - (multiply.item() - 0.5)) > 0.1


def test_convention_soft_argmax_pixel_centre_between_grids():
    """hs ≠ ht: source cell x_s sits at (x_s + 0.5)·wt/ws − 0.5; the naive x_s·wt/ws differs by half a cell."""
    corr = torch.zeros(1, 1, 2, 1, 4)
    corr[0, 0, 0, 0, 0] = 1.0  # source (0, 0) → target (0, 0)
    corr[0, 0, 1, 0, 3] = 1.0  # source (1, 0) → target (3, 0)
    flow = soft_argmax(corr, HARD)
    # source x = 0 → 0.5 and x = 1 → 2.5 on the 4-wide target grid
    assert flow[0, 0, 0].tolist() == [-0.5, 0.5]
    assert flow[0, 0, 0].tolist() != [0.0, 1.0]  # naive scaling x·wt/ws


@given(
    b=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    data=st.data(),
)
def test_one_hot_equal_grids_gives_exact_integer_flow(b, h, w, data):
    targets = torch.tensor(data.draw(st.lists(st.integers(0, h * w - 1), min_size=b * h * w, max_size=b * h * w)))
    targets = targets.view(b, h * w)
    flow = soft_argmax(_one_hot(b, h, w, h, w, targets), HARD)
    src = torch.arange(h * w)
    expected = torch.stack(((targets % w) - (src % w), (targets // w) - (src // w)), dim=1).float()
    assert torch.equal(flow, expected.view(b, 2, h, w))


@given(hs=st.integers(1, 5), ws=st.integers(1, 5), ht=st.integers(1, 5), wt=st.integers(1, 5), data=st.data())
def test_one_hot_unequal_grids(hs, ws, ht, wt, data):
    targets = torch.tensor(data.draw(st.lists(st.integers(0, ht * wt - 1), min_size=hs * ws, max_size=hs * ws)))
    flow = soft_argmax(_one_hot(1, hs, ws, ht, wt, targets.view(1, -1)), HARD)
    src = torch.arange(hs * ws)
    x_src = (src % ws + 0.5) * wt / ws - 0.5
    y_src = (src // ws + 0.5) * ht / hs - 0.5
    expected = torch.stack(((targets % wt) - x_src, (targets // wt) - y_src)).view(1, 2, hs, ws)
    # one-hot weights: the expected position is exact; the source position takes a few roundings
    torch.testing.assert_close(flow, expected.float(), atol=float32_tolerance(expected, terms=4), rtol=0)


def test_small_tau_tends_to_hard_argmax():
    torch.manual_seed(0)
    b, hs, ws, ht, wt = 2, 3, 4, 5, 2
    corr = torch.randperm(b * hs * ws * ht * wt).float().view(b, hs, ws, ht, wt) / 100.0  # distinct values
    hard = soft_argmax(_one_hot(b, hs, ws, ht, wt, corr.flatten(3).argmax(-1).flatten(1)), HARD)
    # the runner-up weighs exp(-100) at most: a sum over the 10 target cells rounds to the hard position
    torch.testing.assert_close(soft_argmax(corr, 1e-4), hard, atol=float32_tolerance(hard, terms=12), rtol=0)
    assert not torch.allclose(soft_argmax(corr, 1.0), hard, atol=0.1)


def test_uniform_correlation_points_to_target_centre():
    hs, ws, ht, wt = 3, 5, 4, 7
    flow = soft_argmax(torch.zeros(2, hs, ws, ht, wt), 0.1)
    x_src = (torch.arange(ws) + 0.5) * wt / ws - 0.5
    y_src = (torch.arange(hs) + 0.5) * ht / hs - 0.5
    # softmax over the 28 target cells, a weighted sum of 28 positions, the source position out and back in
    tol = float32_tolerance(max(ht, wt), terms=2 * ht * wt + 4)
    torch.testing.assert_close(flow[:, 0] + x_src, torch.full((2, hs, ws), (wt - 1) / 2), atol=tol, rtol=0)
    torch.testing.assert_close(flow[:, 1] + y_src[:, None], torch.full((2, hs, ws), (ht - 1) / 2), atol=tol, rtol=0)


def test_module_keeps_tau_as_a_float_not_a_parameter():
    module = SoftArgmax(0.02)
    assert isinstance(module.tau, float) and module.tau == 0.02
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    corr = torch.randn(2, 2, 3, 4, 2)
    torch.testing.assert_close(module(corr), soft_argmax(corr, 0.02), atol=0, rtol=0)  # exact: forward is this call


def test_gradcheck():
    corr = torch.randn(2, 2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: soft_argmax(c, 0.7), (corr,), fast_mode=True)


@pytest.mark.usefixtures("no_typecheck")
@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_errors_tau(tau):
    with pytest.raises(ValueError, match="tau = "):
        soft_argmax(torch.zeros(1, 2, 2, 2, 2), tau)
    with pytest.raises(ValueError, match="tau = "):
        SoftArgmax(tau)


@pytest.mark.usefixtures("no_typecheck")
def test_errors_rank():
    with pytest.raises(ValueError, match=r"corr has shape \(1, 4, 2, 2\): expected 5 dimensions"):
        soft_argmax(torch.zeros(1, 4, 2, 2), 0.1)
