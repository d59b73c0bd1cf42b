"""Batch memory: where a loader worker puts a batch and how it reaches the main process.

A batch's tensors are views of a few buffers (:func:`carve`): the two images, the dense targets,
the small per-pair fields. Inside a loader worker the buffers live in shared memory, and a batch
travels to the main process as one shared buffer per storage plus a description of each view
(:class:`WorkerBatch`), instead of one buffer and one file-descriptor hand-over per tensor.

Image buffers are the bulk (12.6 MB for 32 uint8 pairs at 256 px) and writing fresh shared memory
costs a page fault per 4 KB in both processes, so each worker reuses its image buffers
(:class:`BufferPool`). A buffer is reused only after the main process has dropped every tensor that
views it: each pool has a lease flag per buffer in shared memory; the worker sets a flag when it
fills the buffer, the flags travel with the batch, and the main process clears a flag once a weak
reference to the buffer's storage has expired (checked whenever a batch arrives). A worker with no
free buffer allocates a fresh one, which is what happens without a pool. A buffer taken but never
handed over (an abandoned iteration) stays out: the pool then has one buffer less.

The guarantee holds for the process that receives the batches: a batch handed on from there to
another process (a multiprocessing queue) is not tracked there, so clone it first, or read with
``ShardDataset(reuse_buffers=False)``.
"""

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import get_worker_info

__all__ = ["BufferPool", "WorkerBatch", "carve", "empty", "packed"]

ALIGN = 64  # bytes: each tensor carved from a buffer starts on a cache line
POOL_BUFFERS = 6  # reused image buffers per worker: 4 cover the batches in flight (prefetch 2) and the consumer's; 2 spare


def empty(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor; inside a loader worker it lives in shared memory, so that handing the batch
    to the main process copies nothing (the allocation ``default_collate`` makes)."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    like = torch.empty(0, dtype=dtype)
    storage = like._typed_storage()._new_shared(math.prod(shape), device="cpu")  # noqa: SLF001 (as default_collate)
    return like.new(storage).view(tuple(shape))


def carve(specs: Sequence[tuple[Sequence[int], torch.dtype]], pool: "BufferPool | None" = None) -> list[Tensor]:
    """Uninitialised contiguous tensors of the given (shape, dtype), all views of one buffer: from ``pool``
    when given, else new (shared memory inside a loader worker, see :func:`empty`)."""
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        total += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
    buffer = pool.acquire(total) if pool is not None else empty((total,), torch.uint8)
    return [
        buffer[start : start + math.prod(shape) * dtype.itemsize].view(dtype).view(tuple(shape))
        for start, (shape, dtype) in zip(offsets, specs, strict=True)
    ]


def packed(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` copied into views of one buffer (see :func:`carve`), same keys, shapes and dtypes."""
    views = carve([(tuple(t.shape), t.dtype) for t in tensors.values()])
    return {key: view.copy_(t) for (key, t), view in zip(tensors.items(), views, strict=True)}


# ----------------------------------------------------------------------------------------------
# Reused buffers and their leases.

_watched: list[tuple[StorageWeakRef, Tensor, int]] = []  # main process: buffers received and not yet released
_watch_lock = threading.Lock()  # batches may arrive in the pin-memory thread


def _watch(received: Sequence[tuple[Any, Tensor, int]]) -> None:
    """Main process: watch the (storage, lease flags, index) of reused buffers just received, and clear
    the lease of every watched buffer whose storage no tensor views any more."""
    with _watch_lock:
        _watched.extend((StorageWeakRef(storage), flags, index) for storage, flags, index in received)
        keep = []
        for ref, flags, index in _watched:
            if ref.expired():
                flags[index] = 0
            else:
                keep.append((ref, flags, index))
        _watched[:] = keep


class BufferPool:
    """A loader worker's reusable shared-memory buffers (see the module docstring).

    ``flags`` (uint8, shared memory, one per buffer) travel with each batch that uses a buffer, so
    the main process can clear them; every pool has its own, so loaders never share a lease.
    """

    def __init__(self, buffers: int = POOL_BUFFERS):
        self.flags = torch.zeros(buffers, dtype=torch.uint8).share_memory_()
        self._flags = self.flags.numpy()  # the same memory, cheap to read
        self.buffers: list[Tensor | None] = [None] * buffers
        self.leases: dict[int, int] = {}  # storage address of a live pooled buffer -> its index
        self.fresh = 0  # buffers allocated because every pooled one was out

    def acquire(self, nbytes: int) -> Tensor:
        """A uint8 buffer of ``nbytes``: a free pooled one (its lease taken), else a fresh one."""
        for index, out in enumerate(self._flags):
            if not out:
                buffer = self.buffers[index]
                if buffer is None or buffer.numel() != nbytes:
                    if buffer is not None:
                        del self.leases[buffer.untyped_storage().data_ptr()]
                    buffer = self.buffers[index] = empty((nbytes,), torch.uint8)
                    self.leases[buffer.untyped_storage().data_ptr()] = index
                self._flags[index] = 1
                return buffer
        self.fresh += 1
        return empty((nbytes,), torch.uint8)

    def release(self, buffer: Tensor) -> None:
        """Give back a pooled buffer that was never handed over (no-op for any other tensor)."""
        index = self.leases.get(buffer.untyped_storage().data_ptr())
        if index is not None:
            self._flags[index] = 0

    def lease(self, storage: Any) -> int | None:
        """The pool index of ``storage``, or None if it is not a pooled buffer."""
        return self.leases.get(storage.data_ptr())


# ----------------------------------------------------------------------------------------------
# Handing a batch over.


class WorkerBatch(dict):
    """A batch made in a loader worker. It pickles (to the main process) as one shared-memory buffer per
    distinct storage with a view description per tensor, and unpickles as a plain ``dict`` of the same
    tensors (views of those buffers); buffers from ``pool`` travel with their lease."""

    def __init__(self, batch: Mapping[str, Any], pool: BufferPool | None = None):
        super().__init__(batch)
        self.pool = pool

    def __reduce__(self) -> tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]:
        indices: dict[int, int] = {}
        buffers: list[Tensor] = []
        leases: list[tuple[int, int]] = []  # (buffer, pool index)
        entries: list[tuple[str, Any, Any]] = []
        for key, value in self.items():
            if isinstance(value, Tensor) and value.device.type == "cpu" and not value.requires_grad and value.numel():
                storage = value.untyped_storage()
                index = indices.setdefault(storage.data_ptr(), len(buffers))
                if index == len(buffers):
                    buffers.append(torch.empty(0, dtype=torch.uint8).set_(storage))
                    lease = None if self.pool is None else self.pool.lease(storage)
                    if lease is not None:
                        leases.append((index, lease))
                view = (index, value.dtype, value.storage_offset(), tuple(value.shape), value.stride())
                entries.append((key, view, None))
            else:
                entries.append((key, None, value))
        flags = self.pool.flags if leases else None
        return _rebuild_batch, (buffers, entries, flags, leases)

    def __copy__(self) -> "WorkerBatch":  # default_convert copies the batch: keep the packing
        return type(self)(self, self.pool)


def _rebuild_batch(
    buffers: Sequence[Tensor],
    entries: Sequence[tuple[str, Any, Any]],
    flags: Tensor | None = None,
    leases: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    """The plain ``dict`` a pickled :class:`WorkerBatch` stands for; watches its reused buffers."""
    out: dict[str, Any] = {}
    for key, view, value in entries:
        if view is None:
            out[key] = value
        else:
            index, dtype, offset, shape, stride = view
            out[key] = torch.empty(0, dtype=dtype).set_(buffers[index].untyped_storage(), offset, shape, stride)
    _watch([(buffers[index].untyped_storage(), flags, lease) for index, lease in leases])
    return out
