"""Figures: the flow colour code (known values), the TPS warp (known maps), PNGs written and non-empty."""

import numpy as np
import pytest
import torch
import xarray as xr
from matplotlib.image import imread
from tolerances import float32_tolerance

from actr_core.imaging import normalise_image
from actr_core.metrics import STANDARD, summarise
from actr_core.metrics.evaluate import BatchScores
from actr_core.viz import (
    colour_wheel,
    flow_legend,
    flow_to_colour,
    plot_learning_curve,
    plot_matches,
    plot_path_flows,
    plot_pck_curves,
    plot_tps_warps,
    to_display_image,
    tps_warp,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_bytes=2000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels[..., :3].std() > 0.01  # not a blank page
    return pixels


def _picture(h, w, seed=0):
    """A smooth, structured test picture (h, w, 3) in [0, 1]."""
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 3)
    return np.stack([0.5 + 0.5 * np.sin(7 * xs + 3 * ys + p) for p in phase], axis=-1)


def test_colour_wheel_has_55_anchors_starting_red():
    wheel = colour_wheel()
    assert wheel.shape == (55, 3)
    assert wheel[0].tolist() == [1.0, 0.0, 0.0]


def test_flow_to_colour_known_values():
    flow = np.zeros((2, 2, 3))
    flow[0, 0, 0] = 4.0  # +x at full magnitude -> red
    flow[0, 0, 1] = -4.0  # -x -> cyan/blue anchor 27: (0, 255 - floor(255 * 2 / 11), 255)
    flow[0, 0, 2] = 2.0  # +x at half magnitude -> pale red
    flow[0, 1, 0] = 8.0  # beyond the maximum -> dimmed red
    valid = np.ones((2, 3), dtype=bool)
    valid[1, 2] = False
    out = flow_to_colour(flow, max_magnitude=4.0, valid=valid)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [0, 209, 255]
    assert out[0, 2].tolist() == [255, 128, 128]
    assert out[1, 0].tolist() == [191, 0, 0]
    assert out[1, 1].tolist() == [255, 255, 255]  # zero flow is white
    assert out[1, 2].tolist() == [0, 0, 0]  # invalid is black


def test_flow_to_colour_accepts_tensors_h_ne_w_and_rejects_bad_shapes(no_typecheck):
    out = flow_to_colour(torch.randn(2, 5, 7))
    assert out.shape == (5, 7, 3)
    with pytest.raises(ValueError, match="flow must have shape"):
        flow_to_colour(np.zeros((3, 4, 4)))


def test_flow_legend_is_a_white_cornered_disc():
    legend = flow_legend(32)
    assert legend.shape == (32, 32, 3) and legend[0, 0].tolist() == [255, 255, 255]


def test_to_display_image_inverts_normalisation():
    picture = _picture(6, 10)
    tensor = normalise_image(torch.from_numpy(picture).permute(2, 0, 1).float())
    # float32 pixels normalised and back (4 roundings, at the scale 1/std of the normalised values)
    np.testing.assert_allclose(to_display_image(tensor), picture, atol=float32_tolerance(1 / 0.225, terms=5), rtol=0)
    assert to_display_image((picture * 255).astype(np.uint8)).max() <= 1.0


def test_tps_warp_reproduces_a_translation():
    picture = _picture(40, 60)
    src = np.array([[10.0, 10.0], [50.0, 12.0], [30.0, 35.0], [15.0, 30.0]])
    warped, inside = tps_warp(picture, src, src + np.array([5.0, 3.0]), (40, 60))
    # target pixel (x, y) shows source pixel (x - 5, y - 3)
    np.testing.assert_allclose(warped[3:, 5:], picture[:-3, :-5], atol=1e-3)
    assert not inside[0, 0] and inside[20, 30]


def test_tps_warp_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        tps_warp(_picture(8, 8), np.zeros((4, 2)), np.zeros((4, 2)), (8, 8), np.array([True, True, False, False]))


def _results(shift: float, name: str) -> xr.Dataset:
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 100, (6, 5, 2))
    pred = gt + shift * rng.standard_normal((6, 5, 2))
    scores = BatchScores(
        pred=pred,
        gt=gt,
        valid=np.ones((6, 5), dtype=bool),
        distance=np.hypot(*(pred - gt).transpose(2, 0, 1)),
        threshold=np.full(6, 100.0),
        threshold_kind=["bbox"] * 6,
        n_correct=np.zeros((1, 6), dtype=np.int64),
        meta={"pair_id": [f"{name}{i}" for i in range(6)], "category": ["a", "b"] * 3, "dataset": ["spair"] * 6},
    )
    return summarise([scores], STANDARD, (0.1,), model_name=name)


def test_plot_pck_curves(tmp_path):
    path = plot_pck_curves(
        {"good": _results(3.0, "g"), "poor": _results(12.0, "p")}, tmp_path / "curves.png", alphas=np.linspace(0.01, 0.3, 15)
    )
    _check_png(path)
    with pytest.raises(ValueError, match="empty"):
        plot_pck_curves({}, tmp_path / "none.png")


def _with_references(shift: float) -> xr.Dataset:
    """Results of a model, identity (shift 40) and the peer (shift 1) on the same six pairs."""
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 100, (6, 5, 2))
    noise = rng.standard_normal((6, 5, 2))

    def scores(s: float) -> BatchScores:
        pred = gt + s * noise
        return BatchScores(
            pred=pred,
            gt=gt,
            valid=np.ones((6, 5), dtype=bool),
            distance=np.hypot(*(pred - gt).transpose(2, 0, 1)),
            threshold=np.full(6, 100.0),
            threshold_kind=["bbox"] * 6,
            n_correct=np.zeros((1, 6), dtype=np.int64),
            meta={"pair_id": [f"p{i}" for i in range(6)], "category": ["a", "b"] * 3, "dataset": ["spair"] * 6},
        )

    by = {"model": [scores(shift)], "identity": [scores(40.0)], "classical_peer": [scores(1.0)]}
    return summarise(by, STANDARD, (0.1,), bootstrap_resamples=50)


def test_plot_pck_curves_draws_the_references_once_and_labelled(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    labels = []
    original = Axes.plot

    def spy(self, *args, **kwargs):
        labels.append((kwargs.get("label"), kwargs.get("linestyle")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    path = plot_pck_curves({"trained": _with_references(3.0), "untrained": _with_references(30.0)},
                           tmp_path / "refs.png", alphas=np.linspace(0.01, 0.3, 10))  # fmt: skip
    _check_png(path)
    assert labels == [
        ("trained", None),
        ("untrained", None),
        ("identity (zero motion)", "--"),
        ("classical peer (ORB + RANSAC homography)", ":"),
    ]


def test_plot_learning_curve_draws_the_references_as_horizontal_lines(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    lines = []
    original = Axes.axhline

    def spy(self, y=0, *args, **kwargs):
        lines.append((round(y, 6), kwargs.get("label"), kwargs.get("linestyle")))
        return original(self, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "axhline", spy)
    nan = float("nan")
    history = [
        {"epoch": 0, "train_loss": nan, "val_pck": 0.05, "identity_val_pck": 0.25, "peer_val_pck": 0.8},
        {"epoch": 1, "train_loss": 6.0, "val_pck": 0.3, "identity_val_pck": 0.25, "peer_val_pck": 0.8},
        {"epoch": 2, "train_loss": 4.0, "val_pck": 0.5, "identity_val_pck": 0.25, "peer_val_pck": 0.8},
    ]
    _check_png(plot_learning_curve(history, tmp_path / "curve.png"))
    assert lines == [
        (25.0, "identity (zero motion): 25.0 %", "--"),
        (80.0, "classical peer (ORB + RANSAC homography): 80.0 %", ":"),
    ]
    lines.clear()
    without_peer = [{**row, "peer_val_pck": nan} for row in history]
    plot_learning_curve(without_peer, tmp_path / "curve2.png")
    assert [label for _, label, _ in lines] == ["identity (zero motion): 25.0 %"]


def test_plot_learning_curve_rejects_rows_without_the_curve(tmp_path):
    with pytest.raises(ValueError, match="val_pck"):
        plot_learning_curve([{"epoch": 0, "train_loss": 1.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plot_learning_curve([], tmp_path / "x.png")


def test_plot_matches_and_tps_warps(tmp_path):
    src_img, trg_img = _picture(48, 64, 1), _picture(40, 56, 2)  # H != W, different sizes
    src = np.array([[10.0, 10.0], [50.0, 12.0], [30.0, 35.0], [15.0, 30.0], [0.0, 0.0]])
    gt = src * 0.8 + 2.0
    pred = gt + np.array([[1.0, 0.0], [9.0, 4.0], [0.0, 1.0], [-1.0, 0.0], [np.nan, np.nan]])
    valid = np.array([True, True, True, True, False])
    correct = np.array([True, False, True, True, False])
    _check_png(plot_matches(src_img, trg_img, src, pred, gt, correct, tmp_path / "m.png", valid=valid))
    tensor_src = normalise_image(torch.from_numpy(src_img).permute(2, 0, 1).float())
    _check_png(plot_tps_warps(tensor_src, trg_img, src, pred, gt, tmp_path / "w.png", valid=valid))


def test_plot_path_flows(tmp_path):
    flows = torch.randn(3, 2, 6, 10)
    gt = torch.randn(2, 6, 10)
    valid = torch.rand(6, 10) > 0.5
    _check_png(plot_path_flows(flows, flows.mean(0), tmp_path / "f.png", gt=gt, valid_gt=valid), min_bytes=1000)
    _check_png(plot_path_flows(None, flows[0], tmp_path / "g.png"), min_bytes=1000)
