"""An epoch of training and a validation pass, free of any training framework.

Axis legend: b batch (pairs) · n keypoints · 2 (x, y).

Under ``torch.distributed`` every rank runs these on its own part of the data;
:func:`all_reduce_sum` adds the per-rank sums so every rank sees the same totals.
Validation runs the inner model (never the DDP wrapper), so ranks may see different numbers of
validation batches without a collective waiting on them.
"""

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from jaxtyping import Shaped
from torch import Tensor, nn

from actr_core.metrics import ScoringProtocol, get_protocol, score_batch
from actr_core.training.optim import unwrap_model
from actr_core.training.step import StepResult, StepSettings, autocast_context, move_batch, train_step

__all__ = ["train_epoch", "ValidationResult", "validate", "all_reduce_sum"]


def all_reduce_sum(values: Shaped[Tensor, "*shape"]) -> Shaped[Tensor, "*shape"]:
    """Sum ``values`` over all ranks when ``torch.distributed`` is initialised (else return it unchanged)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    on_cuda = torch.distributed.get_backend() == "nccl"
    work = values.to(torch.device("cuda", torch.cuda.current_device())) if on_cuda else values.clone()
    torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM)
    return work.to(values.device)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    steps: int,
    device: torch.device,
    settings: StepSettings = StepSettings(),
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, StepResult], None] | None = None,
) -> list[float]:
    """Take exactly ``steps`` optimiser steps on the next ``steps`` batches; returns their losses.

    ``on_step(i, result)`` is called after step ``i`` (0-based within the epoch); the scheduler
    steps once per optimiser step. Raises ``RuntimeError`` when ``batches`` ends early (every
    DDP rank must take the same number of steps).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    losses: list[float] = []
    iterator: Iterator[Mapping[str, Any]] = iter(batches)
    for i in range(steps):
        try:
            batch = next(iterator)
        except StopIteration:
            raise RuntimeError(
                f"the training data ended after {i} of {steps} batches in this epoch; give more shards "
                "or fewer steps_per_epoch (every worker must take the same number of steps)"
            ) from None
        result = train_step(model, move_batch(batch, device), optimizer, settings=settings, scaler=scaler)
        if scheduler is not None:
            scheduler.step()
        losses.append(result.loss)
        if on_step is not None:
            on_step(i, result)
    return losses


@dataclasses.dataclass(frozen=True)
class ValidationResult:
    """Validation totals (summed over ranks): mean loss over batches and mean PCK over pairs."""

    loss: float
    pck: float
    batches: int
    pairs: int


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device,
    alpha: float,
    protocol: str | ScoringProtocol = "standard",
    max_batches: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> ValidationResult:
    """The model's loss and PCK@α on validation batches (all of them, or the first ``max_batches``).

    PCK is scored by :func:`actr_core.metrics.score_batch` under ``protocol`` (default
    "standard": target-side threshold chosen per dataset, errors in original target pixels,
    keypoints moved by the model's ``transfer``) and averaged per image: each pair's fraction of
    correct keypoints, then the mean over pairs; a pair with no valid keypoint is not counted.
    Under ``torch.distributed`` the totals of all ranks are combined (every rank must call this).
    """
    matcher = unwrap_model(model)
    protocol = get_protocol(protocol)
    was_training = matcher.training
    matcher.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, batches, pck sum, pairs
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            batch = move_batch(batch, device)
            with autocast_context(device, autocast_dtype):
                output = matcher(batch["src_image"], batch["trg_image"])
                loss = matcher.loss(output, batch)
            scores = score_batch(matcher, batch, protocol, (alpha,), output=output)
            n_valid = scores.valid.sum(axis=1)
            counted = n_valid > 0
            per_pair = scores.n_correct[0][counted] / n_valid[counted]
            sums += torch.tensor([float(loss), 1.0, float(per_pair.sum()), float(counted.sum())], dtype=torch.float64)
    finally:
        matcher.train(was_training)
    loss_sum, n_batches, pck_sum, n_pairs = all_reduce_sum(sums).tolist()
    return ValidationResult(
        loss=loss_sum / n_batches if n_batches else math.nan,
        pck=pck_sum / n_pairs if n_pairs else math.nan,
        batches=int(n_batches),
        pairs=int(n_pairs),
    )
