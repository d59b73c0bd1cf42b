"""Flow geometry: conventions, round trips and error paths."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import float32_tolerance

from actr_core import flow as F_
from actr_core.flow import (
    coords_grid,
    flow_to_mapping,
    keypoints_to_flow,
    mapping_to_flow,
    normalise_coords,
    pool_flow,
    rescale_keypoints,
    resize_flow,
    sample_flow,
    transfer_keypoints,
    unnormalise_coords,
    warp,
)

sizes = st.integers(min_value=2, max_value=12)
batches = st.integers(min_value=1, max_value=3)


# ---------------------------------------------------------------- conventions


def test_convention_flow_channel_zero_is_x():
    """grid[0] varies along columns (x), grid[1] along rows (y); flow channel 0 moves points in x."""
    g = coords_grid(3, 5)
    assert g.shape == (2, 3, 5)
    assert torch.equal(g[0, 0], torch.arange(5.0))  # x along a row
    assert torch.equal(g[1, :, 0], torch.arange(3.0))  # y down a column
    flow = torch.zeros(1, 2, 3, 5)
    flow[:, 0] = 2.0  # +2 in x
    kps = torch.tensor([[[1.0, 1.0]]])
    out = transfer_keypoints(flow, kps)
    expected = torch.tensor([[[3.0, 1.0]]])
    # the point normalised and back (4 roundings), 4 bilinear weights, the addition
    torch.testing.assert_close(out, expected, atol=float32_tolerance(expected, terms=9), rtol=0)
    assert not torch.allclose(out, torch.tensor([[[1.0, 3.0]]]))  # the (y, x) misreading


def test_convention_flow_points_from_source_into_target():
    """warp(target, flow) pulls target pixels at source + flow back onto the source grid."""
    target = torch.zeros(1, 1, 4, 6)
    target[0, 0, 2, 4] = 1.0
    flow = torch.zeros(1, 2, 4, 6)
    flow[:, 0, 2, 1] = 3.0  # source (x=1, y=2) matches target (x=4, y=2)
    out = warp(target, flow)
    assert out[0, 0, 2, 1] == 1.0
    # the misreading "flow points from target into source" would sample x = 1 - 3 = -2 instead
    assert warp(target, -flow)[0, 0, 2, 1] == 0.0


def test_convention_pixel_centres_at_integers():
    """Pixel centre 0 sits half a pixel inside the frame: normalised -1 + 1/W, not -1."""
    size = (4, 8)
    xy = torch.tensor([[0.0, 0.0], [-0.5, -0.5], [7.5, 3.5]])
    n = normalise_coords(xy, size)
    # exact: halves and powers of two
    assert torch.equal(n[0], torch.tensor([-1 + 1 / 8, -1 + 1 / 4]))
    assert torch.equal(n[1], torch.tensor([-1.0, -1.0]))  # outer edge
    assert torch.equal(n[2], torch.tensor([1.0, 1.0]))
    assert not torch.allclose(n[0], torch.tensor([-1.0, -1.0]))  # align_corners=True misreading


def test_convention_rescaling_keypoints_uses_pixel_centres():
    """Downscaling 8 → 4 maps x = 0.5 (between pixels 0 and 1) to 0, and x = 0 to −0.25."""
    kps = torch.tensor([[[0.5, 1.5], [0.0, 0.0]]])
    out = rescale_keypoints(kps, (8, 8), (4, 4))
    assert torch.equal(out, torch.tensor([[[0.0, 0.5], [-0.25, -0.25]]]))  # exact: halves and quarters
    assert not torch.allclose(out[0, 0], kps[0, 0] * 0.5)  # the naive x·s misreading


def test_convention_resize_flow_rescales_values():
    """A flow of 1 px on a 4-wide grid is 2 px on an 8-wide grid (values in pixels of the new grid)."""
    flow = torch.ones(1, 2, 4, 4)
    out = resize_flow(flow, (8, 16))
    tol = float32_tolerance(4.0, terms=5)  # 4 bilinear weights, the scaling
    torch.testing.assert_close(out[:, 0], torch.full((1, 8, 16), 4.0), atol=tol, rtol=0)
    torch.testing.assert_close(out[:, 1], torch.full((1, 8, 16), 2.0), atol=tol, rtol=0)


def test_convention_resize_then_transfer_commutes_with_rescaling():
    """Transferring on a fine grid equals transferring on a coarse grid under the pixel-centre map."""
    flow = torch.zeros(1, 2, 4, 4)
    flow[:, 0] = 1.0
    flow[:, 1] = -0.5
    kps = torch.tensor([[[1.2, 2.3]]])
    coarse = transfer_keypoints(flow, kps)
    fine = transfer_keypoints(resize_flow(flow, (16, 16)), rescale_keypoints(kps, (4, 4), (16, 16)))
    # rescaled there and back (3 + 3 roundings), the fine flow (4 weights and the scaling), the transfer (9)
    tol = float32_tolerance(fine, terms=20)
    torch.testing.assert_close(rescale_keypoints(fine, (16, 16), (4, 4)), coarse, atol=tol, rtol=0)


# ---------------------------------------------------------------- properties


@given(b=batches, h=sizes, w=sizes, seed=st.integers(0, 2**16))
def test_normalise_unnormalise_is_identity(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, 7, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h]) - 0.5
    back = unnormalise_coords(normalise_coords(xy, (h, w)), (h, w))
    assert torch.allclose(back, xy, atol=1e-12)


@given(b=batches, h=sizes, w=sizes, seed=st.integers(0, 2**16))
def test_flow_mapping_round_trip(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    flow = torch.randn(b, 2, h, w, generator=g, dtype=torch.float64)
    assert torch.allclose(mapping_to_flow(flow_to_mapping(flow)), flow, atol=1e-12)


@given(b=batches, h=sizes, w=sizes, c=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_zero_flow_warps_to_identity(b, h, w, c, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, c, h, w, generator=g, dtype=torch.float64)
    out = warp(image, torch.zeros(b, 2, h, w, dtype=torch.float64))
    assert torch.allclose(out, image, atol=1e-12)


@given(
    b=batches,
    h=sizes,
    w=sizes,
    h2=sizes,
    w2=sizes,
    dx=st.floats(-5, 5),
    dy=st.floats(-5, 5),
)
def test_resizing_constant_flow_scales_it_exactly(b, h, w, h2, w2, dx, dy):
    flow = torch.empty(b, 2, h, w, dtype=torch.float64)
    flow[:, 0], flow[:, 1] = dx, dy
    out = resize_flow(flow, (h2, w2))
    assert out.shape == (b, 2, h2, w2)
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], dx * w2 / w), atol=1e-12)
    assert torch.allclose(out[:, 1], torch.full_like(out[:, 1], dy * h2 / h), atol=1e-12)


@given(b=batches, h=sizes, w=sizes, dx=st.floats(-5, 5), dy=st.floats(-5, 5), seed=st.integers(0, 2**16))
def test_transfer_of_constant_flow_adds_it(b, h, w, dx, dy, seed):
    g = torch.Generator().manual_seed(seed)
    flow = torch.empty(b, 2, h, w, dtype=torch.float64)
    flow[:, 0], flow[:, 1] = dx, dy
    kps = torch.rand(b, 5, 2, generator=g, dtype=torch.float64) * torch.tensor([w - 1, h - 1])
    out = transfer_keypoints(flow, kps)
    assert torch.allclose(out, kps + torch.tensor([dx, dy], dtype=torch.float64), atol=1e-12)


@st.composite
def spaced_keypoints(draw):
    """Keypoints on a coarse lattice (≥ 4 cells apart) of a grid with independent H ≠ W."""
    h = draw(st.integers(16, 40))
    w = draw(st.integers(16, 40).filter(lambda v: v != h))
    b = draw(batches)
    lattice = [(x, y) for x in range(2, w - 2, 5) for y in range(2, h - 2, 5)]
    n = draw(st.integers(1, min(6, len(lattice))))
    seed = draw(st.integers(0, 2**16))
    return b, h, w, n, lattice, seed


@given(spaced_keypoints())
def test_keypoints_to_flow_then_transfer_returns_targets(args):
    b, h, w, n, lattice, seed = args
    g = torch.Generator().manual_seed(seed)
    picks = torch.stack([torch.randperm(len(lattice), generator=g)[:n] for _ in range(b)])
    base = torch.tensor(lattice, dtype=torch.float64)[picks]
    src = base + torch.rand(b, n, 2, generator=g, dtype=torch.float64) - 0.5  # sub-pixel
    trg = torch.rand(b, n, 2, generator=g, dtype=torch.float64) * torch.tensor([w - 1, h - 1])
    valid = torch.ones(b, n, dtype=torch.bool)
    # 64-cell-wide grid equivalent: side = 35/512 of the grid ≥ 2 cells, so each keypoint's four
    # bilinear neighbours lie inside its own neighbourhood.
    flow, filled = keypoints_to_flow(src, trg, valid, (h, w), neighbourhood=4.0, reference_size=16.0)
    assert filled.any()
    assert torch.allclose(transfer_keypoints(flow, src, valid), trg, atol=1e-9)


# ---------------------------------------------------------------- keypoints_to_flow known values


def test_keypoints_to_flow_fills_square_neighbourhood():
    src = torch.tensor([[[10.0, 5.0]]])
    trg = torch.tensor([[[12.0, 9.0]]])
    valid = torch.tensor([[True]])
    # side 35/512 of a 64-wide grid = 4.375 cells → half 2.1875: columns 8..12, rows 3..7
    flow, filled = keypoints_to_flow(src, trg, valid, (16, 64))
    # height 16 → half side 35/512*16/2 = 0.547 rows → rows 5 only; width 64 → columns 8..12
    assert filled.sum() == 5
    assert filled[0, 5, 8:13].all()
    assert torch.equal(flow[0, :, 5, 10], torch.tensor([2.0, 4.0]))
    assert torch.equal(flow[0, :, ~filled[0]], torch.zeros(2, int((~filled).sum())))


def test_keypoints_to_flow_nearest_keypoint_wins_and_ignores_invalid():
    src = torch.tensor([[[4.0, 4.0], [7.0, 4.0], [5.0, 4.0]]])
    trg = torch.tensor([[[5.0, 4.0], [9.0, 4.0], [float("nan"), float("nan")]]])
    valid = torch.tensor([[True, True, False]])
    flow, _filled = keypoints_to_flow(src, trg, valid, (9, 12), neighbourhood=6.0, reference_size=12.0)
    # half side 3 cells; cell x=5 is 1 from kp0 and 2 from kp1 → kp0; x=6 is 2 vs 1 → kp1
    assert flow[0, 0, 4, 5] == 1.0
    assert flow[0, 0, 4, 6] == 2.0
    assert torch.isfinite(flow).all()
    # equidistant cell (x=5.5 does not exist); tie rule: put kp1 at 6 so x=5 is equidistant
    src2 = torch.tensor([[[4.0, 4.0], [6.0, 4.0]]])
    flow2, _ = keypoints_to_flow(src2, trg[:, :2], valid[:, :2], (9, 12), neighbourhood=6.0, reference_size=12.0)
    assert flow2[0, 0, 4, 5] == 1.0  # lower index wins on a tie


# ---------------------------------------------------------------- gradients and errors


def test_transfer_keypoints_gradcheck():
    flow = torch.randn(2, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    kps = (torch.rand(2, 3, 2, dtype=torch.float64) * torch.tensor([5.0, 3.0]) + 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, k: transfer_keypoints(f, k), (flow, kps))


def test_invalid_keypoints_become_nan_without_reading_input():
    flow = torch.zeros(1, 2, 4, 4, requires_grad=True)
    kps = torch.tensor([[[1.0, 1.0], [float("nan"), float("inf")]]], requires_grad=True)
    out = transfer_keypoints(flow, kps, torch.tensor([[True, False]]))
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0]).all()
    out[0, 0].sum().backward()
    assert torch.isfinite(kps.grad).all() and torch.isfinite(flow.grad).all()


def test_sample_flow_clamps_outside_points_to_border():
    flow = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 2, 3, 4).contiguous()
    out = sample_flow(flow, torch.tensor([[[-3.0, 1.0], [10.0, 1.0]]]))
    expected = torch.tensor([0.0, 3.0])
    # border points normalised and back (4 roundings), 4 bilinear weights
    torch.testing.assert_close(out[0, :, 0], expected, atol=float32_tolerance(expected, terms=8), rtol=0)


def test_convention_pool_flow_centres_and_units():
    """An affine flow pooled by k equals the same motion sampled at the coarse cell centres
    (x_c + 0.5)·k − 0.5, in coarse cells; the misreadings (centre at k·x_c, values kept in fine
    pixels) give other numbers."""
    k, h, w = 4, 8, 12
    fine = coords_grid(h, w, dtype=torch.float64)  # (x, y) of fine cell centres
    a = torch.tensor([[0.1, -0.2], [0.05, 0.3]], dtype=torch.float64)
    t = torch.tensor([1.5, -2.0], dtype=torch.float64).view(2, 1, 1)
    flow = (torch.einsum("ij,jhw->ihw", a, fine) + t).unsqueeze(0)  # affine in the fine frame
    pooled, valid = pool_flow(flow, torch.ones(1, h, w, dtype=torch.bool), k)
    coarse = coords_grid(h // k, w // k, dtype=torch.float64)
    centres = (coarse + 0.5) * k - 0.5
    expected = (torch.einsum("ij,jhw->ihw", a, centres) + t) / k
    assert valid.all() and pooled.shape == (1, 2, 2, 3)
    torch.testing.assert_close(pooled[0], expected, rtol=0, atol=1e-12)
    misread = (torch.einsum("ij,jhw->ihw", a, coarse * k) + t) / k
    assert (pooled[0] - misread).abs().max() > 0.05
    assert (pooled[0] * k - expected).abs().max() > 0.5


def test_pool_flow_block_valid_only_when_whole_and_never_reads_invalid_cells():
    flow = torch.ones(2, 2, 4, 6)
    valid = torch.ones(2, 4, 6, dtype=torch.bool)
    valid[1, 0, 0] = False
    flow[1, :, 0, 0] = float("nan")
    pooled, coarse_valid = pool_flow(flow, valid, 2)
    assert coarse_valid.sum() == 11 and not coarse_valid[1, 0, 0]
    assert torch.isfinite(pooled).all()
    assert (pooled[coarse_valid.unsqueeze(1).expand_as(pooled)] == 0.5).all()  # exact: 1 / 2


@given(b=batches, hc=sizes, wc=sizes, k=st.integers(1, 4), seed=st.integers(0, 2**16), p_invalid=st.floats(0.0, 0.3))
def test_pool_flow_is_the_mean_of_whole_valid_blocks(b, hc, wc, k, seed, p_invalid):
    """Any flow and mask: a coarse cell is valid iff its k × k block is, and then holds the block's
    mean over k (checked in float64 by reshaping); NaN in invalid cells never reaches the output."""
    gen = torch.Generator().manual_seed(seed)
    flow = torch.randn(b, 2, hc * k, wc * k, generator=gen, dtype=torch.float64) * 5
    valid = torch.rand(b, hc * k, wc * k, generator=gen, dtype=torch.float64) >= p_invalid
    flow = torch.where(valid.unsqueeze(1), flow, float("nan"))
    pooled, coarse_valid = pool_flow(flow, valid, k)
    blocks = flow.reshape(b, 2, hc, k, wc, k)
    expected_valid = valid.reshape(b, hc, k, wc, k).all(dim=4).all(dim=2)
    assert torch.equal(coarse_valid, expected_valid)
    assert torch.isfinite(pooled).all()
    expected = blocks.mean(dim=(3, 5)) / k
    inside = expected_valid.unsqueeze(1).expand_as(pooled)
    torch.testing.assert_close(pooled[inside], expected[inside], rtol=0, atol=1e-12)


@pytest.mark.usefixtures("no_typecheck")
class TestErrors:
    def test_flow_wrong_rank(self):
        with pytest.raises(ValueError, match=r"\(b, 2, h, w\).*\(2, 4, 4\)"):
            resize_flow(torch.zeros(2, 4, 4), (8, 8))

    def test_flow_three_channels(self):
        with pytest.raises(ValueError, match=r"\(1, 3, 4, 4\)"):
            flow_to_mapping(torch.zeros(1, 3, 4, 4))

    def test_mismatched_grids(self):
        with pytest.raises(ValueError, match="grid"):
            warp(torch.zeros(1, 3, 5, 5), torch.zeros(1, 2, 4, 4))

    def test_keypoint_batch_mismatch(self):
        with pytest.raises(ValueError, match="batch size 3.*batch size 2"):
            transfer_keypoints(torch.zeros(2, 2, 4, 4), torch.zeros(3, 5, 2))

    def test_non_bool_mask(self):
        with pytest.raises(ValueError, match="boolean.*torch.int64"):
            transfer_keypoints(torch.zeros(1, 2, 4, 4), torch.zeros(1, 5, 2), torch.ones(1, 5, dtype=torch.long))

    def test_mask_wrong_shape(self):
        with pytest.raises(ValueError, match=r"\(1, 5\).*\(1, 4\)"):
            keypoints_to_flow(torch.zeros(1, 5, 2), torch.zeros(1, 5, 2), torch.ones(1, 4, dtype=torch.bool), (8, 8))

    def test_bad_size(self):
        with pytest.raises(ValueError, match=r"\(0, 8\)"):
            resize_flow(torch.zeros(1, 2, 4, 4), (0, 8))

    def test_pool_flow_factor_must_divide_grid(self):
        with pytest.raises(ValueError, match=r"factor = 3.*\(4, 6\)"):
            pool_flow(torch.zeros(1, 2, 4, 6), torch.ones(1, 4, 6, dtype=torch.bool), 3)

    def test_pool_flow_mask_must_be_boolean(self):
        with pytest.raises(ValueError, match="boolean"):
            pool_flow(torch.zeros(1, 2, 4, 6), torch.ones(1, 4, 6), 2)

    def test_integer_flow(self):
        with pytest.raises(ValueError, match="floating-point.*torch.int64"):
            resize_flow(torch.zeros(1, 2, 4, 4, dtype=torch.long), (8, 8))


def test_public_names():
    for name in ("coords_grid", "resize_flow", "warp", "transfer_keypoints", "keypoints_to_flow"):
        assert name in F_.__all__
