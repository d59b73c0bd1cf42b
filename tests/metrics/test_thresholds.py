"""Threshold definitions d (bbox / img / bkp), hand-computed."""

import math

import pytest
import torch

from actr_core.metrics import bbox_threshold, bkp_threshold, img_threshold, rescale_boxes


def test_bbox_threshold_is_longer_side():
    boxes = torch.tensor([[10.0, 20.0, 110.0, 70.0], [0.0, 0.0, 30.0, 200.0]])
    assert bbox_threshold(boxes).tolist() == [100.0, 200.0]


def test_img_threshold_is_longer_side_of_height_width():
    sizes = torch.tensor([[333, 500], [480, 200]])
    assert img_threshold(sizes).tolist() == [500.0, 480.0]
    assert img_threshold(sizes).dtype == torch.float32


def test_bkp_threshold_ignores_padding_whatever_its_value():
    kps = torch.tensor([[[100.0, 100.0], [300.0, 200.0], [-1.0, -1.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False, False]])
    assert bkp_threshold(kps, valid).tolist() == [200.0]
    # the misreading (padding included) gives 301
    assert bkp_threshold(kps).tolist() == [301.0]


def test_bkp_threshold_degenerate_pairs():
    kps = torch.tensor([[[5.0, 5.0], [float("nan"), 0.0]], [[5.0, 7.0], [1.0, 1.0]]])
    valid = torch.tensor([[False, False], [True, False]])
    got = bkp_threshold(kps, valid)
    assert math.isnan(got[0].item()) and got[1].item() == 0.0


def test_rescale_boxes_scales_sides_exactly_pixel_centre():
    box = torch.tensor([[10.0, 20.0, 110.0, 70.0]])
    out = rescale_boxes(box, (100, 200), (50, 400))  # x scales by 2, y by 0.5
    assert (out[0, 2] - out[0, 0]).item() == 200.0 and (out[0, 3] - out[0, 1]).item() == 25.0
    # corners move with the half-pixel convention: x1 = (10 + 0.5) * 2 - 0.5
    assert out[0, 0].item() == 20.5 and out[0, 1].item() == 9.75


def test_bad_shapes(no_typecheck):
    with pytest.raises(ValueError, match="bbox must have shape"):
        bbox_threshold(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="size must have shape"):
        img_threshold(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="kps must have shape"):
        bkp_threshold(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="valid must be a boolean mask"):
        bkp_threshold(torch.zeros(2, 3, 2), torch.ones(2, 4, dtype=torch.bool))
