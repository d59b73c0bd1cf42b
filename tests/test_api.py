"""The one-call Matcher on user images, with a stand-in model of known flow."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import float32_tolerance
from torch import nn

from actr_core.api import ImageError, Matcher, load_image
from actr_core.blocks import cpu_bf16_refusal


@dataclasses.dataclass(frozen=True)
class _Out:
    flow: torch.Tensor


class ShiftModel(nn.Module):
    """Flow of +dx grid cells from the darker to the brighter image, −dx the other way."""

    def __init__(self, dx: float):
        super().__init__()
        self.dx = dx
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, src, trg):
        b, _, h, w = src.shape
        sign = torch.sign(trg.mean((1, 2, 3)) - src.mean((1, 2, 3))).view(b, 1, 1)
        flow = torch.zeros(b, 2, h // 4, w // 4)
        flow[:, 0] = self.dx * sign
        return _Out(flow)


def _img(h, w, value):
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_keypoints_come_back_in_original_target_pixels():
    m = Matcher(ShiftModel(0.0), (64, 64))
    kps = torch.tensor([[30.0, 20.0], [0.0, 0.0]])
    res = m(_img(40, 60, 50), _img(80, 120, 200), kps)
    # zero flow: pure pixel-centre rescaling from 60×40 to 120×80
    expected = (kps + 0.5) * torch.tensor([2.0, 2.0]) - 0.5
    # four pixel-centre rescalings (3 roundings each) and a transfer (9)
    torch.testing.assert_close(res.keypoints, expected, atol=float32_tolerance(expected, terms=21), rtol=0)
    assert res.flow.shape == (2, 40, 60)
    ones = torch.ones(2)
    torch.testing.assert_close(res.confidence, ones, atol=float32_tolerance(ones, terms=2), rtol=0)  # exp(−0²)


def test_shift_and_cycle_confidence():
    m = Matcher(ShiftModel(2.0), (64, 64))
    res = m(_img(32, 32, 10), _img(32, 32, 250), torch.tensor([[10.0, 10.0]]))
    # 2 cells of a 16-cell grid on a 32-px image = 4 px
    expected = torch.tensor([[14.0, 10.0]])
    torch.testing.assert_close(res.keypoints, expected, atol=float32_tolerance(expected, terms=21), rtol=0)  # as above
    # there and back through ±2 cells: two transfers (9 each), the rescalings to the grid (3), positions up to
    # 16 cells, then 2 px per cell
    assert res.cycle_error.item() == pytest.approx(0.0, abs=2 * float32_tolerance(16.0, terms=21))
    assert res.confidence_map.shape == (32, 32)
    four = torch.full((22, 22), 4.0)
    # 4 bilinear weights and the scaling
    torch.testing.assert_close(res.flow[0, 5:-5, 5:-5], four, atol=float32_tolerance(four, terms=5), rtol=0)


def test_batched_lists():
    m = Matcher(ShiftModel(1.0), (64, 64))
    out = m([_img(32, 48, 0)] * 3, [_img(16, 16, 255)] * 3, [[[1.0, 1.0]]] * 3)
    assert len(out) == 3 and all(r.keypoints.shape == (1, 2) for r in out)


def test_exif_orientation_and_modes(tmp_path):
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :10] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    loaded = load_image(tmp_path / "rot.jpg")
    assert loaded.shape == (3, 20, 10)  # displayed upright: taller than wide
    for mode in ("L", "RGBA", "CMYK", "P"):
        im = Image.fromarray(arr).convert(mode)
        assert load_image(im).shape == (3, 10, 20)


def test_bad_inputs(tmp_path):
    m = Matcher(ShiftModel(0.0), (64, 64))
    with pytest.raises(ImageError, match="no such image file"):
        m(tmp_path / "missing.jpg", _img(8, 8, 0))
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match="bad.jpg: cannot read image"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match="outside the 8×8 source image"):
        m(_img(8, 8, 0), _img(8, 8, 9), torch.tensor([[9.0, 1.0]]))
    with pytest.raises(ImageError, match=r"\(3, h, w\)"):
        load_image(torch.zeros(2, 5, 5))


class WarpModel(nn.Module):
    """A fixed random grid flow forward and another backward (told apart by the brighter image)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.forward_flow = nn.Parameter(torch.randn(2, 8, 12, generator=g))
        self.backward_flow = nn.Parameter(torch.randn(2, 8, 12, generator=g))

    def forward(self, src, trg):
        brighter = (trg.mean((1, 2, 3)) > src.mean((1, 2, 3))).view(-1, 1, 1, 1)
        return _Out(torch.where(brighter, self.forward_flow, self.backward_flow).expand(src.shape[0], -1, -1, -1))


def test_dense_outputs_are_lazy_and_equal_the_sparse_transfer_at_every_pixel():
    from actr_core.flow import coords_grid

    m = Matcher(WarpModel(), (32, 48))
    res = m(_img(21, 30, 10), _img(40, 50, 250), torch.tensor([[4.0, 7.0]]))
    assert "flow" not in res.__dict__ and "confidence_map" not in res.__dict__  # nothing full-size yet
    assert res.flow_grid.shape == (2, 8, 12) and res.confidence_grid.shape == (8, 12)
    pixels = coords_grid(21, 30).flatten(1).T
    sparse = m(_img(21, 30, 10), _img(40, 50, 250), pixels).keypoints
    dense = res.flow.flatten(1).T + pixels  # computed on access, then kept
    # both: two pixel-centre rescalings (3 roundings each), one bilinear sample (9), positions up to 50 px
    torch.testing.assert_close(dense, sparse, atol=float32_tolerance(50.0, terms=30), rtol=0)
    assert "flow" in res.__dict__ and res.confidence_map.shape == (21, 30)


def test_cycle_error_in_pixels_and_relative_to_the_longer_side():
    m = Matcher(WarpModel(), (32, 48))
    res = m(_img(21, 30, 10), _img(40, 50, 250), torch.tensor([[4.0, 7.0], [20.0, 3.0]]))
    torch.testing.assert_close(res.cycle_error_relative, res.cycle_error / 30, rtol=1e-6, atol=0)
    assert (res.cycle_error > 0).all() and not res.calibrated and res.calibration_alpha is None


def test_a_calibration_makes_the_confidence_a_probability_of_its_relative_error():
    from actr_core.calibration import ConfidenceCalibration

    cal = ConfidenceCalibration(-3.0, (-1.6,), 0.1, ("cycle",), "test", 100)
    m = Matcher(WarpModel(), (32, 48), calibration=cal)
    res = m(_img(21, 30, 10), _img(40, 50, 250), torch.tensor([[4.0, 7.0], [20.0, 3.0]]))
    assert res.calibrated and res.calibration_alpha == 0.1
    torch.testing.assert_close(res.confidence, cal(cycle=res.cycle_error_relative), rtol=1e-6, atol=0)
    uncalibrated = Matcher(WarpModel(), (32, 48))(_img(21, 30, 10), _img(40, 50, 250), torch.tensor([[4.0, 7.0]]))
    assert uncalibrated.confidence.item() != pytest.approx(res.confidence[0].item(), rel=1e-3)


def test_a_calibration_reading_the_flip_error_matches_the_mirrored_pair_too():
    from actr_core.calibration import ConfidenceCalibration, displacement_error, flip_displacement
    from actr_core.flow import rescale_keypoints
    from actr_core.imaging import normalise_image

    cal = ConfidenceCalibration(-3.0, (-1.2, -0.8), 0.1, ("cycle", "flip"))
    model = WarpModel()
    src, trg, kps = _img(21, 30, 10), _img(40, 50, 250), torch.tensor([[4.0, 7.0], [20.0, 3.0]])
    res = Matcher(model, (32, 48), calibration=cal)(src, trg, kps)
    # the flip error by hand: the model on the mirrored pair, its flow mapped back, both sampled at the points
    s, t = (normalise_image(load_image(im, (32, 48))[None]) for im in (src, trg))
    with torch.no_grad():
        forward, mirrored = model(s, t).flow, model(s.flip(-1), t.flip(-1)).flow
    on_grid = rescale_keypoints(kps[None], (21, 30), (8, 12))
    flip = displacement_error(flip_displacement(forward, mirrored, on_grid), (8, 12), (21, 30))[1][0]
    assert (flip > 0).all()  # this model is not mirror-symmetric
    torch.testing.assert_close(res.confidence, cal(cycle=res.cycle_error_relative, flip=flip), rtol=1e-5, atol=1e-7)


@dataclasses.dataclass(frozen=True)
class _CorrOut:
    flow: torch.Tensor
    correlations: torch.Tensor


class CorrelatedWarpModel(WarpModel):
    """WarpModel with a fixed random attention-like correlation ``(b, 1, 4, 6, 4, 6)`` (16 × 24 px
    cells of a 32 × 48 input)."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.corr = nn.Parameter(torch.rand(1, 1, 4, 6, 4, 6, generator=g) ** 8)

    def forward(self, src, trg):
        return _CorrOut(super().forward(src, trg).flow, self.corr.expand(src.shape[0], -1, -1, -1, -1, -1))


def test_a_calibration_reading_every_measure_takes_each_from_its_own_map():
    from actr_core.calibration import ConfidenceCalibration, correlation_spread, image_flatness, match_measures
    from actr_core.flow import rescale_keypoints
    from actr_core.imaging import normalise_image

    cal = ConfidenceCalibration(-1.0, (-1.2, -0.8, -0.6, -0.2), 0.1, ("cycle", "flip", "spread", "flatness"))
    model = CorrelatedWarpModel()
    rng = np.random.default_rng(0)
    src, trg = rng.integers(0, 120, (21, 30, 3), dtype=np.uint8), _img(40, 50, 250)  # a textured, darker source
    kps = torch.tensor([[4.0, 7.0], [20.0, 3.0], [29.0, 20.0]])
    res = Matcher(model, (32, 48), calibration=cal)(src, trg, kps)
    # by hand: the three flows, the correlation's spread on its token grid and the source's flatness at model input size
    s, t = (normalise_image(load_image(im, (32, 48))[None]) for im in (src, trg))
    with torch.no_grad():
        out = model(s, t)
        back, mirrored = model(t, s).flow, model(s.flip(-1), t.flip(-1)).flow
    on_grid = rescale_keypoints(kps[None], (21, 30), (8, 12))
    measures = match_measures(
        out.flow, back, on_grid, (21, 30), mirrored=mirrored, spread=correlation_spread(out.correlations),
        flatness=image_flatness(s),
    )  # fmt: skip
    assert measures["spread"].min() > 1 and len(set(measures["flatness"][0].tolist())) == 3  # they vary
    torch.testing.assert_close(res.confidence, cal(**measures)[0], rtol=1e-5, atol=1e-7)
    cycle_only = Matcher(model, (32, 48), calibration=ConfidenceCalibration(-1.0, (-1.2,), 0.1, ("cycle",)))
    assert not torch.allclose(cycle_only(src, trg, kps).confidence, res.confidence)  # the other measures count


def test_a_calibration_reading_the_spread_refuses_a_model_without_correlations():
    from actr_core.calibration import ConfidenceCalibration

    cal = ConfidenceCalibration(-1.0, (-1.2, -0.6), 0.1, ("cycle", "spread"))
    with pytest.raises(ValueError, match="reads the correlation's spread, but the model returns no correlations"):
        Matcher(WarpModel(), (32, 48), calibration=cal)(_img(21, 30, 10), _img(40, 50, 250))


def test_from_checkpoint_picks_up_the_calibration_beside_it(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "training"))
    from training_toys import TOY_NAME, ToyMatcher

    from actr_core.calibration import ConfidenceCalibration
    from actr_core.training import save_checkpoint

    path = save_checkpoint(tmp_path / "model_best.pt", model=ToyMatcher(), builder=TOY_NAME, config={"image_size": 32})
    assert Matcher.from_checkpoint(path).calibration is None and Matcher.from_checkpoint(path).input_size == (32, 32)
    ConfidenceCalibration(-3.0, (-1.6,), 0.1, ("cycle",), "val", 10).save(tmp_path / "calibration.json")
    m = Matcher.from_checkpoint(path, input_size=(48, 64))
    assert m.calibration == ConfidenceCalibration(-3.0, (-1.6,), 0.1, ("cycle",), "val", 10) and m.input_size == (48, 64)
    assert Matcher.from_checkpoint(path, calibration=None).calibration is None


def test_a_large_jpeg_is_reduced_before_decoding_and_keypoints_stay_in_its_pixels(tmp_path):
    from actr_core.api import image_size

    ys, xs = np.mgrid[0:1200, 0:1600] / 1600
    smooth = np.stack([xs, ys, 0.5 + 0.4 * np.sin(6 * xs) * np.cos(4 * ys)], -1)
    big = (255 * smooth / smooth.max()).astype(np.uint8)  # 1200 × 1600
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    assert image_size(tmp_path / "big.jpg") == (1200, 1600)
    small = load_image(tmp_path / "big.jpg", (60, 80))
    full = torch.nn.functional.interpolate(load_image(tmp_path / "big.jpg")[None], size=(60, 80), mode="area")[0]
    assert small.shape == (3, 60, 80) and (small - full).abs().mean() < 0.02  # filters differ a little
    res = Matcher(ShiftModel(0.0), (64, 64))(tmp_path / "big.jpg", tmp_path / "big.jpg", torch.tensor([[1599.0, 1199.0]]))
    assert res.src_size == (1200, 1600) and res.keypoints[0, 0] > 1590  # original pixels, not the model's


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, d: m(_img(8, 8, 0), _img(8, 8, 9), torch.tensor([[1.0, float("nan")]])), r"NaN or infinite, e.g. row 0"),
        (lambda m, d: m(_img(8, 8, 0), _img(8, 8, 9), [[1.0, 2.0], [float("inf"), 1.0]]), r"row 1 = \[inf, 1.0\]"),
        (lambda m, d: m(torch.full((3, 8, 8), float("nan")), _img(8, 8, 9)), "192 NaN or infinite value"),
        (lambda m, d: m(torch.full((3, 8, 8), 200.0), _img(8, 8, 9)), r"\[0, 1\], found \[200, 200\]; divide 0–255"),
        (lambda m, d: m(torch.full((3, 8, 8), -0.5), _img(8, 8, 9)), r"found \[-0.5, -0.5\]$"),
        (lambda m, d: m(np.zeros((0, 5, 3), np.uint8), _img(8, 8, 9)), r"the image is empty \(5×0 pixels\)"),
        (lambda m, d: m(_img(1, 1, 0), _img(8, 8, 9), [[0.0, 0.0]]), r"1×1 pixels, too small to match"),
        (lambda m, d: m(d, _img(8, 8, 9)), "is a folder, not an image file"),
        (lambda m, d: Matcher(ShiftModel(0.0), (0, 64)), r"input_size must be two positive integers .*\(0, 64\)"),
        (lambda m, d: Matcher(ShiftModel(0.0), (64, 64), sigma=0.0), "sigma must be a positive number .* got 0.0"),
        (lambda m, d: Matcher(ShiftModel(0.0), (64, 64), precision="fp16"), "fp16 matching is not supported on cpu"),
        (lambda m, d: Matcher(ShiftModel(0.0), (64, 64), precision="int8"), "precision must be one of"),
    ],
)
def test_input_guards_name_the_value(call, message, tmp_path, no_typecheck):
    with pytest.raises(ValueError, match=message):
        call(Matcher(ShiftModel(0.0), (64, 64)), tmp_path)


def test_bf16_on_cpu_matches_like_fp32():
    if cpu_bf16_refusal():  # an AMX CPU under ATEN_CPU_CAPABILITY=default: refused up front, not inside the model
        with pytest.raises(ValueError, match="bf16 matching is not supported on this CPU: PyTorch refuses bf16 attention"):
            Matcher(ShiftModel(2.0), (64, 64), precision="bf16")
        return
    kps = torch.tensor([[10.0, 10.0]])
    half = Matcher(ShiftModel(2.0), (64, 64), precision="bf16")(_img(32, 32, 10), _img(32, 32, 250), kps)
    full = Matcher(ShiftModel(2.0), (64, 64))(_img(32, 32, 10), _img(32, 32, 250), kps)
    torch.testing.assert_close(half.keypoints, full.keypoints, atol=0.1, rtol=0)  # bf16: 8 bits of mantissa
    assert half.keypoints.dtype == torch.float32
