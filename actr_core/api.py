"""Match your own images: one call from file paths, PIL images, arrays or tensors to keypoints.

Axis legend: b batch · n keypoints · 2 (x, y) · H W model input · h w model flow grid.

``Matcher`` wraps any model of the library (an ``actr_core.models.CorrespondenceModel``:
``model(src, trg).flow`` on the source grid at ``H/4 × W/4``). Each image is read (EXIF orientation
applied, any mode converted to RGB), resized to the model's input size, ImageNet-normalised and
matched; keypoints are returned in pixels of the **original** target image. A per-match confidence
comes from forward–backward (cycle) consistency: the source point is sent to the target by the
forward flow and back by the backward flow, and the distance to where it started decides the
confidence.
"""

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn

from actr_core.flow import coords_grid, rescale_keypoints, sample_flow, transfer_keypoints
from actr_core.imaging import normalise_image

__all__ = ["Matcher", "MatchResult", "ImageError", "load_image"]

ImageLike = str | os.PathLike | Image.Image | np.ndarray | Tensor


class ImageError(ValueError):
    """An image that cannot be used: missing or unreadable file, unsupported layout or mode."""


@dataclasses.dataclass(frozen=True)
class MatchResult:
    """What :class:`Matcher` returns for one pair.

    Attributes:
        keypoints: ``(n, 2)`` predicted (x, y) in original target-image pixels (None without query points).
        confidence: ``(n,)`` in (0, 1]: ``exp(−(e/σ)²)`` of the cycle error ``e`` in flow-grid cells.
        cycle_error: ``(n,)`` the cycle error in original source-image pixels.
        flow: ``(2, Hs, Ws)`` dense flow on the original source image: target position (original
            target pixels) minus source position (original source pixels).
        confidence_map: ``(Hs, Ws)`` dense cycle confidence on the original source image.
    """

    keypoints: Tensor | None
    confidence: Tensor | None
    cycle_error: Tensor | None
    flow: Tensor
    confidence_map: Tensor


def load_image(image: ImageLike) -> Float[Tensor, "3 h w"]:
    """Any supported image → float RGB ``(3, h, w)`` in [0, 1].

    Paths and PIL images: EXIF orientation applied, grayscale/CMYK/palette/RGBA converted to RGB
    (alpha dropped). Arrays: ``(h, w)``, ``(h, w, 3|4)`` uint8 or float in [0, 1]. Tensors:
    ``(3, h, w)`` or ``(h, w, 3)``, uint8 or float in [0, 1].
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        try:
            with Image.open(path) as pil:
                pil.load()
                image = ImageOps.exif_transpose(pil)
        except (UnidentifiedImageError, OSError) as err:
            raise ImageError(f"{path}: cannot read image ({err})") from None
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L", "RGBA", "CMYK", "P", "LA", "I", "I;16", "F", "YCbCr", "PA"):
            raise ImageError(f"unsupported image mode {image.mode!r}")
        if image.mode in ("I", "I;16", "F"):
            arr = np.asarray(image, dtype=np.float64)
            span = max(arr.max() - arr.min(), 1e-12)
            image = Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8))
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.array(image, copy=True))
        if image.ndim == 2:
            image = image.unsqueeze(-1).expand(-1, -1, 3)
        if image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] not in (3,):
            image = image[..., :3].permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise ImageError(f"unsupported image type {type(image).__name__}")
    if image.ndim == 3 and image.shape[0] != 3 and image.shape[-1] == 3:
        image = image.permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ImageError(f"image must be (3, h, w) or (h, w, 3), got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise ImageError(f"image tensor must be uint8 or float in [0, 1], got dtype {image.dtype}")
    return image.float()


class Matcher:
    """One-call matching of arbitrary images with any model of the library.

    Args:
        model: a correspondence model (``actr_core.models.CorrespondenceModel``: ``model(src, trg).flow``
            of shape ``(b, 2, H/4, W/4)``).
        input_size: ``(H, W)`` the model input; images are resized to it and the result mapped back.
        device: where to run (default: the model's device).
        sigma: cycle-error scale of the confidence, in flow-grid cells.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: Sequence[int] = (256, 256),
        *,
        device: torch.device | str | None = None,
        sigma: float = 1.0,
    ) -> None:
        self.model = model.eval()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        if device is not None:
            self.model.to(device)
        self.device = next(model.parameters()).device
        self.sigma = float(sigma)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs) -> "Matcher":
        """Rebuild the model of a training checkpoint written by ``pipelines/train.py``."""
        from actr_core.training.checkpoint import load_model_from_checkpoint

        model, info = load_model_from_checkpoint(path)
        size = info.get("input_size", (256, 256))
        return cls(model, kwargs.pop("input_size", size), **kwargs)

    @classmethod
    def from_released(cls, path: str | os.PathLike, **kwargs) -> "Matcher":
        """Load a checkpoint of the released ACTR code (``model_best.pth``); 256×256 input only."""
        from actr_core.models import load_official_actr

        return cls(load_official_actr(path), (256, 256), **kwargs)

    def _prepare(self, image: ImageLike) -> tuple[Tensor, tuple[int, int]]:
        rgb = load_image(image)
        size = (rgb.shape[1], rgb.shape[2])
        resized = F.interpolate(rgb[None], size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return normalise_image(resized.clamp(0, 1))[0], size

    @torch.no_grad()
    def __call__(
        self,
        src_image: ImageLike | Sequence[ImageLike],
        trg_image: ImageLike | Sequence[ImageLike],
        src_keypoints: Tensor | np.ndarray | Sequence | None = None,
    ) -> MatchResult | list[MatchResult]:
        """Match one pair, or two equal-length lists of images (then ``src_keypoints`` is a list too).

        ``src_keypoints`` are (x, y) in pixels of the original source image, ``(n, 2)``; points
        outside the image raise :class:`ValueError`.
        """
        batched = isinstance(src_image, (list, tuple))
        srcs = list(cast(Sequence[ImageLike], src_image)) if batched else [cast(ImageLike, src_image)]
        trgs = list(cast(Sequence[ImageLike], trg_image)) if batched else [cast(ImageLike, trg_image)]
        if len(srcs) != len(trgs):
            raise ValueError(f"got {len(srcs)} source images but {len(trgs)} target images")
        kps_list = list(src_keypoints) if (batched and src_keypoints is not None) else [src_keypoints] * len(srcs)
        if len(kps_list) != len(srcs):
            raise ValueError(f"got {len(kps_list)} keypoint sets for {len(srcs)} pairs")
        prepared_src = [self._prepare(im) for im in srcs]
        prepared_trg = [self._prepare(im) for im in trgs]
        src = torch.stack([p[0] for p in prepared_src]).to(self.device)
        trg = torch.stack([p[0] for p in prepared_trg]).to(self.device)
        forward = self.model(torch.cat([src, trg]), torch.cat([trg, src])).flow.float().cpu()
        flow_st, flow_ts = forward[: len(srcs)], forward[len(srcs) :]
        results = [
            self._result(flow_st[i], flow_ts[i], prepared_src[i][1], prepared_trg[i][1], kps_list[i]) for i in range(len(srcs))
        ]
        return results if batched else results[0]

    def _cycle_error(self, flow_st: Tensor, flow_ts: Tensor, pts: Tensor) -> Tensor:
        """Distance (grid cells) between ``pts`` and their image after source → target → source."""
        there = transfer_keypoints(flow_st[None], pts[None])
        back = there + sample_flow(flow_ts[None], there)
        return (back - pts[None]).norm(dim=-1)[0]

    def _result(self, flow_st, flow_ts, src_size, trg_size, kps) -> MatchResult:
        grid_size = tuple(flow_st.shape[-2:])
        # dense: every original source pixel, through the grid, to original target pixels
        src_pix = coords_grid(*src_size).flatten(1).T
        on_grid = rescale_keypoints(src_pix[None], src_size, grid_size)[0]
        dense_trg = rescale_keypoints(transfer_keypoints(flow_st[None], on_grid[None]), grid_size, trg_size)[0]
        flow = (dense_trg - src_pix).T.reshape(2, *src_size)
        cyc_grid = self._cycle_error(flow_st, flow_ts, coords_grid(*grid_size).flatten(1).T)
        conf_grid = torch.exp(-(cyc_grid / self.sigma).square()).reshape(1, 1, *grid_size)
        confidence_map = F.interpolate(conf_grid, size=src_size, mode="bilinear", align_corners=False)[0, 0]
        if kps is None:
            return MatchResult(None, None, None, flow, confidence_map)
        kps = torch.as_tensor(np.asarray(kps, dtype=np.float32))
        if kps.ndim != 2 or kps.shape[-1] != 2:
            raise ValueError(f"src_keypoints must be (n, 2) (x, y), got shape {tuple(kps.shape)}")
        h, w = src_size
        outside = (kps[:, 0] < -0.5) | (kps[:, 0] > w - 0.5) | (kps[:, 1] < -0.5) | (kps[:, 1] > h - 0.5)
        if outside.any():
            bad = kps[outside][0].tolist()
            raise ValueError(f"{int(outside.sum())} keypoint(s) lie outside the {w}×{h} source image, e.g. {bad}")
        on_grid = rescale_keypoints(kps[None], src_size, grid_size)
        moved = rescale_keypoints(transfer_keypoints(flow_st[None], on_grid), grid_size, trg_size)[0]
        cyc = self._cycle_error(flow_st, flow_ts, on_grid[0])
        cell = torch.tensor([w / grid_size[1], h / grid_size[0]]).max()
        return MatchResult(moved, torch.exp(-(cyc / self.sigma).square()), cyc * cell, flow, confidence_map)
