"""Training/evaluation samples: a pair brought to the model's frame with its ground-truth flow.

Axis legend: H W model input frame · h w flow grid (H/4 × W/4) · n keypoints · 2 (x, y),
channel 0 = x · 4 box (x1, y1, x2, y2).

:func:`build_sample` resizes both images of a :class:`~actr_core.data.records.PairRecord` to the
frame (anisotropically, like the released code), rescales keypoints and boxes with the
pixel-centre convention (:func:`actr_core.flow.rescale_keypoints`) and attaches the flow on the
``H/4 × W/4`` grid: the pseudo-flow of :func:`actr_core.flow.keypoints_to_flow` (the paper's 35×35
neighbourhoods at 512 px) for benchmark pairs, or the exact flow of a synthetic pair.
:func:`encode_sample` / :func:`decode_sample` turn a sample into the members of a shard sample
(``actr_core.data.schema.SHARD_MEMBERS``) and back.
"""

import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import simplejpeg
import torch
from jaxtyping import Bool, Float, UInt8
from PIL import Image
from torch import Tensor

from actr_core.data.errors import DataError
from actr_core.data.records import PairRecord
from actr_core.data.schema import FLOW_KINDS, FLOW_STRIDE, IMAGE_FORMATS, SCHEMA_VERSION
from actr_core.flow import check_size, keypoints_to_flow, rescale_keypoints

__all__ = [
    "PairSample",
    "PseudoFlow",
    "build_sample",
    "pseudo_flow",
    "rescale_box",
    "keypoints_in_frame",
    "encode_sample",
    "decode_sample",
    "sample_size",
]

_KPS_DECIMALS = 4  # keypoints are stored to 1e-4 px
_JPEG_MAGIC = b"\xff\xd8"  # start-of-image marker
JPEG_QUALITY = 90  # default JPEG quality of stored images (chosen: visually lossless at 256 px)


@dataclasses.dataclass(frozen=True)
class PseudoFlow:
    """How pseudo-flow is drawn from keypoints (paper Sec. 3.5: 35×35 neighbourhoods at 512 px)."""

    neighbourhood: float = 35.0  # paper Sec. 3.5 / released KeypointToFlow(receptive_field_size=35)
    reference_size: float = 512.0  # the image side at which the neighbourhood is 35 px (released imside)
    stride: int = FLOW_STRIDE  # flow grid = frame / stride (Sec. 3.4)


@dataclasses.dataclass(frozen=True)
class PairSample:
    """One pair in the model's frame, images still ``uint8`` (normalised only when batched).

    ``*_bbox`` are object boxes in original pixels (for PCK); ``*_frame_bbox`` are the same boxes in
    the current frame (a crop moves them). ``valid_kps`` marks keypoint rows inside both frames.
    """

    pair_id: str
    dataset: str
    split: str
    category: str
    src_image: UInt8[Tensor, "3 H W"]
    trg_image: UInt8[Tensor, "3 H W"]
    src_kps: Float[Tensor, "n 2"]
    trg_kps: Float[Tensor, "n 2"]
    valid_kps: Bool[Tensor, " n"]
    src_kps_orig: Float[Tensor, "n 2"]
    trg_kps_orig: Float[Tensor, "n 2"]
    flow: Float[Tensor, "2 h w"]
    valid_flow: Bool[Tensor, "h w"]
    flow_kind: str
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    src_bbox: Float[Tensor, "4"]
    trg_bbox: Float[Tensor, "4"]
    src_frame_bbox: Float[Tensor, "4"]
    trg_frame_bbox: Float[Tensor, "4"]
    pseudo: PseudoFlow = PseudoFlow()
    flags: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return int(self.src_image.shape[-2]), int(self.src_image.shape[-1])


def sample_size(size: int | Sequence[int]) -> tuple[int, int]:
    """A frame size from ``256`` or ``(192, 256)``; both sides must be multiples of the flow stride."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    h, w = check_size(pair, "size")
    if h % FLOW_STRIDE or w % FLOW_STRIDE:
        raise ValueError(f"size ({h}, {w}) must be a multiple of the flow stride {FLOW_STRIDE} on both sides")
    return h, w


def rescale_box(box: Float[Tensor, "*batch 4"], from_size: Sequence[int], to_size: Sequence[int]) -> Float[Tensor, "*batch 4"]:
    """Move a box's two corners between frames with the pixel-centre convention."""
    corners = box.reshape(*box.shape[:-1], 2, 2)
    return rescale_keypoints(corners, from_size, to_size).reshape(box.shape)


def keypoints_in_frame(kps: Float[Tensor, "n 2"], size: Sequence[int]) -> Bool[Tensor, " n"]:
    """Keypoints whose position lies inside a frame of ``size`` (edges included: [-0.5, W - 0.5])."""
    h, w = size
    x, y = kps[:, 0], kps[:, 1]
    return (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)


def pseudo_flow(
    src_kps: Float[Tensor, "n 2"],
    trg_kps: Float[Tensor, "n 2"],
    valid: Bool[Tensor, " n"],
    frame_size: Sequence[int],
    pseudo: PseudoFlow = PseudoFlow(),
) -> tuple[Float[Tensor, "2 h w"], Bool[Tensor, "h w"]]:
    """Pseudo ground-truth flow on the ``frame / stride`` grid from frame-pixel keypoints (paper Eq. 4's target)."""
    h, w = frame_size
    grid = (h // pseudo.stride, w // pseudo.stride)
    src = rescale_keypoints(src_kps.float(), (h, w), grid)
    trg = rescale_keypoints(trg_kps.float(), (h, w), grid)
    flow, valid_flow = keypoints_to_flow(
        src[None], trg[None], valid[None], grid, neighbourhood=pseudo.neighbourhood, reference_size=pseudo.reference_size
    )
    return flow[0], valid_flow[0]


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> Tensor:
    if image.shape[:2] != size:
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def build_sample(record: PairRecord, size: int | Sequence[int] = 256, pseudo: PseudoFlow = PseudoFlow()) -> PairSample:
    """Bring ``record`` to the model frame ``size`` with its flow (see the module docstring).

    Convention:
        Keypoints and boxes move by x' = (x + 0.5)·W'/W − 0.5 (per axis). A synthetic record's
        exact flow is kept as it is; its images must already be at ``size`` (its flow grid at
        ``size / stride``), else ValueError.
    """
    size = sample_size(size)
    grid = (size[0] // pseudo.stride, size[1] // pseudo.stride)
    src_orig = torch.from_numpy(np.asarray(record.src_kps, dtype=np.float32))
    trg_orig = torch.from_numpy(np.asarray(record.trg_kps, dtype=np.float32))
    src_kps = rescale_keypoints(src_orig, record.src_size, size)
    trg_kps = rescale_keypoints(trg_orig, record.trg_size, size)
    valid = keypoints_in_frame(src_kps, size) & keypoints_in_frame(trg_kps, size)
    src_bbox = torch.from_numpy(np.asarray(record.src_bbox, dtype=np.float32))
    trg_bbox = torch.from_numpy(np.asarray(record.trg_bbox, dtype=np.float32))
    if record.flow is not None:
        if record.src_size != size or record.trg_size != size or tuple(record.flow.shape[-2:]) != grid:
            raise ValueError(
                f"{record.pair_id}: a record with exact flow must come at the frame size {size} with a flow grid "
                f"{grid}; got images {record.src_size}/{record.trg_size} and flow {tuple(record.flow.shape)}"
            )
        flow = torch.from_numpy(np.asarray(record.flow, dtype=np.float32))
        valid_flow = torch.from_numpy(np.asarray(record.valid_flow, dtype=bool))
        kind = "exact"
    else:
        flow, valid_flow = pseudo_flow(src_kps, trg_kps, valid, size, pseudo)
        kind = "pseudo"
    return PairSample(
        pair_id=record.pair_id,
        dataset=record.dataset,
        split=record.split,
        category=record.category,
        src_image=_resize_image(record.src_image, size),
        trg_image=_resize_image(record.trg_image, size),
        src_kps=src_kps,
        trg_kps=trg_kps,
        valid_kps=valid,
        src_kps_orig=src_orig,
        trg_kps_orig=trg_orig,
        flow=flow,
        valid_flow=valid_flow,
        flow_kind=kind,
        src_size=record.src_size,
        trg_size=record.trg_size,
        src_bbox=src_bbox,
        trg_bbox=trg_bbox,
        src_frame_bbox=rescale_box(src_bbox, record.src_size, size),
        trg_frame_bbox=rescale_box(trg_bbox, record.trg_size, size),
        pseudo=pseudo,
        flags=dict(record.flags),
    )


# ----------------------------------------------------------------------------------------------
# Shard encoding.


def _encode_image(image: Tensor, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    if image_format == "jpg":
        pil.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
    else:
        pil.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _points(kps: Tensor) -> list[list[float]]:
    return [[round(float(x), _KPS_DECIMALS), round(float(y), _KPS_DECIMALS)] for x, y in kps.tolist()]


def encode_sample(sample: PairSample, image_format: str = "jpg", quality: int = JPEG_QUALITY) -> dict[str, bytes]:
    """Shard members of ``sample`` (``src.<fmt>``, ``trg.<fmt>``, ``flow.npy``, ``valid.npy``, ``kps.json``, ``meta.json``).

    The flow is stored as float16 with invalid cells set to 0; encoding is deterministic.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    flow = torch.where(sample.valid_flow[None], sample.flow, torch.zeros_like(sample.flow))
    meta = {
        "schema_version": SCHEMA_VERSION,
        "pair_id": sample.pair_id,
        "dataset": sample.dataset,
        "split": sample.split,
        "category": sample.category,
        "src_size": list(sample.src_size),
        "trg_size": list(sample.trg_size),
        "src_bbox": [float(v) for v in sample.src_bbox.tolist()],
        "trg_bbox": [float(v) for v in sample.trg_bbox.tolist()],
        "flow_kind": sample.flow_kind,
        "pseudo": dataclasses.asdict(sample.pseudo),
        "flags": dict(sample.flags),
    }
    kps = {
        "src": _points(sample.src_kps),
        "trg": _points(sample.trg_kps),
        "src_orig": _points(sample.src_kps_orig),
        "trg_orig": _points(sample.trg_kps_orig),
        "valid": [bool(v) for v in sample.valid_kps.tolist()],
    }
    return {
        f"src.{image_format}": _encode_image(sample.src_image, image_format, quality),
        f"trg.{image_format}": _encode_image(sample.trg_image, image_format, quality),
        "flow.npy": _npy(flow.numpy().astype(np.float16)),
        "valid.npy": _npy(sample.valid_flow.numpy()),
        "kps.json": _json(kps),
        "meta.json": _json(meta),
    }


def _decode_image(data: bytes, where: str) -> Tensor:
    """RGB uint8 (3, H, W) view of an (H, W, 3) array: JPEG through libjpeg-turbo (simplejpeg), else Pillow.

    Both decoders give identical pixels for baseline JPEGs (libjpeg-turbo with the same settings);
    anything simplejpeg declines (CMYK, PNG, corrupt data) goes through Pillow, which converts any
    mode to RGB or reports the file.
    """
    if data[:2] == _JPEG_MAGIC:
        try:
            return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)
        except ValueError:
            pass  # Pillow decides: convert or report
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's signals for truncated / corrupt data
        raise DataError(where, f"cannot decode image: {error}") from error
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _load_npy(data: bytes, where: str) -> np.ndarray:
    """An array stored by :func:`encode_sample` (``numpy.load``, no pickled objects)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(where, f"cannot read .npy: {error}") from error


def _load_json(data: bytes, where: str) -> dict:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(where, f"invalid JSON: {error}") from error


def decode_sample(members: Mapping[str, bytes], where: str = "sample") -> PairSample:
    """Inverse of :func:`encode_sample`; a missing member, undecodable image, NaN or size mismatch raises :class:`DataError`."""
    try:
        return _decode(members, where)
    except (KeyError, TypeError) as error:  # a field missing from or mistyped in meta.json
        raise DataError(where, f"malformed sample metadata: {error!r}") from error


def _decode(members: Mapping[str, bytes], where: str) -> PairSample:
    image_format = next((fmt for fmt in IMAGE_FORMATS if f"src.{fmt}" in members), None)
    required = ["flow.npy", "valid.npy", "kps.json", "meta.json"]
    if image_format is None or f"trg.{image_format}" not in members:
        raise DataError(where, f"sample lacks its images (has members {sorted(members)})")
    missing = [m for m in required if m not in members]
    if missing:
        raise DataError(where, f"sample lacks members {missing} (has {sorted(members)})")
    meta = _load_json(members["meta.json"], f"{where} meta.json")
    kps = _load_json(members["kps.json"], f"{where} kps.json")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(where, f"schema version {meta.get('schema_version')!r}, this reader expects {SCHEMA_VERSION}")
    if meta.get("flow_kind") not in FLOW_KINDS:
        raise DataError(where, f"flow_kind {meta.get('flow_kind')!r} not in {FLOW_KINDS}")
    src_image = _decode_image(members[f"src.{image_format}"], f"{where} src.{image_format}")
    trg_image = _decode_image(members[f"trg.{image_format}"], f"{where} trg.{image_format}")
    if src_image.shape != trg_image.shape:
        raise DataError(where, f"source {tuple(src_image.shape)} and target {tuple(trg_image.shape)} sizes differ")
    flow = _load_npy(members["flow.npy"], f"{where} flow.npy")
    valid_flow = _load_npy(members["valid.npy"], f"{where} valid.npy")
    size = (int(src_image.shape[-2]), int(src_image.shape[-1]))
    pseudo = PseudoFlow(**meta["pseudo"])
    grid = (size[0] // pseudo.stride, size[1] // pseudo.stride)
    if flow.shape != (2, *grid) or valid_flow.shape != grid or valid_flow.dtype != np.bool_:
        raise DataError(where, f"flow {flow.shape} / bool mask {valid_flow.shape} {valid_flow.dtype} do not fit the frame {size}")
    flow = flow.astype(np.float32)  # float16 on disk
    if not math.isfinite(float(flow.sum())):  # a NaN or inf anywhere makes the sum non-finite (|flow| <= 65504)
        raise DataError(where, "NaN or inf in the stored flow")
    try:
        rows = [kps["src"], kps["trg"], kps["src_orig"], kps["trg_orig"]]
        valid_kps = torch.from_numpy(np.asarray(kps["valid"], dtype=np.bool_).reshape(-1))
    except KeyError as error:
        raise DataError(where, f"kps.json lacks {error}") from error
    counts = sorted({len(row) for row in rows} | {len(valid_kps)})
    if len(counts) != 1:
        raise DataError(where, f"keypoint count mismatch between src/trg/src_orig/trg_orig/valid: {counts}")
    try:
        points = np.asarray(rows, dtype=np.float32).reshape(4, -1, 2)
    except (ValueError, TypeError) as error:
        raise DataError(where, f"keypoints are not lists of (x, y): {error}") from error
    if not np.isfinite(points).all():
        raise DataError(where, "NaN or inf in keypoints")
    src_kps, trg_kps, src_orig, trg_orig = torch.from_numpy(points).unbind(0)
    src_size = (int(meta["src_size"][0]), int(meta["src_size"][1]))
    trg_size = (int(meta["trg_size"][0]), int(meta["trg_size"][1]))
    boxes = np.asarray([meta["src_bbox"], meta["trg_bbox"]], dtype=np.float32).reshape(2, 2, 2)
    frame_boxes = (boxes + 0.5) * _box_scale(src_size, trg_size, size) - 0.5  # pixel-centre rescaling
    src_bbox, trg_bbox = torch.from_numpy(boxes.reshape(2, 4)).unbind(0)
    src_frame_bbox, trg_frame_bbox = torch.from_numpy(frame_boxes.reshape(2, 4)).unbind(0)
    return PairSample(
        pair_id=str(meta["pair_id"]),
        dataset=str(meta["dataset"]),
        split=str(meta["split"]),
        category=str(meta["category"]),
        src_image=src_image,
        trg_image=trg_image,
        src_kps=src_kps,
        trg_kps=trg_kps,
        valid_kps=valid_kps,
        src_kps_orig=src_orig,
        trg_kps_orig=trg_orig,
        flow=torch.from_numpy(flow),
        valid_flow=torch.from_numpy(valid_flow.copy()),
        flow_kind=str(meta["flow_kind"]),
        src_size=src_size,
        trg_size=trg_size,
        src_bbox=src_bbox,
        trg_bbox=trg_bbox,
        src_frame_bbox=src_frame_bbox,
        trg_frame_bbox=trg_frame_bbox,
        pseudo=pseudo,
        flags={str(k): int(v) for k, v in meta.get("flags", {}).items()},
    )


def _box_scale(src_size: tuple[int, int], trg_size: tuple[int, int], frame: tuple[int, int]) -> np.ndarray:
    """(2 images, 1, 2 axes) scale factors W'/W, H'/H from the original sizes to the frame."""
    return np.array(
        [[[frame[1] / src_size[1], frame[0] / src_size[0]]], [[frame[1] / trg_size[1], frame[0] / trg_size[0]]]],
        dtype=np.float32,
    )
