"""Reading-side transforms: photometric set, box-preserving crop with consistent keypoints and flow, resize."""

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from tolerances import float32_tolerance

from actr_core.data import (
    BoxPreservingCrop,
    Compose,
    PairRecord,
    Photometric,
    PhotometricConfig,
    Resize,
    build_sample,
    pseudo_flow,
    reframe,
    train_transforms,
)
from actr_core.data.synthetic import SyntheticConfig, generate_pair
from actr_core.data.transforms import _OPERATIONS, _sharpen
from actr_core.flow import rescale_keypoints, transfer_keypoints

SIZE = (64, 96)


def _keypoint_sample(n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    record = PairRecord(
        pair_id="k",
        dataset="spair",
        split="train",
        category="cat",
        src_image=rng.integers(0, 256, (50, 70, 3), dtype=np.uint8),
        trg_image=rng.integers(0, 256, (40, 60, 3), dtype=np.uint8),
        src_kps=rng.uniform([15, 12], [55, 38], (n, 2)),
        trg_kps=rng.uniform([12, 10], [48, 30], (n, 2)),
        src_bbox=np.array([12.0, 10.0, 58.0, 40.0]),
        trg_bbox=np.array([10.0, 8.0, 50.0, 32.0]),
    )
    return build_sample(record, SIZE)


def _synthetic_sample(index: int = 0):
    return build_sample(generate_pair(SyntheticConfig(size=SIZE, n_kps=12), "train", index), SIZE)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TestPhotometric:
    def test_p_zero_is_identity_and_p_one_changes_both_images(self):
        sample = _keypoint_sample()
        same = Photometric(PhotometricConfig(p=0.0))(sample, _gen())
        assert torch.equal(same.src_image, sample.src_image) and torch.equal(same.trg_image, sample.trg_image)
        changed = Photometric(PhotometricConfig(p=1.0))(sample, _gen())
        assert not torch.equal(changed.src_image, sample.src_image)
        assert not torch.equal(changed.trg_image, sample.trg_image)
        assert changed.src_image.dtype == torch.uint8 and changed.src_image.shape == sample.src_image.shape
        assert torch.equal(changed.flow, sample.flow) and torch.equal(changed.src_kps, sample.src_kps)

    def test_deterministic_per_generator(self):
        sample = _keypoint_sample()
        a = Photometric()(sample, _gen(3))
        b = Photometric()(sample, _gen(3))
        assert torch.equal(a.src_image, b.src_image) and torch.equal(a.trg_image, b.trg_image)

    def test_each_operation_runs_alone(self):
        sample = _keypoint_sample()
        for name, operation in _OPERATIONS:
            out = operation(sample.src_image, PhotometricConfig(), _gen())
            assert out.dtype == torch.uint8 and out.shape == sample.src_image.shape, name

    def test_operations_are_torchvision_ops_with_parameters_from_the_generator(self):
        """p = 1: each operation in the documented order, its coin then its parameters drawn from the
        generator (uniform in the configured ranges), applied by transforms.v2's functional ops."""
        cfg = PhotometricConfig(p=1.0)
        image = _keypoint_sample().src_image
        draws = _gen(7)

        def uniform(low, high):
            return low + (high - low) * float(torch.rand((), generator=draws))

        expected = image
        for name, _ in _OPERATIONS:
            assert float(torch.rand((), generator=draws)) < 1.0  # the operation's coin
            if name == "gray":
                expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
            elif name == "posterize":
                expected = TF.posterize(expected, 4)
            elif name == "equalize":
                expected = TF.equalize(expected)
            elif name == "sharpen":
                expected = TF.adjust_sharpness(expected, 1 + uniform(0.5, 1.5) * 13 / 9)
            elif name == "brightness_contrast":
                b, c = uniform(0.8, 1.2), uniform(0.8, 1.2)
                expected = TF.adjust_contrast(TF.adjust_brightness(expected, b), c)
            elif name == "solarize":
                expected = TF.solarize(expected, 128)
            else:
                b, c, s, h = uniform(0.8, 1.2), uniform(0.8, 1.2), uniform(0.8, 1.2), uniform(-0.2, 0.2)
                expected = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(expected, b), c), s), h)
        assert torch.equal(Photometric(cfg).image(image, _gen(7)), expected)

    def test_sharpen_is_the_unsharp_mask_inside_the_frame(self):
        """torchvision's sharpness factor 1 + a·13/9 is x + a(x − box3x3(x)) away from the border (float64
        reference), within torchvision's uint8 roundings: its blurred image is rounded to whole levels, an
        error the blend scales by f − 1, and the blend truncates; plus the reference's own rounding."""
        image = _keypoint_sample(seed=2).src_image
        amount = 0.5 + 1.0 * float(torch.rand((), generator=_gen(4)))
        out = _sharpen(image, PhotometricConfig(), _gen(4)).double()
        x = image.double()
        box = torch.nn.functional.avg_pool2d(x[None], 3, stride=1)[0]  # interior cells only
        inner = x[:, 1:-1, 1:-1]
        reference = (inner + amount * (inner - box)).round().clamp(0, 255)
        bound = 0.5 * amount * 13 / 9 + 1.0 + 0.5
        assert (out[:, 1:-1, 1:-1] - reference).abs().max() <= bound
        naive = TF.adjust_sharpness(image, 1 + amount).double()  # the misreading: factor 1 + a
        assert (naive[:, 1:-1, 1:-1] - reference).abs().max() > bound

    def test_probability_must_be_valid(self):
        with pytest.raises(ValueError, match="p must be in"):
            Photometric(PhotometricConfig(p=1.5))


class TestReframe:
    def test_full_frame_is_identity(self):
        for sample in (_keypoint_sample(), _synthetic_sample()):
            h, w = SIZE
            out = reframe(sample, (0, 0, w, h), (0, 0, w, h))
            assert torch.equal(out.src_image, sample.src_image)
            torch.testing.assert_close(out.src_kps, sample.src_kps, atol=0, rtol=0)  # exact: scale 1, offset 0
            # an exact flow is resampled at its own cells: positions normalised and back (4 roundings, at the
            # scale of the grid), 4 bilinear weights, the match and the cell subtracted (at the flow's scale)
            scale = max(sample.flow.abs().max().item(), *sample.flow.shape[-2:])
            torch.testing.assert_close(out.flow, sample.flow, atol=float32_tolerance(scale, terms=10), rtol=0)
            interior = sample.valid_flow.clone()
            interior[[0, -1]] = False
            interior[:, [0, -1]] = False
            assert torch.equal(out.valid_flow & interior, sample.valid_flow & interior)

    def test_convention_crop_maps_pixel_centres(self):
        """x' = (x - left + 0.5)·W/(right - left) - 0.5; the naive (x - left)·W/(right - left) differs."""
        sample = _keypoint_sample()
        box = (10, 6, 58, 54)
        out = reframe(sample, box, (0, 0, 96, 64))
        scale = torch.tensor([96 / 48, 64 / 48])
        expected = (sample.src_kps - torch.tensor([10.0, 6.0]) + 0.5) * scale - 0.5
        # 4 roundings here, one from the float64 map
        tol = float32_tolerance(expected, terms=5)
        torch.testing.assert_close(out.src_kps[out.valid_kps], expected[out.valid_kps], atol=tol, rtol=0)
        naive = (sample.src_kps - torch.tensor([10.0, 6.0])) * scale
        assert not torch.allclose(out.src_kps, naive, atol=0.1)

    def test_pseudo_flow_is_rebuilt_from_the_moved_keypoints(self):
        sample = _keypoint_sample()
        out = reframe(sample, (8, 4, 80, 60), (2, 2, 90, 62))
        flow, valid = pseudo_flow(out.src_kps, out.trg_kps, out.valid_kps, SIZE, out.pseudo)
        torch.testing.assert_close(out.flow, flow, atol=0, rtol=0)  # exact: the same call on the same keypoints
        assert torch.equal(out.valid_flow, valid)

    def test_keypoints_leaving_the_crop_become_invalid(self):
        sample = _keypoint_sample()
        out = reframe(sample, (48, 0, 96, 64), (0, 0, 96, 64))  # right half of the source only
        x_old = sample.src_kps[:, 0]
        assert torch.equal(out.valid_kps, sample.valid_kps & (x_old >= 47.5))

    @pytest.mark.parametrize("index", [0, 1])
    def test_exact_flow_is_carried_through_both_crops(self, index):
        """After cropping, the new flow still takes each source keypoint to its target keypoint."""
        sample = _synthetic_sample(index)
        x1, y1, _x2, _y2 = (int(v) for v in sample.src_frame_bbox.tolist())
        out = reframe(sample, (max(x1 - 3, 0), max(y1 - 2, 0), 96, 64), (0, 0, 90, 60))
        grid = tuple(out.flow.shape[-2:])
        src = rescale_keypoints(out.src_kps, SIZE, grid)[None]
        moved = rescale_keypoints(transfer_keypoints(out.flow[None], src)[0], grid, SIZE)
        cells = src[0].round().long()
        inside = (cells[:, 0] >= 1) & (cells[:, 0] < grid[1] - 1) & (cells[:, 1] >= 1) & (cells[:, 1] < grid[0] - 1)
        usable = out.valid_kps & inside
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                r = (cells[:, 1] + dy).clamp(0, grid[0] - 1)
                c = (cells[:, 0] + dx).clamp(0, grid[1] - 1)
                usable &= out.valid_flow[r, c]
        assert usable.sum() >= 3
        # a tenth of a pixel: bilinear reading of a warped flow on a 4x coarser grid, not rounding
        torch.testing.assert_close(moved[usable], out.trg_kps[usable], atol=0.1, rtol=0)

    def test_box_errors(self):
        sample = _keypoint_sample()
        with pytest.raises(ValueError, match="source crop"):
            reframe(sample, (10, 10, 5, 20), (0, 0, 96, 64))
        with pytest.raises(ValueError, match="target crop"):
            reframe(sample, (0, 0, 96, 64), (0, 0, 97, 64))


class TestBoxPreservingCrop:
    def test_crop_keeps_the_object_box_inside_the_frame(self):
        for seed in range(6):
            for sample in (_keypoint_sample(seed=seed), _synthetic_sample(seed % 2)):
                out = BoxPreservingCrop(p=1.0)(sample, _gen(seed))
                for box in (out.src_frame_bbox, out.trg_frame_bbox):
                    x1, y1, x2, y2 = box.tolist()
                    assert x1 >= -0.5 - 1.0 and x2 <= 95.5 + 1.0 and y1 >= -0.5 - 1.0 and y2 <= 63.5 + 1.0
                assert out.frame_size == SIZE and out.flow.shape == sample.flow.shape

    def test_p_zero_returns_the_sample(self):
        sample = _keypoint_sample()
        assert BoxPreservingCrop(p=0.0)(sample, _gen()) is sample

    def test_original_keypoints_and_boxes_are_untouched(self):
        sample = _keypoint_sample()
        out = BoxPreservingCrop(p=1.0)(sample, _gen(1))
        assert torch.equal(out.src_kps_orig, sample.src_kps_orig) and torch.equal(out.trg_bbox, sample.trg_bbox)


def test_resize_moves_everything_consistently():
    sample = _keypoint_sample()
    out = Resize((32, 48))(sample, _gen())
    assert out.src_image.shape == (3, 32, 48) and out.flow.shape == (2, 8, 12)
    expected = rescale_keypoints(sample.src_kps, SIZE, (32, 48))
    # (x + 0.5)·s − 0.5 here (4 roundings), x·s + offset in float64 there (1)
    torch.testing.assert_close(out.src_kps, expected, atol=float32_tolerance(expected, terms=5), rtol=0)
    flow, _valid = pseudo_flow(out.src_kps, out.trg_kps, out.valid_kps, (32, 48), out.pseudo)
    torch.testing.assert_close(out.flow, flow, atol=0, rtol=0)  # exact: the same call on the same keypoints
    assert Resize(SIZE)(sample, _gen()) is sample


def test_train_transforms_compose_deterministically():
    sample = _synthetic_sample()
    chain = Compose(train_transforms())
    a, b = chain(sample, _gen(5)), chain(sample, _gen(5))
    assert torch.equal(a.src_image, b.src_image) and torch.equal(a.flow, b.flow)
    assert dataclasses.replace(a) == a  # still a valid sample
