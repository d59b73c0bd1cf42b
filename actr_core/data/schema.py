"""Names shared by the data pipeline and its consumers: the batch schema and the shard layout.

Axis legend: b batch · n keypoints (padded) · 2 (x, y), channel 0 = x · H W model input frame ·
h w flow grid (H/4 × W/4) · 4 box (x1, y1, x2, y2).

A batch is a ``dict`` with string keys (:data:`BATCH_KEYS`):

================== ======================= ==================================================
key                type / shape            meaning
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
category           list[str]               object category (photo name for synthetic pairs)
pair_id            list[str]               unique within a dataset split
dataset            list[str]               "spair", "pfpascal", "pfwillow" or "synthetic"
SPair flags        Int (b,)                viewpoint_variation, scale_variation, truncation,
                                           occlusion; present when every pair of the batch has them
================== ======================= ==================================================

A shard sample (one pair in a WebDataset tar) holds the members of :data:`SHARD_MEMBERS`.
"""

from actr_core.flow import FLOW_STRIDE

__all__ = [
    "SCHEMA_VERSION",
    "SRC_IMAGE",
    "TRG_IMAGE",
    "SRC_KPS",
    "TRG_KPS",
    "VALID_KPS",
    "ANNOTATED_KPS",
    "FLOW",
    "VALID_FLOW",
    "SRC_KPS_ORIG",
    "TRG_KPS_ORIG",
    "SRC_SIZE",
    "TRG_SIZE",
    "SRC_BBOX",
    "TRG_BBOX",
    "CATEGORY",
    "PAIR_ID",
    "DATASET",
    "SPAIR_FLAGS",
    "TENSOR_KEYS",
    "LIST_KEYS",
    "BATCH_KEYS",
    "FLOW_STRIDE",
    "DATASETS",
    "SPLITS",
    "FLOW_KINDS",
    "IMAGE_FORMATS",
    "SHARD_MEMBERS",
    "MANIFEST_NAME",
]

SCHEMA_VERSION = 1  # bump when a batch key, a shard member or its encoding changes

SRC_IMAGE = "src_image"
TRG_IMAGE = "trg_image"
SRC_KPS = "src_kps"
TRG_KPS = "trg_kps"
VALID_KPS = "valid_kps"
ANNOTATED_KPS = "annotated_kps"
FLOW = "flow"
VALID_FLOW = "valid_flow"
SRC_KPS_ORIG = "src_kps_orig"
TRG_KPS_ORIG = "trg_kps_orig"
SRC_SIZE = "src_size"
TRG_SIZE = "trg_size"
SRC_BBOX = "src_bbox"
TRG_BBOX = "trg_bbox"
CATEGORY = "category"
PAIR_ID = "pair_id"
DATASET = "dataset"
SPAIR_FLAGS: tuple[str, ...] = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")

TENSOR_KEYS: tuple[str, ...] = (
    SRC_IMAGE,
    TRG_IMAGE,
    SRC_KPS,
    TRG_KPS,
    VALID_KPS,
    ANNOTATED_KPS,
    FLOW,
    VALID_FLOW,
    SRC_KPS_ORIG,
    TRG_KPS_ORIG,
    SRC_SIZE,
    TRG_SIZE,
    SRC_BBOX,
    TRG_BBOX,
)
LIST_KEYS: tuple[str, ...] = (CATEGORY, PAIR_ID, DATASET)
BATCH_KEYS: tuple[str, ...] = TENSOR_KEYS + LIST_KEYS  # always present; SPAIR_FLAGS when available

# The models predict flow on a grid 4x finer than the 16-px token grid: H/4 x W/4 (paper Sec. 3.4):
# FLOW_STRIDE, defined with the flow conventions (actr_core.flow) and re-exported here.

DATASETS: tuple[str, ...] = ("spair", "pfpascal", "pfwillow", "synthetic")
SPLITS: tuple[str, ...] = ("train", "val", "test")
# "pseudo": keypoint displacements over square neighbourhoods (paper Sec. 3.5); "exact": dense
# analytic flow of a synthetic warp.
FLOW_KINDS: tuple[str, ...] = ("pseudo", "exact")
IMAGE_FORMATS: tuple[str, ...] = ("jpg", "png")

# Members of one shard sample: "<key>.<member>", written in name order (flow.npy, kps.json, meta.json,
# src.<fmt>, trg.<fmt>, valid.npy; shard sets of 0.1.0 hold them in this table's order: both read the same).
SHARD_MEMBERS: dict[str, str] = {
    "src": "source image, JPEG (src.jpg) or PNG (src.png), RGB, at the stored frame size",
    "trg": "target image, same format and size as the source",
    "flow.npy": "float16 (2, h, w) flow on the H/4 source grid (0 where invalid)",
    "valid.npy": "bool (h, w) mask of cells where the flow is defined",
    "kps.json": "keypoints: src/trg in frame pixels, src_orig/trg_orig in original pixels",
    "meta.json": "pair id, dataset, category, split, sizes, boxes, flow kind, flags, versions",
}

MANIFEST_NAME = "manifest.json"
