"""Correlation sampling at keypoints, blurred keypoint targets, MMNet's BCE loss, keypoint transfer."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tolerances import float32_tolerance

from actr_core.blocks.coarse_to_fine import reverse_correlation
from actr_core.blocks.correlation_keypoints import (
    CorrelationKeypointLoss,
    argmax_flow,
    argmax_transfer,
    correlation_keypoint_loss,
    gaussian_kernel2d,
    keypoint_target_map,
    sample_correlation,
    soft_argmax_transfer,
    softmax_bce,
)
from actr_core.blocks.soft_argmax import soft_argmax
from actr_core.flow import normalise_coords


def _released_gaussian(side: int) -> torch.Tensor:
    """The released gaussian2d: sigma = side / 2 / 2.354, normalised."""
    sig_sq = (side / 2 / 2.354) ** 2
    half = (side - 1) / 2
    ax = torch.arange(-half, half + 1)
    return torch.exp(-(ax[None, :] ** 2) / 2 / sig_sq - ax[:, None] ** 2 / 2 / sig_sq).div_(
        torch.exp(-(ax[None, :] ** 2) / 2 / sig_sq - ax[:, None] ** 2 / 2 / sig_sq).sum()
    )


def _released_inverse_distance_splat(x: float, y: float, h: int, w: int) -> torch.Tensor:
    """The released getBlurredGT before its blur, on grid coordinates (x, y) inside the grid."""
    x0, y0 = math.floor(x), math.floor(y)
    fx, fy = x - x0, y - y0
    nodes = [(x0, y0, math.hypot(fx, fy))]
    if y0 + 1 <= h - 1:
        nodes.append((x0, y0 + 1, math.hypot(fx, 1 - fy)))
    if x0 + 1 <= w - 1:
        nodes.append((x0 + 1, y0, math.hypot(1 - fx, fy)))
    if y0 + 1 <= h - 1 and x0 + 1 <= w - 1:
        nodes.append((x0 + 1, y0 + 1, math.hypot(1 - fx, 1 - fy)))
    inv = [1 / max(d, 1e-5) for *_, d in nodes]
    out = torch.zeros(h, w)
    for (i, j, _), v in zip(nodes, inv):
        out[j, i] = v / sum(inv)
    return out


class TestSampleCorrelation:
    def test_convention_matches_grid_sample_border(self):
        torch.manual_seed(0)
        corr = torch.randn(2, 3, 5, 2, 4)
        kps = torch.stack((torch.rand(2, 7) * 7 - 1, torch.rand(2, 7) * 5 - 1), dim=-1)  # some off the grid
        got = sample_correlation(corr, kps)
        image = corr.flatten(3).permute(0, 3, 1, 2)  # b (ht wt) hs ws
        grid = normalise_coords(kps, (3, 5))[:, :, None]
        expected = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        expected = expected[..., 0].permute(0, 2, 1).reshape(2, 7, 2, 4)
        # 4 weighted corners; weights from a few roundings of the position (normalised and back for grid_sample)
        torch.testing.assert_close(got, expected, atol=float32_tolerance(expected, terms=8), rtol=0)

    def test_integer_keypoints_read_rows(self):
        corr = torch.randn(1, 3, 4, 2, 2)
        kps = torch.tensor([[[3.0, 2.0], [0.0, 1.0]]])
        out = sample_correlation(corr, kps)
        # exact: integer keypoints give the weights (1, 0, 0, 0)
        torch.testing.assert_close(out[0, 0], corr[0, 2, 3], atol=0, rtol=0)
        torch.testing.assert_close(out[0, 1], corr[0, 1, 0], atol=0, rtol=0)

    def test_permuted_view_equals_contiguous_copy(self):
        corr = torch.randn(2, 3, 4, 5, 6)
        kps = torch.rand(2, 3, 2) * 4
        rev = reverse_correlation(corr)
        expected = sample_correlation(rev.contiguous(), kps)
        # 4 weighted corners, gathered from another memory layout (the sum may run in another order)
        torch.testing.assert_close(sample_correlation(rev, kps), expected, atol=float32_tolerance(corr, terms=4), rtol=0)

    def test_errors(self, no_typecheck):
        with pytest.raises(ValueError, match="5 dimensions"):
            sample_correlation(torch.randn(2, 3, 4, 5), torch.zeros(2, 1, 2))
        with pytest.raises(ValueError, match="expected \\(2, n, 2\\)"):
            sample_correlation(torch.randn(2, 3, 4, 5, 6), torch.zeros(1, 1, 2))


class TestTargets:
    def test_gaussian_matches_released(self):
        expected = _released_gaussian(3)
        # the exponent in another order (4 steps), exp, a sum of 9 and a division
        torch.testing.assert_close(
            gaussian_kernel2d(3, 3 / 2 / 2.354), expected, atol=float32_tolerance(expected, terms=15), rtol=0
        )
        # normalised by a sum of 25, summed again
        assert gaussian_kernel2d(5, 1.0).sum().item() == pytest.approx(1.0, abs=float32_tolerance(1.0, terms=51))

    @given(
        x=st.floats(0.0, 4.0, allow_nan=False),
        y=st.floats(0.0, 2.0, allow_nan=False),
    )
    def test_inverse_distance_matches_released_splat(self, x, y):
        kps = torch.tensor([[[x, y]]])
        # the released splat in float64 from the same float32 point (rounding x can move it across a cell border)
        expected = _released_inverse_distance_splat(*kps[0, 0].tolist(), 3, 5)
        # distances (3 steps), inverses, their sum of 4, the division; weights are at most 1
        torch.testing.assert_close(
            keypoint_target_map(kps, (3, 5))[0, 0], expected, atol=float32_tolerance(1.0, terms=10), rtol=0
        )
        got = keypoint_target_map(kps, (3, 5))[0, 0]
        assert got.sum().item() == pytest.approx(1.0, abs=float32_tolerance(1.0, terms=10 + 15))  # and a sum of 15 cells

    def test_bilinear_weights_known_value(self):
        got = keypoint_target_map(torch.tensor([[[1.25, 0.5]]]), (2, 3), weighting="bilinear")[0, 0]
        expected = torch.tensor([[0.0, 0.375, 0.125], [0.0, 0.375, 0.125]])
        torch.testing.assert_close(got, expected, atol=0, rtol=0)  # exact: products of quarters and halves

    def test_integer_point_bilinear_is_one_hot_then_blurred(self):
        kernel = gaussian_kernel2d(3, 0.637)
        got = keypoint_target_map(torch.tensor([[[2.0, 1.0]]]), (3, 5), kernel=kernel, weighting="bilinear")[0, 0]
        expected = torch.zeros(3, 5)
        expected[0:3, 1:4] = kernel
        # a 3x3 convolution of the one-hot map (exact unless the convolution transforms its input)
        torch.testing.assert_close(got, expected, atol=float32_tolerance(kernel, terms=9), rtol=0)

    def test_points_off_the_grid_are_clamped(self):
        got = keypoint_target_map(torch.tensor([[[-3.0, 9.0]]]), (3, 4), weighting="bilinear")[0, 0]
        assert got[2, 0].item() == 1.0 and got.sum().item() == 1.0  # exact: the clamped point is a cell centre

    def test_errors(self, no_typecheck):
        with pytest.raises(ValueError, match="weighting"):
            keypoint_target_map(torch.zeros(1, 1, 2), (2, 2), weighting="nearest")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="odd square"):
            keypoint_target_map(torch.zeros(1, 1, 2), (2, 2), kernel=torch.ones(2, 2))
        with pytest.raises(ValueError, match="odd size"):
            gaussian_kernel2d(4, 1.0)
        with pytest.raises(ValueError, match="sigma"):
            gaussian_kernel2d(3, 0.0)


class TestLoss:
    def test_softmax_bce_matches_torch_bce(self):
        torch.manual_seed(0)
        logits, target = torch.randn(2, 3, 10), torch.rand(2, 3, 10)
        valid = torch.tensor([[True, False, True], [True, True, True]])
        got = softmax_bce(logits, target, valid)
        ref = F.binary_cross_entropy(logits.softmax(-1), target, reduction="none").sum(-1)
        expected = torch.where(valid, ref, torch.zeros_like(ref))
        # log-softmax against log of softmax over 10 cells (12 steps), then a sum of 10 logs
        torch.testing.assert_close(got, expected, atol=float32_tolerance(expected, terms=22), rtol=0)

    def test_known_value(self):
        # one source cell, two target cells with logits (0, log 3): p = (1/4, 3/4); target one-hot on cell 1
        corr = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 1, 2)
        loss = correlation_keypoint_loss(
            corr,
            torch.zeros(1, 1, 2),
            torch.tensor([[[1.0, 0.0]]]),
            torch.ones(1, 1, dtype=torch.bool),
            kernel=None,
            weighting="bilinear",
        )
        expected = -2 * math.log(0.75)
        # log-softmax over 2 cells, log(1 - p), a sum of 2 (and the rounding of log 3)
        assert loss.item() == pytest.approx(expected, abs=float32_tolerance(expected, terms=8))

    def test_divides_by_batch_and_sums_keypoints(self):
        corr = torch.randn(2, 3, 4, 3, 4)
        kps = torch.rand(2, 5, 2) * 3
        valid = torch.ones(2, 5, dtype=torch.bool)
        loss = CorrelationKeypointLoss()
        total = loss(corr, kps, kps, valid)
        parts = [loss(corr[i : i + 1], kps[i : i + 1], kps[i : i + 1], valid[i : i + 1]) for i in range(2)]
        expected = (parts[0] + parts[1]) / 2
        # per keypoint a log-softmax and a sum over 12 cells, then 10 keypoints summed and divided
        torch.testing.assert_close(total, expected, atol=float32_tolerance(expected, terms=12 + 4 + 10 + 1), rtol=0)

    def test_invalid_keypoints_are_ignored_even_when_nan(self):
        corr = torch.randn(1, 3, 4, 3, 4, requires_grad=True)
        kps = torch.rand(1, 3, 2) * 3
        valid = torch.tensor([[True, False, True]])
        poisoned = kps.clone()
        poisoned[0, 1] = float("nan")
        loss = CorrelationKeypointLoss()
        got = loss(corr, poisoned, poisoned, valid)
        expected = loss(corr, kps[:, [0, 2]], kps[:, [0, 2]], valid[:, [0, 2]])
        # per keypoint a log-softmax and a sum over 12 cells, then 3 keypoints (one exactly 0) summed
        torch.testing.assert_close(got, expected, atol=float32_tolerance(expected, terms=12 + 4 + 3), rtol=0)
        got.backward()
        assert torch.isfinite(corr.grad).all()

    def test_reverse_view_equals_explicit_reverse(self):
        corr = torch.randn(2, 3, 4, 3, 4, requires_grad=True)
        kps_s, kps_t = torch.rand(2, 4, 2) * 3, torch.rand(2, 4, 2) * 3
        valid = torch.ones(2, 4, dtype=torch.bool)
        loss = CorrelationKeypointLoss()
        a = loss(reverse_correlation(corr), kps_t, kps_s, valid)
        b = loss(torch.einsum("bijkl->bklij", corr).contiguous(), kps_t, kps_s, valid)
        # 4 weighted corners gathered from another layout, a log-softmax and a sum over 12 cells, 8 keypoints
        torch.testing.assert_close(a, b, atol=float32_tolerance(b, terms=4 + 12 + 4 + 8 + 1), rtol=0)

    def test_gradcheck(self):
        torch.manual_seed(0)
        corr = torch.randn(1, 2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
        src = torch.tensor([[[0.3, 0.6], [1.7, 0.2]]], dtype=torch.float64)
        trg = torch.tensor([[[1.2, 0.9], [0.1, 0.4]]], dtype=torch.float64)
        valid = torch.ones(1, 2, dtype=torch.bool)
        kernel = gaussian_kernel2d(3, 0.637, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda c: correlation_keypoint_loss(c, src, trg, valid, kernel=kernel), (corr,), fast_mode=True
        )

    def test_errors(self, no_typecheck):
        corr = torch.randn(1, 2, 2, 2, 2)
        kps = torch.zeros(1, 3, 2)
        with pytest.raises(ValueError, match="boolean"):
            correlation_keypoint_loss(corr, kps, kps, torch.ones(1, 3), kernel=None)
        with pytest.raises(ValueError, match="must match"):
            correlation_keypoint_loss(corr, kps, torch.zeros(1, 2, 2), torch.ones(1, 3, dtype=torch.bool), kernel=None)
        with pytest.raises(ValueError, match="weighting"):
            CorrelationKeypointLoss(weighting="nearest")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="shape of logits"):
            softmax_bce(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))


def _one_hot_correlation(match: torch.Tensor, trg_size: tuple[int, int]) -> torch.Tensor:
    """(b, hs, ws) flat target indices -> one-hot correlation (b, hs, ws, ht, wt)."""
    b, hs, ws = match.shape
    corr = F.one_hot(match, trg_size[0] * trg_size[1]).float()
    return corr.view(b, hs, ws, *trg_size)


class TestTransfer:
    def test_argmax_transfer_one_hot(self):
        torch.manual_seed(0)
        match = torch.randint(0, 12, (2, 3, 5))
        corr = _one_hot_correlation(match, (3, 4))
        ys, xs = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
        kps = torch.stack((xs, ys), dim=-1).view(1, 15, 2).expand(2, 15, 2).float()
        got = argmax_transfer(corr, kps)
        flat = match.view(2, 15)
        # exact: integer keypoints read one-hot rows, and cell centres are integers
        torch.testing.assert_close(got, torch.stack((flat % 4, flat // 4), dim=-1).float(), atol=0, rtol=0)

    def test_soft_argmax_transfer_tends_to_argmax(self):
        match = torch.randint(0, 12, (1, 3, 5))
        corr = _one_hot_correlation(match, (3, 4))
        kps = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])
        hard = argmax_transfer(corr, kps)
        # softmax over 12 cells (the others weigh exp(-100)), a weighted sum of 12 positions
        torch.testing.assert_close(
            soft_argmax_transfer(corr, kps, 0.01), hard, atol=float32_tolerance(hard, terms=12 + 2 + 12), rtol=0
        )

    def test_argmax_flow_one_hot_gives_integer_flow_and_matches_soft_argmax(self):
        match = torch.randint(0, 20, (2, 4, 5))
        corr = _one_hot_correlation(match, (4, 5))
        flow = argmax_flow(corr)
        ys, xs = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
        expected = torch.stack(((match % 5) - xs, (match // 5) - ys), dim=1).float()
        torch.testing.assert_close(flow, expected, atol=0, rtol=0)  # exact: integers on equal grids
        # softmax over 20 cells (the others weigh exp(-100)), a weighted sum of 20 positions, the source position
        torch.testing.assert_close(soft_argmax(corr, 0.01), flow, atol=float32_tolerance(4.0, terms=20 + 2 + 20 + 2), rtol=0)

    def test_argmax_flow_between_grids_uses_pixel_centres(self):
        # source 1 x 2 cells, target 1 x 4 cells: source cell 0 sits at x = 0.5 on the target grid
        corr = torch.zeros(1, 1, 2, 1, 4)
        corr[0, 0, 0, 0, 0] = 1.0
        corr[0, 0, 1, 0, 3] = 1.0
        flow = argmax_flow(corr)
        torch.testing.assert_close(flow[0, 0, 0], torch.tensor([-0.5, 0.5]), atol=0, rtol=0)  # exact: halves

    def test_errors(self, no_typecheck):
        with pytest.raises(ValueError, match="tau"):
            soft_argmax_transfer(torch.zeros(1, 1, 1, 1, 2), torch.zeros(1, 1, 2), 0.0)
        with pytest.raises(ValueError, match="5 dimensions"):
            argmax_flow(torch.zeros(1, 2, 2, 2))


def test_argmax_flow_matches_plain_argmax_with_ties():
    torch.manual_seed(0)
    corr = torch.randint(0, 3, (2, 3, 4, 5, 6)).float()  # many ties: the first occurrence must win
    flow = argmax_flow(corr)
    index = corr.reshape(2, 12, 30).argmax(-1).view(2, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    src_x = (xs + 0.5) * 6 / 4 - 0.5
    src_y = (ys + 0.5) * 5 / 3 - 0.5
    expected = torch.stack(((index % 6) - src_x, (index // 6) - src_y), dim=1).float()
    # the source position (x + 0.5)·5/3 − 0.5 in another order: 4 roundings
    torch.testing.assert_close(flow, expected, atol=float32_tolerance(expected, terms=4), rtol=0)


def test_saturated_softmax_has_finite_gradient():
    # raw dot products of random features reach hundreds: p rounds to exactly 1 and 0
    logits = torch.tensor([[[0.0, 400.0, -300.0, 1e4]]], requires_grad=True)
    target = torch.tensor([[[0.1, 0.6, 0.0, 0.3]]])
    loss = softmax_bce(logits, target, torch.ones(1, 1, dtype=torch.bool)).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
