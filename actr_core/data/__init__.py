"""Data: benchmark readers over fsspec, synthetic pairs, samples with ground-truth flow, shards, loading.

See ``docs/data.md``. A batch is a :class:`PairBatch` (:mod:`actr_core.data.schema`).
"""

from actr_core.data.errors import DataError, SkipLog
from actr_core.data.pipeline import (
    IMAGE_MODES,
    EpochPlan,
    ShardDataset,
    collate,
    plan_epoch,
    prepare_batch,
    read_shard,
    register_fsspec_opener,
)
from actr_core.data.readers import READERS, PairReader, PFPascalReader, PFWillowReader, SPairReader, open_reader
from actr_core.data.records import PairRecord
from actr_core.data.samples import PairSample, PseudoFlow, build_sample, decode_sample, encode_sample, pseudo_flow
from actr_core.data.schema import SCHEMA_VERSION, PairBatch
from actr_core.data.shards import (
    ShardSettings,
    VerifyReport,
    check_manifest,
    make_shards,
    read_manifest,
    verify_shards,
)
from actr_core.data.synthetic import PHOTOS, SyntheticConfig, SyntheticPairs, generate_pair
from actr_core.data.transforms import (
    BoxPreservingCrop,
    Compose,
    Photometric,
    PhotometricConfig,
    Resize,
    reframe,
    train_transforms,
)

__all__ = [
    "IMAGE_MODES",
    "PHOTOS",
    "READERS",
    "SCHEMA_VERSION",
    "BoxPreservingCrop",
    "Compose",
    "DataError",
    "EpochPlan",
    "PairBatch",
    "PairReader",
    "PairRecord",
    "PairSample",
    "PFPascalReader",
    "PFWillowReader",
    "Photometric",
    "PhotometricConfig",
    "PseudoFlow",
    "Resize",
    "SPairReader",
    "ShardDataset",
    "ShardSettings",
    "SkipLog",
    "SyntheticConfig",
    "SyntheticPairs",
    "VerifyReport",
    "build_sample",
    "check_manifest",
    "collate",
    "decode_sample",
    "encode_sample",
    "generate_pair",
    "make_shards",
    "open_reader",
    "plan_epoch",
    "prepare_batch",
    "pseudo_flow",
    "read_manifest",
    "read_shard",
    "reframe",
    "register_fsspec_opener",
    "train_transforms",
    "verify_shards",
]
