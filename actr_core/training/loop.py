"""An epoch of training and a validation pass, free of any training framework.

Axis legend: b batch (pairs) · n keypoints · 2 (x, y).

Under ``torch.distributed`` every rank runs these on its own part of the data;
:func:`all_reduce_sum` adds the per-rank sums so every rank sees the same totals.
Validation runs the inner model (never the DDP wrapper), so ranks may see different numbers of
validation batches without a collective waiting on them. It scores the reference predictors
(identity, and the classical peer when asked) on the same validation pairs; they do not change
from epoch to epoch, so :class:`ValidationReferences` computes each pair's reference scores once
and reuses them, and the all-reduce gives every rank the same totals.
"""

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from jaxtyping import Shaped
from torch import Tensor, nn

from actr_core.blocks import masked_flow_loss
from actr_core.data.schema import PairBatch
from actr_core.metrics import IDENTITY, REFERENCE_NAMES, ScoringProtocol, get_protocol, reference_predictor, score_batch
from actr_core.training.optim import unwrap_model
from actr_core.training.step import StepResult, StepSettings, autocast_context, move_batch, train_step

if TYPE_CHECKING:
    from actr_core.models import CorrespondenceModel

__all__ = ["train_epoch", "ValidationReferences", "ValidationResult", "validate", "all_reduce_sum"]


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
    batches: Iterable[PairBatch],
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
    iterator: Iterator[PairBatch] = iter(batches)
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
    """Validation totals (summed over ranks): mean loss over batches and mean PCK over pairs.

    ``loss`` is the model's own objective (for ``actr_conv_tiny``, Eq. 4 plus the correlation
    cross-entropy, so not comparable across models); ``flow_epe`` is Eq. 4 alone, the masked
    end-point error of ``output.flow`` in pixels of the flow grid, the same quantity for every
    model.

    ``references``: each reference predictor's PCK on the same pairs (per image, same α and
    protocol); ``reference_fallbacks``: pairs on which it fell back to identity.
    """

    loss: float
    pck: float
    batches: int
    pairs: int
    references: Mapping[str, float] = dataclasses.field(default_factory=dict)
    reference_fallbacks: Mapping[str, int] = dataclasses.field(default_factory=dict)
    flow_epe: float = math.nan


def _flow_epe(flow: Tensor, batch: PairBatch) -> float:
    """Eq. 4 of ``flow`` against the batch's flow (pixels of the flow grid); NaN when the grids differ."""
    if tuple(batch.flow.shape) != tuple(flow.shape):
        return math.nan
    return float(masked_flow_loss(flow.float(), batch.flow.float(), batch.valid_flow))


class ValidationReferences:
    """The reference predictors of a validation set, scored once per pair and then reused.

    The references (:mod:`actr_core.metrics.references`) do not learn: their score on a
    validation pair is the same at every epoch. Each pair's outcome (correct and valid keypoints,
    fall-back) is kept under (protocol, α, input size, ``pair_id``); a batch whose pairs are all
    known is not run again. A batch with an unnamed pair (``pair_id`` "") is scored every time. Keep one instance
    per training run (per rank) and pass it to every :func:`validate` call.

    Args:
        names: reference predictors by name; ``identity`` is always included.
    """

    def __init__(self, names: Sequence[str] = REFERENCE_NAMES) -> None:
        if isinstance(names, str):
            raise ValueError(f"names must be a list of reference names, got the string {names!r}")
        unknown = [n for n in names if n not in REFERENCE_NAMES]
        if unknown:
            raise ValueError(f"unknown reference predictors {unknown}; choose from {list(REFERENCE_NAMES)}")
        self.names: tuple[str, ...] = (IDENTITY, *(n for n in names if n != IDENTITY))
        self._predictors = {name: reference_predictor(name) for name in self.names}
        self._known: dict[tuple, dict[str, tuple[int, int, bool]]] = {}
        self.batches_run = 0  # batches the references were actually run on (the rest came from the cache)

    def score(
        self, batch: PairBatch, protocol: ScoringProtocol, alpha: float
    ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per reference: correct keypoints, valid keypoints and fall-back, each ``(b,)``, for ``batch``."""
        keys = [(protocol, float(alpha), batch.input_size, pair) for pair in batch.pair_id] if all(batch.pair_id) else None
        if keys is None or not all(key in self._known for key in keys):
            self.batches_run += 1
            fresh: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
            for name, predictor in self._predictors.items():
                scores = score_batch(predictor, batch, protocol, (alpha,))
                n_valid = scores.valid.sum(axis=1)
                fallback = scores.fallback if scores.fallback is not None else np.zeros(len(n_valid), dtype=bool)  # None: never
                fresh[name] = (scores.n_correct[0], n_valid, fallback)
            if keys is None:
                return fresh
            for i, key in enumerate(keys):
                self._known[key] = {name: (int(c[i]), int(v[i]), bool(f[i])) for name, (c, v, f) in fresh.items()}
        rows = [self._known[key] for key in keys]

        def column(name: str, j: int) -> np.ndarray:
            return np.array([row[name][j] for row in rows])

        return {name: (column(name, 0), column(name, 1), column(name, 2)) for name in self.names}


@torch.no_grad()
def validate(
    model: nn.Module,
    batches: Iterable[PairBatch],
    *,
    device: torch.device,
    alpha: float,
    protocol: str | ScoringProtocol = "standard",
    max_batches: int = 0,
    autocast_dtype: torch.dtype | None = None,
    references: ValidationReferences | Sequence[str] | None = (IDENTITY,),
) -> ValidationResult:
    """The model's loss and PCK@α on validation batches (all of them, or the first ``max_batches``),
    beside the reference predictors' PCK on the same pairs.

    PCK is scored by :func:`actr_core.metrics.score_batch` under ``protocol`` (default
    "standard": target-side threshold chosen per dataset, errors in original target pixels,
    keypoints moved by the model's ``transfer``) and averaged per image: each pair's fraction of
    correct keypoints, then the mean over pairs; a pair with no valid keypoint is not counted.
    ``references``: a :class:`ValidationReferences` kept across calls (each pair's reference
    scores are computed once), reference names (computed afresh; default identity alone) or
    None. Under ``torch.distributed`` the totals of all ranks are combined (every rank must call
    this, with the same reference names).
    """
    matcher = cast("CorrespondenceModel", unwrap_model(model))
    protocol = get_protocol(protocol)
    if references is not None and not isinstance(references, ValidationReferences):
        references = ValidationReferences(references) if references else None
    names = references.names if references is not None else ()
    was_training = matcher.training
    matcher.eval()
    # loss sum, batches, pck sum, pairs, Eq. 4 sum; then per reference: pck sum, pairs, fall-backs
    sums = torch.zeros(5 + 3 * len(names), dtype=torch.float64)
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            batch = move_batch(batch, device)
            with autocast_context(device, autocast_dtype):
                output = matcher(batch.src_image, batch.trg_image)
                loss = matcher.loss(output, batch)
                epe = _flow_epe(output.flow, batch)
            scores = score_batch(matcher, batch, protocol, (alpha,), output=output)
            n_valid = scores.valid.sum(axis=1)
            counted = n_valid > 0
            per_pair = scores.n_correct[0][counted] / n_valid[counted]
            row = [float(loss), 1.0, float(per_pair.sum()), float(counted.sum()), float(epe)]
            if references is not None:
                for n_correct, n_valid_ref, fallback in references.score(batch, protocol, alpha).values():
                    scored = n_valid_ref > 0
                    row += [float((n_correct[scored] / n_valid_ref[scored]).sum()), float(scored.sum()), float(fallback.sum())]
            sums += torch.tensor(row, dtype=torch.float64)
    finally:
        matcher.train(was_training)
    totals = all_reduce_sum(sums).tolist()
    loss_sum, n_batches, pck_sum, n_pairs, epe_sum = totals[:5]
    per_reference = [totals[5 + 3 * i : 8 + 3 * i] for i in range(len(names))]
    return ValidationResult(
        loss=loss_sum / n_batches if n_batches else math.nan,
        pck=pck_sum / n_pairs if n_pairs else math.nan,
        batches=int(n_batches),
        pairs=int(n_pairs),
        references={name: s / n if n else math.nan for name, (s, n, _) in zip(names, per_reference, strict=True)},
        reference_fallbacks={name: int(f) for name, (_, _, f) in zip(names, per_reference, strict=True)},
        flow_epe=epe_sum / n_batches if n_batches else math.nan,
    )
