"""Match your own images: one call from file paths, PIL images, arrays or tensors to keypoints.

Axis legend: b batch · n keypoints · 2 (x, y) · H W model input · h w model flow grid ·
Hs Ws original source image · Ht Wt original target image.

``Matcher`` wraps any model of the library (an ``actr_core.models.CorrespondenceModel``:
``model(src, trg).flow`` on the source grid at ``H/4 × W/4``). Each image is read (EXIF orientation
applied, any mode converted to RGB), reduced to the model's input size **before** anything runs at
full resolution (JPEGs are decoded at a reduced scale, other files box-reduced), ImageNet-normalised
and matched both ways; keypoints are returned in pixels of the **original** target image.

Each match has a cycle error: the source point is sent to the target by the forward flow and back
by the backward flow; the distance to where it started is the cycle error, in original source
pixels and relative to the source image's longer side (:mod:`actr_core.calibration`). Its
confidence is **calibrated** when the matcher holds a :class:`~actr_core.calibration.ConfidenceCalibration`
(``calibration.json`` beside a checkpoint, fitted on a validation split): then it estimates the
probability that the match is correct at the calibration's α, from the measures it reads: the
cycle error, the disagreement with the pair matched mirrored left–right (a third pass of the
model), the spread of the model's correlation and the flatness of the source image around the
point. Without one, the confidence is the
**uncalibrated** score ``exp(−(e/σ)²)`` of the cycle error ``e`` in flow-grid cells: it ranks
matches but is not a probability, and :attr:`MatchResult.calibrated` is False.
"""

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor, nn

from actr_core.blocks.device_table import PRECISIONS, cpu_bf16_refusal
from actr_core.calibration import (
    CALIBRATION_FILE,
    ConfidenceCalibration,
    correlation_spread,
    cycle_displacement,
    displacement_error,
    image_flatness,
    match_measures,
)
from actr_core.flow import coords_grid, rescale_keypoints, transfer_keypoints
from actr_core.imaging import normalise_image

__all__ = ["Matcher", "MatchResult", "ImageError", "load_image", "image_size", "PRECISIONS"]

ImageLike = str | os.PathLike | Image.Image | np.ndarray | Tensor
MIN_IMAGE_SIDE = 2  # pixels: a smaller image has no structure to match
# Matching precisions (PRECISIONS: autocast dtype per name); which devices run each is checked in Matcher.
_HALF_DEVICES = {"bf16": ("cpu", "cuda"), "fp16": ("cuda",)}
_EXIF_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by ±90°


class ImageError(ValueError):
    """An image that cannot be used: missing or unreadable file, unsupported layout or mode, bad values."""


@dataclasses.dataclass(frozen=True, eq=False)
class MatchResult:
    """What :class:`Matcher` returns for one pair: sparse matches now, dense maps on request.

    Attributes:
        keypoints: ``(n, 2)`` predicted (x, y) in original target-image pixels (None without query points).
        confidence: ``(n,)`` in (0, 1]: calibrated P(correct at ``calibration_alpha``) when ``calibrated``,
            else the uncalibrated score ``exp(−(e/σ)²)`` of the cycle error ``e`` in flow-grid cells.
        cycle_error: ``(n,)`` the cycle error in original source-image pixels.
        cycle_error_relative: ``(n,)`` the cycle error divided by ``max(Hs, Ws)``, the source image's
            longer side (the ``d`` of PCK's image threshold).
        calibrated: whether ``confidence`` and ``confidence_map`` come from a fitted calibration.
        calibration_alpha: the PCK α the calibration estimates correctness at (None when uncalibrated).
        src_size, trg_size: ``(H, W)`` of the original images.
        flow_grid: ``(2, h, w)`` the model's forward flow on its grid, in grid cells.
        confidence_grid: ``(h, w)`` the confidence of every grid cell (as ``confidence``).

    Dense full-resolution outputs are computed on first access and kept (they cost
    ``2 · Hs · Ws`` floats): :attr:`flow` and :attr:`confidence_map`.
    """

    keypoints: Tensor | None
    confidence: Tensor | None
    cycle_error: Tensor | None
    cycle_error_relative: Tensor | None
    calibrated: bool
    calibration_alpha: float | None
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    flow_grid: Tensor
    confidence_grid: Tensor

    @functools.cached_property
    def flow(self) -> Float[Tensor, "2 Hs Ws"]:
        """Dense flow on the original source image: target position (original target pixels) minus
        source position (original source pixels), bilinear in the grid flow (border values outside).

        Convention:
            A source pixel x sits at x_g = (x + 0.5) · w/Ws − 0.5 on the grid; it moves to
            x_g + flow(x_g), which is (x_g' + 0.5) · Wt/w − 0.5 in target pixels.
        """
        (gh, gw), (hs, ws), (ht, wt) = self.flow_grid.shape[-2:], self.src_size, self.trg_size
        moved = coords_grid(hs, ws)
        moved = rescale_keypoints(moved.flatten(1).T, (hs, ws), (gh, gw)).T.reshape(2, hs, ws)
        moved += F.interpolate(self.flow_grid[None], size=(hs, ws), mode="bilinear", align_corners=False)[0]
        moved = rescale_keypoints(moved.flatten(1).T, (gh, gw), (ht, wt)).T.reshape(2, hs, ws)
        return moved - coords_grid(hs, ws)

    @functools.cached_property
    def confidence_map(self) -> Float[Tensor, "Hs Ws"]:
        """Dense confidence on the original source image (the grid's, bilinearly upsampled)."""
        grid = self.confidence_grid[None, None]
        return F.interpolate(grid, size=self.src_size, mode="bilinear", align_corners=False)[0, 0]


def _check_values(image: Tensor, where: str) -> None:
    h, w = image.shape[-2:]
    if h == 0 or w == 0:
        raise ImageError(f"{where}: the image is empty ({w}×{h} pixels)")
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ImageError(f"{where}: the image is {w}×{h} pixels, too small to match (each side needs ≥ {MIN_IMAGE_SIDE})")
    if image.is_floating_point():
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            raise ImageError(f"{where}: the image has {bad} NaN or infinite value(s)")
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 1:
            raise ImageError(
                f"{where}: float image values must lie in [0, 1], found [{low:g}, {high:g}]"
                + ("; divide 0–255 images by 255" if high > 1 and low >= 0 else "")
            )


def _open(path: Path, size: tuple[int, int] | None) -> tuple[Image.Image, tuple[int, int]]:
    """A decoded, upright PIL image of ``path`` (JPEG decoded at a reduced scale when ``size`` allows),
    and the full upright size ``(H, W)``."""
    full = image_size(path)
    try:
        with Image.open(path) as pil:
            w, h = pil.size
            swap = (h, w) != full
            if size is not None and min(h, w) >= MIN_IMAGE_SIDE:
                want = (size[0], size[1]) if swap else (size[1], size[0])  # PIL (width, height) before rotation
                pil.draft("RGB", want)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below `want`
            pil.load()
            return ImageOps.exif_transpose(pil), full
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: cannot read image ({err})") from None


def _to_tensor(image: Any, where: str) -> Tensor:
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L", "RGBA", "CMYK", "P", "LA", "I", "I;16", "F", "YCbCr", "PA"):
            raise ImageError(f"{where}: unsupported image mode {image.mode!r}")
        if image.mode in ("I", "I;16", "F"):
            arr = np.asarray(image, dtype=np.float64)
            span = max(arr.max() - arr.min(), 1e-12) if arr.size else 1.0
            image = Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8)) if arr.size else image
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
        raise ImageError(f"{where}: image must be (3, h, w) or (h, w, 3), got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise ImageError(f"{where}: image tensor must be uint8 or float in [0, 1], got dtype {image.dtype}")
    _check_values(image, where)
    return image


def _read(image: ImageLike, size: tuple[int, int] | None) -> tuple[Float[Tensor, "3 h w"], tuple[int, int]]:
    """Image → (float RGB in [0, 1], resized to ``size`` when given; the original ``(H, W)``)."""
    where = str(image) if isinstance(image, (str, os.PathLike)) else "image"
    full = None
    if isinstance(image, (str, os.PathLike)):
        image, full = _open(Path(image), size)
    if isinstance(image, Image.Image) and size is not None and min(image.size) >= MIN_IMAGE_SIDE:
        factor = min(image.size[0] // (2 * size[1]), image.size[1] // (2 * size[0]))
        if factor > 1:  # integer box reduction in C, keeping at least twice the input size
            image = image.reduce(factor)
    pixels = _to_tensor(image, where)
    if full is None:
        full = (int(pixels.shape[1]), int(pixels.shape[2]))
    rgb = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    if size is not None and tuple(rgb.shape[-2:]) != size:
        rgb = F.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
    return rgb, full


def load_image(image: ImageLike, size: Sequence[int] | None = None) -> Float[Tensor, "3 h w"]:
    """Any supported image → float RGB ``(3, h, w)`` in [0, 1] (resized to ``size = (H, W)`` when given).

    Paths and PIL images: EXIF orientation applied, grayscale/CMYK/palette/RGBA converted to RGB
    (alpha dropped); with ``size``, a large JPEG is decoded at a reduced scale first. Arrays:
    ``(h, w)``, ``(h, w, 3|4)`` uint8 or float in [0, 1]. Tensors: ``(3, h, w)`` or ``(h, w, 3)``,
    uint8 or float in [0, 1]. Rejected with :class:`ImageError` naming the problem: a folder or
    missing file, an empty or 1-pixel-wide image, NaN or infinite values, float values outside [0, 1].
    """
    target = None if size is None else _check_size(size, "size")
    return _read(image, target)[0]


def image_size(image: ImageLike) -> tuple[int, int]:
    """``(H, W)`` of an image as :func:`load_image` would read it (upright); a file's header only."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise ImageError(f"{path}: is a folder, not an image file")
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        try:
            with Image.open(path) as pil:
                w, h = pil.size
                return (w, h) if pil.getexif().get(0x0112) in _EXIF_SWAPS_SIDES else (h, w)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise ImageError(f"{path}: cannot read image ({err})") from None
    if isinstance(image, Image.Image):
        return image.size[1], image.size[0]
    shape = tuple(image.shape)
    return (
        (int(shape[1]), int(shape[2])) if len(shape) == 3 and shape[0] == 3 and shape[-1] != 3 else (int(shape[0]), int(shape[1]))
    )


def _check_size(size: Sequence[int], name: str) -> tuple[int, int]:
    values = tuple(size)
    if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise ValueError(f"{name} must be two positive integers (H, W), got {values}")
    return int(values[0]), int(values[1])


def _check_keypoints(kps: Any, src_size: tuple[int, int]) -> Tensor:
    points = torch.as_tensor(np.asarray(kps, dtype=np.float32))
    if points.ndim != 2 or points.shape[-1] != 2:
        raise ValueError(f"src_keypoints must be (n, 2) (x, y), got shape {tuple(points.shape)}")
    finite = torch.isfinite(points).all(dim=1)
    if not finite.all():
        row = int((~finite).nonzero()[0])
        raise ValueError(
            f"src_keypoints: {int((~finite).sum())} point(s) are NaN or infinite, e.g. row {row} = {points[row].tolist()}"
        )
    h, w = src_size
    outside = (points[:, 0] < -0.5) | (points[:, 0] > w - 0.5) | (points[:, 1] < -0.5) | (points[:, 1] > h - 0.5)
    if outside.any():
        bad = points[outside][0].tolist()
        raise ValueError(f"{int(outside.sum())} keypoint(s) lie outside the {w}×{h} source image, e.g. {bad}")
    return points


class Matcher:
    """One-call matching of arbitrary images with any model of the library.

    Args:
        model: a correspondence model (``actr_core.models.CorrespondenceModel``: ``model(src, trg).flow``
            of shape ``(b, 2, H/4, W/4)``).
        input_size: ``(H, W)`` the model input; images are reduced to it and the result mapped back.
        device: where to run (default: the model's device).
        sigma: cycle-error scale of the uncalibrated confidence, in flow-grid cells (> 0).
        calibration: a fitted :class:`~actr_core.calibration.ConfidenceCalibration`; None: uncalibrated.
        precision: ``"fp32"``, ``"bf16"`` (CPU or CUDA) or ``"fp16"`` (CUDA): the model runs under
            ``torch.autocast`` at that precision; flows are converted to float32 afterwards. A
            device that cannot run it is refused here (``ValueError``), e.g. a CPU on which PyTorch
            refuses bf16 attention (:func:`actr_core.blocks.cpu_bf16_refusal`).
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: Sequence[int] = (256, 256),
        *,
        device: torch.device | str | None = None,
        sigma: float = 1.0,
        calibration: ConfidenceCalibration | None = None,
        precision: str = "fp32",
    ) -> None:
        self.input_size = _check_size(input_size, "input_size")
        if not float(sigma) > 0:
            raise ValueError(f"sigma must be a positive number of grid cells, got {sigma}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(model.parameters()).device
        allowed = _HALF_DEVICES.get(precision, (self.device.type,))
        if self.device.type not in allowed:
            raise ValueError(f"{precision} matching is not supported on {self.device.type} (it runs on {', '.join(allowed)})")
        if precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"bf16 matching is not supported by {torch.cuda.get_device_name(self.device)}; use fp16")
        if precision == "bf16" and self.device.type == "cpu" and (refusal := cpu_bf16_refusal()):
            raise ValueError(f"bf16 matching is not supported on this CPU: PyTorch refuses bf16 attention here ({refusal})")
        self.sigma = float(sigma)
        self.calibration = calibration
        self.precision = precision

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> "Matcher":
        """Rebuild the model of a training checkpoint written by ``pipelines/train.py``.

        Its input size is the checkpoint's unless ``input_size`` is given; ``calibration.json`` beside
        the checkpoint, when present, calibrates the confidence (``calibration=None`` ignores it).
        """
        from actr_core.training.checkpoint import load_model_from_checkpoint

        model, info = load_model_from_checkpoint(path)
        if "calibration" not in kwargs and (Path(path).parent / CALIBRATION_FILE).is_file():
            kwargs["calibration"] = ConfidenceCalibration.load(Path(path).parent / CALIBRATION_FILE)
        size = kwargs.pop("input_size", None) or info.get("input_size", (256, 256))
        return cls(model, size, **kwargs)

    @classmethod
    def from_released(cls, path: str | os.PathLike, **kwargs: Any) -> "Matcher":
        """Load a checkpoint of the released ACTR code (``model_best.pth``); 256×256 input only."""
        from actr_core.models import load_official_actr

        if kwargs.pop("input_size", None) not in (None, (256, 256)):
            raise ValueError("the released ACTR checkpoints take 256×256 input only")
        return cls(load_official_actr(path), (256, 256), **kwargs)

    @classmethod
    def from_pretrained(cls, name: str, **kwargs: Any) -> "Matcher":
        """A released ACTR checkpoint by name (``"actr-spair"``, ``"actr-pfpascal"``), downloaded
        into the cache once and checked (:func:`actr_core.hub.load_pretrained`, docs/hub.md)."""
        from actr_core.hub import load_pretrained

        return load_pretrained(name, **kwargs)

    def _reads(self, feature: str) -> bool:
        """Whether the confidence reads ``feature`` (a calibration with it)."""
        return self.calibration is not None and feature in self.calibration.features

    def _forward(self, src: Tensor, trg: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Flows of the pairs forward and backward (``(2b, 2, h, w)``), in one call with the
        mirrored pairs when the confidence reads ``flip``; and what else the confidence reads, as
        :func:`~actr_core.calibration.match_measures` takes it (``mirrored``, ``spread``, ``flatness``)."""
        dtype = PRECISIONS[self.precision]
        srcs, trgs = [src, trg], [trg, src]
        if self._reads("flip"):
            srcs, trgs = srcs + [src.flip(-1)], trgs + [trg.flip(-1)]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            output = self.model(torch.cat(srcs), torch.cat(trgs))
        flows, b = output.flow.float().cpu(), len(src)
        maps = {"mirrored": flows[2 * b :]} if self._reads("flip") else {}
        if self._reads("spread"):
            if getattr(output, "correlations", None) is None:
                raise ValueError("this calibration reads the correlation's spread, but the model returns no correlations")
            maps["spread"] = correlation_spread(output.correlations[:b]).cpu()
        if self._reads("flatness"):
            maps["flatness"] = image_flatness(src.cpu())
        return flows[: 2 * b], maps

    @torch.no_grad()
    def __call__(
        self,
        src_image: ImageLike | Sequence[ImageLike],
        trg_image: ImageLike | Sequence[ImageLike],
        src_keypoints: Tensor | np.ndarray | Sequence | None = None,
    ) -> MatchResult | list[MatchResult]:
        """Match one pair, or two equal-length lists of images (then ``src_keypoints`` is a list too).

        ``src_keypoints`` are (x, y) in pixels of the original source image, ``(n, 2)``; points
        outside the image or not finite raise :class:`ValueError`.
        """
        batched = isinstance(src_image, (list, tuple))
        srcs = list(cast(Sequence[ImageLike], src_image)) if batched else [cast(ImageLike, src_image)]
        trgs = list(cast(Sequence[ImageLike], trg_image)) if batched else [cast(ImageLike, trg_image)]
        if len(srcs) != len(trgs):
            raise ValueError(f"got {len(srcs)} source images but {len(trgs)} target images")
        kps_list = list(src_keypoints) if (batched and src_keypoints is not None) else [src_keypoints] * len(srcs)
        if len(kps_list) != len(srcs):
            raise ValueError(f"got {len(kps_list)} keypoint sets for {len(srcs)} pairs")
        read_src = [_read(im, self.input_size) for im in srcs]
        read_trg = [_read(im, self.input_size) for im in trgs]
        queries = [None if k is None else _check_keypoints(k, r[1]) for k, r in zip(kps_list, read_src, strict=True)]
        src = normalise_image(torch.stack([r[0] for r in read_src])).to(self.device)
        trg = normalise_image(torch.stack([r[0] for r in read_trg])).to(self.device)
        flows, maps = self._forward(src, trg)
        b = len(srcs)
        results = [
            self._result(flows[i], flows[b + i], {k: m[i] for k, m in maps.items()}, read_src[i][1], read_trg[i][1], queries[i])
            for i in range(b)
        ]
        return results if batched else results[0]

    def _confidence(
        self, flow_st: Tensor, flow_ts: Tensor, maps: dict[str, Tensor], points: Tensor, src_size: tuple[int, int]
    ) -> tuple[Tensor, ...]:
        """Confidence, cycle error in source pixels and relative, at ``points`` (grid cells, ``(1, n, 2)``)."""
        grid = (int(flow_st.shape[-2]), int(flow_st.shape[-1]))
        displacement = cycle_displacement(flow_st[None], flow_ts[None], points)
        pixels, relative = displacement_error(displacement, grid, src_size)
        if self.calibration is None:
            return torch.exp(-(displacement.norm(dim=-1) / self.sigma).square()), pixels, relative
        measures = match_measures(flow_st[None], flow_ts[None], points, src_size, **{k: v[None] for k, v in maps.items()})
        return self.calibration(**measures), pixels, relative

    def _result(
        self, flow_st: Tensor, flow_ts: Tensor, maps: dict[str, Tensor], src_size, trg_size, kps: Tensor | None
    ) -> MatchResult:
        grid = (int(flow_st.shape[-2]), int(flow_st.shape[-1]))
        cells = coords_grid(*grid).flatten(1).T[None]
        confidence_grid = self._confidence(flow_st, flow_ts, maps, cells, src_size)[0]
        common: dict[str, Any] = dict(
            calibrated=self.calibration is not None,
            calibration_alpha=None if self.calibration is None else self.calibration.alpha,
            src_size=tuple(src_size),
            trg_size=tuple(trg_size),
            flow_grid=flow_st,
            confidence_grid=confidence_grid.reshape(grid),
        )
        if kps is None:
            return MatchResult(None, None, None, None, **common)
        on_grid = rescale_keypoints(kps[None], src_size, grid)
        moved = rescale_keypoints(transfer_keypoints(flow_st[None], on_grid), grid, trg_size)[0]
        confidence, pixels, relative = self._confidence(flow_st, flow_ts, maps, on_grid, src_size)
        return MatchResult(moved, confidence[0], pixels[0], relative[0], **common)
