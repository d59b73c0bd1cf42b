"""The one-call Matcher on user images, with a stand-in model of known flow."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import float32_tolerance
from torch import nn

from actr_core.api import ImageError, Matcher, load_image


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
