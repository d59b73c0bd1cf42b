import pytest
import torch
from tolerances import float32_tolerance

from actr_core.imaging import IMAGENET_MEAN, IMAGENET_STD, denormalise_image, normalise_image


def test_convention_images_are_imagenet_normalised():
    """A uint8 pixel equal to 255·mean becomes 0; white (255) becomes (1 − mean)/std, not 1."""
    img = torch.tensor(IMAGENET_MEAN).mul(255).round().to(torch.uint8).view(3, 1, 1).expand(3, 2, 5)
    out = normalise_image(img.unsqueeze(0))
    assert out.shape == (1, 3, 2, 5)
    assert out.abs().max() < 0.01
    white = normalise_image(torch.full((3, 1, 1), 255, dtype=torch.uint8))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    # 255/255, − mean, / std here; − mean, / std there
    torch.testing.assert_close(white.flatten(), expected, atol=float32_tolerance(expected, terms=5), rtol=0)
    assert not torch.allclose(white.flatten(), torch.ones(3))


def test_round_trip():
    img = torch.rand(2, 3, 4, 6)
    # − mean, / std, · std, + mean: roundings at the scale of the pixels and of (x − mean)/std ≤ 1/std
    tol = float32_tolerance(1 / torch.tensor(IMAGENET_STD), terms=4)
    torch.testing.assert_close(denormalise_image(normalise_image(img)), img, atol=tol, rtol=0)


@pytest.mark.usefixtures("no_typecheck")
def test_errors():
    with pytest.raises(ValueError, match=r"3 \(RGB\) channels.*\(1, 4, 2, 2\)"):
        normalise_image(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="torch.int32"):
        normalise_image(torch.zeros(1, 3, 2, 2, dtype=torch.int32))
