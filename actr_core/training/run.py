"""One training run in one process, and the run folder's files, free of any framework.

:func:`fit` is what each training process runs: build the model, data, optimiser and schedule
from a :class:`TrainConfig`; resume; train epoch by epoch; validate beside the reference
predictors; write a checkpoint per epoch (rank 0) and hand it to ``report``. The caller (the Ray
pipeline ``pipelines/train.py``, or a test with one process) supplies the distributed pieces:
its rank and world size, the device, how to wrap the model (DDP), what to do with each epoch's
metrics and checkpoint, and the checkpoint it restored (if any).

The run folder ``<runs_dir>/<name>/`` holds ``checkpoints/epoch_NNN/checkpoint.pt``,
``metrics.csv`` (one row per epoch, :func:`history_row`), ``steps.csv`` (training loss per
step) and ``model_final.pt`` / ``model_best.pt`` (:func:`write_run_outputs`).
"""

import csv
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from actr_core.metrics import CLASSICAL_PEER, IDENTITY, REFERENCE_NAMES
from actr_core.training.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    TrainingCheckpoint,
    check_weights,
    export_model,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from actr_core.training.config import TrainConfig
from actr_core.training.loop import ValidationReferences, ValidationResult, all_reduce_sum, train_epoch, validate
from actr_core.training.optim import build_optimizer, build_scheduler
from actr_core.training.step import StepSettings, precision_settings

__all__ = [
    "CHECKPOINTS_DIR",
    "BEST_METRIC",
    "fit",
    "checkpoint_folder",
    "latest_checkpoint",
    "resume_source",
    "discard_unreported",
    "seed_everything",
    "history_row",
    "epoch_line",
    "untrained_line",
    "write_csv",
    "write_run_outputs",
    "run_summary",
]

CHECKPOINTS_DIR = "checkpoints"  # <run folder>/checkpoints/epoch_NNN/checkpoint.pt
BEST_METRIC = "val_pck"  # model selection on the validation split
_log = logging.getLogger(__name__)

# report(metrics, checkpoint folder or None): what the caller does with each epoch's row
Report = Callable[[dict[str, Any], Path | None], None]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_folder(run_dir: Path, epoch: int) -> Path:
    """``<run_dir>/checkpoints/epoch_NNN``: the folder of epoch ``epoch``'s checkpoint."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"epoch_{epoch:03d}"


def latest_checkpoint(run_dir: Path) -> TrainingCheckpoint | None:
    """The newest complete checkpoint under ``run_dir/checkpoints`` (unreadable ones are skipped)."""
    for path in sorted((Path(run_dir) / CHECKPOINTS_DIR).glob(f"epoch_*/{CHECKPOINT_NAME}"), reverse=True):
        try:
            return load_checkpoint(path)
        except CheckpointError as error:
            _log.warning("skipping %s: %s", path, error)
    return None


def resume_source(cfg: TrainConfig, restored: TrainingCheckpoint | None = None) -> tuple[TrainingCheckpoint | None, bool]:
    """Where to start: ``(checkpoint or None, whether it is this run's own)``.

    ``restored``, the checkpoint the caller's framework holds for this run (Ray's record after a
    restart, or when the same run is started again: the one source of truth), else ``cfg.resume``,
    else nothing. The run folder is never searched: a file there that the framework never recorded
    (its writer died before the report was registered) is not a checkpoint of the run (see
    :func:`discard_unreported`). A caller without a framework passes :func:`latest_checkpoint`.
    """
    if restored is not None:
        return restored, True
    if cfg.resume:
        return load_checkpoint(cfg.resume), False
    return None, False


def discard_unreported(run_dir: Path, epoch: int) -> list[Path]:
    """Delete the checkpoint folders of ``run_dir`` for epochs after ``epoch``, the restored one; returns them.

    After a restart the framework restores the newest checkpoint it recorded; a newer folder was
    written by a worker that died before its report was recorded, so the framework neither keeps nor
    deletes it. Left there it would escape the retention policy; the epochs after ``epoch`` are
    trained again and their checkpoints written and reported anew.
    """
    stale = [
        folder
        for folder in sorted((Path(run_dir) / CHECKPOINTS_DIR).glob("epoch_*"))
        if folder.name[len("epoch_") :].isdigit() and int(folder.name[len("epoch_") :]) > epoch
    ]
    for folder in stale:
        _log.warning("deleting %s: written after the restored epoch %d and never recorded", folder, epoch)
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def _gather_rng(world: int) -> dict[int, dict[str, Any]]:
    """Every rank's RNG state (a collective: every rank calls it)."""
    states: list[Any] = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return dict(enumerate(states))


def history_row(
    epoch: int,
    step: int,
    step_losses: list[float],
    scores: ValidationResult,
    lrs: Mapping[str, float],
    seconds: float,
    restarts: int,
) -> dict[str, Any]:
    """One row of the history (``metrics.csv``; ``step_losses`` go to ``steps.csv``)."""
    return {
        "epoch": epoch,
        "step": step,
        "train_loss": sum(step_losses) / len(step_losses) if step_losses else math.nan,
        "val_loss": scores.loss,  # the model's objective (Eq. 4 plus any added term)
        "val_flow_epe": scores.flow_epe,  # Eq. 4 alone, pixels of the flow grid: comparable across models
        "val_pck": scores.pck,
        "identity_val_pck": scores.references.get(IDENTITY, math.nan),  # zero motion, same pairs
        "peer_val_pck": scores.references.get(CLASSICAL_PEER, math.nan),  # NaN when val_peer is off
        "peer_val_fallbacks": scores.reference_fallbacks.get(CLASSICAL_PEER, math.nan),  # pairs left to identity
        "val_pairs": scores.pairs,
        "lr_backbone": lrs.get("backbone", 0.0),
        "lr_heads": lrs.get("heads", 0.0),
        "epoch_seconds": seconds,
        "restarts": restarts,  # times the workers were restarted from this run's checkpoints so far
        "step_losses": step_losses,
    }


def _references_text(row: Mapping[str, Any]) -> str:
    """``(identity 22.25%, peer 95.20%)``: the references' val PCK on the same pairs."""
    parts = [f"identity {100 * row['identity_val_pck']:.2f}%"]
    peer = row.get("peer_val_pck", math.nan)
    parts.append("peer not run" if math.isnan(peer) else f"peer {100 * peer:.2f}%")
    return f"({', '.join(parts)})"


def epoch_line(row: Mapping[str, Any], epochs: int, alpha: float) -> str:
    """The line printed after each epoch: losses, validation EPE and PCK beside the references, lr, time."""
    return (
        f"epoch {row['epoch']}/{epochs}  step {row['step']}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  val_EPE {row['val_flow_epe']:.3f}px  val_PCK@{alpha:g} {100 * row['val_pck']:.2f}% {_references_text(row)}  "
        f"lr_heads {row['lr_heads']:.2e}  {row['epoch_seconds']:.0f}s"
    )


def untrained_line(row: Mapping[str, Any], alpha: float) -> str:
    """The line printed after validating the untrained model (epoch 0)."""
    return (
        f"untrained: val_loss {row['val_loss']:.4f}  val_EPE {row['val_flow_epe']:.3f}px  "
        f"val_PCK@{alpha:g} {100 * row['val_pck']:.2f}% {_references_text(row)}"
    )


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows as a CSV file, written to a temporary name and renamed; columns are the union of the rows' keys."""
    if not rows:
        return
    fields = list(dict.fromkeys(key for row in rows for key in row))  # rows resumed from older runs may lack columns
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_run_outputs(run_dir: Path, history: Sequence[Mapping[str, Any]], last: Path, best: Path) -> None:
    """metrics.csv, steps.csv, model_final.pt (from checkpoint ``last``) and model_best.pt (from ``best``)."""
    write_csv(run_dir / "metrics.csv", [{k: v for k, v in row.items() if k != "step_losses"} for row in history])
    steps, first = [], 0
    for row in history:
        for i, loss in enumerate(row["step_losses"]):
            steps.append({"step": first + i + 1, "epoch": row["epoch"], "train_loss": loss})
        first += len(row["step_losses"])
    write_csv(run_dir / "steps.csv", steps)
    export_model(last, run_dir / "model_final.pt")
    export_model(best, run_dir / "model_best.pt")


def _number(row: Mapping[str, Any], key: str) -> float | None:
    """A column of a history row; None when it was not run (NaN) or not recorded."""
    value = row.get(key)
    return None if value is None or math.isnan(float(value)) else float(value)


def run_summary(run_dir: Path, history: Sequence[Mapping[str, Any]], seconds: float) -> dict[str, Any]:
    """The summary of a finished run: run folder, epochs, steps, final and best validation scores."""
    final = history[-1]
    best = max((r for r in history if r["epoch"] > 0), key=lambda r: r[BEST_METRIC])
    fallbacks = _number(final, "peer_val_fallbacks")
    return {
        "run_dir": str(run_dir),
        "epochs": final["epoch"],
        "steps": final["step"],
        "final_val_pck": final["val_pck"],
        "best_val_pck": best["val_pck"],
        "best_epoch": best["epoch"],
        "untrained_val_pck": history[0]["val_pck"] if history[0]["epoch"] == 0 else None,
        "identity_val_pck": _number(final, "identity_val_pck"),  # same validation pairs as val_pck
        "peer_val_pck": _number(final, "peer_val_pck"),  # None when the peer was not run
        "peer_val_fallbacks": None if fallbacks is None else int(fallbacks),
        "wall_seconds": seconds,
    }


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # loader processes decode and resize; one thread each


def fit(
    cfg: TrainConfig,
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] = lambda model: model,
    report: Report = lambda metrics, folder: None,
    restored: TrainingCheckpoint | None = None,
    on_step: Callable[[int], None] = lambda step: None,
) -> list[dict[str, Any]]:
    """Train ``cfg`` in this process (one rank of ``world``); returns the history (rank 0's is the run's).

    ``wrap_model`` wraps the built model for data parallelism (after its optimiser is made);
    ``report(metrics, folder)`` is called once per validation on every rank, with the folder of
    the epoch's checkpoint on rank 0 (written atomically before the call) and None otherwise;
    ``restored`` is the checkpoint the caller's framework holds for this run (:func:`resume_source`;
    rank 0 then deletes the run folder's newer, unrecorded checkpoint folders,
    :func:`discard_unreported`); ``on_step(step)`` runs after
    every optimiser step with the run's global step count (the fault-injection hook).
    """
    from actr_core.data import SCHEMA_VERSION, Resize, ShardDataset, train_transforms
    from actr_core.models import build_model

    device = torch.device("cpu") if device is None else device
    seed_everything(cfg.seed * 1000 + rank)
    resume_from, own = resume_source(cfg, restored)

    model: nn.Module = build_model(cfg.model, **cfg.model_kwargs)
    if resume_from is not None:
        check_weights(resume_from, model, cfg.model)
        model.load_state_dict(resume_from.model)
        if own and rank == 0:
            discard_unreported(cfg.run_dir, resume_from.epoch)
    model.to(device)
    optimizer = build_optimizer(
        model,
        backbone_lr=cfg.backbone_lr,
        head_lr=cfg.head_lr,
        weight_decay=cfg.weight_decay,
        freeze_backbone=cfg.freeze_backbone,
    )
    model = wrap_model(model)

    resize = Resize(cfg.image_size)
    train_data = ShardDataset(
        cfg.shards,
        cfg.train_split,
        batch_size=cfg.batch_size,
        training=True,
        transforms=[*(train_transforms() if cfg.augment else []), resize],
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        max_batches=cfg.steps_per_epoch or None,
        images="uint8",  # normalised on the training device (move_batch)
        allow_incomplete=cfg.allow_incomplete,
    )
    val_data = ShardDataset(
        cfg.shards,
        cfg.val_split,
        batch_size=cfg.val_batch_size,
        transforms=[resize],
        seed=cfg.seed,
        images="uint8",
        allow_incomplete=cfg.allow_incomplete,
    )

    def batches(data):  # the shards in this process, or a DataLoader of loader_workers processes
        return data.loader(cfg.loader_workers, worker_init_fn=_one_thread) if cfg.loader_workers else data

    train_batches = batches(train_data)  # loader() sets the worker count the epoch plan uses
    steps = len(train_data)
    if steps < 1:
        raise ValueError(
            f"the {cfg.train_split!r} split of {cfg.shards} gives no full batch of {cfg.batch_size} per worker "
            f"with {world} workers; make more shards or use a smaller batch_size"
        )
    scheduler = build_scheduler(
        optimizer,
        total_steps=cfg.epochs * steps,
        warmup_steps=cfg.warmup_steps,
        schedule=cfg.lr_schedule,
        min_ratio=cfg.min_lr_ratio,
    )
    autocast_dtype, use_scaler = precision_settings(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    settings = StepSettings(autocast_dtype=autocast_dtype, clip_grad_norm=cfg.clip_grad_norm)

    start_epoch, step, history, restarts = 0, 0, [], 0
    if resume_from is not None:
        if resume_from.optimizer is None or resume_from.scheduler is None:
            raise CheckpointError(
                "the checkpoint holds no optimiser or scheduler state (an exported model): it cannot be resumed"
            )
        optimizer.load_state_dict(resume_from.optimizer)
        scheduler.load_state_dict(resume_from.scheduler)
        if scaler is not None and resume_from.scaler is not None:
            scaler.load_state_dict(resume_from.scaler)
        start_epoch, step, history = resume_from.epoch, resume_from.step, list(resume_from.history)
        restarts = (history[-1].get("restarts", 0) if history else 0) + int(own)
        if rank in resume_from.rng:
            set_rng_state(resume_from.rng[rank])
        if rank == 0:
            print(f"resumed from epoch {start_epoch}, step {step} (restart {restarts} of this run)", flush=True)

    references = ValidationReferences(REFERENCE_NAMES if cfg.val_peer else (IDENTITY,))  # scored once per pair

    def val_scores() -> ValidationResult:
        return validate(
            model,
            batches(val_data),
            device=device,
            alpha=cfg.pck_alpha,
            protocol=cfg.val_protocol,
            max_batches=cfg.val_steps,
            autocast_dtype=autocast_dtype,
            references=references,
        )

    def metrics_of(row: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k != "step_losses"}

    if cfg.validate_before_training and resume_from is None:
        started = time.perf_counter()
        row = history_row(0, 0, [], val_scores(), {}, time.perf_counter() - started, restarts)
        history.append(row)
        if rank == 0:
            print(untrained_line(row, cfg.pck_alpha), flush=True)
        report(metrics_of(row), None)

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        train_data.set_epoch(epoch)
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=rank != 0 or not cfg.progress or not sys.stdout.isatty(),  # a log gets the epoch line only
            file=sys.stdout,
            mininterval=10.0,
            ascii=True,
        )

        def after_step(i: int, result: Any, first: int = step, bar: Any = bar) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", refresh=False)
            on_step(first + i + 1)

        losses = train_epoch(
            model,
            train_batches,
            optimizer,
            scheduler,
            steps=steps,
            device=device,
            settings=settings,
            scaler=scaler,
            on_step=after_step,
        )
        bar.close()
        step += steps
        step_losses = (all_reduce_sum(torch.tensor(losses, dtype=torch.float64)) / world).tolist()
        scores = val_scores()
        lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
        row = history_row(epoch + 1, step, step_losses, scores, lrs, time.perf_counter() - started, restarts)
        history.append(row)
        rng = _gather_rng(world)
        if rank != 0:
            report(metrics_of(row), None)
            continue
        print(epoch_line(row, cfg.epochs, cfg.pck_alpha), flush=True)
        folder = checkpoint_folder(cfg.run_dir, epoch + 1)
        save_checkpoint(
            folder / CHECKPOINT_NAME,
            model=model,
            builder=cfg.model,
            builder_kwargs=cfg.model_kwargs,
            config=cfg.to_dict(),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            epoch=epoch + 1,
            step=step,
            rng=rng,
            history=history,
            data_schema_version=SCHEMA_VERSION,
        )
        report(metrics_of(row), folder)
    return history
