"""Synthetic pairs from the photos bundled in scikit-image: the embedded default data set.

Axis legend: H W image frame rows, columns · h w flow grid (H/4 × W/4) · n keypoints ·
2 (x, y), channel 0 = x · k thin-plate-spline control points.

A pair is made of one photo. The **source** is a random crop of the photo (side log-uniform in
``crop_scale`` of the photo's shorter side, so one photo gives views at many scales), resized to
the frame; the **target** shows the same photo seen through a random warp ``W`` that maps each
target pixel to a source-frame position: a thin-plate spline ``T``, then a homography
``P = S⁻¹ · C``, ``W = P ∘ T``. ``C`` moves each frame corner at random (``homography``); ``S`` is
the similarity taking the source to the target: a rotation about the frame centre (``rotation``),
a zoom (``scale``, log-uniform) and a shift (``translation``). Strengths and distributions are in
:class:`SyntheticConfig`; they mix, so that no single factor makes the pair hard on its own. Target
pixels whose source position falls outside the crop still show real photo content (outside the
crop; mirrored at the photo's border), so the images have no black borders. Each image then gets
an independent photometric jitter (brightness, contrast, saturation). There are no occluders: every
valid cell's target pixel shows its source content (pinned by a test).

Ground truth (exact, not interpolated):

- ``flow`` on the ``H/4 × W/4`` source grid: for each source cell centre p, the target position
  ``q = W⁻¹(p)`` found by Newton's method on the analytic map and Jacobian (residual below
  ``newton_tol`` pixels), minus p, in pixels of that grid (``docs/conventions.md``);
- ``valid_flow``: cells whose match lies inside the target frame (and whose Newton solve
  converged);
- keypoints: ``n_kps`` source points drawn uniformly in the valid region with their exact matches;
- object boxes: ``trg_bbox`` is the box (inclusive pixel-centre extremes) of the target pixels that
  show content of the source frame (``W(q)`` inside the source frame); ``src_bbox`` is the box of
  the source pixels whose match stays inside the target frame (the region bounded by the image of
  the target's border under ``W``). Both boxes bound the region where correspondences exist, so a
  bbox-normalised PCK is defined.

Rendering the target evaluates ``W`` (in float32) on a lattice every ``render_stride`` pixels and
bilinearly in between. The similarity is affine, so interpolation adds no error for it; the error
comes from the curvature of the spline and of the perspective, magnified by a zoom-out: with the
default warps the rendered position departs from ``W`` by at most 0.015 px at 256 px (0.045 px at
64 × 96), measured over hundreds of draws and pinned by a test. That is within the precision of
the stored ground truth itself (float16 flow rounds large displacements by up to 0.06 px at 256 px)
and far below the images' own interpolation blur, so ``render_stride`` stays 2 (stride 1 would cost
4× the evaluations for 0.005 px). The flow, keypoints and source box use ``W`` itself.

Warps fold nowhere inside the frame: a draw where the Jacobian determinant of ``W``, divided by
that of its similarity (``1 / zoom²``), falls below ``min_det`` somewhere in the frame (or whose
valid region is too small) is redrawn; with the defaults no draw is rejected. Everything is
deterministic per ``(seed, split, index)``, independent of order and process.

Photos (only those inside the scikit-image wheel; none needs a download; grayscale ones become
RGB): see :data:`DEFAULT_SPLIT_PHOTOS`: test uses rocket, coffee, camera and coins; validation uses
chelsea and text; train uses the rest (natural photos, documents and textures), with both halves
of the motorcycle stereo pair kept together.
"""

import dataclasses
import functools
import zlib
from collections.abc import Mapping
from typing import Literal, overload

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from matplotlib.path import Path
from PIL import Image

from actr_core.data.errors import DataError
from actr_core.data.readers import PairReader
from actr_core.data.records import PairRecord
from actr_core.data.schema import FLOW_STRIDE

__all__ = [
    "PHOTOS",
    "PHOTO_CATEGORY",
    "DEFAULT_SPLIT_PHOTOS",
    "SyntheticConfig",
    "SyntheticPairs",
    "generate_pair",
    "load_photo",
]


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(skimage.data, name)()


# Photos shipped inside the scikit-image wheel (loaded offline, no pooch download); grayscale ones
# become RGB by repeating their channel. Left out as degenerate for matching: clock and cell (blurred,
# nearly uniform), colorwheel and logo (graphics), cat (the same photo as chelsea), checkerboard,
# horse, binary_blobs, lfw thumbnails, microaneurysms, shepp_logan.
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
    "motorcycle_left",
    "motorcycle_right",
)
# The category of a synthetic pair is its photo, except the stereo halves, which share one.
PHOTO_CATEGORY: Mapping[str, str] = {
    **{name: name for name in PHOTOS},
    "motorcycle_left": "motorcycle",
    "motorcycle_right": "motorcycle",
}
DEFAULT_SPLIT_PHOTOS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "train",
        (
            "astronaut",
            "hubble_deep_field",
            "immunohistochemistry",
            "retina",
            "motorcycle_left",
            "motorcycle_right",
            "moon",
            "page",
            "brick",
            "grass",
            "gravel",
        ),
    ),
    ("val", ("chelsea", "text")),
    ("test", ("rocket", "coffee", "camera", "coins")),
)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """How synthetic pairs are drawn. Lengths in normalised frame units run from -1 to 1 across the frame.

    The geometric factors mix: alone, each leaves the "no motion" predictor at 46–75 % PCK@0.1;
    together they bring it to about 25 % (``docs/data.md``). Zero rotation and translation, ``scale=(1, 1)``,
    ``homography=0.2``, ``tps=0.06``, ``jitter=0.15``, ``crop_scale=(0.6, 1.0)`` give the strengths of the
    earlier mild set (identity PCK@0.1 about 91 %).
    """

    size: tuple[int, int] = (256, 256)  # frame (H, W) of both images: the paper's 256 px model input (Sec. 4.1)
    flow_stride: int = FLOW_STRIDE  # flow grid = frame / stride, the models' output grid (Sec. 3.4)
    n_kps: int = 20  # keypoints per pair; SPair-71k pairs have up to ~20 mutually visible ones
    rotation: float = 30.0  # max |angle| in degrees about the frame centre, uniform in ±rotation (chosen: SPair-like views)
    scale: tuple[float, float] = (0.7, 1.4)  # target zoom relative to the source (> 1: larger), log-uniform (chosen)
    translation: float = 0.25  # max shift per axis, normalised units, uniform in ±translation (chosen: ±32 px at 256)
    homography: float = 0.25  # max displacement of each frame corner, normalised units, uniform (chosen)
    tps: float = 0.1  # max displacement of each spline control point, normalised units, uniform (chosen)
    tps_grid: int = 3  # spline control points per side (3 × 3 grid over the frame; chosen)
    photo_scale: float = 1.5  # photos are resized to a shorter side of photo_scale × max(H, W) (chosen)
    crop_scale: tuple[float, float] = (0.35, 1.0)  # source crop side / resized photo's shorter side, log-uniform (chosen)
    jitter: float = 0.2  # brightness, contrast, saturation factors drawn in 1 ± jitter, uniform (chosen)
    min_det: float = 0.25  # least Jacobian determinant of W relative to its similarity's, in the frame: no folds (chosen)
    min_valid: float = 0.3  # least fraction of source cells whose match stays in view (chosen)
    fold_check_points: int = 17  # points per side of the grid on which the determinant is checked
    border_points: int = 64  # points per frame edge tracing the valid region's outline
    kp_candidates: int = 8  # candidate source points drawn per wanted keypoint
    max_attempts: int = 32  # warps drawn before a pair is reported as impossible (defaults: none is rejected)
    newton_steps: int = 30  # Newton iterations inverting W
    newton_tol: float = 1e-4  # Newton residual, in frame pixels
    render_stride: int = 2  # rendering evaluates W exactly every render_stride px, bilinear between (see module doc)
    splits: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_SPLIT_PHOTOS  # split -> photos (held out)

    def __post_init__(self):
        h, w = self.size
        for stride in (self.flow_stride, self.render_stride):
            if h % stride or w % stride or h <= 0 or w <= 0:
                raise ValueError(f"size {self.size} must be positive multiples of {stride} (flow and render strides)")
        if self.n_kps < 1:
            raise ValueError(f"n_kps must be >= 1, got {self.n_kps}")
        if not 0 <= self.rotation < 180:
            raise ValueError(f"rotation must be in [0, 180) degrees, got {self.rotation}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale {self.scale} must satisfy 0 < low <= high")
        if self.translation < 0:
            raise ValueError(f"translation must be >= 0, got {self.translation}")
        if not 0 <= self.homography < 1:
            raise ValueError(f"homography must be in [0, 1) (corner shift, normalised units), got {self.homography}")
        if self.tps < 0:
            raise ValueError(f"tps must be >= 0, got {self.tps}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale {self.crop_scale} must satisfy 0 < low <= high <= 1")
        if self.tps_grid < 2:
            raise ValueError(f"tps_grid must be >= 2, got {self.tps_grid}")
        if self.min_det <= 0:
            raise ValueError(f"min_det must be > 0 (folds have determinant <= 0), got {self.min_det}")
        if not 0 < self.min_valid <= 1:
            raise ValueError(f"min_valid must be in (0, 1], got {self.min_valid}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        seen: dict[str, str] = {}
        for split, photos in self.splits:
            for photo in photos:
                if photo not in PHOTOS:
                    raise ValueError(f"unknown photo {photo!r} in split {split!r}; known: {PHOTOS}")
                category = PHOTO_CATEGORY[photo]
                if seen.setdefault(category, split) != split:
                    raise ValueError(
                        f"photo group {category!r} appears in splits {seen[category]!r} and {split!r}; "
                        "a photo (and both halves of the stereo pair) must stay on one side of a split"
                    )

    def photos(self, split: str) -> tuple[str, ...]:
        """The photos of ``split``."""
        for name, photos in self.splits:
            if name == split:
                return photos
        raise ValueError(f"no photos configured for split {split!r}")


@functools.lru_cache(maxsize=2 * len(PHOTOS))
def load_photo(name: str, short_side: int) -> Float[torch.Tensor, "3 Hp Wp"]:
    """Bundled photo ``name`` resized (Lanczos) to a shorter side of ``short_side``, RGB in [0, 1]
    (a grayscale photo repeats its channel)."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; known: {PHOTOS}")
    array = _skimage_photo(name)
    rgb = np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array[..., :3]
    image = Image.fromarray(np.ascontiguousarray(rgb))
    scale = short_side / min(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    resized = np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------
# The warp W = P ∘ T: target-normalised coordinates -> source-normalised coordinates.


_TINY = 1e-300  # floor under r² before the logarithm (float64)
_TINY32 = 1e-30  # the same for float32
_SINGULAR = 1e-12  # |det J| below which a Newton step is skipped
_FAR = 1e3  # normalised coordinates beyond which a Newton iterate is clipped (1000 frames away)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma weights


def _radial(r2: np.ndarray) -> np.ndarray:
    """Thin-plate kernel U = r² log r² (0 at r = 0)."""
    return r2 * np.log(np.maximum(r2, _TINY))


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3×3 homography taking 4 points ``src`` to ``dst`` (direct linear transform, h33 = 1)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    h = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def _similarity(angle: float, zoom: float, shift: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The 3×3 map of normalised coordinates that rotates by ``angle`` (radians) and zooms by ``zoom``
    about the frame centre (isotropically in pixels, whatever the aspect), then shifts by ``shift``
    (normalised units per axis)."""
    half = np.array([size[1], size[0]], dtype=np.float64) / 2.0  # normalised unit -> pixels, per axis
    c, s = np.cos(angle), np.sin(angle)
    linear = zoom * np.array([[c, -s], [s, c]]) * half[None, :] / half[:, None]  # D^-1 (zoom R) D
    out = np.eye(3)
    out[:2, :2], out[:2, 2] = linear, shift
    return out


@dataclasses.dataclass(frozen=True)
class _Warp:
    """Thin-plate spline (control points ``ctrl``, kernel weights ``w``, affine part ``a``) then homography ``hom``.

    ``hom`` = S⁻¹ · C: the corner-shift homography C, then the inverse of the similarity S that takes
    the source to the target (rotation, zoom, shift). ``area`` is S⁻¹'s determinant (1 / zoom²).
    """

    ctrl: np.ndarray  # (k, 2)
    w: np.ndarray  # (k, 2)
    a: np.ndarray  # (3, 2): rows = constant, x, y
    hom: np.ndarray  # (3, 3)
    area: float = 1.0  # determinant of the similarity part of W: the fold check divides by it

    @classmethod
    def draw(cls, rng: np.random.Generator, cfg: SyntheticConfig) -> "_Warp":
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
        moved = corners + rng.uniform(-cfg.homography, cfg.homography, size=corners.shape)
        axis = np.linspace(-1.0, 1.0, cfg.tps_grid)
        gx, gy = np.meshgrid(axis, axis, indexing="xy")
        ctrl = np.stack([gx.ravel(), gy.ravel()], axis=1)
        shifted = ctrl + rng.uniform(-cfg.tps, cfg.tps, size=ctrl.shape)
        angle = np.deg2rad(rng.uniform(-cfg.rotation, cfg.rotation))
        zoom = float(np.exp(rng.uniform(np.log(cfg.scale[0]), np.log(cfg.scale[1]))))
        shift = rng.uniform(-cfg.translation, cfg.translation, size=2)
        k = len(ctrl)
        kernel = _radial(((ctrl[:, None] - ctrl[None]) ** 2).sum(-1))
        affine = np.concatenate([np.ones((k, 1)), ctrl], axis=1)
        system = np.zeros((k + 3, k + 3))
        system[:k, :k] = kernel
        system[:k, k:] = affine
        system[k:, :k] = affine.T
        rhs = np.concatenate([shifted, np.zeros((3, 2))])
        coef = np.linalg.solve(system, rhs)
        similarity = _similarity(angle, zoom, shift, cfg.size)
        hom = np.linalg.solve(similarity, _homography(corners, moved))  # S^-1 C
        return cls(ctrl=ctrl, w=coef[:k], a=coef[k:], hom=hom / hom[2, 2], area=zoom**-2)

    def astype(self, dtype: type) -> "_Warp":
        """The same warp with parameters in ``dtype`` (float32 for rendering: 1e-5 px precision)."""
        return _Warp(
            ctrl=np.asarray(self.ctrl, dtype=dtype),
            w=np.asarray(self.w, dtype=dtype),
            a=np.asarray(self.a, dtype=dtype),
            hom=np.asarray(self.hom, dtype=dtype),
            area=self.area,
        )

    @overload
    def __call__(self, u: np.ndarray, jacobian: Literal[False] = ...) -> tuple[np.ndarray, np.ndarray, None]: ...

    @overload
    def __call__(self, u: np.ndarray, jacobian: Literal[True]) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    @overload
    def __call__(self, u: np.ndarray, jacobian: bool = ...) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...

    def __call__(self, u: np.ndarray, jacobian: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """W(u) for points ``u`` (N, 2); returns (W(u), homography denominator, Jacobian (N, 2, 2) or None)."""
        dx = u[:, 0:1] - self.ctrl[None, :, 0]  # N k
        dy = u[:, 1:2] - self.ctrl[None, :, 1]
        r2 = dx * dx + dy * dy
        log_r2 = np.log(np.maximum(r2, _TINY if r2.dtype == np.float64 else _TINY32))  # r2 log r2 -> 0 as r -> 0
        t = self.a[0] + u @ self.a[1:] + (r2 * log_r2) @ self.w  # N 2
        s = t @ self.hom[:, :2].T + self.hom[:, 2]  # N 3
        out = s[:, :2] / s[:, 2:3]
        if not jacobian:
            return out, s[:, 2], None
        grad = 2.0 * (log_r2 + 1.0)  # d(r2 log r2)/d(dx) = grad * dx
        gx, gy = (grad * dx) @ self.w, (grad * dy) @ self.w  # N 2 (dT_i/du_x, dT_i/du_y)
        jt = np.stack([self.a[1] + gx, self.a[2] + gy], axis=-1)  # N 2 2: [i, j] = dT_i/du_j
        jp = (self.hom[None, :2, :2] - out[:, :, None] * self.hom[None, 2:3, :2]) / s[:, 2, None, None]
        return out, s[:, 2], jp @ jt

    def inverse(self, p: np.ndarray, steps: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
        """Solve W(q) = p by Newton's method from the homography's inverse; returns (q, converged)."""
        h = np.linalg.inv(self.hom)
        s = p @ h[:, :2].T + h[:, 2]
        q = s[:, :2] / s[:, 2:3]
        active = np.arange(len(p))
        error = np.full(len(p), np.inf)
        denom = np.ones(len(p))
        for _ in range(steps + 1):
            value, denom_active, jac = self(q[active], jacobian=True)
            residual = value - p[active]
            error[active] = np.abs(residual).max(axis=1)
            denom[active] = denom_active
            moving = error[active] >= tol / 4  # iterate a little past the tolerance
            active, residual, jac = active[moving], residual[moving], jac[moving]
            if not len(active):
                break
            det = jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0]
            ok = np.abs(det) > _SINGULAR
            safe_det = np.where(ok, det, 1.0)
            step_x = (jac[:, 1, 1] * residual[:, 0] - jac[:, 0, 1] * residual[:, 1]) / safe_det
            step_y = (-jac[:, 1, 0] * residual[:, 0] + jac[:, 0, 0] * residual[:, 1]) / safe_det
            step = np.where(ok[:, None], np.stack([step_x, step_y], axis=1), 0.0)
            q[active] = np.clip(q[active] - step, -_FAR, _FAR)  # diverging points stay finite and fail below
        converged = (error < tol) & (denom > 0) & np.isfinite(q).all(axis=1)
        return q, converged


def _normalise(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixel (x, y) -> normalised (2x + 1)/W - 1 (pixel-centre convention)."""
    wh = np.array([size[1], size[0]], dtype=np.float64)
    return (2.0 * x + 1.0) / wh - 1.0


def _unnormalise(u: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    wh = np.array([size[1], size[0]], dtype=np.float64)
    return ((u + 1.0) * wh - 1.0) / 2.0


def _grid_points(size: tuple[int, int]) -> np.ndarray:
    """Pixel centres of an (h, w) grid as (h·w, 2) (x, y), row-major."""
    ys, xs = np.meshgrid(np.arange(size[0], dtype=np.float64), np.arange(size[1], dtype=np.float64), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


@functools.lru_cache(maxsize=8)
def _normalised_grid(size: tuple[int, int]) -> np.ndarray:
    """Normalised pixel centres of a frame (read-only, shared between pairs)."""
    out = _normalise(_grid_points(size), size)
    out.flags.writeable = False
    return out


def _mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Inclusive pixel-centre box (x1, y1, x2, y2) of a mask, None when it has no positive area."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) < 2 or len(cols) < 2:
        return None
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)


def _dense_map(warp: _Warp, size: tuple[int, int], stride: int) -> np.ndarray:
    """W at every pixel centre of a frame (H·W, 2), normalised: exact on a lattice every ``stride``
    pixels (from edge to edge), bilinear in between (align_corners=True on that lattice)."""
    h, w = size
    lattice_y, lattice_x = np.linspace(-1.0, 1.0, h // stride + 1), np.linspace(-1.0, 1.0, w // stride + 1)
    gx, gy = np.meshgrid(lattice_x, lattice_y, indexing="xy")
    values, _, _ = warp.astype(np.float32)(np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32))
    coarse = torch.from_numpy(np.ascontiguousarray(values.T.reshape(1, 2, len(lattice_y), len(lattice_x))))
    points = torch.from_numpy(_normalised_grid(size).astype(np.float32)).view(1, h, w, 2)
    dense = F.grid_sample(coarse, points, mode="bilinear", align_corners=True)
    return dense[0].reshape(2, -1).T.numpy()


def _render(photo: torch.Tensor, photo_coords: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Sample ``photo`` (3, Hp, Wp) bilinearly at photo-normalised coordinates (H·W, 2); mirror outside."""
    grid = torch.from_numpy(photo_coords.astype(np.float32)).view(1, size[0], size[1], 2)
    out = F.grid_sample(photo[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out[0]


def _jitter(image: torch.Tensor, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation factors in 1 ± strength; returns (H, W, 3) uint8.

    out = bright · (contrast · (sat · x + (1 − sat) · luma(x) − m) + m), m the mean luma: one 3×3
    colour matrix and an offset.
    """
    bright, contrast, saturation = (float(f) for f in rng.uniform(1.0 - strength, 1.0 + strength, size=3))
    rgb = image.numpy().transpose(1, 2, 0)  # H W 3, float32 in [0, 1]
    mean = float((rgb.reshape(-1, 3) @ _LUMA).mean())
    matrix = bright * contrast * (saturation * np.eye(3) + (1.0 - saturation) * np.outer(np.ones(3), _LUMA))
    offset = bright * (1.0 - contrast) * mean
    out = rgb @ (matrix.T * 255.0).astype(np.float32) + np.float32(offset * 255.0)
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _clipped_box(outline: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    """Inclusive pixel-centre box of the frame's pixels inside the closed ``outline`` (frame pixels).

    The extremes of (polygon ∩ frame) lie among the outline's vertices inside the frame, the
    crossings of its edges with the frame's border lines, and the frame corners inside it.
    """
    h, w = size
    lo, hi = np.array([-0.5, -0.5]), np.array([w - 0.5, h - 0.5])
    inside = outline[((outline >= lo) & (outline <= hi)).all(axis=1)]
    start, end = outline, np.roll(outline, -1, axis=0)
    crossings = [inside]
    for axis in (0, 1):
        for line in (lo[axis], hi[axis]):
            delta = end[:, axis] - start[:, axis]
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (line - start[:, axis]) / delta
            hit = (delta != 0) & (t >= 0) & (t <= 1)
            points = start[hit] + t[hit, None] * (end[hit] - start[hit])
            other = 1 - axis
            crossings.append(points[(points[:, other] >= lo[other]) & (points[:, other] <= hi[other])])
    corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
    crossings.append(corners[Path(outline).contains_points(corners)])
    points = np.concatenate(crossings)
    if not len(points):
        return None
    first = np.clip(np.ceil(points.min(axis=0)), 0, [w - 1, h - 1])
    last = np.clip(np.floor(points.max(axis=0)), 0, [w - 1, h - 1])
    if not (last > first).all():
        return None
    return np.array([first[0], first[1], last[0], last[1]], dtype=np.float64)


def _frame_border(size: tuple[int, int], per_edge: int) -> np.ndarray:
    """Points along the outer edge of a frame, normalised coordinates, counter-clockwise."""
    t = np.linspace(-1.0, 1.0, per_edge, endpoint=False)
    ones = np.ones_like(t)
    return np.concatenate([np.stack([t, -ones], 1), np.stack([ones, t], 1), np.stack([-t, ones], 1), np.stack([-ones, -t], 1)])


def _seed(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


def generate_pair(cfg: SyntheticConfig, split: str, index: int, seed: int = 0) -> PairRecord:
    """Synthetic pair ``index`` of ``split`` (deterministic in ``(seed, split, index)``)."""
    rng = _seed(seed, split, index)
    photos = cfg.photos(split)
    name = photos[int(rng.integers(len(photos)))]
    h, w = cfg.size
    photo = load_photo(name, round(cfg.photo_scale * max(h, w)))
    hp, wp = photo.shape[-2:]
    grid = (h // cfg.flow_stride, w // cfg.flow_stride)
    tol = cfg.newton_tol * 2.0 / max(h, w)
    frame_points = _normalised_grid(cfg.size)
    cells = _normalised_grid(grid)  # cell centres, normalised (same frame)
    checks = np.linspace(-1.0, 1.0, cfg.fold_check_points)
    check_points = np.stack(np.meshgrid(checks, checks, indexing="xy"), -1).reshape(-1, 2)
    where = f"synthetic {split} pair {index} (photo {name})"

    for _ in range(cfg.max_attempts):
        # Source crop: side c (width) of the photo, log-uniform, aspect of the frame, uniformly placed.
        crop = np.exp(rng.uniform(np.log(cfg.crop_scale[0]), np.log(cfg.crop_scale[1])))
        cw = crop * min(hp, wp * h / w) * w / h
        ch = cw * h / w
        x0, y0 = rng.uniform(0.0, wp - cw), rng.uniform(0.0, hp - ch)
        warp = _Warp.draw(rng, cfg)

        def to_photo(u: np.ndarray, cw: float = cw, ch: float = ch, x0: float = x0, y0: float = y0) -> np.ndarray:
            return np.stack([(2 * x0 + (u[:, 0] + 1) * cw) / wp - 1, (2 * y0 + (u[:, 1] + 1) * ch) / hp - 1], 1)

        _, denom, jac = warp(check_points, jacobian=True)
        det = jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0]
        if not ((denom > 0).all() and (det > cfg.min_det * warp.area).all()):
            continue
        # Exact flow on the source grid: q = W^-1(p), both normalised to the same frame.
        q, ok = warp.inverse(cells, cfg.newton_steps, tol)
        valid = ok & (np.abs(q) <= 1.0).all(axis=1)
        if valid.mean() < cfg.min_valid:
            continue
        # Keypoints: uniform source points whose match stays inside the target's pixel centres.
        lo, hi = np.zeros(2), np.array([w - 1.0, h - 1.0])
        cand = rng.uniform(lo, hi, size=(cfg.n_kps * cfg.kp_candidates, 2))
        kq, kok = warp.inverse(_normalise(cand, cfg.size), cfg.newton_steps, tol)
        trg_cand = _unnormalise(kq, cfg.size)
        keep = kok & (trg_cand >= lo).all(axis=1) & (trg_cand <= hi).all(axis=1)
        if keep.sum() < cfg.n_kps:
            continue
        chosen = np.flatnonzero(keep)[: cfg.n_kps]
        # Boxes of the regions where correspondences exist.
        source_pos = _dense_map(warp, cfg.size, cfg.render_stride)
        trg_box = _mask_box((np.abs(source_pos) <= 1.0).all(axis=1).reshape(h, w))
        outline, _, _ = warp(_frame_border(cfg.size, cfg.border_points))
        src_box = _clipped_box(_unnormalise(outline, cfg.size), cfg.size)
        if trg_box is None or src_box is None:
            continue
        break
    else:
        raise DataError(where, f"no acceptable warp in {cfg.max_attempts} attempts (min_valid {cfg.min_valid})")

    src_view = _render(photo, to_photo(frame_points), cfg.size)
    trg_view = _render(photo, to_photo(source_pos), cfg.size)
    flow = (_unnormalise(q, grid) - _unnormalise(cells, grid)) * valid[:, None]
    return PairRecord(
        pair_id=f"synthetic-{split}-{index:06d}",
        dataset="synthetic",
        split=split,
        category=PHOTO_CATEGORY[name],
        src_image=_jitter(src_view, rng, cfg.jitter),
        trg_image=_jitter(trg_view, rng, cfg.jitter),
        src_kps=cand[chosen],
        trg_kps=trg_cand[chosen],
        src_bbox=src_box,
        trg_bbox=trg_box,
        flow=np.ascontiguousarray(flow.T.reshape(2, *grid).astype(np.float32)),
        valid_flow=valid.reshape(grid),
    )


class SyntheticPairs(PairReader):
    """``n_pairs`` synthetic pairs of ``split`` as a reader (see the module docstring)."""

    dataset = "synthetic"

    def __init__(
        self,
        split: str,
        n_pairs: int,
        *,
        config: SyntheticConfig = SyntheticConfig(),
        seed: int = 0,
        on_error: str = "raise",
    ):
        super().__init__(split, on_error=on_error)
        if n_pairs < 0:
            raise ValueError(f"n_pairs must be >= 0, got {n_pairs}")
        config.photos(split)
        self.n_pairs = n_pairs
        self.config = config
        self.seed = seed

    def __len__(self) -> int:
        return self.n_pairs

    def load(self, index: int) -> PairRecord:
        return generate_pair(self.config, self.split, self._check_index(index), self.seed)
