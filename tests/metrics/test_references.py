"""Reference predictors: identity predicts the source positions (rescaled by the protocol like a
model's prediction); the classical peer recovers a known homography, falls back (counted) on a
textureless pair, and is deterministic; homography helpers agree with the flow geometry."""

import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import ProjectiveTransform, warp
from tolerances import float32_tolerance

from actr_core.data import PairBatch
from actr_core.flow import rescale_keypoints, transfer_keypoints
from actr_core.imaging import normalise_image
from actr_core.metrics import (
    RELEASED,
    STANDARD,
    STANDARD_INPUT,
    ClassicalPeer,
    IdentityPredictor,
    PeerSettings,
    evaluate,
    load_results,
    reference_predictor,
    save_results,
    score_batch,
)
from actr_core.metrics.references import apply_homography, best_constant_flow, fit_homography, homography_flow

# A mild perspective warp in pixels of a 96 x 128 (h x w) frame: shear, scale, shift and tilt.
TRUE_H = np.array([[1.06, 0.05, 4.0], [-0.04, 0.97, -3.0], [2e-4, -3e-4, 1.0]])


def _textured(h: int = 96, w: int = 128) -> np.ndarray:
    """An RGB photo from scikit-image, reduced to (h, w, 3) floats in [0, 1]."""
    photo = data.astronaut()[40:424:4, ::4] / 255.0  # 96 x 128
    return np.ascontiguousarray(photo[:h, :w])


def _as_input(*images: np.ndarray) -> torch.Tensor:
    return normalise_image(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float())


def _warped_pair() -> tuple[torch.Tensor, torch.Tensor]:
    src = _textured()
    trg = warp(src, ProjectiveTransform(matrix=TRUE_H).inverse, output_shape=src.shape[:2], order=1)
    return _as_input(src), _as_input(trg)


def test_identity_predicts_the_source_positions_on_an_h_ne_w_grid():
    src = torch.zeros(2, 3, 32, 48)
    kps = torch.tensor([[[3.25, 7.5], [40.0, 1.0]], [[0.0, 0.0], [47.0, 31.0]]])
    valid = torch.tensor([[True, False], [True, True]])
    identity = IdentityPredictor()
    out = identity(src, src)
    assert out.flow.shape == (2, 2, 8, 12) and not out.flow.any()
    assert not out.fallback.any() and out.status == ("fitted", "fitted")
    pred = identity.transfer(out, kps, valid)
    assert torch.equal(pred[valid], kps[valid]) and torch.isnan(pred[~valid]).all()
    # the same as any matcher's transfer of a zero flow (base Matcher rule: to the grid and back)
    through_flow = rescale_keypoints(
        transfer_keypoints(out.flow, rescale_keypoints(kps, (32, 48), (8, 12)), valid), (8, 12), (32, 48)
    )
    torch.testing.assert_close(pred[valid], through_flow[valid], rtol=0, atol=float32_tolerance(kps, terms=4))


@pytest.mark.parametrize("protocol", [STANDARD, STANDARD_INPUT, RELEASED], ids=lambda p: p.name)
def test_identity_is_scored_exactly_like_a_zero_flow_model(protocol, batch_factory, matcher_factory):
    """The protocol rescales identity's prediction as it rescales a model's (here 300 x 500 originals)."""
    batch = batch_factory(
        [[[100.25, 40.0], [420.0, 250.5]]], [[[110.0, 42.0], [400.0, 260.0]]],
        src_size=[(300, 500)], trg_size=[(240, 400)], input_size=(48, 64),
    )  # fmt: skip
    identity = score_batch(IdentityPredictor(), batch, protocol, (0.1,))
    still = score_batch(matcher_factory((0.0, 0.0)), batch, protocol, (0.1,))
    np.testing.assert_allclose(identity.pred, still.pred, rtol=0, atol=float32_tolerance(still.pred, terms=8))
    if protocol is STANDARD:  # source pixel position carried from 500 x 300 to 400 x 240 by pixel centres
        expected = rescale_keypoints(batch.src_kps_orig, (300, 500), (240, 400)).numpy()
        np.testing.assert_allclose(identity.pred, expected, rtol=0, atol=float32_tolerance(expected, terms=8))


def test_apply_homography_known_values_and_errors(no_typecheck):
    h = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, -2.0], [0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]])
    kps = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[2.0, 4.0], [0.0, 6.0]]])
    out = apply_homography(h.double(), kps)
    assert out.dtype == torch.float32
    assert out.tolist() == [[[3.0, 1.0], [1.0, -2.0]], [[1.0, 2.0], [0.0, 6.0]]]
    with pytest.raises(ValueError, match="homography must have shape"):
        apply_homography(torch.eye(3), kps)
    with pytest.raises(ValueError, match="kps must have shape"):
        apply_homography(h, kps[:1])


def test_homography_flow_agrees_with_the_keypoint_transfer():
    """At every H/4 cell centre, flow-based transfer equals the exact homography; a shift is a constant flow."""
    h = torch.from_numpy(TRUE_H)[None]
    frame, grid = (96, 128), (24, 32)
    flow = homography_flow(h, frame)
    assert flow.shape == (1, 2, 24, 32)
    ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(32.0), indexing="ij")
    cells = torch.stack([xs, ys], -1).reshape(1, -1, 2)
    by_flow = rescale_keypoints(transfer_keypoints(flow, cells), grid, frame)
    exact = apply_homography(h, rescale_keypoints(cells, grid, frame))
    torch.testing.assert_close(by_flow, exact, rtol=0, atol=float32_tolerance(exact, terms=8))
    shift = torch.tensor([[[1.0, 0.0, 8.0], [0.0, 1.0, -4.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    constant = homography_flow(shift, frame)
    assert torch.equal(constant[0, 0], torch.full((24, 32), 2.0)) and torch.equal(constant[0, 1], torch.full((24, 32), -1.0))


def test_peer_recovers_a_known_homography():
    src, trg = _warped_pair()
    peer = ClassicalPeer()
    out = peer(src, trg)
    assert out.status == ("fitted",) and not out.fallback.any()
    assert out.flow.shape == (1, 2, 24, 32)
    # keypoints well inside both images, moved by the fitted homography vs the true one
    kps = torch.tensor([[[20.0, 20.0], [100.0, 15.0], [64.0, 48.0], [30.0, 80.0], [110.0, 75.0]]])
    pred = peer.transfer(out, kps, torch.ones(1, 5, dtype=torch.bool))
    true = apply_homography(torch.from_numpy(TRUE_H)[None], kps)
    error = (pred - true).norm(dim=-1)
    assert error.max().item() < 1.0, error  # sub-pixel-ish on a 128-px frame
    # the flow on the H/4 grid is the homography's flow
    torch.testing.assert_close(out.flow, homography_flow(out.homography, (96, 128)))


def test_peer_falls_back_to_identity_on_a_pair_without_texture():
    src, trg = _warped_pair()
    flat = torch.zeros_like(src)  # grey: no corner at all
    peer = ClassicalPeer()
    out = peer(torch.cat([flat, src]), torch.cat([flat, trg]))
    assert out.status == ("too_few_matches", "fitted")
    assert out.fallback.tolist() == [True, False]
    assert torch.equal(out.homography[0], torch.eye(3, dtype=torch.float64)) and not out.flow[0].any()
    kps = torch.tensor([[[5.0, 6.0]], [[20.0, 20.0]]])
    assert torch.equal(peer.transfer(out, kps)[0], kps[0])  # identity's prediction


def test_peer_is_deterministic_and_independent_of_the_batch():
    src, trg = _warped_pair()
    noise = torch.from_numpy(np.random.default_rng(0).uniform(size=(96, 128, 3)))
    other = _as_input(noise.numpy())
    peer = ClassicalPeer()
    alone = peer(src, trg)
    together = peer(torch.cat([other, src]), torch.cat([other.flip(-1), trg]))
    again = peer(torch.cat([other, src]), torch.cat([other.flip(-1), trg]))
    assert torch.equal(together.homography, again.homography) and together.status == again.status
    assert torch.equal(together.homography[1], alone.homography[0])


def test_fit_homography_at_the_working_size_and_no_consensus(no_typecheck):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(64, 64)), rng.uniform(size=(64, 64))  # unrelated textures
    fit = fit_homography(a, b)
    assert fit.homography is None and fit.status in ("too_few_matches", "no_consensus")
    with pytest.raises(ValueError, match="same size"):
        fit_homography(a, b[:32])


def test_settings_and_names(no_typecheck):
    assert "working_side" not in PeerSettings().describe() and "192 px" in PeerSettings().describe()
    with pytest.raises(ValueError, match="working_side"):
        PeerSettings(working_side=8)
    with pytest.raises(ValueError, match="min_samples"):
        PeerSettings(min_inliers=3)
    with pytest.raises(ValueError, match="max_ratio"):
        PeerSettings(max_ratio=0.0)
    assert isinstance(reference_predictor("identity"), IdentityPredictor)
    assert isinstance(reference_predictor("classical_peer"), ClassicalPeer)
    with pytest.raises(ValueError, match="unknown reference predictor"):
        reference_predictor("sift")


def test_evaluate_with_the_peer_round_trips_through_netcdf(tmp_path, matcher_factory):
    """A textured pair and a blank one: the peer fits one, falls back on the other, all in results.nc."""
    from actr_core.flow import rescale_keypoints as rescale

    src, trg = _warped_pair()
    src_kps = torch.tensor([[[20.0, 20.0], [100.0, 15.0], [64.0, 48.0]]] * 2)
    trg_kps = apply_homography(torch.from_numpy(TRUE_H)[None].expand(2, 3, 3), src_kps)
    batch = PairBatch.build(
        torch.cat([src, torch.zeros_like(src)]), torch.cat([trg, torch.zeros_like(trg)]), src_kps, trg_kps,
        src_kps_orig=rescale(src_kps, (96, 128), (96, 128)), trg_kps_orig=trg_kps.clone(),
        category=["astronaut", "blank"], pair_id=["textured", "blank"], dataset=["synthetic"] * 2,
    )  # fmt: skip
    ds = evaluate(matcher_factory((0.0, 0.0)), [batch], alphas=(0.05, 0.1), progress=False)
    assert ds["predictor"].values.tolist() == ["model", "identity", "classical_peer"]
    peer = ds.sel(predictor="classical_peer")
    assert int(peer["n_fallbacks"]) == 1 and peer["fallback"].values.tolist() == [False, True]
    assert peer["fallback_reason"].values.tolist() == ["", "too_few_matches"]
    assert peer["pair_pck"].sel(alpha=0.05, pair="textured").item() == 1.0  # within 6.4 px of the truth
    back = load_results(save_results(ds, tmp_path / "results.nc"))
    assert back["predictor"].values.tolist() == ds["predictor"].values.tolist()
    for name in ("pred_kps", "distance", "pair_pck", "fallback", "fallback_reason", "n_fallbacks", "pck_image_difference"):
        assert back[name].dims == ds[name].dims
        np.testing.assert_array_equal(back[name].values, ds[name].values)
    assert back["pck_image_difference"]["comparison"].values.tolist() == ["model - identity", "model - classical_peer"]


# ---------------------------------------------------------------- the best constant flow


def test_best_constant_flow_is_the_weighted_geometric_median():
    """Three samples whose valid cells hold constant flows (0, 0), (1, 0), (10, 0): Eq. 4 weighs each
    sample once, so the best constant is their median (1, 0), not the mean (3.67, 0) nor the
    cell-weighted median; no other constant scores lower."""
    from actr_core.blocks import masked_flow_loss

    flow = torch.zeros(3, 2, 4, 5, dtype=torch.float64)
    flow[1, 0], flow[2, 0] = 1.0, 10.0
    valid = torch.zeros(3, 4, 5, dtype=torch.bool)
    valid[0, :1, :1] = True  # 1 cell
    valid[1, :2] = True  # 10 cells
    valid[2] = True  # 20 cells: the cell-weighted median would be (10, 0)
    flow[~valid.unsqueeze(1).expand_as(flow)] = float("nan")  # never read
    best = best_constant_flow(flow, valid)
    torch.testing.assert_close(best, torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-6)

    def loss(c):
        return float(masked_flow_loss(c.view(1, 2, 1, 1).expand_as(flow).contiguous(), flow, valid))

    for other in ([0.0, 0.0], [3.67, 0.0], [10.0, 0.0], [1.0, 0.5]):
        assert loss(best) < loss(torch.tensor(other, dtype=torch.float64))


def test_best_constant_flow_errors(no_typecheck):
    with pytest.raises(ValueError, match="no valid cell"):
        best_constant_flow(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        best_constant_flow(torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2))
