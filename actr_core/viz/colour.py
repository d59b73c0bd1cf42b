"""Flow → colour (the Middlebury colour wheel) and image helpers for figures.

Axis legend: h w grid rows, columns · 2 (x, y), channel 0 = x · 3 RGB.

The colour coding is the one of Baker et al., "A Database and Evaluation Methodology for Optical
Flow" (Middlebury, ICCV 2007): hue gives the direction, saturation the magnitude relative to
``max_magnitude``; a zero flow is white, rightward (+x) is red, leftward is cyan.
"""

import numpy as np
from jaxtyping import Bool, Float, Shaped, UInt8
from torch import Tensor

from actr_core.imaging import denormalise_image

__all__ = ["COLOUR_WHEEL_SEGMENTS", "colour_wheel", "flow_to_colour", "flow_legend", "to_display_image", "to_numpy"]

# Hue segments of the Middlebury wheel (Baker et al. 2007): red→yellow, yellow→green, green→cyan,
# cyan→blue, blue→magenta, magenta→red, in steps chosen to look perceptually even.
COLOUR_WHEEL_SEGMENTS: tuple[tuple[str, int], ...] = (("RY", 15), ("YG", 6), ("GC", 4), ("CB", 11), ("BM", 13), ("MR", 6))
# Flows beyond the maximum magnitude are drawn darker by this factor (Middlebury convention).
OUT_OF_RANGE_DIMMING = 0.75
UNKNOWN_COLOUR = (0, 0, 0)  # cells without a value (e.g. outside the pseudo-flow mask): black


def to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    """Detach, move to the host, return a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def colour_wheel() -> Float[np.ndarray, "k 3"]:
    """The k = 55 anchor colours of the wheel, RGB in [0, 1], starting at red and turning to yellow."""
    rows = []
    for name, steps in COLOUR_WHEEL_SEGMENTS:
        ramp = np.floor(255.0 * np.arange(steps) / steps)
        up, down, full, zero = ramp, 255.0 - ramp, np.full(steps, 255.0), np.zeros(steps)
        rgb = {
            "RY": (full, up, zero),
            "YG": (down, full, zero),
            "GC": (zero, full, up),
            "CB": (zero, down, full),
            "BM": (up, zero, full),
            "MR": (full, zero, down),
        }[name]
        rows.append(np.stack(rgb, axis=1))
    return np.concatenate(rows) / 255.0


def flow_to_colour(
    flow: Float[Tensor, "2 h w"] | Float[np.ndarray, "2 h w"],
    max_magnitude: float | None = None,
    valid: Bool[Tensor, "h w"] | Bool[np.ndarray, "h w"] | None = None,
) -> UInt8[np.ndarray, "h w 3"]:
    """Colour-code a flow field (channel 0 = x, to the right; channel 1 = y, downwards).

    Args:
        flow: ``(2, h, w)`` displacements.
        max_magnitude: magnitude drawn at full saturation (default: the largest valid magnitude);
            larger ones are drawn darker. Pass one value to compare several flows.
        valid: cells to draw; the others are black.

    Convention:
        Direction ↦ hue by the Middlebury wheel: +x red, −x cyan, +y (down) greenish-yellow
        turning through the wheel; zero flow is white. Image y points down, as in the flow.
    """
    flow = to_numpy(flow).astype(np.float64)
    if flow.ndim != 3 or flow.shape[0] != 2:
        raise ValueError(f"flow must have shape (2, h, w), got {flow.shape}")
    keep = np.isfinite(flow).all(axis=0)
    if valid is not None:
        valid = to_numpy(valid).astype(bool)
        if valid.shape != flow.shape[1:]:
            raise ValueError(f"valid must have shape {flow.shape[1:]}, got {valid.shape}")
        keep &= valid
    u = np.where(keep, flow[0], 0.0)
    v = np.where(keep, flow[1], 0.0)
    magnitude = np.hypot(u, v)
    if max_magnitude is None:
        max_magnitude = float(magnitude[keep].max()) if keep.any() else 0.0
    if not max_magnitude > 0:
        max_magnitude = 1.0  # all-zero flow: everything white
    rad = magnitude / max_magnitude
    wheel = colour_wheel()
    k = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]; +x gives 1 (the wheel's last/first anchor)
    position = (angle + 1.0) / 2.0 * (k - 1)
    k0 = np.floor(position).astype(np.int64)
    k1 = (k0 + 1) % k
    frac = (position - k0)[..., None]
    colour = (1.0 - frac) * wheel[k0] + frac * wheel[k1]
    inside = (rad <= 1.0)[..., None]
    colour = np.where(inside, 1.0 - rad[..., None] * (1.0 - colour), colour * OUT_OF_RANGE_DIMMING)
    out = np.round(255.0 * np.clip(colour, 0.0, 1.0)).astype(np.uint8)
    out[~keep] = UNKNOWN_COLOUR
    return out


def flow_legend(size: int = 64) -> UInt8[np.ndarray, "s s 3"]:
    """A disc of every direction and magnitude up to 1: the key to :func:`flow_to_colour`."""
    centre = (size - 1) / 2.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    flow = np.stack([(xs - centre) / centre, (ys - centre) / centre])
    disc = np.hypot(flow[0], flow[1]) <= 1.0
    image = flow_to_colour(flow, max_magnitude=1.0, valid=disc)
    image[~disc] = 255
    return image


def to_display_image(
    image: Float[Tensor, "3 h w"] | Shaped[np.ndarray, "h w 3"],
) -> Float[np.ndarray, "h w 3"]:
    """A picture to show: an ImageNet-normalised ``(3, h, w)`` tensor (model input) or an ``(h, w, 3)``
    array (uint8 in [0, 255] or float in [0, 1]) → float ``(h, w, 3)`` RGB in [0, 1]."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, h, w) ImageNet-normalised, got {tuple(image.shape)}")
        rgb = denormalise_image(image.detach().float().cpu()).clamp(0.0, 1.0)
        return rgb.permute(1, 2, 0).numpy().astype(np.float64)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image array must be (h, w, 3), got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)
