"""Reference predictors scored beside every model: identity (zero motion) and a classical geometric peer.

Axis legend: b batch (pairs) · H W input frame · h w flow grid (H/4, W/4) · n keypoints ·
2 (x, y), channel 0 = x · 3 3 homography.

A PCK figure means little on its own: on pairs related by a small motion, predicting "no motion"
already scores high. Every evaluation (:func:`actr_core.metrics.evaluate`, training validation)
therefore scores two references on the same pairs, under the same protocol, as the model:

- ``identity``: zero flow; each source keypoint is predicted at the same pixel position of the
  input frame, and the scoring protocol rescales it into the measurement frame exactly as it
  rescales a model's prediction.
- ``classical_peer``: a classical *geometric* peer, not a semantic method: ORB features, matched
  with a cross-check and a ratio test, and one RANSAC homography per pair (scikit-image); the
  homography moves the keypoints. When no homography can be fitted the pair falls back to
  identity, and the fall-back is counted (``fallback`` in the results). Its fixed settings are
  :class:`PeerSettings` (see docs/evaluation.md for the measurements behind them).

Both follow the matcher contract of :mod:`actr_core.models.base` structurally, so that the
scoring code (:func:`actr_core.metrics.score_batch`, the ``released`` protocol's nearest-flow
lookup, the figures) treats them like any model: ``forward(src, trg)`` returns an output with
``flow`` ``(b, 2, H/4, W/4)`` (source grid, pointing into the target, in pixels of that grid), and
``transfer(output, src_kps, valid)`` returns target keypoints in input-frame pixels. They have no
``loss`` (nothing to train) and no parameters. This module does not import
:mod:`actr_core.models` (which pulls in the backbones) and imports scikit-image only when the peer
runs.
"""

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from jaxtyping import Bool, Float
from torch import Tensor, nn

from actr_core.flow import FLOW_STRIDE, check_size, coords_grid, rescale_keypoints
from actr_core.imaging import denormalise_image

__all__ = [
    "CLASSICAL_PEER",
    "IDENTITY",
    "REFERENCE_LABELS",
    "REFERENCE_NAMES",
    "ClassicalPeer",
    "HomographyFit",
    "IdentityPredictor",
    "PeerSettings",
    "ReferenceOutput",
    "apply_homography",
    "best_constant_flow",
    "fit_homography",
    "homography_flow",
    "reference_predictor",
]

IDENTITY = "identity"
CLASSICAL_PEER = "classical_peer"
REFERENCE_NAMES: tuple[str, ...] = (IDENTITY, CLASSICAL_PEER)
# How tables, figures and logs name the predictors.
REFERENCE_LABELS: Mapping[str, str] = {
    "model": "model",
    IDENTITY: "identity",
    CLASSICAL_PEER: "classical peer",
}
LUMA = (0.2125, 0.7154, 0.0721)  # RGB → grey weights (ITU-R BT.709, as skimage.color.rgb2gray)
FITTED, TOO_FEW_MATCHES, NO_CONSENSUS = "fitted", "too_few_matches", "no_consensus"


@dataclasses.dataclass(frozen=True)
class ReferenceOutput:
    """What a reference predictor returns: the fields of ``MatchOutput`` it has, plus its homography.

    Attributes:
        flow: ``(b, 2, h, w)`` on the H/4 source grid, in pixels of that grid, pointing into the
            target: the flow the homography induces at each cell centre (zero for identity).
        homography: ``(b, 3, 3)`` source → target in input-frame pixels (pixel centres at
            integers), float64; the identity matrix where the predictor fell back to identity.
        fallback: ``(b,)`` True where the predictor fell back to identity (the peer found too few
            matches or no consensus).
        status: per pair ``"fitted"``, ``"too_few_matches"`` or ``"no_consensus"`` (identity: ``"fitted"``).
    """

    flow: Float[Tensor, "b 2 h w"]
    homography: Float[Tensor, "b 3 3"]
    fallback: Bool[Tensor, " b"]
    status: tuple[str, ...]


def apply_homography(homography: Float[Tensor, "b 3 3"], kps: Float[Tensor, "b n 2"]) -> Float[Tensor, "b n 2"]:
    """Map (x, y) points through per-pair homographies, in float64, returned in ``kps``' dtype.

    A point mapped to infinity (third coordinate 0) comes out non-finite, and so counts as wrong.
    """
    if homography.ndim != 3 or tuple(homography.shape[1:]) != (3, 3):
        raise ValueError(f"homography must have shape (b, 3, 3), got {tuple(homography.shape)}")
    if kps.ndim != 3 or kps.shape[-1] != 2 or kps.shape[0] != homography.shape[0]:
        raise ValueError(f"kps must have shape (b, n, 2) with b = {homography.shape[0]}, got {tuple(kps.shape)}")
    points = kps.to(torch.float64)
    points = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)  # b n 3
    mapped = points @ homography.to(device=kps.device, dtype=torch.float64).transpose(1, 2)
    return (mapped[..., :2] / mapped[..., 2:]).to(kps.dtype)


def homography_flow(
    homography: Float[Tensor, "b 3 3"], frame: Sequence[int], stride: int = FLOW_STRIDE
) -> Float[Tensor, "b 2 h w"]:
    """The flow a homography (input-frame pixels) induces on the ``frame / stride`` grid, in grid pixels.

    Convention:
        Each grid cell centre is taken into the input frame with the pixel-centre convention
        (:func:`actr_core.flow.rescale_keypoints`), mapped, brought back to the grid, and the
        cell's own position subtracted; so ``transfer_keypoints`` on this flow agrees with
        :func:`apply_homography` at the cell centres.
    """
    height, width = check_size(frame, "frame")
    if height % stride or width % stride:
        raise ValueError(f"frame {height}x{width} is not a multiple of the flow stride {stride}")
    grid = (height // stride, width // stride)
    b = homography.shape[0]
    cells = coords_grid(*grid, dtype=torch.float64, device=homography.device)
    cells = repeat(cells, "c h w -> b (h w) c", b=b)
    moved = rescale_keypoints(apply_homography(homography, rescale_keypoints(cells, grid, frame)), frame, grid)
    return rearrange(moved - cells, "b (h w) c -> b c h w", h=grid[0]).to(torch.float32)


def _identity_homographies(b: int, device: torch.device) -> Tensor:
    return torch.eye(3, dtype=torch.float64, device=device).expand(b, 3, 3).clone()


class IdentityPredictor(nn.Module):
    """Zero motion: every source keypoint is predicted at its own input-frame position.

    The scoring protocol then carries the prediction into the measurement frame exactly as it
    carries a model's (e.g. pixel-centre rescaling from the input frame to the target image's
    original size, or the released protocol's nearest lookup of the zero flow).
    """

    flow_stride: int = FLOW_STRIDE

    def __init__(self) -> None:
        super().__init__()

    def forward(self, src: Float[Tensor, "b 3 H W"], trg: Float[Tensor, "b 3 H W"]) -> ReferenceOutput:
        """Zero flow on the H/4 grid; identity homographies; no fall-back."""
        b, _, height, width = src.shape
        flow = torch.zeros(b, 2, height // self.flow_stride, width // self.flow_stride, device=src.device)
        none = torch.zeros(b, dtype=torch.bool, device=src.device)
        return ReferenceOutput(flow, _identity_homographies(b, src.device), none, (FITTED,) * b)

    def transfer(
        self, output: ReferenceOutput, src_kps: Float[Tensor, "b n 2"], valid: Bool[Tensor, "b n"] | None = None
    ) -> Float[Tensor, "b n 2"]:
        """``src_kps`` themselves (input-frame pixels); NaN where ``valid`` is False."""
        if valid is None:
            return src_kps.clone()
        return torch.where(valid.unsqueeze(-1), src_kps, torch.full_like(src_kps, float("nan")))


@dataclasses.dataclass(frozen=True)
class PeerSettings:
    """The classical peer's fixed settings (measured choices: docs/evaluation.md, "Reference predictors")."""

    # Longer side (px) of the frame features are computed in: both images are resized (bilinear,
    # antialiased, aspect kept) from the model's input frame to it, up or down. On the 200
    # synthetic test pairs of the main job it beat working in the input frame itself: PCK@0.1
    # 91.0 vs 87.7 at 128 px input, 92.2 vs 92.0 at 256 px input, in 0.6-1.4x the time and at a
    # cost that does not grow with the input size; docs/evaluation.md.
    working_side: int = 192
    # ORB (Rublee et al. 2011; skimage.feature.ORB): keypoints kept per image, pyramid levels and
    # step, FAST arc length and threshold, Harris k. SIFT scored lower at 2x the time or more.
    n_keypoints: int = 500
    n_scales: int = 4
    downscale: float = 1.2
    fast_n: int = 9
    fast_threshold: float = 0.03  # skimage default 0.08 finds too few corners in 128-256 px images
    harris_k: float = 0.04
    # skimage.feature.match_descriptors (Hamming distance): mutual nearest neighbours only, and
    # the best match must be closer than max_ratio times the second best (Lowe's ratio test).
    cross_check: bool = True
    max_ratio: float = 0.8
    # skimage.measure.ransac with skimage.transform.ProjectiveTransform: 4 correspondences per
    # hypothesis, inliers within residual_threshold px of the working frame, at most max_trials
    # hypotheses (fewer once stop_probability is reached), random sampling seeded with `seed` for
    # every pair (results do not depend on batching or order).
    min_samples: int = 4
    residual_threshold: float = 2.0
    max_trials: int = 1000
    stop_probability: float = 0.999
    seed: int = 0
    # Fall-backs to identity: fewer than min_matches matches ("too_few_matches"); no model, fewer
    # than min_inliers inliers, or a homography sending a frame corner to or behind infinity
    # ("no_consensus").
    min_matches: int = 4
    min_inliers: int = 8

    def __post_init__(self) -> None:
        if self.working_side < 32:
            raise ValueError(f"working_side must be >= 32 px, got {self.working_side}")
        if self.min_samples < 4 or self.min_matches < self.min_samples or self.min_inliers < self.min_samples:
            raise ValueError(
                f"need min_samples >= 4 and min_matches, min_inliers >= min_samples; got min_samples="
                f"{self.min_samples}, min_matches={self.min_matches}, min_inliers={self.min_inliers}"
            )
        if not 0 < self.max_ratio <= 1 or not self.residual_threshold > 0 or self.max_trials < 1:
            raise ValueError(
                f"need 0 < max_ratio <= 1, residual_threshold > 0, max_trials >= 1; got {self.max_ratio}, "
                f"{self.residual_threshold}, {self.max_trials}"
            )

    def describe(self) -> str:
        """One line naming every setting (written into the results' attributes)."""
        return (
            f"ORB (n_keypoints={self.n_keypoints}, n_scales={self.n_scales}, downscale={self.downscale:g}, "
            f"fast_n={self.fast_n}, fast_threshold={self.fast_threshold:g}, harris_k={self.harris_k:g}) on grey "
            f"images resized to {self.working_side} px (longer side); Hamming matching, cross_check="
            f"{self.cross_check}, max_ratio={self.max_ratio:g}; RANSAC ProjectiveTransform, min_samples="
            f"{self.min_samples}, residual_threshold={self.residual_threshold:g} px, max_trials={self.max_trials}, "
            f"stop_probability={self.stop_probability:g}, seed={self.seed}; identity when fewer than "
            f"{self.min_matches} matches or {self.min_inliers} inliers"
        )


@dataclasses.dataclass(frozen=True)
class HomographyFit:
    """One pair's fit: ``homography`` (3, 3) source → target in the images' pixels, or None, and why."""

    homography: np.ndarray | None
    status: str
    n_matches: int
    n_inliers: int


def _orb_features(image: np.ndarray, settings: PeerSettings) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) keypoints and binary descriptors; empty when the image has no corner."""
    from skimage.feature import ORB

    orb = ORB(
        downscale=settings.downscale,
        n_scales=settings.n_scales,
        n_keypoints=settings.n_keypoints,
        fast_n=settings.fast_n,
        fast_threshold=settings.fast_threshold,
        harris_k=settings.harris_k,
    )
    try:
        orb.detect_and_extract(image)
    except (RuntimeError, IndexError, ValueError):  # no (or too few) corners in a flat image
        return np.zeros((0, 2)), np.zeros((0, 256), dtype=bool)
    return orb.keypoints[:, ::-1].astype(np.float64), orb.descriptors


def _keeps_frame(homography: np.ndarray, shape: tuple[int, int]) -> bool:
    """True when the frame's corners map to finite points in front of the camera (w > 0)."""
    height, width = shape
    corners = np.array([[0, 0, 1], [width - 1, 0, 1], [0, height - 1, 1], [width - 1, height - 1, 1]], dtype=float)
    w = corners @ homography[2]
    return bool(np.all(np.isfinite(homography)) and np.all(w > 1e-8 * np.abs(homography[2, 2])))


def fit_homography(
    src: Float[np.ndarray, "H W"], trg: Float[np.ndarray, "H W"], settings: PeerSettings = PeerSettings()
) -> HomographyFit:
    """ORB + matching + RANSAC homography between two grey images of one size (values in [0, 1]).

    The homography maps source pixel positions (x, y) to target ones, in these images' pixels.
    Deterministic: the RANSAC sampler is seeded with ``settings.seed`` on every call.
    """
    from skimage.feature import match_descriptors
    from skimage.measure import ransac
    from skimage.transform import ProjectiveTransform

    if src.shape != trg.shape:
        raise ValueError(f"src {src.shape} and trg {trg.shape} must have the same size")
    src_xy, src_desc = _orb_features(src, settings)
    trg_xy, trg_desc = _orb_features(trg, settings)
    if min(len(src_xy), len(trg_xy)) < settings.min_matches:
        return HomographyFit(None, TOO_FEW_MATCHES, 0, 0)
    matches = match_descriptors(
        src_desc, trg_desc, metric="hamming", cross_check=settings.cross_check, max_ratio=settings.max_ratio
    )
    if len(matches) < settings.min_matches:
        return HomographyFit(None, TOO_FEW_MATCHES, len(matches), 0)
    with warnings.catch_warnings():  # degenerate samples warn; they are simply rejected
        warnings.simplefilter("ignore")
        model, inliers = ransac(
            (src_xy[matches[:, 0]], trg_xy[matches[:, 1]]),
            ProjectiveTransform,
            min_samples=settings.min_samples,
            residual_threshold=settings.residual_threshold,
            is_model_valid=lambda m, *_: _keeps_frame(m.params, src.shape),
            max_trials=settings.max_trials,
            stop_probability=settings.stop_probability,
            rng=np.random.default_rng(settings.seed),
        )
    n_inliers = 0 if inliers is None else int(inliers.sum())
    if model is None or n_inliers < settings.min_inliers or not _keeps_frame(model.params, src.shape):
        return HomographyFit(None, NO_CONSENSUS, len(matches), n_inliers)
    return HomographyFit(np.asarray(model.params, dtype=np.float64), FITTED, len(matches), n_inliers)


def _grey(images: Tensor, size: tuple[int, int]) -> np.ndarray:
    """ImageNet-normalised (b, 3, H, W) → grey float64 (b, h', w') in [0, 1] at ``size``."""
    rgb = denormalise_image(images.detach().to("cpu", torch.float32)).clamp(0.0, 1.0)
    luma = torch.tensor(LUMA, dtype=rgb.dtype).view(1, 3, 1, 1)
    grey = (rgb * luma).sum(dim=1, keepdim=True)
    if tuple(grey.shape[-2:]) != size:
        grey = F.interpolate(grey, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)
    return grey[:, 0].numpy().astype(np.float64)


def _working_size(frame: tuple[int, int], side: int) -> tuple[int, int]:
    scale = side / max(frame)
    return max(1, round(frame[0] * scale)), max(1, round(frame[1] * scale))


def _between_frames(homography: np.ndarray, frame: tuple[int, int], working: tuple[int, int]) -> np.ndarray:
    """A working-frame homography expressed in input-frame pixels (pixel-centre convention both ways)."""
    sx, sy = working[1] / frame[1], working[0] / frame[0]
    to_working = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    out = np.linalg.inv(to_working) @ homography @ to_working
    return out / out[2, 2]


class ClassicalPeer(nn.Module):
    """The classical geometric peer: ORB + RANSAC homography per pair (scikit-image), on the CPU.

    Not a semantic method: one homography per pair cannot follow parts that move differently, and
    a pair without enough repeatable texture falls back to identity (counted in ``fallback``).
    Settings: :class:`PeerSettings` (fixed; see its fields). ``forward`` returns the homography
    in input-frame pixels and its flow on the H/4 grid; ``transfer`` applies the homography to
    the keypoints exactly (not through the flow). The fits run with one BLAS thread: RANSAC's
    matrices are tiny, and BLAS threads only added overhead (200 pairs at 128 px took 30 s of CPU
    and 44 s of wall time with the default threads on a shared 2-core machine, 16 s and 25 s with one).
    """

    flow_stride: int = FLOW_STRIDE

    def __init__(self, settings: PeerSettings = PeerSettings()) -> None:
        super().__init__()
        self.settings = settings

    def forward(self, src: Float[Tensor, "b 3 H W"], trg: Float[Tensor, "b 3 H W"]) -> ReferenceOutput:
        """Fit one homography per pair (ImageNet-normalised images of one size)."""
        from threadpoolctl import threadpool_limits

        if src.shape != trg.shape:
            raise ValueError(f"src {tuple(src.shape)} and trg {tuple(trg.shape)} must have the same shape")
        frame = (int(src.shape[-2]), int(src.shape[-1]))
        working = _working_size(frame, self.settings.working_side)
        src_grey, trg_grey = _grey(src, working), _grey(trg, working)
        homographies, status = [], []
        with threadpool_limits(limits=1, user_api="blas"):  # RANSAC's 8 x 9 SVDs: BLAS threads only cost
            for s, t in zip(src_grey, trg_grey, strict=True):
                fit = fit_homography(s, t, self.settings)
                status.append(fit.status)
                homographies.append(np.eye(3) if fit.homography is None else _between_frames(fit.homography, frame, working))
        homography = torch.from_numpy(np.stack(homographies)).to(src.device)
        fallback = torch.tensor([s != FITTED for s in status], dtype=torch.bool, device=src.device)
        flow = homography_flow(homography, frame, self.flow_stride).to(src.device)
        return ReferenceOutput(flow, homography, fallback, tuple(status))

    def transfer(
        self, output: ReferenceOutput, src_kps: Float[Tensor, "b n 2"], valid: Bool[Tensor, "b n"] | None = None
    ) -> Float[Tensor, "b n 2"]:
        """Source keypoints (input-frame pixels) mapped by each pair's homography; NaN where not valid."""
        if valid is None:
            valid = torch.ones(src_kps.shape[:2], dtype=torch.bool, device=src_kps.device)
        safe = torch.where(valid.unsqueeze(-1), src_kps, torch.zeros_like(src_kps))
        moved = apply_homography(output.homography, safe)
        return torch.where(valid.unsqueeze(-1), moved, torch.full_like(moved, float("nan")))


def best_constant_flow(
    flow: Float[Tensor, "b 2 h w"], valid: Bool[Tensor, "b h w"], *, iterations: int = 200
) -> Float[Tensor, " 2"]:
    """The one constant flow that minimises the masked end-point error (paper Eq. 4) on these pairs.

    Eq. 4 averages ``‖pred − target‖`` over each sample's valid cells, then over the samples, so its
    best constant is the geometric median of the valid cells' flows with each sample's cells
    weighted ``1/|S|``; found by Weiszfeld's iteration (float64) from the weighted mean. A model
    whose Eq. 4 does not beat this constant's has learnt at most the data set's mean motion.
    Invalid cells are never read. Raises ``ValueError`` when no cell is valid.
    """
    if valid.dtype != torch.bool or flow.ndim != 4 or flow.shape[1] != 2 or valid.shape != (flow.shape[0], *flow.shape[2:]):
        raise ValueError(
            f"flow {tuple(flow.shape)} and valid {tuple(valid.shape)} ({valid.dtype}) must be (b, 2, h, w) and a "
            "boolean (b, h, w)"
        )
    if not valid.any():
        raise ValueError("valid has no valid cell: no constant flow to fit")
    points = flow.permute(0, 2, 3, 1)[valid].to(torch.float64)
    per_sample = 1.0 / valid.sum(dim=(1, 2)).clamp_min(1).to(torch.float64)
    weights = per_sample.view(-1, 1, 1).expand(valid.shape)[valid]
    centre = (weights[:, None] * points).sum(0) / weights.sum()
    for _ in range(iterations):
        w = weights / (points - centre).norm(dim=1).clamp_min(torch.finfo(torch.float64).eps)
        centre = (w[:, None] * points).sum(0) / w.sum()
    return centre.to(flow.dtype)


def reference_predictor(name: str) -> nn.Module:
    """A reference predictor by name: ``"identity"`` or ``"classical_peer"`` (default settings)."""
    if name == IDENTITY:
        return IdentityPredictor()
    if name == CLASSICAL_PEER:
        return ClassicalPeer()
    raise ValueError(f"unknown reference predictor {name!r}; choose from {list(REFERENCE_NAMES)}")
