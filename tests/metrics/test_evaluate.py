"""The evaluator: aggregation (per image vs per keypoint, NaN pairs), splits, counts, files, table,
the predictor dimension (model beside the references) and the bootstrap differences."""

import dataclasses
import math

import numpy as np
import pytest

from actr_core.metrics import (
    IDENTITY,
    MODEL,
    evaluate,
    format_table,
    load_results,
    pck_curve,
    pck_difference,
    save_results,
)

NAN = float("nan")
ONLY_IDENTITY = (IDENTITY,)  # the crafted batches have blank images: the peer would only fall back


@pytest.fixture
def crafted(batch_factory):
    """Two batches of a shift-by-32-px matcher; see the expected values in the tests.

    Pair A (cat): 1 valid keypoint, exact. Pair B (cat): 3 valid keypoints, all 100 px off.
    Pair C (dog): no valid keypoint. Pair D (dog, second batch, n = 2): one exact, one 100 px off.
    Boxes are 200 px, so at alpha = 0.1 the radius is 20 px.
    """
    box = [[100.0, 100.0, 300.0, 300.0]]
    first = batch_factory(
        [
            [[100.0, 100.0], [NAN, NAN], [0.0, 0.0]],
            [[100.0, 100.0], [150.0, 120.0], [200.0, 250.0]],
            [[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]],
        ],
        [
            [[132.0, 100.0], [NAN, NAN], [0.0, 0.0]],
            [[232.0, 100.0], [282.0, 120.0], [332.0, 250.0]],
            [[42.0, 10.0], [52.0, 20.0], [62.0, 30.0]],
        ],
        [[True, False, False], [True, True, True], [False, False, False]],
        src_bbox=box * 3,
        trg_bbox=box * 3,
        category=["cat", "cat", "dog"],
        flags={"viewpoint_variation": [0, 1, 1], "occlusion": [0, 0, 1]},
    )
    second = batch_factory(
        [[[100.0, 100.0], [200.0, 200.0]]],
        [[[132.0, 100.0], [332.0, 200.0]]],
        src_bbox=box,
        trg_bbox=box,
        category=["dog"],
        flags={"viewpoint_variation": [0], "occlusion": [1]},
    )
    second = dataclasses.replace(second, pair_id=("p3",))
    return [first, second]


def test_per_image_and_per_keypoint_differ_and_nan_pair_is_skipped(crafted, shift_matcher):
    shift_matcher.train()
    ds = evaluate(shift_matcher, iter(crafted), alphas=(0.1,), progress=False, references=ONLY_IDENTITY)
    assert shift_matcher.training  # mode restored
    assert ds["predictor"].values.tolist() == [MODEL, IDENTITY]
    ds = ds.sel(predictor=MODEL)
    at = {"alpha": 0.1}
    assert ds["pck_image"].sel(alpha=0.1, category="cat").item() == 0.5  # (1 + 0) / 2
    assert ds["pck_keypoint"].sel(alpha=0.1, category="cat").item() == 0.25  # 1 / 4
    assert ds["pck_image"].sel(alpha=0.1, category="dog").item() == 0.5  # C skipped, D = 1/2
    assert ds["pck_image_overall"].sel(at).item() == 0.5  # (1 + 0 + 0.5) / 3, C skipped
    assert ds["pck_keypoint_overall"].sel(at).item() == pytest.approx(1 / 3)  # 2 / 6
    assert ds["pck_image_category_mean"].sel(at).item() == 0.5
    assert ds["pck_keypoint_category_mean"].sel(at).item() == 0.375  # (0.25 + 0.5) / 2
    assert ds["n_pairs"].sel(category="dog").item() == 2
    assert ds["n_pairs_scored"].sel(category="dog").item() == 1
    assert ds["n_keypoints"].values.tolist() == [4, 2]
    assert int(ds["n_pairs_total"]) == 4 and int(ds["n_pairs_scored_total"]) == 3
    assert int(ds["n_keypoints_total"]) == 6
    assert math.isnan(ds["pair_pck"].sel(alpha=0.1, pair="p2").item())
    assert ds.sizes["keypoint"] == 3  # batches of 3 and 2 keypoints, padded


def test_spair_difficulty_splits(crafted, shift_matcher):
    ds = evaluate(shift_matcher, crafted, alphas=(0.1,), progress=False, references=ONLY_IDENTITY).sel(predictor=MODEL)
    split = ds["pck_image_by_viewpoint_variation"].sel(alpha=0.1)
    assert split.sel(viewpoint_variation=0).item() == 0.75  # A = 1, D = 0.5
    assert split.sel(viewpoint_variation=1).item() == 0.0  # B = 0, C skipped
    assert ds["pck_keypoint_by_viewpoint_variation"].sel(alpha=0.1, viewpoint_variation=0).item() == pytest.approx(2 / 3)
    assert ds["n_pairs_by_occlusion"].values.tolist() == [2, 2]
    assert ds["n_keypoints_by_occlusion"].values.tolist() == [4, 2]


def test_alpha_dimension_and_attributes(crafted, shift_matcher):
    ds = evaluate(shift_matcher, crafted, alphas=(0.1, 0.5, 1.0), progress=False, model_name="shift",
                  references=ONLY_IDENTITY).sel(predictor=MODEL)  # fmt: skip
    # B's errors are 100 px = 0.5 * 200: counted at alpha 0.5 (boundary) and above
    assert ds["pck_keypoint_overall"].values.tolist() == pytest.approx([1 / 3, 1.0, 1.0])
    assert ds.attrs["protocol"] == "standard"
    assert ds.attrs["threshold_type"] == "bbox"
    assert ds.attrs["threshold_image"] == "target"
    assert ds.attrs["coordinate_frame"] == "original image pixels"
    assert ds.attrs["model"] == "shift"
    assert ds["threshold"].values.tolist() == [200.0] * 4


def test_released_protocol_through_the_evaluator(batch_factory, shift_matcher):
    # source box 100, target box 200, error 15: standard counts it at alpha 0.1, released does not
    batch = batch_factory(
        [[[100.0, 200.0]]], [[[141.0, 212.0]]], src_bbox=[[50.0, 150.0, 150.0, 220.0]], trg_bbox=[[40.0, 100.0, 240.0, 250.0]]
    )
    std = evaluate(shift_matcher, [batch], alphas=(0.1,), progress=False, references=ONLY_IDENTITY).sel(predictor=MODEL)
    rel = evaluate(shift_matcher, [batch], protocol="released", alphas=(0.1,), progress=False,
                   references=ONLY_IDENTITY).sel(predictor=MODEL)  # fmt: skip
    assert std["pck_image_overall"].item() == 1.0 and rel["pck_image_overall"].item() == 0.0
    assert rel.attrs["threshold_image"] == "source" and "512x512" in rel.attrs["coordinate_frame"]


def test_netcdf_round_trip_and_table(crafted, shift_matcher, tmp_path):
    ds = evaluate(shift_matcher, crafted, alphas=(0.05, 0.1), progress=False, references=ONLY_IDENTITY)
    path = save_results(ds, tmp_path / "out" / "results.nc")
    assert path.stat().st_size > 0
    back = load_results(path)
    for name in ("pck_image", "pck_keypoint", "pair_pck", "distance", "pred_kps", "keypoint_valid", "gt_kps",
                 "fallback", "n_fallbacks", "pck_image_difference", "pck_keypoint_difference"):  # fmt: skip
        np.testing.assert_array_equal(back[name].values, ds[name].values)
        assert back[name].dims == ds[name].dims
    assert back["pred_kps"].dims == ("predictor", "pair", "keypoint", "coord")
    assert back["gt_kps"].dims == ("pair", "keypoint", "coord")  # ground truth is shared by the predictors
    assert back["threshold"].dims == ("pair",) and back["pair_category"].dims == ("pair",)
    assert back["predictor"].values.tolist() == [MODEL, IDENTITY]
    assert back["category"].values.tolist() == ["cat", "dog"]
    assert back.attrs["protocol"] == "standard"
    assert back.attrs["reference_classical_peer"] == "not run"
    table = format_table(back)
    assert "cat" in table and "50.0" in table and "original image pixels" in table
    assert "viewpoint=0" in table and "1 pair(s) without a valid keypoint skipped" in table
    assert "33.3" in format_table(back, average="keypoint")


def test_pck_curve_matches_stored_values(crafted, shift_matcher):
    ds = evaluate(shift_matcher, crafted, alphas=(0.05, 0.1, 0.5), progress=False, references=ONLY_IDENTITY)
    for average in ("image", "keypoint"):
        curve = pck_curve(ds, ds["alpha"].values, average=average)
        assert curve.dims == ("predictor", "alpha")
        np.testing.assert_allclose(curve.values, ds[f"pck_{average}_overall"].values)
        one = pck_curve(ds, ds["alpha"].values, average=average, predictor=IDENTITY)
        np.testing.assert_allclose(one.values, ds[f"pck_{average}_overall"].sel(predictor=IDENTITY).values)
    dense = pck_curve(ds, np.linspace(0.01, 1.0, 12))
    assert np.all(np.diff(dense.values, axis=-1) >= 0)


def test_h_ne_w_inputs_and_batch(batch_factory, shift_matcher):
    batch = batch_factory(
        [[[10.0, 20.0]], [[30.0, 40.0]]],
        [[[42.0, 20.0]], [[62.0, 40.0]]],
        src_size=[(256, 512)],
        trg_size=[(256, 512)],
        input_size=(32, 64),
    )
    # one cell = 4 px in the 64-wide input = 32 px in the 512-wide original
    ds = evaluate(shift_matcher, [batch], alphas=(0.01,), progress=False, references=ONLY_IDENTITY).sel(predictor=MODEL)
    assert ds["pck_image_overall"].item() == 1.0
    assert np.nanmax(ds["distance"].values) < 1e-4


def test_errors(shift_matcher, batch_factory, no_typecheck):
    with pytest.raises(ValueError, match="no batches"):
        evaluate(shift_matcher, [], progress=False)
    with pytest.raises(ValueError, match="alphas"):
        evaluate(shift_matcher, [], alphas=(0.0,), progress=False)
    batch = batch_factory([[[1.0, 1.0]]], [[[1.0, 1.0]]])
    with pytest.raises(TypeError, match="a batch must be a PairBatch .actr_core.data., got dict"):
        evaluate(shift_matcher, [{"src_image": batch.src_image}], progress=False)


def test_identity_beside_the_model_on_the_same_pairs(crafted, shift_matcher):
    """Identity predicts each source keypoint where it is: A is 32 px off, B 132 px, D 32 and 132 px.

    At alpha 0.5 (radius 100 px): A 1/1, B 0/3, C unscored, D 1/2 → per image (1 + 0 + 0.5) / 3, per
    keypoint 2 / 6; at alpha 0.1 (20 px) nothing is correct.
    """
    ds = evaluate(shift_matcher, crafted, alphas=(0.1, 0.5), progress=False, references=ONLY_IDENTITY)
    identity = ds.sel(predictor=IDENTITY)
    assert identity["pck_image_overall"].values.tolist() == [0.0, 0.5]
    assert identity["pck_keypoint_overall"].values.tolist() == pytest.approx([0.0, 1 / 3])
    assert identity["pair_pck"].sel(alpha=0.5).values.tolist()[:2] == [1.0, 0.0]
    np.testing.assert_allclose(identity["distance"].sel(pair="p1").values, [132.0] * 3, rtol=0, atol=1e-3)
    assert int(identity["n_fallbacks"]) == 0 and not identity["fallback"].values.any()
    # the model's numbers are those of the model-only tests above, untouched by the reference
    assert ds["pck_image_overall"].sel(predictor=MODEL, alpha=0.1).item() == 0.5


def test_model_minus_identity_with_its_bootstrap_interval(crafted, shift_matcher):
    ds = evaluate(shift_matcher, crafted, alphas=(0.1, 0.5), progress=False, references=ONLY_IDENTITY)
    stored = ds["pck_image_difference"].sel(comparison="model - identity")
    assert stored.dims == ("alpha", "bound") and stored["bound"].values.tolist() == ["mean", "low", "high"]
    # per pair at alpha 0.1: model (1, 0, 0.5), identity (0, 0, 0): mean 0.5
    mean, low, high = pck_difference(ds, MODEL, IDENTITY, 0.1)
    assert mean == pytest.approx(0.5) and low <= mean <= high and low >= 0.0 and high <= 1.0
    assert [mean, low, high] == pytest.approx(stored.sel(alpha=0.1).values.tolist())
    assert pck_difference(ds, MODEL, IDENTITY, 0.1) == pck_difference(ds, MODEL, IDENTITY, 0.1)  # seeded
    # at alpha 0.5 (100 px) the model gets every keypoint: (1, 1, 1) against (1, 0, 0.5)
    assert pck_difference(ds, MODEL, IDENTITY, 0.5).mean == pytest.approx(0.5)
    # an alpha that was not scored is recomputed from the stored keypoints: at 0.3 (60 px) both get
    # (1, 0, 0.5), every pair's difference is 0 and the interval has zero width
    assert tuple(pck_difference(ds, MODEL, IDENTITY, 0.3)) == (0.0, 0.0, 0.0)
    keypoint = pck_difference(ds, MODEL, IDENTITY, 0.1, average="keypoint")
    assert keypoint.mean == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="classical_peer"):
        pck_difference(ds, MODEL, "classical_peer", 0.1)


def test_table_lists_every_predictor_and_says_when_the_peer_was_not_run(crafted, shift_matcher):
    ds = evaluate(shift_matcher, crafted, alphas=(0.1,), progress=False, references=ONLY_IDENTITY)
    table = format_table(ds)
    rows = [line.split() for line in table.splitlines()]
    assert ["cat", "model", "2", "4", "50.0"] in rows and ["identity", "0.0"] in rows
    assert "classical peer: not run" in table
    assert "model − identity" in table and "+50.0 [" in table
    assert any(line.startswith("model − classical peer") and line.endswith("not run") for line in table.splitlines())


def test_table_with_the_peer_counts_its_fallbacks(crafted, shift_matcher):
    """Blank images have no corner: the peer falls back to identity on every pair, and says so."""
    ds = evaluate(shift_matcher, crafted, alphas=(0.5,), progress=False)
    assert ds["predictor"].values.tolist() == [MODEL, IDENTITY, "classical_peer"]
    assert int(ds["n_fallbacks"].sel(predictor="classical_peer")) == 4
    assert set(ds["fallback_reason"].sel(predictor="classical_peer").values.tolist()) == {"too_few_matches"}
    np.testing.assert_array_equal(ds["pair_pck"].sel(predictor="classical_peer"), ds["pair_pck"].sel(predictor=IDENTITY))
    table = format_table(ds)
    assert "classical peer: ORB + RANSAC homography" in table
    assert "fell back to identity on 4 of 4 pairs (too few matches 4)" in table
    assert "not run" not in table
    assert "ORB" in ds.attrs["reference_classical_peer"] and "seed=0" in ds.attrs["reference_classical_peer"]


def test_results_without_the_predictor_dimension_still_read(crafted, shift_matcher):
    ds = evaluate(shift_matcher, crafted, alphas=(0.1,), progress=False, references=ONLY_IDENTITY)
    old = ds.sel(predictor=MODEL, drop=True).drop_vars(["pck_image_difference", "pck_keypoint_difference"])
    assert "50.0" in format_table(old) and "identity: not run" in format_table(old)
    assert pck_curve(old, [0.1]).dims == ("predictor", "alpha")


def test_reference_errors(crafted, shift_matcher):
    with pytest.raises(ValueError, match="unknown reference"):
        evaluate(shift_matcher, crafted, progress=False, references=("identity", "sift"))
    with pytest.raises(ValueError, match="names the evaluated model"):
        evaluate(shift_matcher, crafted, progress=False, references={"model": shift_matcher})
    with pytest.raises(ValueError, match="string"):
        evaluate(shift_matcher, crafted, progress=False, references="identity")
