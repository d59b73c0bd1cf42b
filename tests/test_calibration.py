"""Calibrated match confidence: the cycle and flip errors, the correlation's spread, the image's
flatness, the logistic fit, its scores, its file, and the collection of matches from batches scored
with the library's PCK rule."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from tolerances import float32_tolerance

from actr_core.calibration import (
    CalibrationError,
    ConfidenceCalibration,
    calibration_scores,
    collect_match_features,
    correlation_spread,
    cycle_displacement,
    displacement_error,
    fit_calibration,
    flip_displacement,
    image_flatness,
    match_measures,
    mirror_flow,
)
from actr_core.data import collate
from actr_core.data.samples import build_sample
from actr_core.data.synthetic import SyntheticConfig, SyntheticPairs
from actr_core.flow import sample_map
from actr_core.metrics import IdentityPredictor, evaluate, keypoint_correctness
from actr_core.models.base import CorrespondenceModel, MatchOutput


def _constant(b, h, w, dx, dy):
    flow = torch.zeros(b, 2, h, w)
    flow[:, 0], flow[:, 1] = dx, dy
    return flow


def test_convention_cycle_displacement_of_consistent_and_inconsistent_flows():
    pts = torch.tensor([[[3.0, 2.0], [5.5, 4.25]]])
    there_and_back = cycle_displacement(_constant(1, 8, 12, 2.0, -1.0), _constant(1, 8, 12, -2.0, 1.0), pts)
    zero = torch.zeros_like(pts)
    torch.testing.assert_close(there_and_back, zero, atol=float32_tolerance(12.0, terms=10), rtol=0)
    # a backward flow that does not undo the forward one: the residual is their sum, not either alone
    off = cycle_displacement(_constant(1, 8, 12, 2.0, 0.0), _constant(1, 8, 12, -1.0, 0.5), pts)
    expected = torch.tensor([[[1.0, 0.5], [1.0, 0.5]]])
    torch.testing.assert_close(off, expected, atol=float32_tolerance(12.0, terms=10), rtol=0)


def test_convention_displacement_error_scales_each_axis_by_its_own_cells():
    # grid 4 × 8 cells on a 40 × 160 image: a cell is 20 px wide and 10 px high
    pixels, relative = displacement_error(torch.tensor([[[3.0, 4.0]]]), (4, 8), (40, 160))
    assert pixels.item() == pytest.approx(math.hypot(60.0, 40.0), rel=1e-6)
    assert relative.item() == pytest.approx(math.hypot(60.0, 40.0) / 160, rel=1e-6)  # the longer side
    assert pixels.item() != pytest.approx(5 * 20.0)  # not one cell size for both axes


def test_convention_mirror_flow_undoes_the_mirrored_pairs_flow():
    # a pair related by x -> x + f(x, y); mirrored left-right (cell x -> w - 1 - x on a grid of width w),
    # the same correspondence reads g(x', y) = -f(w - 1 - x', y) in x and f_y(w - 1 - x', y) in y
    f = torch.randn(2, 2, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.empty_like(f)
    for x in range(7):
        g[:, 0, :, x] = -f[:, 0, :, 6 - x]
        g[:, 1, :, x] = f[:, 1, :, 6 - x]
    torch.testing.assert_close(mirror_flow(g), f, rtol=0, atol=0)
    torch.testing.assert_close(mirror_flow(mirror_flow(f)), f, rtol=0, atol=0)  # an involution
    pts = torch.tensor([[[0.0, 0.0], [3.25, 2.5], [6.0, 4.0]]] * 2, dtype=torch.float64)
    torch.testing.assert_close(flip_displacement(f, g, pts), torch.zeros_like(pts), rtol=0, atol=1e-12)
    shifted = g.clone()
    shifted[:, 0] += 1.5  # the mirrored pass predicts 1.5 cells further right in its frame: left here
    expected = torch.zeros_like(pts)
    expected[..., 0] = 1.5
    torch.testing.assert_close(flip_displacement(f, shifted, pts), expected, rtol=0, atol=1e-12)


def _draws(intercept, slopes, n, seed=0):
    """Relative errors of len(slopes) independent features and labels drawn from the logistic model."""
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), (len(slopes), n)))
    p = 1 / (1 + np.exp(-(intercept + np.asarray(slopes) @ np.log(e))))
    return e, rng.random(n) < p


def test_fit_recovers_a_known_logistic_model_and_is_monotone():
    e, y = _draws(-4.0, [-1.5, -0.7], 20_000)
    cal = fit_calibration({"cycle": e[0], "flip": e[1]}, y, alpha=0.1, fitted_on="draws")
    # maximum likelihood on 20,000 draws: standard errors about 0.07 (intercept) and 0.02 (slopes)
    assert cal.features == ("cycle", "flip") and cal.intercept == pytest.approx(-4.0, abs=0.35)
    assert cal.slopes == pytest.approx((-1.5, -0.7), abs=0.1)
    assert (cal.alpha, cal.fitted_on, cal.n_matches) == (0.1, "draws", 20_000)
    grid = torch.tensor([1e-9, 1e-3, 0.01, 0.1, 1.0, 10.0], dtype=torch.float64)
    conf = cal(cycle=grid, flip=torch.full_like(grid, 0.01))
    assert (conf.diff() <= 0).all() and (conf > 0).all() and (conf < 1).all()
    assert (cal(cycle=grid[:1], flip=grid[3:4]) < cal(cycle=grid[:1], flip=grid[2:3])).all()  # both lower it
    assert conf[0] == conf[1 - 1] and conf[0] == cal(cycle=grid.new_tensor([1e-6]), flip=grid.new_tensor([0.01]))  # floor
    assert torch.isnan(cal(cycle=torch.tensor([float("nan")]), flip=torch.tensor([0.1]))).all()
    with pytest.raises(ValueError, match="missing \\['flip'\\]"):
        cal(cycle=grid)


def test_fit_leaves_out_a_feature_that_does_not_lower_the_confidence():
    e, y = _draws(-4.0, [-1.5, 0.0], 20_000)
    noise = np.exp(np.random.default_rng(1).uniform(np.log(1e-3), np.log(0.5), y.size))
    backwards = np.where(y, 0.4, 0.001) * noise / noise  # wrong matches have the smaller error
    cal = fit_calibration({"cycle": e[0], "flip": backwards}, y, alpha=0.1)
    assert cal.features == ("cycle",) and cal.slopes[0] == pytest.approx(-1.5, abs=0.1)


def test_fit_refuses_what_cannot_be_calibrated():
    e, y = _draws(-4.0, [-1.5], 200)
    with pytest.raises(CalibrationError, match="at least 2 correct and 2 wrong"):
        fit_calibration({"cycle": e[0]}, np.ones_like(y), alpha=0.1)
    with pytest.raises(CalibrationError, match="no measure ranks these matches"):
        fit_calibration({"cycle": e[0]}, e[0] > np.median(e[0]), alpha=0.1)  # larger errors more often correct
    with pytest.raises(ValueError, match="cycle measures must be finite and >= 0"):
        fit_calibration({"cycle": np.array([0.1, np.nan, 0.2, 0.3])}, np.array([1, 0, 1, 0], bool), alpha=0.1)
    with pytest.raises(ValueError, match="must map names of"):
        fit_calibration({"blur": e[0]}, y, alpha=0.1)
    with pytest.raises(ValueError, match="negative slopes"):
        ConfidenceCalibration(0.0, (0.5,), 0.1)
    with pytest.raises(ValueError, match="one slope per distinct feature"):
        ConfidenceCalibration(0.0, (-0.5,), 0.1, ("cycle", "flip"))


def test_convention_spread_is_one_on_a_peak_and_the_cell_count_on_a_flat_row():
    corr = torch.full((1, 2, 2, 3, 4, 5), 1 / 20, dtype=torch.float64)  # flat rows: 20 target cells
    corr[0, :, 0, 0] = 0.0
    corr[0, :, 0, 0, 1, 2] = 1.0  # both paths: all of the row on one cell
    corr[0, 1, 1, 2] = torch.arange(20, dtype=torch.float64).reshape(4, 5)  # one path ramps 0..19
    spread = correlation_spread(corr)
    assert spread.shape == (1, 2, 3) and spread[0, 0, 0] == 1.0
    torch.testing.assert_close(spread[0, 0, 1], torch.tensor(20.0, dtype=torch.float64))  # flat: every cell holds 1/20
    # mean of the paths' peak shares, then inverted: the flat path 1/20, the ramp's peak 19 of the mass 190 above 0
    expected = 1 / ((1 / 20 + 19 / 190) / 2)
    assert spread[0, 1, 2].item() == pytest.approx(expected, rel=1e-12)
    # a dot-product correlation (signed) reads the same after any shift of a row; a constant row is flat
    torch.testing.assert_close(correlation_spread(corr - 3.0), spread, atol=1e-12, rtol=1e-12)
    assert correlation_spread(torch.full((1, 1, 1, 1, 4, 5), -2.0)).item() == pytest.approx(20.0)


def test_convention_flatness_is_the_inverse_local_grey_deviation():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 24, 20, generator=g, dtype=torch.float64)
    image[..., :, :10] = 0.7  # the left half uniform
    flat = image_flatness(image, window=5)
    assert flat.shape == (1, 24, 20)
    grey = image.mean(1)[0]
    # 5 × 5 windows wholly in the uniform half: σ = 0 up to the rounding of E[g²] − E[g]² (about
    # sqrt(ε₆₄) · |g| with g the centred grey level), which 1 / (σ + 0.01) scales by 100
    rounding = 100 * math.sqrt(16 * np.finfo(np.float64).eps) * (grey - grey.mean()).abs().max().item()
    torch.testing.assert_close(flat[0, :, :8], torch.full((24, 8), 100.0, dtype=torch.float64), rtol=rounding, atol=0)
    window = grey[10:15, 13:18]  # centred on (row 12, column 15), all inside the image
    assert flat[0, 12, 15].item() == pytest.approx(1 / (window.std(unbiased=False).item() + 0.01), rel=1e-9)
    corner = grey[0:3, 17:20]  # clipped at the border: only the pixels inside count
    assert flat[0, 0, 19].item() == pytest.approx(1 / (corner.std(unbiased=False).item() + 0.01), rel=1e-9)
    with pytest.raises(ValueError, match="positive odd"):
        image_flatness(image, window=4)


def test_measures_sample_their_maps_where_the_points_fall():
    values = torch.arange(12.0).reshape(1, 3, 4)
    points = torch.tensor([[[0.0, 0.0], [3.0, 2.0], [1.5, 1.0], [-5.0, 1.0]]])
    # at pixel centres: the value; between them: the mean; outside: the border's
    torch.testing.assert_close(sample_map(values[:, None], points)[..., 0], torch.tensor([[0.0, 11.0, 5.5, 4.0]]))
    # a float64 map (image_flatness of a float64 image) read at float32 points stays float64
    as64 = sample_map(values[:, None].double(), points)[..., 0]
    torch.testing.assert_close(as64, torch.tensor([[0.0, 11.0, 5.5, 4.0]], dtype=torch.float64))
    flow = _constant(1, 8, 12, 1.0, 0.0)
    pts = torch.tensor([[[3.0, 2.0]]])
    assert set(match_measures(flow, -flow, pts, (32, 48))) == {"cycle"}
    spread = torch.arange(1.0, 7.0).reshape(1, 2, 3)  # a 2 × 3 token grid (16 px cells of 32 × 48)
    flatness = torch.arange(32.0 * 48).reshape(1, 32, 48)
    m = match_measures(flow, -flow, pts, (32, 48), mirrored=mirror_flow(flow), spread=spread, flatness=flatness)
    assert set(m) == {"cycle", "flip", "spread", "flatness"} and m["cycle"].item() == 0 and m["flip"].item() == 0
    # flow-grid cell (3, 2) of 12 × 8 is model pixel (13.5, 9.5) of 48 × 32 and token (0.375, 0.125) of 3 × 2
    assert m["flatness"].item() == pytest.approx(9.5 * 48 + 13.5)
    assert m["spread"].item() == pytest.approx(1 + 0.375 + 3 * 0.125)


def test_scores_on_a_hand_example_and_auc_equals_the_pairwise_count():
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.7])
    y = np.array([1, 1, 0, 1, 1, 0, 1], bool)
    s = calibration_scores(conf, y)
    assert s["selected"] == 5 and s["precision"] == pytest.approx(4 / 5) and s["recall"] == pytest.approx(4 / 5)
    pos, neg = conf[y], conf[~y]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert s["auc"] == pytest.approx(sum(pairs) / len(pairs))  # 0.7 vs 0.7 counts half
    assert math.isnan(calibration_scores(np.array([0.1, 0.2]), np.array([True, False]))["precision"])  # none selected


def test_calibration_file_round_trip_and_a_damaged_file(tmp_path):
    cal = ConfidenceCalibration(-3.0, (-1.6, -0.4), 0.1, ("cycle", "flip"), "val", 400)
    path = cal.save(tmp_path / "calibration.json")
    assert ConfidenceCalibration.load(path) == cal and not list(tmp_path.glob(".*.tmp"))
    path.write_text('{"intercept": 1.0}')
    with pytest.raises(ValueError, match="calibration.json: not a confidence calibration"):
        ConfidenceCalibration.load(path)


def test_a_one_feature_file_of_an_earlier_build_still_loads(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text('{"intercept": -2.3, "slope": -1.02, "alpha": 0.1, "fitted_on": "val", "n_matches": 4000}')
    assert ConfidenceCalibration.load(path) == ConfidenceCalibration(-2.3, (-1.02,), 0.1, ("cycle",), "val", 4000)


def test_collected_matches_are_scored_as_evaluate_scores_them():
    reader = SyntheticPairs("val", 6, config=SyntheticConfig(size=(64, 64)))
    batches = [collate([build_sample(reader.load(i), 64) for i in range(j, j + 3)]) for j in (0, 3)]
    errors, correct = collect_match_features(IdentityPredictor(), batches, alpha=0.1)
    results = evaluate(IdentityPredictor(), batches, references=("identity",), progress=False)
    expected = keypoint_correctness(results, 0.1, "model").values[results["keypoint_valid"].values.astype(bool)]
    assert set(errors) == {"cycle", "flip", "flatness"} and correct.dtype == bool  # no correlations: no spread
    assert errors["cycle"].shape == errors["flip"].shape == errors["flatness"].shape == correct.shape == expected.shape
    np.testing.assert_array_equal(correct, expected.astype(bool))
    assert 0 < correct.mean() < 1  # zero flow in every direction: no cycle error, no flip disagreement
    assert (errors["cycle"] == 0).all() and (errors["flip"] == 0).all()


@dataclasses.dataclass(frozen=True)
class _SizedOutput(MatchOutput):
    image_size: tuple[int, int] = (0, 0)  # a per-call field, not per pair (as MMNet's output has)


class _SizedModel(CorrespondenceModel):
    """Zero flow; its transfer reads the output's own image_size, as MMNet's reads its pyramid."""

    def forward(self, src, trg):
        h, w = src.shape[-2:]
        return _SizedOutput(flow=src.new_zeros(src.shape[0], 2, h // 4, w // 4), image_size=(h, w))

    def loss(self, output, batch):
        return output.flow.sum()

    def transfer(self, output, src_kps, valid=None):
        assert output.image_size == (64, 64) and output.flow.shape[0] == src_kps.shape[0]
        return super().transfer(output, src_kps, valid)


def test_collection_hands_the_models_transfer_its_own_forward_output():
    reader = SyntheticPairs("val", 2, config=SyntheticConfig(size=(64, 64)))
    batches = [collate([build_sample(reader.load(i), 64)]) for i in range(2)]  # one pair per batch
    errors, correct = collect_match_features(_SizedModel(), batches, alpha=0.1)
    expected, _ = collect_match_features(IdentityPredictor(), batches, alpha=0.1)
    assert correct.shape == errors["cycle"].shape == expected["cycle"].shape
