"""Batch memory: worker batches in shared buffers, image buffers reused only once the consumer let go."""

import os

import torch

from actr_core.data import ShardDataset
from actr_core.data.buffers import POOL_BUFFERS, BufferPool, carve, packed


def _inode(tensor: torch.Tensor) -> int:
    """The shared-memory file behind a tensor received from a worker."""
    fd, _ = tensor.untyped_storage()._share_fd_cpu_()
    return os.fstat(fd).st_ino


def _reference(url: str, split: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per pair id, the (source, target, flow) rows an in-process epoch gives."""
    rows = {}
    for batch in ShardDataset(url, split, batch_size=2, rank=0, world_size=1, images="uint8"):
        for i, pair_id in enumerate(batch["pair_id"]):
            rows[pair_id] = (batch["src_image"][i].clone(), batch["trg_image"][i].clone(), batch["flow"][i].clone())
    return rows


def _intact(batch: dict, reference: dict) -> bool:
    return all(
        torch.equal(batch["src_image"][i], reference[p][0])
        and torch.equal(batch["trg_image"][i], reference[p][1])
        and torch.equal(batch["flow"][i], reference[p][2])
        for i, p in enumerate(batch["pair_id"])
    )


def test_image_buffers_are_reused_across_batches_and_epochs(tiny_shards):
    dataset = ShardDataset(tiny_shards, "train", batch_size=2, rank=0, world_size=1, images="uint8")
    loader = dataset.loader(2)
    inodes = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        inodes += [_inode(batch["src_image"]) for batch in loader]  # each batch dropped before the next
    assert len(inodes) == 3 * len(dataset) >= 30
    assert len(set(inodes)) <= 2 * POOL_BUFFERS  # never more than the two workers' pools


def test_reuse_can_be_turned_off(tiny_shards):
    dataset = ShardDataset(tiny_shards, "train", batch_size=2, rank=0, world_size=1, images="uint8", reuse_buffers=False)
    held = list(dataset.loader(2))  # kept: a fresh buffer may not take a freed one's place
    assert len({_inode(batch["src_image"]) for batch in held}) == len(held) >= 10


def test_batches_held_by_the_consumer_are_never_overwritten(tiny_shards):
    """Batches kept alive (whole, or through one view) while the workers go on keep their contents,
    whether the pool is exhausted or reuses the buffers of the batches that were let go."""
    reference = _reference(tiny_shards, "train")
    dataset = ShardDataset(tiny_shards, "train", batch_size=2, rank=0, world_size=1, images="uint8")
    loader = dataset.loader(2)
    kept, views = [], []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i, batch in enumerate(loader):
            assert _intact(batch, reference)
            if epoch == 1 or i % 3 == 0:
                kept.append(batch)
            elif i % 3 == 1:
                views.append((batch["pair_id"][0], batch["src_image"][0]))  # only a view survives
    assert len(kept) > POOL_BUFFERS * 2  # more than the pools hold: fresh buffers were needed
    assert all(_intact(batch, reference) for batch in kept)
    assert views and all(torch.equal(view, reference[pair_id][0]) for pair_id, view in views)


def test_pool_leases():
    pool = BufferPool(buffers=2)
    first, second = pool.acquire(128), pool.acquire(128)
    assert pool.flags.tolist() == [1, 1]
    assert pool.lease(first.untyped_storage()) == 0 and pool.lease(second.untyped_storage()) == 1
    third = pool.acquire(128)  # both out: a fresh buffer, not pooled
    assert pool.fresh == 1 and pool.lease(third.untyped_storage()) is None
    pool.release(second)  # never handed over: back to the pool
    pool.release(third)  # not pooled: nothing to give back
    assert pool.flags.tolist() == [1, 0]
    assert pool.acquire(128).data_ptr() == second.data_ptr()
    pool.flags[0] = 0  # as the main process does once the batch is gone
    bigger = pool.acquire(256)  # another size replaces the buffer
    assert bigger.numel() == 256 and pool.lease(bigger.untyped_storage()) == 0
    assert pool.lease(first.untyped_storage()) is None


def test_carved_views_are_aligned_and_disjoint():
    a, b, c = carve([((3, 5), torch.uint8), ((2, 7), torch.float32), ((0, 2), torch.int64)])
    assert (a.shape, b.shape, c.shape) == ((3, 5), (2, 7), (0, 2))
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert (b.data_ptr() - a.data_ptr()) % 64 == 0 and b.data_ptr() - a.data_ptr() >= 15
    a.fill_(7)
    b.fill_(1.5)
    assert (a == 7).all() and (b == 1.5).all()
    tensors = {"x": torch.arange(6).view(2, 3), "m": torch.tensor([True, False])}
    out = packed(tensors)
    assert all(torch.equal(out[k], v) and out[k].dtype == v.dtype for k, v in tensors.items())
