"""PCK@α: rule, boundary, masks, NaN pairs, shapes and error paths (hand-computed values)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from actr_core.metrics import keypoint_distances, pck, pck_per_keypoint


def test_convention_boundary_distance_exactly_alpha_d_counts():
    # 3-4-5 triangle: distance 5 exactly; alpha * d = 0.125 * 40 = 5 exactly (powers of two).
    pred = torch.tensor([[[0.0, 0.0]]])
    gt = torch.tensor([[[3.0, 4.0]]])
    threshold = torch.tensor([40.0])
    assert keypoint_distances(pred, gt).item() == 5.0
    assert pck(pred, gt, threshold, 0.125).item() == 1.0
    # one float32 ulp further: no longer correct (the misreading "<" would fail the line above)
    gt_far = torch.tensor([[[3.0, torch.nextafter(torch.tensor(4.0), torch.tensor(5.0)).item()]]])
    assert pck(pred, gt_far, threshold, 0.125).item() == 0.0


def test_boundary_float64():
    pred = torch.zeros(1, 2, 2, dtype=torch.float64)
    gt = torch.tensor([[[6.0, 8.0], [0.0, 10.0]]], dtype=torch.float64)  # both at distance 10
    assert pck(pred, gt, torch.tensor([80.0], dtype=torch.float64), 0.125).item() == 1.0
    assert pck(pred, gt, torch.tensor([79.0], dtype=torch.float64), 0.125).item() == 0.0


def test_invalid_keypoints_excluded_even_with_nan_values():
    pred = torch.tensor([[[0.0, 0.0], [float("nan"), 1.0], [100.0, 100.0]]])
    gt = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [float("nan"), 0.0]]])
    valid = torch.tensor([[True, False, False]])
    out = pck_per_keypoint(pred, gt, torch.tensor([10.0]), 0.1, valid)
    assert out.correct.tolist() == [[True, False, False]]
    assert out.valid.tolist() == [[True, False, False]]
    assert pck(pred, gt, torch.tensor([10.0]), 0.1, valid).item() == 1.0
    # without the mask the wrong third keypoint counts (NaN gt counts as wrong) -> 1/3
    assert pck(pred, gt, torch.tensor([10.0]), 0.1).item() == pytest.approx(1 / 3)


def test_pair_without_valid_keypoint_is_nan():
    pred = torch.zeros(3, 2, 2)
    gt = torch.tensor([[[0.0, 0.0], [9.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[5.0, 5.0], [5.0, 5.0]]])
    valid = torch.tensor([[True, True], [False, False], [True, False]])
    got = pck(pred, gt, torch.tensor([10.0, 10.0, 10.0]), 0.5, valid)
    assert got[0].item() == 0.5  # 0 <= 5, 9 > 5
    assert math.isnan(got[1].item())
    assert got[2].item() == 0.0  # 7.07 > 5
    assert torch.nanmean(got).item() == 0.25  # the NaN pair is skipped, not counted as 0 or 1


def test_per_pair_thresholds_differ_and_h_ne_w_batch():
    # batch of 2, n = 3, different thresholds per pair
    pred = torch.zeros(2, 3, 2)
    gt = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [4.0, 0.0]], [[1.0, 0.0], [2.0, 0.0], [4.0, 0.0]]])
    got = pck(pred, gt, torch.tensor([20.0, 40.0]), 0.1)  # radii 2 and 4
    assert got.tolist() == pytest.approx([2 / 3, 1.0])
    correct, valid = pck_per_keypoint(pred, gt, torch.tensor([20.0, 40.0]), 0.1)
    assert correct.shape == (2, 3) and valid.dtype == torch.bool and valid.all()


def test_non_finite_prediction_of_a_valid_keypoint_is_wrong():
    pred = torch.tensor([[[float("nan"), 0.0], [0.0, 0.0]]])
    gt = torch.zeros(1, 2, 2)
    assert pck(pred, gt, torch.tensor([10.0]), 0.1).item() == 0.5


@given(
    st.floats(min_value=-50, max_value=50, allow_nan=False),
    st.floats(min_value=-50, max_value=50, allow_nan=False),
    st.floats(min_value=1.0, max_value=500.0),
    st.floats(min_value=0.01, max_value=0.3),
)
def test_property_single_keypoint_matches_definition(dx, dy, threshold, alpha):
    pred = torch.zeros(1, 1, 2, dtype=torch.float64)
    gt = torch.tensor([[[dx, dy]]], dtype=torch.float64)
    expected = math.hypot(dx, dy) <= alpha * threshold
    assert pck(pred, gt, torch.tensor([threshold], dtype=torch.float64), alpha).item() == float(expected)


@pytest.mark.parametrize(
    "pred_shape, gt_shape, thr_shape, valid_shape, match",
    [
        ((2, 3), (2, 3), (2,), None, "pred must have shape"),
        ((2, 3, 2), (2, 4, 2), (2,), None, "gt has shape"),
        ((2, 3, 2), (2, 3, 2), (3,), None, "threshold must have shape"),
        ((2, 3, 2), (2, 3, 2), (2,), (2, 4), "valid must have shape"),
    ],
)
def test_bad_shapes_raise_value_error(no_typecheck, pred_shape, gt_shape, thr_shape, valid_shape, match):
    valid = None if valid_shape is None else torch.ones(valid_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        pck(torch.zeros(pred_shape), torch.zeros(gt_shape), torch.ones(thr_shape), 0.1, valid)


def test_bad_valid_dtype_and_alpha(no_typecheck):
    with pytest.raises(ValueError, match="boolean"):
        pck(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.ones(1), 0.1, torch.ones(1, 2))
    with pytest.raises(ValueError, match="alpha must be a positive"):
        pck(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.ones(1), 0.0)


def test_typecheck_catches_bad_shape_when_enabled():
    # with run-time checks on (test session default), jaxtyping rejects before our ValueError
    with pytest.raises(Exception):
        pck(torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), torch.ones(3), 0.1)
