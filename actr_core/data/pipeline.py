"""Reading shard sets: the WebDataset pipeline that feeds training and evaluation with schema batches.

Axis legend: b batch · n keypoints (padded to the batch's largest count) · H W model input frame ·
h w flow grid (H/4 × W/4).

Stages (a ``webdataset.DataPipeline`` built per epoch in each loader worker)::

    this worker's shards (from the epoch plan: manifest order, shuffled per epoch when training;
        rank r of R takes shards r, r + R, ... of that order, its worker w of W every W-th of those)
    -> each shard read whole through webdataset's gopen (fsspec registered for the URL's scheme),
       its sha256 checked against the manifest, then split into samples by webdataset's tar iteration
    -> shuffle buffer of encoded samples (training, ``wds.shuffle``) -> decode (JPEG/PNG, npy, JSON)
    -> transforms (augmentation) -> ``wds.batched`` with :func:`collate` (a
       :class:`~actr_core.data.schema.PairBatch`) -> the plan's batch count

Epoch guarantees (:func:`plan_epoch` computes them; ``ShardDataset.plan`` exposes them):

- evaluation (``training=False``): every sample of the split is yielded exactly once per epoch
  across all ranks and workers; the last batch of a worker may be partial; ranks may get
  different batch counts (gather results with variable sizes).
- training (``training=True``): every sample is yielded at most once per epoch and every rank
  yields the same number of full batches, ``N = min over ranks of (its full batches)``. Dropped
  per epoch: each worker's remainder below a full batch, plus the batches a rank has beyond N —
  ``plan.dropped`` samples in all, reported by :meth:`ShardDataset.plan`. Nothing is padded or
  repeated. Use at least ``ranks × workers`` shards of similar size to keep the drop small.

Integrity: a shard that is missing, whose bytes do not match the manifest's sha256, that does not
parse or holds another sample count than its entry raises :class:`~actr_core.data.errors.DataError`
naming the shard before any of its samples is yielded. Evaluation always stops there (its
exactly-once guarantee would not hold); training under ``on_error="skip"`` leaves the whole shard
out and counts its samples. Bad samples inside an intact shard (an undecodable image, missing
members, NaN values) raise under ``on_error="raise"`` (the default) and are counted under
``"skip"``. Counts are logged at the end of the epoch by each worker; skips in training shorten that
rank's epoch (the count says by how much).
"""

import dataclasses
import functools
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
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.gopen import gopen, gopen_schemes

from actr_core.batch import normalise_uint8
from actr_core.data.errors import DataError, SkipLog, check_on_error
from actr_core.data.samples import PairSample, decode_sample
from actr_core.data.schema import MANIFEST_NAME, SPAIR_FLAGS, PairBatch
from actr_core.data.shards import check_manifest, manifest_problems, read_manifest, sha256_hex, shard_urls, tar_samples

__all__ = [
    "EpochPlan",
    "IMAGE_MODES",
    "ShardDataset",
    "collate",
    "distributed_rank",
    "plan_epoch",
    "prepare_batch",
    "read_shard",
    "register_fsspec_opener",
]

logger = logging.getLogger(__name__)

Transform = Callable[[PairSample, torch.Generator], PairSample]
_LOCAL_SCHEMES = ("", "file", "pipe")  # schemes webdataset's gopen opens itself
SHUFFLE_BUFFER = 256  # samples held by the training shuffle buffer (per worker; chosen)


# ----------------------------------------------------------------------------------------------
# fsspec behind webdataset's gopen; whole shards checked against the manifest.


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **storage_options: Any) -> Any:
    return fsspec.open(url, mode, **storage_options).open()


def register_fsspec_opener(url: str) -> None:
    """Make ``webdataset.gopen`` open URLs of ``url``'s scheme (``memory://``, ``s3://`` ...) through fsspec.

    Idempotent; local paths, ``file://`` and ``pipe:`` keep webdataset's own openers.
    """
    scheme = urlparse(url).scheme
    if scheme not in _LOCAL_SCHEMES and gopen_schemes.get(scheme) is not _gopen_fsspec:
        gopen_schemes[scheme] = _gopen_fsspec


def read_shard(url: str, sha256: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole shard at ``url`` (through ``webdataset.gopen``), once its sha256 equals the manifest's;
    a missing shard or other bytes raise :class:`DataError` naming the shard."""
    register_fsspec_opener(url)
    try:
        with gopen(url, "rb", **dict(storage_options or {})) as stream:
            data = stream.read()
    except FileNotFoundError as error:
        raise DataError(url, "shard not found") from error
    digest = sha256_hex(data)
    if digest != sha256:
        raise DataError(
            url, f"sha256 {digest[:16]}… differs from the manifest's {sha256[:16]}… ({len(data)} bytes): the shard "
            "is corrupt or was replaced; verify_shards lists the damage, rerunning make_shards rebuilds it"
        )  # fmt: skip
    return data


# ----------------------------------------------------------------------------------------------
# Ranks, workers and the epoch plan.


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of ``torch.distributed`` when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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

IMAGE_MODES: tuple[str, ...] = ("normalised", "uint8")


def _check_image_mode(images: str) -> str:
    """``images`` if it is one of :data:`IMAGE_MODES`, else ValueError naming it."""
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {IMAGE_MODES}, got {images!r}")
    return images


def prepare_batch(batch: PairBatch, device: torch.device | str | None = None) -> PairBatch:
    """A batch ready for a model on ``device``: every tensor moved there (non-blocking), uint8 images
    (``images="uint8"`` batches) turned into contiguous ImageNet-normalised float32 there
    (:meth:`PairBatch.normalised`). ``device=None`` keeps every tensor where it is; a batch of float
    images with ``device=None`` comes back as it is.
    """
    if not isinstance(batch, PairBatch):
        raise TypeError(f"a batch must be a PairBatch (actr_core.data), got {type(batch).__name__}")
    return (batch if device is None else batch.to(device, non_blocking=True)).normalised()


def _padded(rows: Sequence[Tensor], n: int, fill: float | bool, dtype: torch.dtype) -> Tensor:
    out = torch.full((len(rows), n, *rows[0].shape[1:]), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate(samples: Sequence[PairSample], pad_kps_to: int | None = None, images: str = "normalised") -> PairBatch:
    """Stack samples into a :class:`~actr_core.data.schema.PairBatch`.

    ``images``: "normalised" gives ImageNet-normalised float32 images, ready for a model;
    "uint8" gives the raw RGB bytes (b, 3, H, W) in channels-last memory (each decoded (H, W, 3)
    image one plain copy, a quarter of the float batch's bytes), for :func:`prepare_batch` to
    normalise on the model's device (less work and memory in the loader).

    Keypoint rows are padded with zeros (``valid_kps`` and ``annotated_kps`` False) to the largest count in the batch,
    or to ``pad_kps_to`` when given (ValueError if a sample has more). SPair flags are included when
    every sample has them.
    """
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
    # the bulky tensors through default_collate, which stacks straight into shared memory in a loader
    # worker (handing the batch over then copies nothing); uint8 images as (b, H, W, 3) bytes, channels-last
    pictures = {}
    for key in ("src_image", "trg_image"):
        if images == "uint8":
            pictures[key] = default_collate([getattr(s, key).permute(1, 2, 0) for s in samples]).permute(0, 3, 1, 2)
        else:
            pictures[key] = default_collate([normalise_uint8(getattr(s, key)[None])[0] for s in samples])
    flagged = all(all(flag in s.flags for flag in SPAIR_FLAGS) for s in samples)
    return PairBatch(
        **pictures,
        src_kps=_padded([s.src_kps for s in samples], n, 0.0, torch.float32),
        trg_kps=_padded([s.trg_kps for s in samples], n, 0.0, torch.float32),
        valid_kps=_padded([s.valid_kps for s in samples], n, False, torch.bool),
        annotated_kps=_padded([torch.ones(len(s.src_kps), dtype=torch.bool) for s in samples], n, False, torch.bool),
        flow=default_collate([s.flow.float() for s in samples]),
        valid_flow=default_collate([s.valid_flow for s in samples]),
        src_kps_orig=_padded([s.src_kps_orig for s in samples], n, 0.0, torch.float32),
        trg_kps_orig=_padded([s.trg_kps_orig for s in samples], n, 0.0, torch.float32),
        src_size=torch.tensor([s.src_size for s in samples], dtype=torch.int64),
        trg_size=torch.tensor([s.trg_size for s in samples], dtype=torch.int64),
        src_bbox=torch.stack([s.src_bbox.float() for s in samples]),
        trg_bbox=torch.stack([s.trg_bbox.float() for s in samples]),
        category=tuple(s.category for s in samples),
        pair_id=tuple(s.pair_id for s in samples),
        dataset=tuple(s.dataset for s in samples),
        flags={flag: torch.tensor([s.flags[flag] for s in samples], dtype=torch.int64) for flag in SPAIR_FLAGS if flagged},
    )


# ----------------------------------------------------------------------------------------------
# The data set.


def _stream_seed(*parts: int) -> int:
    """A 32-bit seed for one random stream, from (seed, epoch, rank, worker[, stage])."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class ShardDataset(IterableDataset):
    """Batches of one split of a shard set; iterate it directly or through :meth:`loader` (a ``DataLoader``
    with ``batch_size=None``: the batches are made in its workers).

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
        allow_incomplete: read a shard set whose manifest says ``complete: false`` or lacks shard
            entries (an interrupted make_shards run: the shards listed so far); by default such a
            manifest raises :class:`DataError` naming the problem.
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
        allow_incomplete: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if (rank is None) != (world_size is None):
            raise ValueError(f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})")
        _check_image_mode(images)
        if rank is None or world_size is None:  # both or neither (checked above)
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
        self.storage_options = dict(storage_options or {})
        manifest = read_manifest(self.url, self.storage_options)
        where = f"{self.url}/{MANIFEST_NAME}"
        if manifest is not None:
            check_manifest(manifest, where, allow_incomplete=allow_incomplete)
        # what makes the set incomplete (read under allow_incomplete); report it beside any result
        self.incomplete: list[str] = manifest_problems(manifest)[0] if manifest is not None else []
        self.shards = shard_urls(self.url, split, manifest)
        if not self.shards and self.incomplete:
            raise DataError(where, f"split {split!r} has no shards written: the shard set is incomplete "
                                   f"({'; '.join(self.incomplete)})")  # fmt: skip
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by persistent workers
        self.num_workers = 1  # set by loader(); used by __len__ and plan()
        self.skipped = SkipLog(on_error)

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
            [count for _, count, _ in self.shards],
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
        """A ``DataLoader`` over this data set (batches are made in the workers); ``kwargs``
        (``pin_memory``, ``prefetch_factor``, ``worker_init_fn`` ...) go to the ``DataLoader``.

        The workers persist across epochs by default (``persistent_workers=True``: no start-up per
        epoch); call :meth:`set_epoch` before each pass over the loader, as without them.
        """
        self.num_workers = max(1, num_workers)
        kwargs.setdefault("persistent_workers", num_workers > 0)
        return DataLoader(self, batch_size=None, num_workers=num_workers, **kwargs)

    # -- stages --------------------------------------------------------------------------------

    def _shard_samples(self, shards: Sequence[tuple[str, int, str]], log: SkipLog) -> Iterator[dict[str, Any]]:
        """The encoded samples of each shard, once the whole shard passed its checks (module docstring)."""
        for url, expected, sha256 in shards:
            try:
                samples = tar_samples(read_shard(url, sha256, self.storage_options), url)
                if len(samples) != expected:
                    raise DataError(url, f"{len(samples)} samples, the manifest says {expected}")
            except DataError as error:
                if not self.training:
                    raise
                log.handle(DataError(error.where, error.reason, count=expected))
                continue
            for key, members in samples:
                yield {"__key__": f"{url}#{key}", **members}

    def _decode(self, sample: dict[str, Any]) -> PairSample:
        return decode_sample({k: v for k, v in sample.items() if k != "__key__"}, sample["__key__"])

    def _transform(self, sample: PairSample, generator: torch.Generator) -> PairSample:
        for transform in self.transforms:
            sample = transform(sample, generator)
        return sample

    def __iter__(self) -> Iterator[PairBatch]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        plan = self.plan(num_workers)
        log = SkipLog(self.on_error)
        self.skipped = log

        def skip_bad_sample(error: Exception) -> bool:  # webdataset's handler: True continues with the next sample
            if not isinstance(error, DataError):
                raise error
            log.handle(error)
            return True

        generator = torch.Generator().manual_seed(_stream_seed(self.seed, plan.epoch, self.rank, worker))
        shards = [self.shards[i] for i in plan.shards[self.rank][worker]]
        stages: list[Callable[[Iterator[Any]], Iterator[Any]]] = []
        if self.training and self.shuffle_buffer > 1:  # shuffles the encoded samples: 6x smaller than decoded
            rng = random.Random(_stream_seed(self.seed, plan.epoch, self.rank, worker, 1))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        collation = functools.partial(collate, pad_kps_to=self.pad_kps_to, images=self.images)
        pipeline = wds.DataPipeline(
            lambda: self._shard_samples(shards, log),
            *stages,
            wds.map(self._decode, handler=skip_bad_sample),
            wds.map(functools.partial(self._transform, generator=generator)),
            wds.batched(self.batch_size, collation_fn=collation, partial=not self.training),
            wds.slice(max(plan.batches[self.rank][worker], 0)),
        )
        yield from pipeline
        log.report(logger, f"{self.url} {self.split} epoch {plan.epoch} rank {self.rank} worker {worker}")
