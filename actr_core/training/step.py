"""One optimiser step on one batch, free of any training framework.

Axis legend: b batch · H W model input · h w flow grid (H/4, W/4) · n keypoints.

``train_step`` works on any model of the library (the matcher interface: ``model(src, trg)``
returns an output with ``flow``; ``model.loss(output, batch)`` is the model's own objective),
bare or wrapped in ``DistributedDataParallel`` (the forward goes through the wrapper so that
gradients are synchronised; the loss is taken from the inner model).
"""

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from actr_core.blocks.device_table import PRECISIONS, autocast_dtype
from actr_core.data.pipeline import prepare_batch
from actr_core.data.schema import PairBatch
from actr_core.training.optim import unwrap_model

if TYPE_CHECKING:
    from actr_core.models import CorrespondenceModel

__all__ = ["StepSettings", "StepResult", "train_step", "move_batch", "autocast_context", "precision_settings"]

AUTOCAST_DTYPES = PRECISIONS  # precision name → autocast dtype (actr_core.blocks.device_table)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """How a step runs: mixed precision and gradient clipping.

    Attributes:
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` to run the forward under autocast,
            None for full precision.
        clip_grad_norm: clip the global gradient L2 norm to this value; 0 = no clipping.
    """

    autocast_dtype: torch.dtype | None = None
    clip_grad_norm: float = 0.0

    def __post_init__(self) -> None:
        if self.clip_grad_norm < 0:
            raise ValueError(f"clip_grad_norm must be >= 0, got {self.clip_grad_norm}")
        if self.autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, bfloat16 or float16, got {self.autocast_dtype}")


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one step did. ``loss`` is the batch loss (float); ``grad_norm`` the gradient norm before
    clipping (None when no clipping was asked); ``skipped`` is True when a GradScaler found inf/NaN
    gradients and skipped the update."""

    loss: float
    grad_norm: float | None
    skipped: bool


def precision_settings(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype, use a GradScaler)`` for a precision name (``TrainConfig.precision``) on a device.

    The device table decides (:func:`actr_core.blocks.autocast_dtype`): mixed precision on CUDA
    only; on CPU every precision runs in float32 (CPU autocast is slower than float32 for these
    models on small machines). float16 gets a GradScaler (its range underflows small gradients);
    bfloat16 has float32's range and needs none.
    """
    dtype = autocast_dtype(precision, device)
    return dtype, dtype is torch.float16


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_batch(batch: PairBatch, device: torch.device) -> PairBatch:
    """The batch with every tensor on ``device`` (non-blocking) and uint8 images normalised there
    (:func:`actr_core.data.prepare_batch`)."""
    return prepare_batch(batch, device)


def train_step(
    model: nn.Module,
    batch: PairBatch,
    optimizer: torch.optim.Optimizer,
    *,
    settings: StepSettings = StepSettings(),
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """Forward, the model's loss, backward, optional clipping, and one optimiser step.

    Args:
        model: a matcher (or DDP around one); put in train mode here.
        batch: a :class:`~actr_core.data.PairBatch`, already on the model's device.
        optimizer: steps once (unless ``scaler`` skips the step).
        settings: autocast dtype and clipping.
        scaler: a ``torch.amp.GradScaler`` for float16 training, else None.

    Raises:
        FloatingPointError: the loss is not finite and no scaler is there to skip the step
            (the parameters are left untouched).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(batch.src_image.device, settings.autocast_dtype):
        output = model(batch.src_image, batch.trg_image)
        loss = cast("CorrespondenceModel", unwrap_model(model)).loss(output, batch)
    loss_value = float(loss.detach())
    if scaler is None and not math.isfinite(loss_value):
        raise FloatingPointError(f"training loss is {loss_value}; the step was not taken")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = None
    if settings.clip_grad_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings.clip_grad_norm))
    skipped = False
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale_before
    else:
        optimizer.step()
    return StepResult(loss=loss_value, grad_norm=grad_norm, skipped=skipped)
