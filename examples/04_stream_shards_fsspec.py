"""Write a few synthetic pairs as WebDataset shards to an fsspec URL and stream them back as batches.

`memory://` keeps everything in this process; `file://`, `s3://bucket/prefix`, `gs://...` work the
same (given the fsspec driver and credentials). `python examples/04_stream_shards_fsspec.py [URL]`
"""

import sys

from actr_core.data import Resize, ShardDataset, ShardSettings, SyntheticConfig, make_shards, verify_shards

url = sys.argv[1] if len(sys.argv) > 1 else "memory://actr-example/synthetic"
settings = ShardSettings(
    source="synthetic",
    pairs=(("train", 12), ("val", 4), ("test", 4)),
    size=(128, 128),
    samples_per_shard=4,
    synthetic=SyntheticConfig(n_kps=10),
)
manifest = make_shards(url, settings, workers=0, progress=False)
print(f"wrote {manifest['totals']['shards']} shards, {manifest['totals']['samples']} pairs to {url}")
print(verify_shards(url))

# training epoch: shuffled, full batches; evaluation epoch: fixed order, every pair exactly once
train = ShardDataset(url, "train", batch_size=4, training=True, transforms=[Resize(64)], rank=0, world_size=1)
for i, batch in enumerate(train.loader(num_workers=0)):
    print(
        f"train batch {i}: images {tuple(batch.src_image.shape)}, flow {tuple(batch.flow.shape)}, "
        f"valid keypoints {int(batch.valid_kps.sum())}"
    )
test = ShardDataset(url, "test", batch_size=3, rank=0, world_size=1)
seen = [pid for batch in test.loader(num_workers=0) for pid in batch.pair_id]
print(f"test split: {len(seen)} pairs, each once: {len(set(seen)) == len(seen)}")
