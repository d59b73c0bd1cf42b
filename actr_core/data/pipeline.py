"""Reading shard sets: the WebDataset pipeline that feeds training and evaluation with schema batches.

Axis legend: b batch · n keypoints (padded to the batch's largest count) · H W model input frame ·
h w flow grid (H/4 × W/4).

Stages (a ``webdataset.DataPipeline`` built per epoch in each loader worker)::

    shard list (from manifest.json; shuffled per epoch when training, same order on every rank)
    -> split_by_node (rank r takes shards r, r + R, ...)
    -> split_by_worker (loader worker w of W takes every W-th of those)
    -> tar reading through webdataset's gopen, with fsspec registered for every URL scheme
    -> shuffle buffer of encoded samples (training) -> decode (JPEG/PNG, npy, JSON)
    -> transforms (augmentation)
    -> batching + collation into the batch schema (``actr_core.data.schema``)

Epoch guarantees (:func:`plan_epoch` computes them; ``ShardDataset.plan`` exposes them):

- evaluation (``training=False``): every sample of the split is yielded exactly once per epoch
  across all ranks and workers; the last batch of a worker may be partial; ranks may get
  different batch counts (gather results with variable sizes).
- training (``training=True``): every sample is yielded at most once per epoch and every rank
  yields the same number of full batches, ``N = min over ranks of (its full batches)``. Dropped
  per epoch: each worker's remainder below a full batch, plus the batches a rank has beyond N —
  ``plan.dropped`` samples in all, reported by :meth:`ShardDataset.plan`. Nothing is padded or
  repeated. Use at least ``ranks × workers`` shards of similar size to keep the drop small.

Bad data: a truncated or corrupt tar, an undecodable image, a sample with missing members or
NaN values raise :class:`~actr_core.data.errors.DataError` naming the shard and sample under
``on_error="raise"`` (the default); under ``"skip"`` they are counted (a truncated shard counts
the samples its manifest entry promised but did not deliver) and the count is logged at the end of
the epoch by each worker. Skips in training shorten that rank's epoch (the count says by how much).
"""

import dataclasses
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen, gopen_schemes

from actr_core.data.buffers import BufferPool, WorkerBatch, carve, packed
from actr_core.data.errors import DataError, SkipLog, check_on_error
from actr_core.data.samples import PairSample, decode_sample
from actr_core.data.schema import SPAIR_FLAGS, SRC_IMAGE, TRG_IMAGE
from actr_core.data.shards import iter_tar, read_manifest, shard_urls
from actr_core.imaging import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "EpochPlan",
    "IMAGE_MODES",
    "ShardDataset",
    "collate",
    "distributed_rank",
    "plan_epoch",
    "prepare_batch",
    "register_fsspec_opener",
    "split_by_node",
    "split_by_worker",
]

logger = logging.getLogger(__name__)

Transform = Callable[[PairSample, torch.Generator], PairSample]
_LOCAL_SCHEMES = ("", "file", "pipe")  # schemes webdataset's gopen opens itself
SHUFFLE_BUFFER = 256  # samples held by the training shuffle buffer (per worker; chosen)


# ----------------------------------------------------------------------------------------------
# fsspec behind webdataset's gopen.


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **storage_options: Any) -> Any:
    return fsspec.open(url, mode, **storage_options).open()


def register_fsspec_opener(url: str) -> None:
    """Make ``webdataset.gopen`` open URLs of ``url``'s scheme (``memory://``, ``s3://`` ...) through fsspec.

    Idempotent; local paths, ``file://`` and ``pipe:`` keep webdataset's own openers.
    """
    scheme = urlparse(url).scheme
    if scheme not in _LOCAL_SCHEMES and gopen_schemes.get(scheme) is not _gopen_fsspec:
        gopen_schemes[scheme] = _gopen_fsspec


# ----------------------------------------------------------------------------------------------
# Ranks, workers and the epoch plan.


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of ``torch.distributed`` when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def split_by_node(src: Iterator[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Rank ``rank`` of ``world_size`` keeps items ``rank, rank + world_size, ...``."""
    for i, item in enumerate(src):
        if i % world_size == rank:
            yield item


def split_by_worker(src: Iterator[Any], worker: int, num_workers: int) -> Iterator[Any]:
    """Loader worker ``worker`` of ``num_workers`` keeps items ``worker, worker + num_workers, ...``."""
    for i, item in enumerate(src):
        if i % num_workers == worker:
            yield item


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """Who reads which shards in one epoch and how many batches each worker yields.

    ``shards[r][w]`` are shard indices of rank r's worker w; ``batches[r][w]`` its batch count.
    """

    epoch: int
    training: bool
    batch_size: int
    order: tuple[int, ...]
    shards: tuple[tuple[tuple[int, ...], ...], ...]
    batches: tuple[tuple[int, ...], ...]
    samples_total: int
    samples_used: int

    @property
    def batches_per_rank(self) -> tuple[int, ...]:
        """Batches each rank yields this epoch (all equal when training)."""
        return tuple(sum(per_worker) for per_worker in self.batches)

    @property
    def dropped(self) -> int:
        """Samples left out this epoch (training only; 0 for evaluation)."""
        return self.samples_total - self.samples_used


def plan_epoch(
    counts: Sequence[int],
    *,
    batch_size: int,
    world_size: int = 1,
    num_workers: int = 1,
    training: bool = False,
    epoch: int = 0,
    seed: int = 0,
    max_batches: int | None = None,
) -> EpochPlan:
    """The :class:`EpochPlan` for shards holding ``counts`` samples (see the module docstring).

    ``max_batches`` caps each rank's batches (an epoch length shorter than the data).
    """
    if batch_size < 1 or world_size < 1 or num_workers < 1:
        raise ValueError(f"batch_size ({batch_size}), world_size ({world_size}), num_workers ({num_workers}) must be >= 1")
    n = len(counts)
    order = list(range(n))
    if training:
        order = [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]
    shards, batches = [], []
    for rank in range(world_size):
        mine = order[rank::world_size]
        per_worker = [tuple(mine[w::num_workers]) for w in range(num_workers)]
        shards.append(tuple(per_worker))
        sizes = [sum(counts[i] for i in ids) for ids in per_worker]
        batches.append([s // batch_size if training else -(-s // batch_size) for s in sizes])
    total = sum(counts)
    if training or max_batches is not None:
        target = min(sum(b) for b in batches) if training else None
        for rank_batches in batches:
            limit = min(v for v in (target, max_batches) if v is not None)
            while sum(rank_batches) > limit:
                rank_batches[rank_batches.index(max(rank_batches))] -= 1
    if training:
        used = sum(sum(b) for b in batches) * batch_size
    else:
        used = total if max_batches is None else _eval_used(counts, shards, batches, batch_size)
    return EpochPlan(
        epoch=epoch,
        training=training,
        batch_size=batch_size,
        order=tuple(order),
        shards=tuple(shards),
        batches=tuple(tuple(b) for b in batches),
        samples_total=total,
        samples_used=used,
    )


def _eval_used(counts: Sequence[int], shards: Sequence, batches: Sequence, batch_size: int) -> int:
    used = 0
    for rank_shards, rank_batches in zip(shards, batches, strict=True):
        for ids, b in zip(rank_shards, rank_batches, strict=True):
            used += min(sum(counts[i] for i in ids), b * batch_size)
    return used


# ----------------------------------------------------------------------------------------------
# Collation into the batch schema.


def _normalise_into(out: Tensor, images: Sequence[Tensor] | Tensor) -> Tensor:
    """uint8 (3, H, W) images, any strides -> ImageNet-normalised float ``out`` (b, 3, H, W):
    (x/255 - mean)/std as x·a - c with a = 1/(255 std), c = mean/std (equal to
    ``actr_core.imaging.normalise_image`` to float rounding)."""
    std = torch.tensor(IMAGENET_STD, device=out.device).view(3, 1, 1)
    scale, shift = 1.0 / (255.0 * std), torch.tensor(IMAGENET_MEAN, device=out.device).view(3, 1, 1) / std
    if out.device.type != "cpu":  # a batch tensor (prepare_batch): one pass, not three kernel launches per image
        return out.copy_(images).mul_(scale).sub_(shift)
    for slot, image in zip(out, images, strict=True):  # image by image, while it is in cache
        slot.copy_(image).mul_(scale).sub_(shift)
    return out


def _stacked_images(
    src: Sequence[Tensor], trg: Sequence[Tensor], images: str, buffers: "_ImageBuffers | None" = None
) -> tuple[Tensor, Tensor]:
    """uint8 (3, H, W) source and target images -> two batches (b, 3, H, W) in one buffer.

    "normalised": ImageNet-normalised float32, contiguous. "uint8": the bytes stored channels-last,
    i.e. (b, H, W, 3) in memory; decoded images are (H, W, 3) arrays viewed as (3, H, W), so each
    image is one plain copy and the batch is a quarter of the float batch's bytes
    (:func:`prepare_batch` normalises it on the device that runs the model). ``buffers`` supplies
    the memory (a worker's reused buffers; rows already holding decoded images, not copied again).
    """
    b, (h, w) = len(src), src[0].shape[-2:]
    pool = None if buffers is None else buffers.pool
    if images == "normalised":
        outs = carve([((b, 3, h, w), torch.float32)] * 2, pool)
        return tuple(_normalise_into(out, group) for out, group in zip(outs, (src, trg), strict=True))
    rows = None if buffers is None else buffers.take((h, w))
    if rows is not None and rows[0].shape[1:] == (h, w, 3) and len(rows[0]) >= b:
        outs = [row[:b] for row in rows]
    else:
        if rows is not None:
            buffers.release(rows[0])  # rows of another frame size: never handed over
        outs = carve([((b, h, w, 3), torch.uint8)] * 2, pool)
    for out, group in zip(outs, (src, trg), strict=True):
        for slot, image in zip(out, group, strict=True):
            if image.data_ptr() != slot.data_ptr():  # else decoded straight into its row
                slot.copy_(image.permute(1, 2, 0))
    return tuple(out.permute(0, 3, 1, 2) for out in outs)


class _ImageBuffers:
    """Memory for the images of one iteration's batches: buffers from the loader worker's pool (fresh
    ones in-process), and with ``direct`` (uint8 batches without transforms) the rows of the batch being
    filled, which samples are decoded straight into (one copy per image less). Rows are sized by the
    previous batch's frame, so the first batch of an iteration, and any sample of another size, is
    copied as usual."""

    def __init__(self, batch_size: int, pool: BufferPool | None, direct: bool):
        self.batch_size = batch_size
        self.pool = pool
        self.direct = direct
        self.frame: tuple[int, int] | None = None
        self.rows: list[Tensor] | None = None
        self.filled = 0  # samples of the current batch accepted so far

    def next_rows(self) -> tuple[Tensor, Tensor] | None:
        """(H, W, 3) source and target rows for the next sample, or None."""
        if not self.direct or self.frame is None:
            return None
        if self.rows is None:
            self.rows = carve([((self.batch_size, *self.frame, 3), torch.uint8)] * 2, self.pool)
        return self.rows[0][self.filled], self.rows[1][self.filled]

    def take(self, frame: tuple[int, int]) -> tuple[Tensor, Tensor] | None:
        """The filled rows for the batch being collated (frame ``frame``); the next batch gets new ones."""
        rows, self.rows, self.filled = self.rows, None, 0
        if self.direct:
            self.frame = frame
        return None if rows is None else (rows[0], rows[1])

    def release(self, buffer: Tensor) -> None:
        """Give a buffer that was never handed over back to the pool."""
        if self.pool is not None:
            self.pool.release(buffer)

    def close(self) -> None:
        """End of the iteration: rows not collated go back to the pool."""
        if self.rows is not None:
            self.release(self.rows[0])
            self.rows = None


IMAGE_MODES: tuple[str, ...] = ("normalised", "uint8")


def _check_image_mode(images: str) -> str:
    """``images`` if it is one of :data:`IMAGE_MODES`, else ValueError naming it."""
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {IMAGE_MODES}, got {images!r}")
    return images


def prepare_batch(batch: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """A batch ready for a model on ``device``: every tensor moved there (non-blocking), uint8 images
    (``images="uint8"`` batches) turned into contiguous ImageNet-normalised float32 there.

    Float images pass through unchanged, so this serves batches of either image mode; lists of
    strings pass through. ``device=None`` keeps every tensor where it is.
    """
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            if device is not None:
                value = value.to(device, non_blocking=True)
            if key in (SRC_IMAGE, TRG_IMAGE) and value.dtype == torch.uint8:
                if value.ndim != 4 or value.shape[1] != 3:
                    raise ValueError(f"{key} must be (b, 3, H, W), got shape {tuple(value.shape)}")
                b, _, h, w = value.shape
                value = _normalise_into(torch.empty((b, 3, h, w), dtype=torch.float32, device=value.device), value)
        out[key] = value
    return out


def _padded(rows: Sequence[Tensor], n: int, fill: float | bool, dtype: torch.dtype) -> Tensor:
    out = torch.full((len(rows), n, *rows[0].shape[1:]), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate(samples: Sequence[PairSample], pad_kps_to: int | None = None, images: str = "normalised") -> dict[str, Any]:
    """Stack samples into a batch of the schema (``actr_core.data.schema``).

    ``images``: "normalised" gives ImageNet-normalised float32 images, ready for a model;
    "uint8" gives the raw RGB bytes (b, 3, H, W) in channels-last memory, for
    :func:`prepare_batch` to normalise on the model's device (less work and memory in the loader).

    Keypoint rows are padded with zeros (``valid_kps`` False) to the largest count in the batch,
    or to ``pad_kps_to`` when given (ValueError if a sample has more). SPair flags are included when
    every sample has them.

    Memory: the tensors of a batch are views of three buffers, one each for the two images, the
    dense targets (``flow``, ``valid_flow``) and the small per-pair fields; a tensor kept beyond
    its batch keeps its whole buffer (``.clone()`` what you keep, as usual for views).
    """
    return _collate(samples, pad_kps_to, images)


def _collate(
    samples: Sequence[PairSample], pad_kps_to: int | None, images: str, buffers: _ImageBuffers | None = None
) -> dict[str, Any]:
    """:func:`collate`, with the image memory of ``buffers`` when given."""
    _check_image_mode(images)
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    sizes = {s.frame_size for s in samples}
    if len(sizes) != 1:
        raise ValueError(f"samples have different frame sizes {sorted(sizes)}; resize them to one size first")
    n = max(len(s.src_kps) for s in samples)
    if pad_kps_to is not None:
        if n > pad_kps_to:
            raise ValueError(f"a sample has {n} keypoints, more than pad_kps_to={pad_kps_to}")
        n = pad_kps_to
    src_image, trg_image = _stacked_images([s.src_image for s in samples], [s.trg_image for s in samples], images, buffers)
    b, grid = len(samples), tuple(samples[0].flow.shape[-2:])
    flow, valid_flow = carve([((b, 2, *grid), torch.float32), ((b, *grid), torch.bool)])
    small = {
        "src_kps": _padded([s.src_kps for s in samples], n, 0.0, torch.float32),
        "trg_kps": _padded([s.trg_kps for s in samples], n, 0.0, torch.float32),
        "valid_kps": _padded([s.valid_kps for s in samples], n, False, torch.bool),
        "src_kps_orig": _padded([s.src_kps_orig for s in samples], n, 0.0, torch.float32),
        "trg_kps_orig": _padded([s.trg_kps_orig for s in samples], n, 0.0, torch.float32),
        "src_size": torch.tensor([s.src_size for s in samples], dtype=torch.int64),
        "trg_size": torch.tensor([s.trg_size for s in samples], dtype=torch.int64),
        "src_bbox": torch.stack([s.src_bbox.float() for s in samples]),
        "trg_bbox": torch.stack([s.trg_bbox.float() for s in samples]),
    }
    if all(all(flag in s.flags for flag in SPAIR_FLAGS) for s in samples):
        for flag in SPAIR_FLAGS:
            small[flag] = torch.tensor([s.flags[flag] for s in samples], dtype=torch.int64)
    small = packed(small)
    batch: dict[str, Any] = {
        "src_image": src_image,
        "trg_image": trg_image,
        **{key: small.pop(key) for key in ("src_kps", "trg_kps", "valid_kps")},
        "flow": torch.stack([s.flow.float() for s in samples], out=flow),
        "valid_flow": torch.stack([s.valid_flow for s in samples], out=valid_flow),
        **small,
        "category": [s.category for s in samples],
        "pair_id": [s.pair_id for s in samples],
        "dataset": [s.dataset for s in samples],
    }
    return batch


# ----------------------------------------------------------------------------------------------
# The data set.


class ShardDataset(IterableDataset):
    """Batches of one split of a shard set, for ``DataLoader(dataset, batch_size=None)`` (see :meth:`loader`).

    Args:
        url: the shard set's directory (local path or fsspec URL) holding ``manifest.json``.
        split: "train", "val" or "test".
        batch_size: pairs per batch.
        training: training epochs (shard and sample shuffling, full batches, equal counts per rank)
            or evaluation epochs (fixed order, every sample exactly once).
        transforms: callables ``(sample, generator) -> sample`` applied in order (augmentation).
        seed: seeds the shard order, the shuffle buffer and the transforms' generators.
        rank, world_size: this process's place among data-parallel ranks; default
            ``torch.distributed``'s when initialised, else 0 of 1.
        on_error: "raise" or "skip" (see the module docstring).
        shuffle_buffer: samples in the training shuffle buffer per worker.
        max_batches: cap on each rank's batches per epoch (None: the plan's full length).
        pad_kps_to: pad keypoint rows to this count (None: the batch's largest count).
        images: "normalised" (float32 ImageNet-normalised, ready for a model) or "uint8" (raw RGB
            in channels-last memory; pass each batch through :func:`prepare_batch`, which
            normalises on the model's device — the faster choice for training and evaluation).
        reuse_buffers: loader workers reuse their image buffers once the receiving process has
            dropped every tensor viewing them (see ``actr_core.data.buffers``); False gives every
            batch fresh memory (for batches handed on to yet another process without a copy).
        storage_options: fsspec options for ``url``.
    """

    def __init__(
        self,
        url: str,
        split: str,
        *,
        batch_size: int,
        training: bool = False,
        transforms: Sequence[Transform] = (),
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        on_error: str = "raise",
        shuffle_buffer: int = SHUFFLE_BUFFER,
        max_batches: int | None = None,
        pad_kps_to: int | None = None,
        images: str = "normalised",
        reuse_buffers: bool = True,
        storage_options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (rank is None) != (world_size is None):
            raise ValueError(f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})")
        _check_image_mode(images)
        if rank is None:
            rank, world_size = distributed_rank()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.url = str(url).rstrip("/")
        self.split = split
        self.batch_size = batch_size
        self.training = training
        self.transforms = tuple(transforms)
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.on_error = check_on_error(on_error)
        self.shuffle_buffer = shuffle_buffer
        self.max_batches = max_batches
        self.pad_kps_to = pad_kps_to
        self.images = images
        self.reuse_buffers = reuse_buffers
        self.storage_options = dict(storage_options or {})
        manifest = read_manifest(self.url, self.storage_options)
        self.shards = shard_urls(self.url, split, manifest)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by persistent workers
        self.num_workers = 1  # set by loader(); used by __len__ and plan()
        self.skipped = SkipLog(on_error)
        self._pool: BufferPool | None = None  # made in each loader worker (see actr_core.data.buffers)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads (see :meth:`set_epoch`)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order and shuffling) before iterating; it is held in shared memory, so
        the workers of a loader with persistent workers read it when the next iteration starts."""
        self._epoch.fill_(int(epoch))

    def plan(self, num_workers: int | None = None) -> EpochPlan:
        """The current epoch's plan for ``num_workers`` loader workers (default: the loader's)."""
        return plan_epoch(
            [count for _, count in self.shards],
            batch_size=self.batch_size,
            world_size=self.world_size,
            num_workers=max(1, num_workers if num_workers is not None else self.num_workers),
            training=self.training,
            epoch=self.epoch,
            seed=self.seed,
            max_batches=self.max_batches,
        )

    def __len__(self) -> int:
        return self.plan().batches_per_rank[self.rank]

    def loader(self, num_workers: int = 2, **kwargs: Any) -> DataLoader:
        """A ``DataLoader`` over this data set (batches are made in the workers).

        The workers persist across epochs by default (``persistent_workers=True``: no start-up per
        epoch); call :meth:`set_epoch` before each pass over the loader, as without them.
        """
        self.num_workers = max(1, num_workers)
        kwargs.setdefault("persistent_workers", num_workers > 0)
        return DataLoader(self, batch_size=None, num_workers=num_workers, **kwargs)

    # -- stages --------------------------------------------------------------------------------

    def _read(self, src: Iterator[tuple[int, str, int]], log: SkipLog) -> Iterator[tuple[str, dict[str, bytes]]]:
        for _, url, expected in src:
            register_fsspec_opener(url)
            seen = 0
            try:
                with gopen(url, **self.storage_options) as stream:
                    for key, members in iter_tar(stream, url):
                        seen += 1
                        yield f"{url}#{key}", members
            except FileNotFoundError:
                log.handle(DataError(url, "shard not found", count=expected))
                continue
            except DataError as error:
                log.handle(DataError(error.where, error.reason, count=max(expected - seen, 0)))
                continue
            if seen != expected:
                log.handle(DataError(url, f"{seen} samples, the manifest says {expected}", count=max(expected - seen, 0)))

    def _decode(
        self, src: Iterator[tuple[str, dict[str, bytes]]], log: SkipLog, buffers: _ImageBuffers | None = None
    ) -> Iterator[PairSample]:
        for where, members in src:
            try:
                sample = decode_sample(members, where, None if buffers is None else buffers.next_rows())
            except DataError as error:
                log.handle(error)
                continue
            yield sample

    def _transform(self, src: Iterator[PairSample], generator: torch.Generator) -> Iterator[PairSample]:
        for sample in src:
            for transform in self.transforms:
                sample = transform(sample, generator)
            yield sample

    def _batch(
        self, src: Iterator[PairSample], limit: int, buffers: _ImageBuffers | None = None
    ) -> Iterator[dict[str, Any]]:
        if limit <= 0:
            return
        made, bucket = 0, []
        for sample in src:
            bucket.append(sample)
            if buffers is not None:
                buffers.filled = len(bucket)
            if len(bucket) == self.batch_size:
                yield _collate(bucket, self.pad_kps_to, self.images, buffers)
                made, bucket = made + 1, []
                if made >= limit:
                    return
        if bucket and not self.training:
            yield _collate(bucket, self.pad_kps_to, self.images, buffers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        if get_worker_info() is None:
            num_workers = 1
        plan = self.plan(num_workers)
        log = SkipLog(self.on_error)
        self.skipped = log
        stream_seed = [self.seed, plan.epoch, self.rank, worker]
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(stream_seed).generate_state(1)[0]))
        shard_list = [(i, *self.shards[i]) for i in plan.order]
        stages: list[Callable[[Iterator[Any]], Iterator[Any]]] = [
            lambda src: split_by_node(src, self.rank, self.world_size),
            lambda src: split_by_worker(src, worker, num_workers),
            lambda src: self._read(src, log),
        ]
        if self.training and self.shuffle_buffer > 1:  # shuffles the encoded samples: 6x smaller than decoded
            rng = random.Random(int(np.random.SeedSequence([*stream_seed, 1]).generate_state(1)[0]))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        in_worker = get_worker_info() is not None
        if in_worker and self.reuse_buffers and self._pool is None:
            self._pool = BufferPool()  # this worker's reused image buffers, kept across epochs
        # images decoded straight into the batch when nothing transforms them in between
        buffers = _ImageBuffers(self.batch_size, self._pool, direct=not self.transforms and self.images == "uint8")
        stages.append(lambda src: self._decode(src, log, buffers))  # decoded right before use, while in cache
        stages.append(lambda src: self._transform(src, generator))
        stages.append(lambda src: self._batch(src, plan.batches[self.rank][worker], buffers))
        pipeline = wds.DataPipeline(lambda: iter(shard_list), *stages)
        try:
            if in_worker:
                yield from (WorkerBatch(batch, self._pool) for batch in pipeline)
            else:
                yield from pipeline
        finally:
            buffers.close()
        log.report(logger, f"{self.url} {self.split} epoch {plan.epoch} rank {self.rank} worker {worker}")
