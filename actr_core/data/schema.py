"""Names shared by the data pipeline and its consumers: the batch type and the shard layout.

A batch is a :class:`~actr_core.batch.PairBatch` (defined in :mod:`actr_core.batch`, whose
docstring tabulates its fields, re-exported here): its field list is the batch schema.

A shard sample (one pair in a WebDataset tar) holds the members of :data:`SHARD_MEMBERS`.
"""

from actr_core.batch import SPAIR_FLAGS, PairBatch
from actr_core.flow import FLOW_STRIDE

__all__ = [
    "SCHEMA_VERSION",
    "PairBatch",
    "SPAIR_FLAGS",
    "FLOW_STRIDE",
    "DATASETS",
    "SPLITS",
    "FLOW_KINDS",
    "IMAGE_FORMATS",
    "SHARD_MEMBERS",
    "MANIFEST_NAME",
]

SCHEMA_VERSION = 1  # bump when a batch field, a shard member or its encoding changes

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
