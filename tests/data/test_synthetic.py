"""Synthetic pairs: bundled photos, held-out splits, exact flow, keypoints, boxes, determinism."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actr_core.data import PHOTOS, SyntheticConfig, SyntheticPairs, generate_pair
from actr_core.data.synthetic import (
    DEFAULT_SPLIT_PHOTOS,
    PHOTO_CATEGORY,
    _dense_map,
    _grid_points,
    _normalise,
    _Warp,
    load_photo,
)
from actr_core.flow import normalise_coords, rescale_keypoints, transfer_keypoints

CFG = SyntheticConfig(size=(48, 64), n_kps=10)


def test_every_photo_loads_offline_as_rgb():
    for name in PHOTOS:
        photo = load_photo(name, 32)
        assert photo.shape[0] == 3 and min(photo.shape[1:]) == 32
        assert photo.dtype == torch.float32 and 0.0 <= float(photo.min()) and float(photo.max()) <= 1.0


def test_splits_hold_out_photos_and_keep_the_stereo_pair_together():
    groups = {split: {PHOTO_CATEGORY[p] for p in photos} for split, photos in DEFAULT_SPLIT_PHOTOS}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    train = dict(DEFAULT_SPLIT_PHOTOS)["train"]
    assert "motorcycle_left" in train and "motorcycle_right" in train
    broken = (("train", ("astronaut", "motorcycle_left")), ("val", ("motorcycle_right",)), ("test", ("rocket",)))
    with pytest.raises(ValueError, match="stay on one side"):
        SyntheticConfig(splits=broken)


def test_pairs_use_only_their_split_photos():
    for split, photos in DEFAULT_SPLIT_PHOTOS:
        categories = {PHOTO_CATEGORY[p] for p in photos}
        assert {generate_pair(CFG, split, i).category for i in range(6)} <= categories


def test_deterministic_per_seed_split_and_index():
    a, b = generate_pair(CFG, "train", 3, seed=7), generate_pair(CFG, "train", 3, seed=7)
    for field in ("src_image", "trg_image", "src_kps", "trg_kps", "src_bbox", "trg_bbox", "flow", "valid_flow"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = generate_pair(CFG, "train", 4, seed=7)
    d = generate_pair(CFG, "train", 3, seed=8)
    assert not np.array_equal(a.flow, c.flow) and not np.array_equal(a.flow, d.flow)


def test_shapes_with_h_not_w():
    record = generate_pair(CFG, "val", 0)
    assert record.src_image.shape == (48, 64, 3) and record.trg_image.shape == (48, 64, 3)
    assert record.flow.shape == (2, 12, 16) and record.valid_flow.shape == (12, 16)
    assert record.src_kps.shape == (10, 2) and record.trg_kps.shape == (10, 2)
    assert record.dataset == "synthetic" and record.pair_id == "synthetic-val-000000"
    assert record.valid_flow.mean() >= CFG.min_valid


def test_identity_warp_gives_zero_flow_and_equal_images():
    cfg = dataclasses.replace(CFG, homography=0.0, tps=0.0, jitter=0.0)
    record = generate_pair(cfg, "test", 1)
    np.testing.assert_allclose(record.flow, 0.0, atol=1e-6)
    assert record.valid_flow.all()
    diff = np.abs(record.src_image.astype(int) - record.trg_image.astype(int))
    assert diff.max() <= 1  # the target is rendered through a float32 map: rounding only
    np.testing.assert_allclose(record.src_kps, record.trg_kps, atol=1e-4)
    np.testing.assert_array_equal(record.trg_bbox, [0, 0, 63, 47])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_newton_inverse_solves_the_warp(seed):
    cfg = SyntheticConfig(homography=0.25, tps=0.08)
    warp = _Warp.draw(np.random.default_rng(seed), cfg)
    p = np.random.default_rng(seed + 10).uniform(-0.9, 0.9, size=(200, 2))
    q, ok = warp.inverse(p, steps=30, tol=1e-9)
    forward, _, _ = warp(q)
    assert ok.mean() > 0.9
    np.testing.assert_allclose(forward[ok], p[ok], atol=1e-9)


def test_analytic_jacobian_matches_finite_differences():
    warp = _Warp.draw(np.random.default_rng(3), SyntheticConfig(tps=0.1))
    u = np.random.default_rng(4).uniform(-1, 1, size=(50, 2))
    _, _, jac = warp(u, jacobian=True)
    eps = 1e-6
    for j in range(2):
        step = np.zeros(2)
        step[j] = eps
        numeric = (warp(u + step)[0] - warp(u - step)[0]) / (2 * eps)
        np.testing.assert_allclose(jac[:, :, j], numeric, atol=1e-6)


@pytest.mark.parametrize("size, bound", [((64, 96), 0.02), ((256, 256), 0.005)])
def test_render_map_departs_from_the_exact_warp_by_under_bound_pixels(size, bound):
    for seed in range(2):
        warp = _Warp.draw(np.random.default_rng(seed), SyntheticConfig(size=size))
        exact, _, _ = warp(_normalise(_grid_points(size), size))
        approx = _dense_map(warp, size, SyntheticConfig.render_stride)
        error_px = np.abs(exact - approx) * np.array([size[1], size[0]]) / 2
        assert error_px.max() < bound


def test_keypoints_follow_the_flow():
    """Transferring the source keypoints along the exact flow lands on the target keypoints."""
    record = generate_pair(CFG, "train", 5)
    grid = record.flow.shape[-2:]
    flow = torch.from_numpy(record.flow)[None]
    src = rescale_keypoints(torch.from_numpy(record.src_kps).float(), CFG.size, grid)[None]
    moved = rescale_keypoints(transfer_keypoints(flow, src)[0], grid, CFG.size)
    # keypoints near the valid region's edge read partly invalid (zero) cells: keep interior ones
    valid = torch.from_numpy(record.valid_flow)
    cells = src[0].round().long().clamp(min=0)
    interior = valid[cells[:, 1].clamp(max=grid[0] - 1), cells[:, 0].clamp(max=grid[1] - 1)]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            r = (cells[:, 1] + dy).clamp(0, grid[0] - 1)
            c = (cells[:, 0] + dx).clamp(0, grid[1] - 1)
            interior &= valid[r, c]
    assert interior.sum() >= 3
    np.testing.assert_allclose(moved[interior].numpy(), record.trg_kps[interior.numpy()], atol=0.05)


def test_target_pixels_show_the_source_content_at_their_match():
    """Without jitter, the target sampled at each valid cell's match equals the source there."""
    cfg = dataclasses.replace(CFG, jitter=0.0, size=(96, 128))
    record = generate_pair(cfg, "train", 2)
    src = torch.from_numpy(record.src_image).permute(2, 0, 1).float()[None]
    trg = torch.from_numpy(record.trg_image).permute(2, 0, 1).float()[None]
    grid = record.flow.shape[-2:]
    cells = torch.stack(torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")[::-1], -1).float()
    match = cells + torch.from_numpy(record.flow).permute(1, 2, 0)
    src_px = rescale_keypoints(cells.reshape(-1, 2), grid, cfg.size)
    trg_px = rescale_keypoints(match.reshape(-1, 2), grid, cfg.size)

    def read(image, points):
        at = normalise_coords(points, cfg.size).view(1, 1, -1, 2)
        return F.grid_sample(image, at, align_corners=False)[0, :, 0].T

    valid = torch.from_numpy(record.valid_flow).reshape(-1)
    diff = (read(src, src_px) - read(trg, trg_px)).abs()[valid]
    assert diff.median() < 6.0  # grey levels; bilinear resampling blur only
    shuffled = (read(src, src_px) - read(trg, trg_px.flip(0))).abs()[valid]
    assert shuffled.median() > 2 * diff.median()


def test_boxes_have_area_and_contain_the_keypoints():
    for index in range(4):
        record = generate_pair(CFG, "train", index)
        for box, kps in ((record.src_bbox, record.src_kps), (record.trg_bbox, record.trg_kps)):
            x1, y1, x2, y2 = box
            assert 0 <= x1 < x2 <= 63 and 0 <= y1 < y2 <= 47
            assert (kps[:, 0] >= x1 - 1).all() and (kps[:, 0] <= x2 + 1).all()
            assert (kps[:, 1] >= y1 - 1).all() and (kps[:, 1] <= y2 + 1).all()


def test_reader_interface():
    reader = SyntheticPairs("val", 3, config=CFG, seed=1)
    records = list(reader)
    assert len(reader) == 3 and [r.pair_id for r in records] == [f"synthetic-val-{i:06d}" for i in range(3)]
    with pytest.raises(IndexError):
        reader.load(3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": (50, 64)}, "multiples"),
        ({"n_kps": 0}, "n_kps"),
        ({"crop_scale": (0.5, 1.5)}, "crop_scale"),
        ({"splits": (("train", ("lena",)),)}, "unknown photo"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**kwargs)
