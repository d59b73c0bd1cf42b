"""Keypoints on the far image border (1-based x = W, y = H) of SPair-format pairs: which protocol scores them.

The released evaluator scores every annotated keypoint; the standard protocol scores the keypoints
inside the image in the pixel-centre convention (x <= W - 0.5), so a 1-based x = W is left out.
"""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from actr_core.data import SPairReader, build_sample, collate
from actr_core.data.samples import pseudo_flow
from actr_core.metrics import evaluate

SRC_WH, TRG_WH = (40, 30), (48, 36)
# Source and target keypoints (x, y) in original pixels; rows 2 and 3 lie on the far border of the
# source (x = W) and of the target (y = H), row 4 on the inner edge (x = W - 0.5, still inside).
SRC_KPS = [[5.0, 6.0], [20.0, 15.0], [40.0, 10.0], [12.0, 29.0], [39.5, 3.0]]
TRG_KPS = [[8.0, 7.0], [26.0, 17.0], [47.0, 12.0], [15.0, 36.0], [44.0, 4.0]]
SRC_BOX, TRG_BOX = [1.0, 2.0, 40.0, 29.0], [2.0, 1.0, 47.0, 36.0]


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def border_batch(tmp_path):
    """One SPair-71k test pair with border keypoints, read by the SPair reader, at a 64-px frame."""
    root = tmp_path / "SPair-71k"
    line = "000000-a-b:cat"
    for rel, data in (
        ("Layout/large/test.txt", f"{line}\n".encode()),
        ("JPEGImages/cat/a.jpg", _jpeg(*SRC_WH)),
        ("JPEGImages/cat/b.jpg", _jpeg(*TRG_WH)),
        (f"PairAnnotation/test/{line}.json", json.dumps({
            "src_kps": SRC_KPS, "trg_kps": TRG_KPS, "src_bndbox": SRC_BOX, "trg_bndbox": TRG_BOX,
            "src_imsize": [*SRC_WH, 3], "trg_imsize": [*TRG_WH, 3], "category": "cat",
            "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0,
        }).encode()),
    ):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    sample = build_sample(SPairReader(str(root), "test").load(0), size=64)
    return collate([sample], images="normalised")


def _released_pck(alpha: float, displacement_px: tuple[float, float]) -> float:
    """The released arithmetic, written out in float64: keypoints to 512 by x·512/W, queries truncated
    and clamped, a constant flow added, the source box (at 512) as threshold, all n_pts keypoints."""
    src, trg = np.array(SRC_KPS), np.array(TRG_KPS)
    (sw, sh), (tw, th) = SRC_WH, TRG_WH
    query = np.clip(np.trunc(src * [512 / sw, 512 / sh]), 0, 511)
    pred = query + displacement_px
    gt = trg * [512 / tw, 512 / th]
    box = np.array(SRC_BOX) * [512 / sw, 512 / sh, 512 / sw, 512 / sh]
    threshold = max(box[2] - box[0], box[3] - box[1])
    return float(np.mean(np.linalg.norm(pred - gt, axis=1) <= alpha * threshold))


def test_released_scores_keypoints_on_the_far_border(border_batch, matcher_factory):
    assert border_batch.valid_kps[0].tolist() == [True, True, False, False, True]  # x = W, y = H are outside
    assert border_batch.annotated_kps[0].tolist() == [True] * 5
    matcher = matcher_factory((1.0, 0.0))  # one H/4 cell: 4 px at 64, 32 px at 512
    alphas = (0.05, 0.1, 0.15)
    released = evaluate(matcher, [border_batch], protocol="released", alphas=alphas, progress=False, references=("identity",))
    standard = evaluate(matcher, [border_batch], protocol="standard", alphas=alphas, progress=False, references=("identity",))
    assert int(released["n_keypoints_total"]) == 5 and int(standard["n_keypoints_total"]) == 3
    got = released["pck_image_overall"].sel(predictor="model").values
    want = [_released_pck(a, (32.0, 0.0)) for a in alphas]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert len(set(want)) > 1  # the α grid separates the keypoints: the comparison is not vacuous
    assert released.attrs["protocol_keypoints"] == "annotated" and standard.attrs["protocol_keypoints"] == "in_frame"


def test_inner_edge_is_scored_and_seeds_pseudo_flow(border_batch):
    """x = W - 0.5 is inside (pixel-centre convention): scored by standard, and a pseudo-flow seed;
    the border keypoints outside the image are neither (the same validity rule)."""
    valid = border_batch.valid_kps[0]
    src, trg = border_batch.src_kps[0], border_batch.trg_kps[0]
    flow, filled = pseudo_flow(src, trg, valid, (64, 64))
    _, edge_filled = pseudo_flow(src[4:], trg[4:], valid[4:], (64, 64))
    assert bool(edge_filled.any()) and bool((filled & edge_filled).eq(edge_filled).all())
    _, border_filled = pseudo_flow(src[2:4], trg[2:4], valid[2:4], (64, 64))
    assert not bool(border_filled.any())  # invalid rows leave no target
    assert torch.isfinite(flow[:, filled]).all()
