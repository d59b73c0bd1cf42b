"""Scoring protocols: where the error is measured, which threshold, how keypoints are transferred.

Axis legend: b batch (pairs) · n keypoints · 2 (x, y), channel 0 = x · h w flow grid ·
H W model input frame · 4 box (x1, y1, x2, y2).

Two protocols ship (``docs/evaluation.md`` sets them side by side):

- ``standard`` (the default): the target side defines the threshold (target box for SPair,
  target image for PF-PASCAL, box around the valid target keypoints for PF-WILLOW); errors are
  measured in original target-image pixels; the model transfers the source keypoints with its own
  sub-pixel (bilinear) rule. ``standard-input`` is the same measured in the model's input frame.
- ``released``: a compatibility mode reproducing how the released ACTR code (and CATs, whose data
  code it reuses) scored, so that published numbers can be reproduced and the difference seen:
  thresholds from the **source** side (source box for SPair, even though the error lives in the
  target; the 512-px source image for PF-PASCAL; the source keypoints' extent for PF-WILLOW,
  inflated by the −1 padding of a 40-row keypoint tensor), all in a 512 × 512 frame reached by
  ``x · 512 / W`` (no half-pixel shift); query keypoints truncated to integers (``.long()``),
  clamped to the frame, and the flow (bilinearly resized to 512) read there (nearest lookup);
  every annotated keypoint is scored, also one outside the image in this library's pixel-centre
  convention (a 1-based coordinate x = W or y = H, on the far border), as the released evaluator
  scores all ``n_pts`` keypoints of a pair.

Which keypoints are scored (``ScoringProtocol.keypoints``): ``"in_frame"`` (standard) scores the
keypoints inside both images, pixel-centre convention (``-0.5 <= x <= W - 0.5``, the batch's
``valid_kps``): a keypoint inside the image is never dropped, one beyond its edge is; the
pseudo-flow targets of training use the same rule. ``"annotated"`` (released) scores every
annotated keypoint (the batch's ``annotated_kps``).

This module scores; it never selects models. Model selection belongs to the validation split.
"""

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from actr_core.batch import PairBatch
from actr_core.flow import check_size, rescale_keypoints, resize_flow
from actr_core.metrics.thresholds import THRESHOLD_KINDS, bbox_threshold, bkp_threshold, img_threshold, rescale_boxes

__all__ = [
    "DATASET_THRESHOLDS",
    "PROTOCOLS",
    "RELEASED",
    "STANDARD",
    "STANDARD_INPUT",
    "ScoringProtocol",
    "corner_rescale",
    "frame_description",
    "get_protocol",
    "ground_truth_keypoints",
    "keypoints_in_frame",
    "nearest_transfer",
    "padded_bkp_threshold",
    "pair_thresholds",
    "predict_keypoints",
    "scored_keypoints",
    "threshold_kind",
]

SIDES = ("target", "source")
FRAMES = ("original", "input", "fixed")
SCALINGS = ("pixel_centre", "corner")
LOOKUPS = ("transfer", "nearest")
ROUNDINGS = ("none", "truncate", "round")
KEYPOINT_SETS = ("in_frame", "annotated")

# Threshold kind per benchmark (paper Sec. 4.1 "Evaluation Metric"): α_bbox for SPair-71k,
# α_img for PF-PASCAL, α_bkp for PF-WILLOW. Names are compared lower-case, letters and digits only.
DATASET_THRESHOLDS: Mapping[str, str] = {
    "spair": "bbox",
    "spair71k": "bbox",
    "pfpascal": "img",
    "pfwillow": "bkp",
}


@dataclass(frozen=True)
class ScoringProtocol:
    """How PCK is scored. Every field is written into the results' attributes."""

    name: str
    # "auto": per pair from its dataset name (DATASET_THRESHOLDS, else ``default_threshold``); or one of bbox/img/bkp.
    threshold: str = "auto"
    # Used by "auto" for datasets not in DATASET_THRESHOLDS (e.g. synthetic pairs with object boxes).
    default_threshold: str = "bbox"
    # Whose box / image / keypoints give d. Standard (DHPF, paper Sec. 4.1): target. Released ACTR: source
    # (data/dataset.py, inherited from CATs, which predicts in the source image).
    threshold_side: str = "target"
    # Where errors are measured: original image pixels; the model "input" frame; a "fixed" frame (released: 512).
    frame: str = "original"
    # Size (h, w) of the "fixed" frame; released ACTR: imside = 512 (data/dataset.py).
    frame_size: tuple[int, int] | None = None
    # How original-pixel keypoints and boxes enter a fixed frame: pixel-centre convention, or the released x·S/W.
    keypoint_scaling: str = "pixel_centre"
    # "transfer": the model's own rule (model.transfer, bilinear sub-pixel); "nearest": flow resized to the
    # frame and read at integer query positions (released utils.flow2kps).
    lookup: str = "transfer"
    # Integer queries for "nearest": released ACTR truncates (.long()); "round" is the true nearest pixel.
    query_rounding: str = "none"
    # bkp only: a padding value that takes part in the extent (released: -1, data/pfwillow.py) and the
    # padded row count (released: max_pts = 40, data/dataset.py); None = padding ignored (standard).
    bkp_padding_value: float | None = None
    bkp_padded_length: int | None = None
    # Which keypoints are scored: "in_frame" (inside both images, pixel-centre convention; standard) or
    # "annotated" (every annotated keypoint; released: Evaluator.eval_kps_transfer scores all n_pts).
    keypoints: str = "in_frame"

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("threshold", self.threshold, ("auto", *THRESHOLD_KINDS)),
            ("default_threshold", self.default_threshold, THRESHOLD_KINDS),
            ("threshold_side", self.threshold_side, SIDES),
            ("frame", self.frame, FRAMES),
            ("keypoint_scaling", self.keypoint_scaling, SCALINGS),
            ("lookup", self.lookup, LOOKUPS),
            ("query_rounding", self.query_rounding, ROUNDINGS),
            ("keypoints", self.keypoints, KEYPOINT_SETS),
        ):
            if value not in allowed:
                raise ValueError(f"{field}={value!r} is not one of {allowed}")
        if self.frame == "fixed":
            if self.frame_size is None:
                raise ValueError("frame='fixed' needs frame_size=(height, width)")
            check_size(self.frame_size, "frame_size")
        elif self.frame_size is not None:
            raise ValueError(f"frame_size={self.frame_size} is only meaningful with frame='fixed', not {self.frame!r}")
        if self.lookup == "nearest" and self.frame == "original":
            raise ValueError("lookup='nearest' needs one frame shared by source and target: frame='input' or 'fixed'")
        if (self.lookup == "nearest") != (self.query_rounding != "none"):
            raise ValueError(
                f"query_rounding={self.query_rounding!r} does not fit lookup={self.lookup!r}: "
                "'nearest' needs 'truncate' or 'round', 'transfer' needs 'none'"
            )
        if (self.bkp_padding_value is None) != (self.bkp_padded_length is None):
            raise ValueError("bkp_padding_value and bkp_padded_length go together (both set or both None)")

    def describe(self, input_size: Sequence[int] | None = None) -> dict[str, str]:
        """Plain-text description (netCDF-safe attribute values) of every choice this protocol makes."""
        attrs = {f"protocol_{k}": str(v) for k, v in dataclasses.asdict(self).items()}
        attrs["protocol"] = self.name
        attrs["threshold_image"] = self.threshold_side
        attrs["coordinate_frame"] = frame_description(self, input_size)
        attrs["comparison"] = "correct when distance <= alpha * d (boundary counts)"
        attrs["transfer"] = (
            "model.transfer (model's own sub-pixel rule)"
            if self.lookup == "transfer"
            else f"flow bilinearly resized to the frame, read at integer queries ({self.query_rounding})"
        )
        return attrs


STANDARD = ScoringProtocol(name="standard")
STANDARD_INPUT = ScoringProtocol(name="standard-input", frame="input")
RELEASED = ScoringProtocol(
    name="released",
    threshold_side="source",
    frame="fixed",
    frame_size=(512, 512),
    keypoint_scaling="corner",
    lookup="nearest",
    query_rounding="truncate",
    bkp_padding_value=-1.0,
    bkp_padded_length=40,
    keypoints="annotated",
)
PROTOCOLS: Mapping[str, ScoringProtocol] = {p.name: p for p in (STANDARD, STANDARD_INPUT, RELEASED)}


def get_protocol(name: str | ScoringProtocol) -> ScoringProtocol:
    """A protocol by name (``standard``, ``standard-input``, ``released``), or the protocol itself."""
    if isinstance(name, ScoringProtocol):
        return name
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def frame_description(protocol: ScoringProtocol, input_size: Sequence[int] | None = None) -> str:
    """Words for the frame where errors (and thresholds) are measured."""
    if protocol.frame == "original":
        return "original image pixels"
    if protocol.frame == "fixed" and protocol.frame_size is not None:  # fixed frames always have one
        h, w = protocol.frame_size
        return f"fixed {h}x{w} frame ({protocol.keypoint_scaling} scaling from original pixels)"
    if input_size is None:
        return "model input frame"
    return f"model input frame {input_size[0]}x{input_size[1]}"


def threshold_kind(protocol: ScoringProtocol, dataset: str | None) -> str:
    """The threshold kind (bbox / img / bkp) the protocol uses for a pair from ``dataset``."""
    if protocol.threshold != "auto":
        return protocol.threshold
    key = re.sub(r"[^a-z0-9]", "", (dataset or "").lower())
    return DATASET_THRESHOLDS.get(key, protocol.default_threshold)


def corner_rescale(
    kps: Float[Tensor, "*batch n 2"], from_size: Sequence[int], to_size: Sequence[int]
) -> Float[Tensor, "*batch n 2"]:
    """The released code's scaling ``x · W'/W`` (no half-pixel shift); sizes are (h, w).

    Convention:
        Not this library's convention (that is :func:`actr_core.flow.rescale_keypoints`); kept only
        to reproduce the released scoring, where it decides which integer a query truncates to.
    """
    if kps.ndim < 2 or kps.shape[-1] != 2:
        raise ValueError(f"kps must have shape (..., n, 2), got {tuple(kps.shape)}")
    (h, w), (h2, w2) = check_size(from_size, "from_size"), check_size(to_size, "to_size")
    scale = torch.tensor([w2 / w, h2 / h], dtype=kps.dtype, device=kps.device)
    return kps * scale


def padded_bkp_threshold(
    kps: Float[Tensor, "b n 2"], valid: Bool[Tensor, "b n"], pad_value: float, padded_length: int
) -> Float[Tensor, " b"]:
    """The released PF-WILLOW threshold: keypoint extent over a tensor padded to ``padded_length`` rows.

    The released code pads keypoints with ``pad_value`` (−1) to ``padded_length`` (40) rows and
    takes ``max − min`` over all rows, pads included. With n_valid < padded_length the point
    (pad_value, pad_value) joins the box, so for keypoints at non-negative coordinates the
    threshold becomes ``max(max x, max y) + 1`` rather than the keypoints' extent.
    """
    if kps.ndim != 3 or kps.shape[-1] != 2 or tuple(valid.shape) != tuple(kps.shape[:2]):
        raise ValueError(f"kps (b, n, 2) and valid (b, n) do not fit: {tuple(kps.shape)}, {tuple(valid.shape)}")
    if padded_length < kps.shape[1]:
        raise ValueError(f"padded_length={padded_length} is smaller than the keypoint count {kps.shape[1]}")
    mask = valid.unsqueeze(-1)
    has_pad = (valid.sum(dim=1) < padded_length).view(-1, 1)
    pad = torch.full_like(kps[:, 0], pad_value)
    upper = torch.where(mask, kps, torch.full_like(kps, float("-inf"))).amax(dim=1)
    lower = torch.where(mask, kps, torch.full_like(kps, float("inf"))).amin(dim=1)
    upper = torch.where(has_pad, torch.maximum(upper, pad), upper)
    lower = torch.where(has_pad, torch.minimum(lower, pad), lower)
    side = (upper - lower).amax(dim=1)
    return torch.where(valid.any(dim=1), side, torch.full_like(side, float("nan")))


def nearest_transfer(
    flow: Float[Tensor, "b 2 h w"],
    kps: Float[Tensor, "b n 2"],
    valid: Bool[Tensor, "b n"],
    size: Sequence[int],
    rounding: str = "truncate",
) -> Float[Tensor, "b n 2"]:
    """Released-style transfer: resize the flow to ``size``, read it at integer queries, add.

    ``kps`` are in pixels of the ``size`` frame. Queries are truncated (``.long()``) or rounded,
    then clamped into the frame; the prediction is ``query + flow[query]``, so truncation moves
    the prediction too. Invalid keypoints come out NaN.
    """
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must have shape (b, 2, h, w), got {tuple(flow.shape)}")
    if kps.ndim != 3 or kps.shape[-1] != 2 or kps.shape[0] != flow.shape[0]:
        raise ValueError(f"kps must have shape (b, n, 2) with b = {flow.shape[0]}, got {tuple(kps.shape)}")
    if rounding not in ("truncate", "round"):
        raise ValueError(f"rounding must be 'truncate' or 'round', got {rounding!r}")
    h, w = check_size(size)
    dense = resize_flow(flow, (h, w))
    mask = valid.unsqueeze(-1)
    safe = torch.where(mask, kps, torch.zeros_like(kps))
    query = torch.trunc(safe) if rounding == "truncate" else torch.round(safe)
    limit = torch.tensor([w - 1, h - 1], dtype=query.dtype, device=query.device)
    query = torch.minimum(query.clamp(min=0), limit)
    index = (query[..., 1] * w + query[..., 0]).long()  # b n, row-major
    values = torch.gather(dense.flatten(2), 2, index.unsqueeze(1).expand(-1, 2, -1)).transpose(1, 2)
    pred = query + values
    return torch.where(mask, pred, torch.full_like(pred, float("nan")))


# ---------------------------------------------------------------------------------------------
# Batch-level helpers (PairBatch of actr_core.batch; sizes are (height, width)).


class _Side(NamedTuple):
    """One side (source or target) of a batch."""

    kps: Tensor  # (b, n, 2) input-frame pixels
    kps_orig: Tensor  # (b, n, 2) original pixels
    sizes: list[tuple[int, int]]  # original (height, width) per pair
    bbox: Tensor  # (b, 4) original pixels


def _side(batch: PairBatch, side: str) -> _Side:
    """The ``side`` ("source"/"target") fields of a batch."""
    if side == "target":
        return _Side(batch.trg_kps, batch.trg_kps_orig, _sizes(batch.trg_size), batch.trg_bbox)
    return _Side(batch.src_kps, batch.src_kps_orig, _sizes(batch.src_size), batch.src_bbox)


def _sizes(sizes: Tensor) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in sizes.tolist()]


def _per_pair(fn, values: Tensor, from_sizes: list[tuple[int, int]], to_sizes: list[tuple[int, int]]) -> Tensor:
    return torch.stack([fn(values[i], from_sizes[i], to_sizes[i]) for i in range(values.shape[0])])


def _frame_sizes(protocol: ScoringProtocol, batch: PairBatch, side: str) -> list[tuple[int, int]]:
    if protocol.frame == "original":
        return _side(batch, side).sizes
    size = protocol.frame_size if protocol.frame == "fixed" and protocol.frame_size is not None else batch.input_size
    return [(int(size[0]), int(size[1]))] * len(batch)


def _original_to_frame(protocol: ScoringProtocol) -> Any:
    return corner_rescale if protocol.keypoint_scaling == "corner" else rescale_keypoints


def keypoints_in_frame(protocol: ScoringProtocol, batch: PairBatch, side: str) -> Float[Tensor, "b n 2"]:
    """The ``side`` ("source"/"target") keypoints of a batch in the protocol's measurement frame."""
    fields = _side(batch, side)
    if protocol.frame == "input":
        return fields.kps
    if protocol.frame == "original":
        return fields.kps_orig
    return _per_pair(_original_to_frame(protocol), fields.kps_orig, fields.sizes, _frame_sizes(protocol, batch, side))


def scored_keypoints(protocol: ScoringProtocol, batch: PairBatch) -> Bool[Tensor, "b n"]:
    """The keypoint rows the protocol scores: ``valid_kps`` ("in_frame") or ``annotated_kps`` ("annotated")."""
    return batch.annotated_kps if protocol.keypoints == "annotated" else batch.valid_kps


def ground_truth_keypoints(protocol: ScoringProtocol, batch: PairBatch) -> Float[Tensor, "b n 2"]:
    """Ground-truth target keypoints in the measurement frame."""
    return keypoints_in_frame(protocol, batch, "target")


class _TransfersKeypoints(Protocol):
    """A matcher's (or reference predictor's) ``transfer``: source keypoints → target keypoints, input-frame pixels."""

    def transfer(self, output: Any, src_kps: Tensor, valid: Tensor | None = None) -> Tensor: ...


def predict_keypoints(protocol: ScoringProtocol, model: nn.Module, output: Any, batch: PairBatch) -> Float[Tensor, "b n 2"]:
    """Predicted target keypoints in the measurement frame (NaN for invalid keypoints).

    ``model`` is a Matcher (``actr_core.models``): ``model.transfer(output, src_kps, valid)`` gives
    target keypoints in input-frame pixels; ``output.flow`` is read by the ``nearest`` lookup.
    """
    valid = scored_keypoints(protocol, batch)
    if protocol.lookup == "nearest":
        size = protocol.frame_size if protocol.frame == "fixed" and protocol.frame_size is not None else batch.input_size
        query = keypoints_in_frame(protocol, batch, "source")
        return nearest_transfer(output.flow, query, valid, size, protocol.query_rounding)
    pred = cast(_TransfersKeypoints, model).transfer(output, batch.src_kps, valid)  # pixels of the input frame
    if protocol.frame == "input":
        return pred
    to_sizes = _frame_sizes(protocol, batch, "target")
    return _per_pair(rescale_keypoints, pred, [batch.input_size] * pred.shape[0], to_sizes)


def pair_thresholds(protocol: ScoringProtocol, batch: PairBatch) -> tuple[Float[Tensor, " b"], list[str]]:
    """Threshold ``d`` per pair in the measurement frame, and the kind used for each pair."""
    fields = _side(batch, protocol.threshold_side)
    b, dtype = len(batch), fields.kps.dtype
    kinds = [threshold_kind(protocol, name) for name in batch.dataset]
    to_sizes = _frame_sizes(protocol, batch, protocol.threshold_side)
    candidates: dict[str, Tensor] = {}
    if "bbox" in kinds:
        box = fields.bbox
        if protocol.frame == "input":
            box = _per_pair(_rescale_box, box, fields.sizes, to_sizes)
        elif protocol.frame == "fixed":
            scale = _original_to_frame(protocol)
            box = _per_pair(scale, box.reshape(b, 2, 2), fields.sizes, to_sizes).reshape(b, 4)
        candidates["bbox"] = bbox_threshold(box)
    if "img" in kinds:
        candidates["img"] = img_threshold(torch.tensor(to_sizes, device=fields.kps.device), dtype)
    if "bkp" in kinds:
        kps = keypoints_in_frame(protocol, batch, protocol.threshold_side)
        scored = scored_keypoints(protocol, batch)
        if protocol.bkp_padding_value is None or protocol.bkp_padded_length is None:  # both set or both None
            candidates["bkp"] = bkp_threshold(kps, scored)
        else:
            candidates["bkp"] = padded_bkp_threshold(kps, scored, protocol.bkp_padding_value, protocol.bkp_padded_length)
    rows = [candidates[kind][i] for i, kind in enumerate(kinds)]
    return torch.stack(rows).to(dtype), kinds


def _rescale_box(box: Float[Tensor, " 4"], from_size: Sequence[int], to_size: Sequence[int]) -> Float[Tensor, " 4"]:
    """One box (x1, y1, x2, y2) between frames (pixel-centre convention)."""
    return rescale_boxes(box.unsqueeze(0), from_size, to_size)[0]
