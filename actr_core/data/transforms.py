"""Reading-side transforms: photometric augmentation, box-preserving random crop, resizing.

Axis legend: H W frame rows, columns · h w flow grid (H/stride × W/stride) · n keypoints ·
2 (x, y), channel 0 = x · 4 box (x1, y1, x2, y2).

A transform is a callable ``(sample, generator) -> sample`` on :class:`~actr_core.data.samples.PairSample`
(``uint8`` images); :class:`Compose` chains them and :func:`train_transforms` builds the released
code's training set: seven photometric operations at p = 0.2 each (torchvision ``transforms.v2``
functional ops, their parameters drawn from the given generator), drawn independently per image,
then a random crop that keeps the object box, per image with p = 0.7.

Convention:
    A crop keeps pixel columns ``left .. right - 1`` and rows ``top .. bottom - 1`` of a frame and
    resizes them to ``(H', W')``; a position moves by x' = (x − left + 0.5)·W'/(right − left) − 0.5
    (pixel centres at integers; the map of ``resized_crop`` with ``align_corners=False``).
    Keypoints move by that map and become invalid when they leave either frame. Pseudo-flow is
    rebuilt from the moved keypoints; an exact (synthetic) flow is carried through the two maps:
    for each new source cell p', with p its old position, the new flow is
    ``A_t(p + F(p)) − p'`` (``A_t`` the target's map, all on the flow grids), with ``F(p)`` read
    bilinearly. A new cell is valid when the four old cells around p are valid and its match
    stays inside the new target frame; interpolating a smooth flow bilinearly is accurate to far
    below a grid cell.
"""

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from jaxtyping import Float, UInt8
from torch import Tensor

from actr_core.data.samples import PairSample, keypoints_in_frame, pseudo_flow, sample_size
from actr_core.flow import coords_grid, normalise_coords

__all__ = [
    "Box",
    "Compose",
    "Photometric",
    "PhotometricConfig",
    "BoxPreservingCrop",
    "Resize",
    "reframe",
    "train_transforms",
]

Box = tuple[int, int, int, int]  # integer crop (left, top, right, bottom), right/bottom exclusive
Transform = Callable[[PairSample, torch.Generator], PairSample]
_VALID_EPS = 1e-6  # bilinear weight of invalid neighbours tolerated (rounding only)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = tuple(transforms)

    def __call__(self, sample: PairSample, generator: torch.Generator) -> PairSample:
        for transform in self.transforms:
            sample = transform(sample, generator)
        return sample


# ----------------------------------------------------------------------------------------------
# Photometric augmentation.


@dataclasses.dataclass(frozen=True)
class PhotometricConfig:
    """The released code's albumentations set (ToGray, Posterize, Equalize, Sharpen, RandomBrightnessContrast,
    Solarize, ColorJitter, each p = 0.2) as torchvision ``transforms.v2`` functional ops on uint8 tensors;
    ranges are albumentations' defaults where they map."""

    p: float = 0.2  # probability of each operation, per image (released train transform)
    posterize_bits: int = 4  # albumentations Posterize default num_bits
    sharpen: tuple[float, float] = (
        0.5,
        1.5,
    )  # unsharp-mask amount a of x + a(x - box3x3(x)), standing in for Sharpen(alpha 0.2-0.5) (chosen)
    brightness: float = 0.2  # RandomBrightnessContrast brightness_limit / ColorJitter brightness
    contrast: float = 0.2  # RandomBrightnessContrast contrast_limit / ColorJitter contrast
    saturation: float = 0.2  # ColorJitter saturation
    hue: float = 0.2  # ColorJitter hue, as a fraction of the colour circle (HSV hue shift, as albumentations)
    solarize_threshold: int = 128  # albumentations Solarize default threshold


# torchvision's sharpness blends with a 3x3 smoothing of weights (1 ... 5 ... 1)/13: x + (f - 1)(x - smooth(x))
# equals the unsharp mask x + a(x - box3x3(x)) inside the frame when f - 1 = a·13/9 (the border rows stay).
_SHARPNESS_PER_AMOUNT = 13.0 / 9.0


def _factor(generator: torch.Generator, spread: float) -> float:
    """A factor drawn uniformly in [1 - spread, 1 + spread]."""
    return _uniform(generator, 1.0 - spread, 1.0 + spread)


def _jitter(image: Tensor, cfg: PhotometricConfig, generator: torch.Generator) -> Tensor:
    """Brightness, contrast, saturation (factors in 1 ± their spread) and hue (± ``hue`` turns), in that order."""
    b, c, s = (_factor(generator, spread) for spread in (cfg.brightness, cfg.contrast, cfg.saturation))
    hue = _uniform(generator, -cfg.hue, cfg.hue)
    image = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)
    return TF.adjust_hue(image, hue)


def _brightness_contrast(image: Tensor, cfg: PhotometricConfig, generator: torch.Generator) -> Tensor:
    b, c = _factor(generator, cfg.brightness), _factor(generator, cfg.contrast)
    return TF.adjust_contrast(TF.adjust_brightness(image, b), c)


def _sharpen(image: Tensor, cfg: PhotometricConfig, generator: torch.Generator) -> Tensor:
    """Unsharp mask of amount a drawn in ``cfg.sharpen`` (torchvision's sharpness factor 1 + a·13/9)."""
    return TF.adjust_sharpness(image, 1.0 + _SHARPNESS_PER_AMOUNT * _uniform(generator, *cfg.sharpen))


def _gray(image: Tensor, cfg: PhotometricConfig, generator: torch.Generator) -> Tensor:
    """Luma (ITU-R BT.601) repeated on the three channels."""
    return TF.rgb_to_grayscale(image, num_output_channels=3)


def _posterize(image: Tensor, cfg: PhotometricConfig, generator: torch.Generator) -> Tensor:
    """Keep the ``posterize_bits`` high bits of every value."""
    return TF.posterize(image, cfg.posterize_bits)


def _equalize(image: Tensor, cfg: PhotometricConfig, generator: torch.Generator) -> Tensor:
    """Histogram equalisation per channel (PIL's ``ImageOps.equalize`` rule)."""
    return TF.equalize(image)


def _solarize(image: Tensor, cfg: PhotometricConfig, generator: torch.Generator) -> Tensor:
    """Invert the values at or above ``solarize_threshold``."""
    return TF.solarize(image, cfg.solarize_threshold)


_OPERATIONS: tuple[tuple[str, Callable[[Tensor, PhotometricConfig, torch.Generator], Tensor]], ...] = (
    ("gray", _gray),
    ("posterize", _posterize),
    ("equalize", _equalize),
    ("sharpen", _sharpen),
    ("brightness_contrast", _brightness_contrast),
    ("solarize", _solarize),
    ("colour_jitter", _jitter),
)


class Photometric:
    """Each of the seven operations with probability ``p``, independently for the source and the target image."""

    operations: tuple[str, ...] = tuple(name for name, _ in _OPERATIONS)

    def __init__(self, config: PhotometricConfig = PhotometricConfig()):
        if not 0.0 <= config.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {config.p}")
        self.config = config

    def image(self, image: UInt8[Tensor, "3 H W"], generator: torch.Generator) -> UInt8[Tensor, "3 H W"]:
        """One image through the operations (each drawn with probability ``p``)."""
        for _, operation in _OPERATIONS:
            if float(torch.rand((), generator=generator)) < self.config.p:
                image = operation(image, self.config, generator)
        return image

    def __call__(self, sample: PairSample, generator: torch.Generator) -> PairSample:
        return dataclasses.replace(
            sample, src_image=self.image(sample.src_image, generator), trg_image=self.image(sample.trg_image, generator)
        )


# ----------------------------------------------------------------------------------------------
# Geometry: crop-and-resize of both images with consistent keypoints, boxes and flow.


def _affine(box: Box, old: tuple[int, int], new: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Scale and offset (x, y) of the crop map x' = (x - left + 0.5)·W'/(right - left) - 0.5."""
    left, top, right, bottom = box
    scale = torch.tensor([new[1] / (right - left), new[0] / (bottom - top)], dtype=torch.float64)
    offset = (torch.tensor([0.5 - left, 0.5 - top], dtype=torch.float64)) * scale - 0.5
    return scale, offset


def _apply(points: Tensor, affine: tuple[Tensor, Tensor]) -> Tensor:
    scale, offset = affine
    return (points.double() * scale + offset).to(points.dtype)


def _check_box(box: Box, size: tuple[int, int], name: str) -> Box:
    left, top, right, bottom = (int(v) for v in box)
    if not (0 <= left < right <= size[1] and 0 <= top < bottom <= size[0]):
        raise ValueError(f"{name} crop {box} must satisfy 0 <= left < right <= {size[1]}, 0 <= top < bottom <= {size[0]}")
    return left, top, right, bottom


def _frame_to_grid(stride: int) -> tuple[Tensor, Tensor]:
    """Frame px -> grid px: g = (x + 0.5)/stride - 0.5."""
    scale = torch.full((2,), 1.0 / stride, dtype=torch.float64)
    return scale, 0.5 * scale - 0.5


def _compose(outer: tuple[Tensor, Tensor], inner: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return outer[0] * inner[0], outer[0] * inner[1] + outer[1]


def _invert(affine: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return 1.0 / affine[0], -affine[1] / affine[0]


def _carry_exact_flow(
    flow: Float[Tensor, "2 h w"],
    valid: Tensor,
    src_map: tuple[Tensor, Tensor],
    trg_map: tuple[Tensor, Tensor],
    new_grid: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Exact flow through the source map (grid px old -> new) and the target map (grid px old -> new)."""
    old_grid = tuple(flow.shape[-2:])
    cells = coords_grid(*new_grid, dtype=torch.float64).permute(1, 2, 0)  # h' w' 2, new source cells
    old = _apply(cells, _invert(src_map))  # their positions on the old source grid
    sample_at = normalise_coords(old, old_grid).float()[None]
    stacked = torch.cat([flow.float(), valid.float()[None]])[None]
    values = F.grid_sample(stacked, sample_at, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    moved = _apply(old + values[:2].permute(1, 2, 0).double(), trg_map)  # match on the new target grid
    new_flow = (moved - cells).permute(2, 0, 1).float()
    h, w = new_grid
    inside_old = (old[..., 0] >= 0) & (old[..., 0] <= old_grid[1] - 1) & (old[..., 1] >= 0) & (old[..., 1] <= old_grid[0] - 1)
    inside_new = (moved[..., 0] >= -0.5) & (moved[..., 0] <= w - 0.5) & (moved[..., 1] >= -0.5) & (moved[..., 1] <= h - 0.5)
    new_valid = (values[2] >= 1.0 - _VALID_EPS) & inside_old & inside_new
    return torch.where(new_valid[None], new_flow, torch.zeros_like(new_flow)), new_valid


def reframe(sample: PairSample, src_box: Box, trg_box: Box, size: int | Sequence[int] | None = None) -> PairSample:
    """Crop ``src_box`` of the source and ``trg_box`` of the target and resize both to ``size``
    (default: the current frame), moving keypoints, boxes and flow consistently (see the module docstring)."""
    old = sample.frame_size
    new = sample_size(size) if size is not None else old
    src_box = _check_box(src_box, old, "source")
    trg_box = _check_box(trg_box, old, "target")
    src_map, trg_map = _affine(src_box, old, new), _affine(trg_box, old, new)
    src_kps, trg_kps = _apply(sample.src_kps, src_map), _apply(sample.trg_kps, trg_map)
    valid = sample.valid_kps & keypoints_in_frame(src_kps, new) & keypoints_in_frame(trg_kps, new)
    stride = sample.pseudo.stride
    new_grid = (new[0] // stride, new[1] // stride)
    if sample.flow_kind == "exact":
        to_grid = _frame_to_grid(stride)
        from_grid = _invert(to_grid)
        grid_src = _compose(to_grid, _compose(src_map, from_grid))
        grid_trg = _compose(to_grid, _compose(trg_map, from_grid))
        flow, valid_flow = _carry_exact_flow(sample.flow, sample.valid_flow, grid_src, grid_trg, new_grid)
    else:
        flow, valid_flow = pseudo_flow(src_kps, trg_kps, valid, new, sample.pseudo)

    def crop(image: Tensor, box: Box) -> Tensor:
        left, top, right, bottom = box
        if box == (0, 0, old[1], old[0]) and new == old:
            return image
        crop = image[:, top:bottom, left:right][None].contiguous()
        return F.interpolate(crop, size=new, mode="bilinear", align_corners=False, antialias=True)[0]

    def move_box(box: Tensor, affine: tuple[Tensor, Tensor]) -> Tensor:
        return _apply(box.reshape(2, 2), affine).reshape(4)

    return dataclasses.replace(
        sample,
        src_image=crop(sample.src_image, src_box),
        trg_image=crop(sample.trg_image, trg_box),
        src_kps=src_kps,
        trg_kps=trg_kps,
        valid_kps=valid,
        flow=flow,
        valid_flow=valid_flow,
        src_frame_bbox=move_box(sample.src_frame_bbox, src_map),
        trg_frame_bbox=move_box(sample.trg_frame_bbox, trg_map),
    )


class BoxPreservingCrop:
    """Random crop containing the object box, per image with probability ``p``, resized back to the frame.

    As in the released code: left ~ U{0..x1}, top ~ U{0..y1}, right ~ U{x2..W}, bottom ~ U{y2..H}
    (the box's corners rounded outwards to whole pixels), drawn independently for source and target.
    """

    def __init__(self, p: float = 0.7):  # released random_crop(p=0.7)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def _draw(self, box: Tensor, size: tuple[int, int], generator: torch.Generator) -> Box:
        h, w = size
        full = (0, 0, w, h)
        if float(torch.rand((), generator=generator)) >= self.p:
            return full
        x1, y1, x2, y2 = box.tolist()
        x1, y1 = min(max(int(x1 + 0.5), 0), w - 1), min(max(int(y1 + 0.5), 0), h - 1)  # pixel holding the corner
        x2, y2 = min(max(int(x2 + 0.5), x1), w - 1), min(max(int(y2 + 0.5), y1), h - 1)
        left, top = _randint(generator, 0, x1), _randint(generator, 0, y1)
        right, bottom = _randint(generator, x2 + 1, w), _randint(generator, y2 + 1, h)
        return left, top, right, bottom

    def __call__(self, sample: PairSample, generator: torch.Generator) -> PairSample:
        size = sample.frame_size
        src_box = self._draw(sample.src_frame_bbox, size, generator)
        trg_box = self._draw(sample.trg_frame_bbox, size, generator)
        full = (0, 0, size[1], size[0])
        if src_box == full and trg_box == full:
            return sample
        return reframe(sample, src_box, trg_box)


class Resize:
    """Resize both images (and everything with them) to ``size``: e.g. shards stored at 512 read at 256."""

    def __init__(self, size: int | Sequence[int]):
        self.size = sample_size(size)

    def __call__(self, sample: PairSample, generator: torch.Generator) -> PairSample:
        h, w = sample.frame_size
        if (h, w) == self.size:
            return sample
        return reframe(sample, (0, 0, w, h), (0, 0, w, h), self.size)


def train_transforms(photometric: PhotometricConfig = PhotometricConfig(), crop_p: float = 0.7) -> list[Transform]:
    """The released code's training augmentation: photometric set, then the box-preserving crop."""
    return [Photometric(photometric), BoxPreservingCrop(crop_p)]
