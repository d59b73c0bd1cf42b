"""The pair record every reader yields, image loading over fsspec, and the checks on annotations.

Axis legend: H W original image rows, columns · n keypoints · 2 (x, y) · 4 box (x1, y1, x2, y2) ·
h w flow grid.

Convention:
    Keypoints and boxes are in pixels of the original image with pixel centres at integer
    coordinates (``docs/conventions.md``); a box is (x1, y1, x2, y2) with x2 > x1 and y2 > y1.
"""

import dataclasses
import io
import logging
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
from jaxtyping import Bool, Float, UInt8
from PIL import Image

from actr_core.data.errors import DataError

__all__ = [
    "PairRecord",
    "open_root",
    "join",
    "load_image",
    "image_to_rgb",
    "check_keypoints",
    "check_box",
]

logger = logging.getLogger(__name__)

# PIL modes converted to RGB by a plain ``convert("RGB")``; alpha is dropped (not composited).
_PLAIN_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV")
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # 16/32-bit grey: rescaled to 8 bits


@dataclasses.dataclass(frozen=True)
class PairRecord:
    """One annotated image pair as read from a benchmark (or generated), before any resizing.

    ``src_kps``/``trg_kps`` hold only the keypoints annotated in both images (row k of one matches
    row k of the other). ``flow``/``valid_flow`` are set only for synthetic pairs: the exact flow on
    the ``H/4 × W/4`` source grid of the images as given (which are then already at the frame size).
    """

    pair_id: str
    dataset: str
    split: str
    category: str
    src_image: UInt8[np.ndarray, "Hs Ws 3"]
    trg_image: UInt8[np.ndarray, "Ht Wt 3"]
    src_kps: Float[np.ndarray, "n 2"]
    trg_kps: Float[np.ndarray, "n 2"]
    src_bbox: Float[np.ndarray, "4"]
    trg_bbox: Float[np.ndarray, "4"]
    flags: Mapping[str, int] = dataclasses.field(default_factory=dict)
    flow: Float[np.ndarray, "2 h w"] | None = None
    valid_flow: Bool[np.ndarray, "h w"] | None = None
    # Annotation sizes that disagreed with the image file (the file's size is used; counted in manifests).
    size_corrected: tuple[str, ...] = ()

    @property
    def src_size(self) -> tuple[int, int]:
        """Original source image (height, width)."""
        return int(self.src_image.shape[0]), int(self.src_image.shape[1])

    @property
    def trg_size(self) -> tuple[int, int]:
        """Original target image (height, width)."""
        return int(self.trg_image.shape[0]), int(self.trg_image.shape[1])


def open_root(root: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it for a local path or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(str(root), **dict(storage_options or {}))
    return fs, path.rstrip("/") or "/"


def join(*parts: str) -> str:
    """Join path parts with ``/`` (fsspec paths are POSIX-like on every filesystem)."""
    return posixpath.join(*parts)


def image_to_rgb(image: Image.Image, where: str) -> UInt8[np.ndarray, "H W 3"]:
    """Decode a PIL image fully and convert any mode (grey, palette, RGBA, CMYK, 16-bit) to RGB."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # PIL's truncated / corrupt signals
        raise DataError(where, f"cannot decode image: {error}") from error
    mode = image.mode
    if mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        top = float(values.max()) if values.size and values.max() > 0 else 1.0
        grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        array = np.repeat(grey[..., None], 3, axis=-1)
    elif mode in _PLAIN_MODES:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    else:
        raise DataError(where, f"unsupported image mode {mode!r}")
    if mode != "RGB":
        logger.debug("%s: converted image mode %s to RGB", where, mode)
    return np.ascontiguousarray(array)


def load_image(fs: fsspec.AbstractFileSystem, path: str) -> UInt8[np.ndarray, "H W 3"]:
    """Read an image through ``fs`` as RGB ``uint8``; missing or undecodable files raise :class:`DataError`."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as error:
        raise DataError(path, "image file not found") from error
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(path, f"cannot decode image: {error}") from error
    return image_to_rgb(image, path)


def check_keypoints(src_kps: Any, trg_kps: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Both keypoint arrays as float64 ``(n, 2)`` with equal n ≥ 1 and finite values, else :class:`DataError`."""
    src = np.asarray(src_kps, dtype=np.float64)
    trg = np.asarray(trg_kps, dtype=np.float64)
    for name, kps in (("source", src), ("target", trg)):
        if kps.ndim != 2 or kps.shape[1] != 2:
            raise DataError(where, f"{name} keypoints must be (n, 2), got shape {kps.shape}")
    if src.shape[0] != trg.shape[0]:
        raise DataError(where, f"keypoint count mismatch: {src.shape[0]} source vs {trg.shape[0]} target")
    if src.shape[0] == 0:
        raise DataError(where, "no keypoint annotated in both images")
    bad = ~(np.isfinite(src).all(axis=1) & np.isfinite(trg).all(axis=1))
    if bad.any():
        raise DataError(where, f"NaN or inf in keypoint rows {np.flatnonzero(bad).tolist()}")
    return src, trg


def check_box(box: Any, where: str, name: str) -> np.ndarray:
    """A finite (x1, y1, x2, y2) float64 box with positive area, else :class:`DataError`."""
    try:
        out = np.asarray(box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise DataError(where, f"{name} box {box!r} is not four numbers") from error
    if out.shape != (4,) or not np.isfinite(out).all():
        raise DataError(where, f"{name} box must be four finite numbers (x1, y1, x2, y2), got {out.tolist()}")
    if not (out[2] > out[0] and out[3] > out[1]):
        raise DataError(where, f"{name} box {out.tolist()} has zero area (needs x2 > x1 and y2 > y1)")
    return out
