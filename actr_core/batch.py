"""The typed batch: a batch of image pairs with their ground truth, as models, losses, metrics and
training read it.

Axis legend: b batch · n keypoints (padded) · 2 (x, y), channel 0 = x · H W model input frame ·
h w flow grid (H/4 × W/4) · 4 box (x1, y1, x2, y2).

A batch is a :class:`PairBatch`, a frozen dataclass: its field list is the schema.

================== ======================= ==================================================
field              type / shape            meaning
================== ======================= ==================================================
src_image          Float (b, 3, H, W)      ImageNet-normalised source image, model input frame
                                           (uint8 RGB in channels-last memory when read with
                                           ``images="uint8"``: ``prepare_batch`` normalises it)
trg_image          Float (b, 3, H, W)      ImageNet-normalised target image (same rule)
src_kps, trg_kps   Float (b, n, 2)         keypoints in input-frame pixels; padded rows are 0
valid_kps          Bool (b, n)             which keypoint rows are real and inside both frames
annotated_kps      Bool (b, n)             which keypoint rows are real (annotated in both
                                           images), inside the frames or not
flow               Float (b, 2, h, w)      ground-truth flow on the H/4 source grid, in pixels
                                           of that grid, pointing into the target
valid_flow         Bool (b, h, w)          cells where ``flow`` is defined
src_kps_orig, ...  Float (b, n, 2)         keypoints in original-image pixels (PCK at original
                                           resolution); padded rows are 0
src_size, trg_size Int (b, 2)              original image (height, width)
src_bbox, trg_bbox Float (b, 4)            object boxes (x1, y1, x2, y2), original pixels
category           tuple[str, ...] (b)     object category (photo name for synthetic pairs)
pair_id            tuple[str, ...] (b)     unique within a dataset split; "" for an unnamed pair
dataset            tuple[str, ...] (b)     "spair", "pfpascal", "pfwillow" or "synthetic"
flags              dict[str, Int (b,)]     SPair flags (:data:`SPAIR_FLAGS`: viewpoint_variation,
                                           scale_variation, truncation, occlusion) when every
                                           pair of the batch has them; empty otherwise
================== ======================= ==================================================

Loaders make them (``actr_core.data.collate``); this module needs only torch, so models and
losses annotate with it without loading the data extras. ``actr_core.data`` and
``actr_core.data.schema`` re-export :class:`PairBatch`.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, get_args

import torch
from jaxtyping import Bool, Float, Int, UInt8
from torch import Tensor

from actr_core.flow import FLOW_STRIDE
from actr_core.imaging import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PairBatch", "SPAIR_FLAGS", "normalise_uint8"]

# SPair-71k pair-level difficulty annotations (PairAnnotation JSON), the names of PairBatch.flags.
SPAIR_FLAGS: tuple[str, ...] = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")

# A batch image: normalised float32, or the raw uint8 RGB bytes of images="uint8" batches.
Image = Float[Tensor, "b 3 H W"] | UInt8[Tensor, "b 3 H W"]


def normalise_uint8(images: UInt8[Tensor, "b 3 H W"]) -> Float[Tensor, "b 3 H W"]:
    """uint8 images, any strides -> contiguous ImageNet-normalised float32 on their device:
    (x/255 - mean)/std as x·a - c with a = 1/(255 std), c = mean/std (equal to
    ``actr_core.imaging.normalise_image`` to float rounding)."""
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    scale, shift = 1.0 / (255.0 * std), torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1) / std
    return images.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).sub_(shift)


def _check_tensor(name: str, value: object, annotation: Any, dims: dict[str, int]) -> None:
    """ValueError naming ``name`` unless ``value`` is a tensor of the annotation's dtype and shape,
    its named axes equal to those bound by earlier fields in ``dims`` (bound here when new)."""
    kinds = get_args(annotation) or (annotation,)
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if str(value.dtype).removeprefix("torch.") not in {dtype for kind in kinds for dtype in kind.dtypes}:
        raise ValueError(f"{name} must be {' or '.join(kind.__name__ for kind in kinds)}, got dtype {value.dtype}")
    axes, shape = kinds[0].dim_str.split(), tuple(value.shape)
    fits = len(shape) == len(axes)
    for axis, size in zip(axes, shape, strict=False):
        fits = fits and size == (int(axis) if axis.isdigit() else dims.setdefault(axis, size))
    if not fits:
        expected = ", ".join(str(dims.get(axis, axis)) for axis in axes)
        raise ValueError(f"{name} has shape {shape}, expected ({', '.join(axes)}) = ({expected})")


@dataclasses.dataclass(frozen=True, eq=False)
class PairBatch:
    """A batch of image pairs with their ground truth (the schema: the module docstring's table).

    ``collate`` makes them from shard samples; :meth:`build` from a few fields (the rest filled from
    the input frame). Every construction is validated: tensors of the annotated dtype (keypoints
    and boxes floating point, masks bool, sizes and flags integer), axes consistent across fields
    (b, n, H, W; the flow grid (h, w) = (H/4, W/4)), ``b`` strings per string field, flags named in
    :data:`SPAIR_FLAGS`; otherwise a one-line ``ValueError`` names the field. Change fields with
    ``dataclasses.replace`` (validated again).
    """

    src_image: Image
    trg_image: Image
    src_kps: Float[Tensor, "b n 2"]
    trg_kps: Float[Tensor, "b n 2"]
    valid_kps: Bool[Tensor, "b n"]
    annotated_kps: Bool[Tensor, "b n"]
    flow: Float[Tensor, "b 2 h w"]
    valid_flow: Bool[Tensor, "b h w"]
    src_kps_orig: Float[Tensor, "b n 2"]
    trg_kps_orig: Float[Tensor, "b n 2"]
    src_size: Int[Tensor, "b 2"]
    trg_size: Int[Tensor, "b 2"]
    src_bbox: Float[Tensor, "b 4"]
    trg_bbox: Float[Tensor, "b 4"]
    category: tuple[str, ...]
    pair_id: tuple[str, ...]
    dataset: tuple[str, ...]
    flags: Mapping[str, Int[Tensor, " b"]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        dims: dict[str, int] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "flags":
                for flag, values in value.items():
                    if flag not in SPAIR_FLAGS:
                        raise ValueError(f"flags has {flag!r}; the SPair flags are {SPAIR_FLAGS}")
                    _check_tensor(f"flags[{flag!r}]", values, get_args(field.type)[1], dims)
            elif field.type == tuple[str, ...]:
                if not isinstance(value, tuple) or len(value) != dims["b"] or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{field.name} must be a tuple of b={dims['b']} strings, got {value!r:.80}")
            else:
                _check_tensor(field.name, value, field.type, dims)
        grid = (dims["H"] // FLOW_STRIDE, dims["W"] // FLOW_STRIDE)
        if (dims["h"], dims["w"]) != grid:
            raise ValueError(
                f"flow has the grid {(dims['h'], dims['w'])}, expected (H/{FLOW_STRIDE}, W/{FLOW_STRIDE}) = {grid} "
                f"for images of (H, W) = {(dims['H'], dims['W'])}"
            )

    def __len__(self) -> int:
        return self.src_image.shape[0]

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the model input frame."""
        return int(self.src_image.shape[-2]), int(self.src_image.shape[-1])

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "PairBatch":
        tensors: dict[str, Any] = {
            f.name: fn(v) for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **tensors, flags={flag: fn(v) for flag, v in self.flags.items()})

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> "PairBatch":
        """Every tensor (flags too) moved to ``device``; strings unchanged."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PairBatch":
        """Every tensor in page-locked memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._map(lambda t: t.pin_memory())

    def normalised(self) -> "PairBatch":
        """uint8 images (``images="uint8"`` batches) as contiguous ImageNet-normalised float32 on their
        device; a batch of float images is returned as it is."""
        images: dict[str, Any] = {
            name: normalise_uint8(image)
            for name in ("src_image", "trg_image")
            if (image := getattr(self, name)).dtype == torch.uint8
        }
        return dataclasses.replace(self, **images) if images else self

    @classmethod
    def build(
        cls,
        src_image: Image,
        trg_image: Image,
        src_kps: Float[Tensor, "b n 2"] | None = None,
        trg_kps: Float[Tensor, "b n 2"] | None = None,
        valid_kps: Bool[Tensor, "b n"] | None = None,
        *,
        flow: Float[Tensor, "b 2 h w"] | None = None,
        valid_flow: Bool[Tensor, "b h w"] | None = None,
        **fields: Any,
    ) -> "PairBatch":
        """A validated batch from the input-frame fields, for hand-made data (tests, one's own pairs).

        Any other field may be given by name in ``fields`` (string fields as any sequence); the
        absent ones are filled as if the input frame were the original image:

        - no keypoints (``n = 0``) unless given; ``trg_kps`` zero like ``src_kps``; ``valid_kps`` all
          True; ``annotated_kps`` = ``valid_kps``;
        - ``flow`` zero with ``valid_flow`` all False (no ground truth) when absent; ``valid_flow``
          all True when only ``flow`` is given;
        - ``src_kps_orig``/``trg_kps_orig`` = the input-frame keypoints, ``src_size``/``trg_size``
          = (H, W), ``src_bbox``/``trg_bbox`` = the whole frame (0, 0, W, H);
        - ``category`` "all", ``dataset`` "unknown", ``flags`` none; ``pair_id`` "" (unnamed: such
          pairs are never taken for one another, e.g. by ``ValidationReferences``' cache).
        """
        b, _, height, width = src_image.shape
        device = src_image.device
        src_kps = torch.zeros(b, 0, 2, device=device) if src_kps is None else src_kps
        trg_kps = torch.zeros_like(src_kps) if trg_kps is None else trg_kps
        valid_kps = torch.ones(src_kps.shape[:2], dtype=torch.bool, device=device) if valid_kps is None else valid_kps
        grid = (b, height // FLOW_STRIDE, width // FLOW_STRIDE)
        valid_flow = torch.full(grid, flow is not None, device=device) if valid_flow is None else valid_flow
        flow = torch.zeros(b, 2, *grid[1:], device=device) if flow is None else flow
        size = torch.tensor([[height, width]], device=device).repeat(b, 1)
        box = torch.tensor([[0.0, 0.0, width, height]], device=device).repeat(b, 1)
        filled: dict[str, Any] = {
            "annotated_kps": valid_kps,
            "src_kps_orig": src_kps,
            "trg_kps_orig": trg_kps,
            "src_size": size,
            "trg_size": size,
            "src_bbox": box,
            "trg_bbox": box,
            "category": ["all"] * b,
            "pair_id": [""] * b,
            "dataset": ["unknown"] * b,
            **fields,
        }
        strings: dict[str, Any] = {name: tuple(filled.pop(name)) for name in ("category", "pair_id", "dataset")}
        return cls(src_image, trg_image, src_kps, trg_kps, valid_kps, flow=flow, valid_flow=valid_flow, **filled, **strings)
