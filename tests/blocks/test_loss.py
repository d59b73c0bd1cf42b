"""Masked flow loss (Eq. 4): known values, per-sample normalisation, invalid cells never reach value or gradient."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import float32_tolerance

from actr_core.blocks import MaskedFlowLoss, masked_flow_loss


def test_known_value_end_point_error_and_squared():
    pred, target = torch.zeros(1, 2, 2, 3), torch.zeros(1, 2, 2, 3)
    target[0, 0, 1, 2], target[0, 1, 1, 2] = 3.0, 4.0
    valid = torch.zeros(1, 2, 3, dtype=torch.bool)
    valid[0, 1, 2] = valid[0, 0, 0] = True
    # exact: integers, sqrt(25) and halves are all float32 numbers
    assert masked_flow_loss(pred, target, valid).item() == 2.5  # (5 + 0) / 2
    assert masked_flow_loss(pred, target, valid, squared=True).item() == 12.5  # (25 + 0) / 2
    assert MaskedFlowLoss(squared=True)(pred, target, valid).item() == 12.5


def test_per_sample_normalisation():
    """One valid cell with error 1 and a hundred with error 3 weigh equally: (1 + 3) / 2, not 301 / 101."""
    pred = torch.zeros(2, 2, 10, 12)
    target = torch.zeros(2, 2, 10, 12)
    target[:, 0] = torch.tensor([1.0, 3.0]).view(2, 1, 1)
    valid = torch.zeros(2, 10, 12, dtype=torch.bool)
    valid[0, 4, 7] = True
    valid[1, :10, :10] = True
    assert masked_flow_loss(pred, target, valid).item() == 2.0  # exact: sums of integers, divided evenly


def test_samples_without_valid_cells_are_left_out():
    pred, target = torch.zeros(3, 2, 4, 5), torch.ones(3, 2, 4, 5)
    valid = torch.zeros(3, 4, 5, dtype=torch.bool)
    valid[1] = True
    # 20 cells of sqrt(2) summed and averaged, then a mean over one sample
    assert masked_flow_loss(pred, target, valid).item() == pytest.approx(2**0.5, abs=float32_tolerance(2**0.5, terms=24))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("squared", [False, True])
def test_convention_non_finite_targets_in_invalid_cells_reach_neither_value_nor_gradient(bad, squared):
    torch.manual_seed(0)
    pred = torch.randn(2, 2, 5, 7, requires_grad=True)
    target = torch.randn(2, 2, 5, 7)
    valid = torch.rand(2, 5, 7) > 0.5
    clean = masked_flow_loss(pred, target, valid, squared=squared)
    dirty_target = torch.where(valid[:, None], target, bad)
    loss = masked_flow_loss(pred, dirty_target, valid, squared=squared)
    assert torch.isfinite(loss) and loss.item() == clean.item()
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.isfinite(grad).all()
    assert (grad[~valid[:, None].expand_as(grad)] == 0).all()


@given(b=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_values_in_invalid_cells_do_not_change_the_loss(b, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(b, 2, h, w, generator=gen), torch.randn(b, 2, h, w, generator=gen)
    valid = torch.rand(b, h, w, generator=gen) > 0.4
    noise = torch.randn(b, 2, h, w, generator=gen) * 100
    keep = valid[:, None]
    base = masked_flow_loss(pred, target, valid)
    assert torch.equal(base, masked_flow_loss(torch.where(keep, pred, noise), torch.where(keep, target, -noise), valid))


def test_all_invalid_returns_zero_with_a_gradient():
    pred = torch.randn(2, 2, 3, 4, requires_grad=True)
    target = torch.full((2, 2, 3, 4), float("nan"))
    loss = masked_flow_loss(pred, target, torch.zeros(2, 3, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_perfect_prediction_has_zero_not_nan_gradient():
    pred = torch.randn(1, 2, 3, 4, requires_grad=True)
    loss = masked_flow_loss(pred, pred.detach().clone(), torch.ones(1, 3, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.parametrize("squared", [False, True])
def test_gradcheck(squared):
    pred = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(2, 3, 4) > 0.3
    valid[:, 0, 0] = True
    assert torch.autograd.gradcheck(lambda p, t: masked_flow_loss(p, t, valid, squared=squared), (pred, target))


@pytest.mark.usefixtures("no_typecheck")
def test_errors():
    pred, target = torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4)
    with pytest.raises(ValueError, match="valid has dtype torch.float32: expected a boolean mask"):
        masked_flow_loss(pred, target, torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"valid has shape \(2, 4, 3\): expected \(2, 3, 4\)"):
        masked_flow_loss(pred, target, torch.ones(2, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pred has shape \(2, 2, 3, 4\) and target has shape \(2, 2, 3, 5\)"):
        masked_flow_loss(pred, torch.zeros(2, 2, 3, 5), torch.ones(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pred has shape \(2, 3, 4\): expected 4 dimensions"):
        masked_flow_loss(torch.zeros(2, 3, 4), target, torch.ones(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pred has shape \(2, 3, 3, 4\)"):
        masked_flow_loss(torch.zeros(2, 3, 3, 4), torch.zeros(2, 3, 3, 4), torch.ones(2, 3, 4, dtype=torch.bool))


def test_nan_prediction_in_a_valid_cell_is_not_hidden():
    """A diverged model must show a NaN loss, not 0 (NaN is only masked in *invalid* cells)."""
    pred = torch.zeros(1, 2, 3, 4)
    pred[0, :, 1, 1] = float("nan")
    valid = torch.zeros(1, 3, 4, dtype=torch.bool)
    valid[0, 1, 1] = True
    assert torch.isnan(masked_flow_loss(pred, torch.zeros_like(pred), valid))
    assert torch.isnan(masked_flow_loss(pred, torch.zeros_like(pred), valid, squared=True))
