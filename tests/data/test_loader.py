"""The shard reading pipeline: PairBatch batches, epoch guarantees across simulated ranks and workers."""

import collections
import dataclasses

import pytest
import torch
from batches import assert_same_batch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import float32_tolerance

from actr_core.data import (
    PairBatch,
    ShardDataset,
    build_sample,
    collate,
    plan_epoch,
    prepare_batch,
    read_manifest,
    register_fsspec_opener,
    train_transforms,
)
from actr_core.data.pipeline import _gopen_fsspec
from actr_core.imaging import IMAGENET_STD, normalise_image

# x·a − c against (x/255 − mean)/std: 8 roundings at the scale of the terms, at most 1/std (not of the result)
NORMALISATION_TOL = float32_tolerance(1 / torch.tensor(IMAGENET_STD), terms=8)

RANKS, WORKERS = 2, 2


def _pair_ids(url: str, split: str, *, training: bool, batch_size: int, epoch: int = 0, **kwargs):
    """Pair ids per rank, read through real DataLoaders with WORKERS processes per simulated rank."""
    per_rank, batches = [], []
    for rank in range(RANKS):
        dataset = ShardDataset(url, split, batch_size=batch_size, training=training, rank=rank, world_size=RANKS, **kwargs)
        dataset.set_epoch(epoch)
        loader = dataset.loader(WORKERS)
        got = [batch.pair_id for batch in loader]
        assert len(got) == len(loader)  # __len__ is the plan's batch count
        per_rank.append([p for batch in got for p in batch])
        batches.append(got)
    return per_rank, batches, dataset


def test_evaluation_yields_every_sample_exactly_once(tiny_shards):
    manifest = read_manifest(tiny_shards)
    per_rank, _batches, dataset = _pair_ids(tiny_shards, "test", training=False, batch_size=3)
    everything = [p for ids in per_rank for p in ids]
    counts = collections.Counter(everything)
    assert len(everything) == manifest["splits"]["test"]["samples"] == 13
    assert set(counts.values()) == {1}
    assert counts.keys() == {f"synthetic-test-{i:06d}" for i in range(13)}
    assert dataset.plan(WORKERS).dropped == 0


def test_training_yields_each_sample_at_most_once_with_equal_batches_per_rank(tiny_shards):
    per_rank, batches, dataset = _pair_ids(tiny_shards, "train", training=True, batch_size=3)
    everything = [p for ids in per_rank for p in ids]
    assert len(everything) == len(set(everything))  # at most once
    assert len({len(b) for b in batches}) == 1  # equal batch counts on every rank
    assert all(len(batch) == 3 for rank in batches for batch in rank)  # full batches only
    plan = dataset.plan(WORKERS)
    assert len(batches[0]) == plan.batches_per_rank[0] > 0
    assert plan.dropped == 22 - len(everything)  # the documented drop is what was dropped


def test_training_epochs_reshuffle(tiny_shards):
    first, _, _ = _pair_ids(tiny_shards, "train", training=True, batch_size=2, epoch=0)
    second, _, _ = _pair_ids(tiny_shards, "train", training=True, batch_size=2, epoch=1)
    again, _, _ = _pair_ids(tiny_shards, "train", training=True, batch_size=2, epoch=0)
    assert first == again  # deterministic per (seed, epoch)
    assert first != second


def test_batches_follow_the_schema(tiny_shards):
    dataset = ShardDataset(tiny_shards, "val", batch_size=4, rank=0, world_size=1)
    batch = next(iter(dataset))
    assert isinstance(batch, PairBatch) and len(batch) == 4 and batch.input_size == (32, 48)
    b, n = batch.valid_kps.shape
    assert b == 4 and n == 8
    assert batch.src_image.shape == (4, 3, 32, 48) and batch.src_image.dtype == torch.float32
    assert batch.trg_image.shape == (4, 3, 32, 48) and batch.trg_image.dtype == torch.float32
    assert batch.flow.shape == (4, 2, 8, 12) and batch.flow.dtype == torch.float32
    assert batch.valid_flow.shape == (4, 8, 12) and batch.valid_flow.dtype == torch.bool
    for kps in (batch.src_kps, batch.trg_kps, batch.src_kps_orig, batch.trg_kps_orig):
        assert kps.shape == (4, n, 2) and kps.dtype == torch.float32
    for mask in (batch.valid_kps, batch.annotated_kps):
        assert mask.shape == (4, n) and mask.dtype == torch.bool
    for size in (batch.src_size, batch.trg_size):
        assert size.dtype == torch.int64 and size.tolist() == [[32, 48]] * 4
    for box in (batch.src_bbox, batch.trg_bbox):
        assert box.shape == (4, 4) and box.dtype == torch.float32
    assert batch.dataset == ("synthetic",) * 4 and len(batch.pair_id) == len(batch.category) == 4
    assert batch.flags == {}  # synthetic pairs have no SPair flags


def test_collated_images_equal_normalise_image(tiny_shards):
    """The fused two-pass normalisation equals actr_core.imaging.normalise_image."""
    dataset = ShardDataset(tiny_shards, "val", batch_size=2, rank=0, world_size=1)
    encoded = dataset._shard_samples(dataset.shards[:1], dataset.skipped)
    samples = [dataset._decode(next(encoded)), dataset._decode(next(encoded))]
    batch = collate(samples)
    expected = normalise_image(torch.stack([s.src_image for s in samples]))
    torch.testing.assert_close(batch.src_image, expected, atol=NORMALISATION_TOL, rtol=0)


@pytest.mark.parametrize("augment", [False, True])
def test_uint8_batches_through_workers_equal_normalised_batches(tiny_shards, augment):
    """images="uint8" batches (channels-last bytes, through worker processes) become, after
    prepare_batch, the batches images="normalised" gives; every other field is identical."""
    kwargs = dict(batch_size=3, training=True, rank=0, world_size=1, transforms=train_transforms() if augment else ())
    raw = list(ShardDataset(tiny_shards, "train", images="uint8", **kwargs).loader(2))
    ready = list(ShardDataset(tiny_shards, "train", images="normalised", **kwargs).loader(2))
    assert len(raw) == len(ready) > 0
    for a, b in zip(raw, ready, strict=True):
        image = a.src_image
        assert image.dtype == torch.uint8 and image.shape == b.src_image.shape
        assert image.is_contiguous(memory_format=torch.channels_last)  # (b, H, W, 3) bytes
        prepared = prepare_batch(a)
        for key in ("src_image", "trg_image"):
            got = getattr(prepared, key)
            assert got.is_contiguous() and got.dtype == torch.float32
            # exact: on the CPU both modes normalise with the same elementwise steps and constants
            torch.testing.assert_close(got, getattr(b, key), atol=0, rtol=0)
            torch.testing.assert_close(got, normalise_image(getattr(a, key)), atol=NORMALISATION_TOL, rtol=0)
        assert_same_batch(dataclasses.replace(prepared, src_image=b.src_image, trg_image=b.trg_image), b)


def test_persistent_workers_follow_set_epoch(tiny_shards):
    """One loader with persistent workers reads each epoch's shuffle, as fresh loaders do."""
    kwargs = dict(batch_size=2, training=True, rank=0, world_size=1)
    dataset = ShardDataset(tiny_shards, "train", **kwargs)
    loader = dataset.loader(2)
    assert loader.persistent_workers
    seen = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        seen.append([p for batch in loader for p in batch.pair_id])
    fresh = []
    for epoch in (0, 1):
        other = ShardDataset(tiny_shards, "train", **kwargs)
        other.set_epoch(epoch)
        fresh.append([p for batch in other.loader(2, persistent_workers=False) for p in batch.pair_id])
    assert seen[0] == seen[2] == fresh[0]
    assert seen[1] == fresh[1] != fresh[0]


def test_worker_batches_equal_in_process_batches(tiny_shards):
    """A batch from a worker process (default DataLoader transfer) is a PairBatch equal to the in-process
    batch, strides included (the uint8 images stay channels-last)."""
    kwargs = dict(batch_size=3, rank=0, world_size=1, images="uint8")
    via_worker = list(ShardDataset(tiny_shards, "test", **kwargs).loader(1, pin_memory=False, prefetch_factor=3))
    in_process = list(ShardDataset(tiny_shards, "test", **kwargs).loader(0))
    assert len(via_worker) == len(in_process) > 0
    for got, want in zip(via_worker, in_process, strict=True):
        assert type(got) is PairBatch
        assert_same_batch(got, want, strides=True)


def test_prepare_batch_passes_float_batches_and_rejects_bad_image_modes(tiny_shards):
    batch = next(iter(ShardDataset(tiny_shards, "val", batch_size=2, rank=0, world_size=1)))
    assert prepare_batch(batch) is batch  # float images, nothing to move: unchanged
    prepared = prepare_batch(batch, "cpu")
    assert all(getattr(prepared, f.name) is getattr(batch, f.name) for f in dataclasses.fields(batch) if f.name != "flags")
    with pytest.raises(ValueError, match="images must be one of"):
        ShardDataset(tiny_shards, "val", batch_size=2, rank=0, world_size=1, images="float16")
    with pytest.raises(ValueError, match="images must be one of"):
        collate([], images="bytes")


def test_collate_pads_keypoints_and_keeps_flags(builders, memory_root):
    from actr_core.data import SPairReader

    builders.spair(memory_root)
    samples = [build_sample(r, 32) for r in SPairReader(memory_root, "train")]  # 4, 5, 6 keypoints
    batch = collate(samples)
    assert batch.valid_kps.sum(1).tolist() == [4, 5, 6]
    assert batch.src_kps[0, 4:].abs().sum() == 0 and batch.src_kps_orig[1, 5:].abs().sum() == 0
    assert batch.flags["viewpoint_variation"].tolist() == [1, 1, 1] and batch.flags["occlusion"].dtype == torch.int64
    assert set(batch.flags) == {"viewpoint_variation", "scale_variation", "truncation", "occlusion"}
    assert collate(samples, pad_kps_to=10).valid_kps.shape == (3, 10)
    with pytest.raises(ValueError, match="more than pad_kps_to"):
        collate(samples, pad_kps_to=5)


def test_training_augmentation_in_the_loader(tiny_shards):
    dataset = ShardDataset(tiny_shards, "train", batch_size=4, training=True, transforms=train_transforms(), rank=0, world_size=1)
    batches = list(dataset.loader(0))
    assert len(batches) == dataset.plan(1).batches_per_rank[0] == 5
    assert all(b.flow.shape == (4, 2, 8, 12) for b in batches)


def test_file_url_and_local_path(tmp_path, tiny_settings_factory):
    from actr_core.data import make_shards

    make_shards(str(tmp_path / "s"), tiny_settings_factory(pairs=(("train", 3), ("val", 3), ("test", 5))), progress=False)
    for url in (str(tmp_path / "s"), f"file://{tmp_path}/s"):
        ids = [p for b in ShardDataset(url, "test", batch_size=2, rank=0, world_size=1) for p in b.pair_id]
        assert len(ids) == 5


def test_max_batches_caps_the_epoch(tiny_shards):
    dataset = ShardDataset(tiny_shards, "train", batch_size=2, training=True, max_batches=3, rank=1, world_size=2)
    assert len(list(dataset.loader(0))) == 3 == len(dataset)


def test_rank_defaults_and_errors(tiny_shards):
    dataset = ShardDataset(tiny_shards, "val", batch_size=2)
    assert (dataset.rank, dataset.world_size) == (0, 1)
    with pytest.raises(ValueError, match="rank 2 outside"):
        ShardDataset(tiny_shards, "val", batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="both rank and world_size"):
        ShardDataset(tiny_shards, "val", batch_size=2, rank=0)
    with pytest.raises(ValueError, match="split 'extra' not in"):
        ShardDataset(tiny_shards, "extra", batch_size=2)


def test_fsspec_opener_registration():
    from webdataset.gopen import gopen_schemes

    register_fsspec_opener("memory://x/y.tar")
    assert gopen_schemes["memory"] is _gopen_fsspec
    before = dict(gopen_schemes)
    register_fsspec_opener("/local/path.tar")
    register_fsspec_opener("file:///local/path.tar")
    assert gopen_schemes == before


@given(
    counts=st.lists(st.integers(0, 9), min_size=0, max_size=12),
    world=st.integers(1, 3),
    workers=st.integers(1, 3),
    batch=st.integers(1, 4),
    epoch=st.integers(0, 3),
)
def test_plan_properties(counts, world, workers, batch, epoch):
    train = plan_epoch(counts, batch_size=batch, world_size=world, num_workers=workers, training=True, epoch=epoch)
    assert sorted(i for rank in train.shards for worker in rank for i in worker) == list(range(len(counts)))
    assert len(set(train.batches_per_rank)) == 1  # equal on every rank
    assert train.samples_used == world * train.batches_per_rank[0] * batch <= sum(counts)
    for rank_shards, rank_batches in zip(train.shards, train.batches, strict=True):
        for ids, n in zip(rank_shards, rank_batches, strict=True):
            assert n * batch <= sum(counts[i] for i in ids)  # a worker never needs more than it reads
    evaluation = plan_epoch(counts, batch_size=batch, world_size=world, num_workers=workers)
    assert evaluation.dropped == 0 and evaluation.order == tuple(range(len(counts)))
