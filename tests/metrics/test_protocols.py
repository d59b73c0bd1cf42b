"""Standard vs released scoring protocols: the documented differences, hand-computed.

All pairs are 512 × 512 originals, so the released 512 frame coincides with original pixels and
each test isolates one difference. The fake matcher moves every point by one H/4-grid cell:
4 px in the 64-px input frame, 32 px in original pixels.
"""

import math

import pytest
import torch

from actr_core.metrics import RELEASED, STANDARD, STANDARD_INPUT, ScoringProtocol, get_protocol
from actr_core.metrics.pck import pck
from actr_core.metrics.protocols import (
    corner_rescale,
    ground_truth_keypoints,
    nearest_transfer,
    padded_bkp_threshold,
    pair_thresholds,
    predict_keypoints,
    threshold_kind,
)


def _score(protocol, matcher, batch, alpha):
    output = matcher(batch.src_image, batch.trg_image)
    pred = predict_keypoints(protocol, matcher, output, batch)
    gt = ground_truth_keypoints(protocol, batch)
    threshold, kinds = pair_thresholds(protocol, batch)
    return pck(pred, gt, threshold, alpha, batch.valid_kps), threshold, kinds, pred


def test_convention_standard_uses_target_box_released_uses_source_box(batch_factory, shift_matcher):
    # SPair pair: source box 100 px wide, target box 200 px. Prediction = src + (32, 0);
    # ground truth = prediction + (9, 12): error 15. alpha = 0.1: target d = 200 -> radius 20 (correct),
    # released source d = 100 -> radius 10 (wrong).
    src = [[[100.0, 200.0]]]
    trg = [[[132.0 + 9.0, 200.0 + 12.0]]]
    batch = batch_factory(src, trg, src_bbox=[[50.0, 150.0, 150.0, 220.0]], trg_bbox=[[40.0, 100.0, 240.0, 250.0]])
    std, d_std, kinds, pred_std = _score(STANDARD, shift_matcher, batch, 0.1)
    rel, d_rel, _, pred_rel = _score(RELEASED, shift_matcher, batch, 0.1)
    assert kinds == ["bbox"]
    assert pred_std.tolist() == [[[132.0, 200.0]]] and pred_rel.tolist() == [[[132.0, 200.0]]]
    assert d_std.tolist() == [200.0] and d_rel.tolist() == [100.0]
    assert std.tolist() == [1.0] and rel.tolist() == [0.0]


def test_convention_pfwillow_bkp_ignores_padding_released_inflates(batch_factory, shift_matcher):
    # Source kps (100,100), (300,200); predictions (132,100), (332,200); ground truth (132,100), (341,212):
    # errors 0 and 15.
    # standard: target kp box 209 x 112 -> d = 209, alpha 0.05 -> radius 10.45 -> PCK 1/2.
    # released: source kps with the -1 pad of a 40-row tensor -> d = max(300, 200) + 1 = 301,
    #           radius 15.05 -> PCK 1.
    src = [[[100.0, 100.0], [300.0, 200.0]]]
    trg = [[[132.0, 100.0], [341.0, 212.0]]]
    batch = batch_factory(src, trg, dataset=["PF-WILLOW"])
    std, d_std, kinds, _ = _score(STANDARD, shift_matcher, batch, 0.05)
    rel, d_rel, _, _ = _score(RELEASED, shift_matcher, batch, 0.05)
    assert kinds == ["bkp"]
    assert d_std.tolist() == [209.0] and d_rel.tolist() == [301.0]
    assert std.tolist() == [0.5] and rel.tolist() == [1.0]


def test_padded_bkp_threshold_only_inflates_when_rows_are_padded():
    kps = torch.tensor([[[100.0, 100.0], [300.0, 200.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    assert padded_bkp_threshold(kps, valid, -1.0, 40).tolist() == [301.0]
    assert padded_bkp_threshold(kps, valid, -1.0, 2).tolist() == [200.0]  # no pad row: plain extent


def test_pfpascal_img_threshold_original_vs_released(batch_factory, shift_matcher):
    # 300 x 500 target (h, w): standard d = 500 original px; released d = 512 (the resized source image).
    batch = batch_factory([[[10.0, 10.0]]], [[[20.0, 20.0]]], src_size=[(400, 400)], trg_size=[(300, 500)], dataset=["pfpascal"])
    assert pair_thresholds(STANDARD, batch)[0].tolist() == [500.0]
    assert pair_thresholds(RELEASED, batch)[0].tolist() == [512.0]
    assert pair_thresholds(STANDARD_INPUT, batch)[0].tolist() == [64.0]


def test_released_truncates_query_keypoints(batch_factory, shift_matcher):
    # Source kp at (100.75, 200.5): released query -> (100, 200) -> prediction (132, 200);
    # standard transfers the exact point -> (132.75, 200.5).
    batch = batch_factory([[[100.75, 200.5]]], [[[132.75, 200.5]]])
    _, _, _, pred_std = _score(STANDARD, shift_matcher, batch, 0.1)
    _, _, _, pred_rel = _score(RELEASED, shift_matcher, batch, 0.1)
    assert pred_std.tolist() == [[[132.75, 200.5]]]
    assert pred_rel.tolist() == [[[132.0, 200.0]]]


def test_nearest_transfer_reads_resized_flow_and_clamps():
    flow = torch.zeros(1, 2, 2, 3)
    flow[0, 0, :, 2] = 1.0  # right column moves +1 cell in x
    kps = torch.tensor([[[-3.0, 0.0], [11.9, 7.9], [5.0, 1.0]]])
    valid = torch.tensor([[True, True, False]])
    out = nearest_transfer(flow, kps, valid, (8, 12), "truncate")  # flow grid x4
    assert out[0, 0].tolist() == [0.0, 0.0]  # clamped to column 0, zero flow there
    assert out[0, 1].tolist() == [15.0, 7.0]  # (11, 7), flow +4 px at the right border
    assert math.isnan(out[0, 2, 0].item())


def test_corner_rescale_vs_pixel_centre():
    kps = torch.tensor([[[100.0, 50.0]]])
    assert corner_rescale(kps, (100, 200), (512, 512)).tolist() == [[[256.0, 256.0]]]


def test_standard_input_frame_measures_in_input_pixels(batch_factory, shift_matcher):
    batch = batch_factory(
        [[[100.0, 200.0]]], [[[132.0, 200.0]]], input_size=(64, 32), src_size=[(512, 256)], trg_size=[(512, 256)]
    )
    output = shift_matcher(batch.src_image, batch.trg_image)
    pred = predict_keypoints(STANDARD_INPUT, shift_matcher, output, batch)
    torch.testing.assert_close(pred, batch.trg_kps)
    pred_orig = predict_keypoints(STANDARD, shift_matcher, output, batch)
    torch.testing.assert_close(pred_orig, batch.trg_kps_orig)


def test_threshold_kind_auto_and_fixed():
    assert threshold_kind(STANDARD, "SPair-71k") == "bbox"
    assert threshold_kind(STANDARD, "pf_pascal") == "img"
    assert threshold_kind(STANDARD, "synthetic") == "bbox"
    assert threshold_kind(ScoringProtocol(name="x", threshold="img"), "pfwillow") == "img"


def test_protocol_validation_and_lookup():
    assert get_protocol("released") is RELEASED
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("best-on-test")
    with pytest.raises(ValueError, match="frame_size"):
        ScoringProtocol(name="x", frame="fixed")
    with pytest.raises(ValueError, match="nearest"):
        ScoringProtocol(name="x", lookup="nearest", query_rounding="truncate")
    with pytest.raises(ValueError, match="query_rounding"):
        ScoringProtocol(name="x", frame="input", lookup="nearest")
    with pytest.raises(ValueError, match="threshold_side"):
        ScoringProtocol(name="x", threshold_side="both")
    attrs = RELEASED.describe((64, 64))
    assert attrs["threshold_image"] == "source" and "512x512" in attrs["coordinate_frame"]
    assert all(isinstance(v, str) for v in attrs.values())


def test_helper_errors(no_typecheck):
    with pytest.raises(ValueError, match="flow must have shape"):
        nearest_transfer(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2), torch.ones(1, 2, dtype=torch.bool), (8, 8))
    with pytest.raises(ValueError, match="kps must have shape"):
        nearest_transfer(torch.zeros(2, 2, 4, 4), torch.zeros(1, 2, 2), torch.ones(1, 2, dtype=torch.bool), (8, 8))
    with pytest.raises(ValueError, match="rounding"):
        nearest_transfer(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2), torch.ones(1, 2, dtype=torch.bool), (8, 8), "floor")
    with pytest.raises(ValueError, match="padded_length"):
        padded_bkp_threshold(torch.zeros(1, 5, 2), torch.ones(1, 5, dtype=torch.bool), -1.0, 4)
    with pytest.raises(ValueError, match="kps must have shape"):
        corner_rescale(torch.zeros(3), (4, 4), (8, 8))
