"""Image normalisation: every model takes ImageNet-normalised float images ``(b, 3, H, W)``.

Axis legend: b batch · 3 RGB channels · H W image rows, columns.
"""

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalise_image", "denormalise_image"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision / timm ImageNet statistics (RGB, [0, 1] scale)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stats(like: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=like.dtype, device=like.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=like.dtype, device=like.device).view(3, 1, 1)
    return mean, std


def normalise_image(image: Shaped[Tensor, "*batch 3 h w"]) -> Float[Tensor, "*batch 3 h w"]:
    """RGB image → model input. ``uint8`` images are read as [0, 255], float images as [0, 1].

    Convention:
        out = (image / 255 − mean) / std for ``uint8``; (image − mean) / std for float input.
    """
    if image.ndim < 3 or image.shape[-3] != 3:
        raise ValueError(f"image must have 3 (RGB) channels in dim -3, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    elif not image.is_floating_point():
        raise ValueError(f"image must be uint8 or floating point, got dtype {image.dtype}")
    mean, std = _stats(image)
    return (image - mean) / std


def denormalise_image(image: Float[Tensor, "*batch 3 h w"]) -> Float[Tensor, "*batch 3 h w"]:
    """Inverse of :func:`normalise_image` for float images: back to [0, 1] RGB (not clamped)."""
    mean, std = _stats(image)
    return image * std + mean
