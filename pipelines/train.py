"""Train a matcher from shards with Ray Train (DDP over Ray workers), locally or on a cluster.

    python pipelines/train.py configs/small_cpu.yaml                     # Ray started in-process
    python pipelines/train.py configs/small_cpu.yaml --epochs 2 --name x  # --key value overrides
    RAY_ADDRESS=127.0.0.1:6379 python pipelines/train.py configs/...     # an existing cluster
    ray job submit --working-dir . -- python pipelines/train.py configs/...

Without a cluster address (``--ray_address`` or ``RAY_ADDRESS``) Ray starts inside this process
with ``num_workers × cpus_per_worker`` CPUs and a small object store, and stops with it. With one
(``ray job submit`` sets ``RAY_ADDRESS``) the cluster is used unchanged.

The run folder ``<runs_dir>/<name>/`` is Ray's experiment folder and holds ``config.yaml``,
``checkpoints/epoch_NNN/checkpoint.pt`` (one per epoch, the best by validation PCK and the latest
kept), ``metrics.csv`` (one row per epoch), ``steps.csv`` (training loss per step, mean over
workers), ``model_final.pt`` (last epoch) and ``model_best.pt`` (best validation PCK).

Every validation line (and ``metrics.csv``, and the summary) shows the model's PCK beside the
reference predictors' on the same validation pairs: identity (zero motion, ``identity_val_pck``)
and the classical peer (ORB + RANSAC homography, ``peer_val_pck``; ``--val_peer false`` skips it).
The references are scored once per validation pair and reused at every epoch.

Fault injection (tests, drills): ``ACTR_FAULT_AT_STEP=N`` SIGKILLs the worker of rank
``ACTR_FAULT_RANK`` (default 0) right after its N-th optimiser step, once per run folder (a
marker file ``.fault_injected`` makes it fire once); Ray then restarts the workers from the last
checkpoint (``max_failures``). See docs/training.md.
"""

import csv
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from actr_core.data import SCHEMA_VERSION as DATA_SCHEMA_VERSION
from actr_core.data import Resize, ShardDataset, train_transforms
from actr_core.metrics import CLASSICAL_PEER, IDENTITY, REFERENCE_NAMES
from actr_core.models import build_model
from actr_core.training import (
    CHECKPOINT_NAME,
    CheckpointError,
    StepSettings,
    TrainConfig,
    TrainingCheckpoint,
    ValidationReferences,
    ValidationResult,
    all_reduce_sum,
    build_optimizer,
    build_scheduler,
    config_from_args,
    export_model,
    load_checkpoint,
    precision_settings,
    rng_state,
    save_checkpoint,
    set_rng_state,
    train_epoch,
    validate,
)

FAULT_STEP_ENV = "ACTR_FAULT_AT_STEP"
FAULT_RANK_ENV = "ACTR_FAULT_RANK"
FAULT_MARKER = ".fault_injected"
CHECKPOINTS_DIR = "checkpoints"
BEST_METRIC = "val_pck"  # model selection on the validation split


# ----------------------------------------------------------------------------------------------
# On each Ray worker


def _threads(cfg: TrainConfig) -> int:
    """torch threads per Ray worker: its CPUs minus one per loader process (at least 1)."""
    return max(1, cfg.cpus_per_worker - cfg.loader_workers)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # loader processes decode and resize; one thread each


def _seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _maybe_inject_fault(fault: Mapping[str, Any], rank: int, step: int) -> None:
    """SIGKILL this worker after global step ``fault["step"]`` on ``fault["rank"]``, once per run folder."""
    if not fault.get("step") or rank != fault["rank"] or step != fault["step"]:
        return
    try:
        fd = os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # already fired in this run
    os.write(fd, f"killed rank {rank} after step {step}\n".encode())
    os.fsync(fd)
    os.close(fd)
    print(f"[fault injection] killing rank {rank} (pid {os.getpid()}) after step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _already_persisted(checkpoint: Any, checkpoint_dir_name: str) -> Any:
    """Ray's upload step for a checkpoint written (atomically) in place in the run folder: nothing to copy."""
    return checkpoint


def _latest_in_run(run_dir: Path) -> TrainingCheckpoint | None:
    """The newest complete checkpoint under ``run_dir/checkpoints`` (unreadable ones are skipped)."""
    for path in sorted((run_dir / CHECKPOINTS_DIR).glob(f"epoch_*/{CHECKPOINT_NAME}"), reverse=True):
        try:
            return load_checkpoint(path)
        except CheckpointError as error:
            print(f"skipping {path}: {error}", flush=True)
    return None


def _resume_source(cfg: TrainConfig, ray_checkpoint: Any) -> tuple[TrainingCheckpoint | None, bool]:
    """Where to start: ``(checkpoint or None, whether it is this run's own)``.

    First this run's newest checkpoint in its folder (a restart after a failure; it may be newer
    than the one Ray registered when the workers died right after reporting it, and it is what a
    re-run of the same command continues from), then Ray's latest, then ``--resume``. Every rank
    reads the same run folder, so all ranks make the same choice.
    """
    own = _latest_in_run(cfg.run_dir)
    if own is not None:
        return own, True
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / CHECKPOINT_NAME), True
    if cfg.resume:
        return load_checkpoint(cfg.resume), False
    return None, False


def _gather_rng(world: int) -> dict[int, dict[str, Any]]:
    """Every rank's RNG state (a collective: every rank calls it)."""
    states: list[Any] = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return dict(enumerate(states))


def _row(
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


def _epoch_line(row: Mapping[str, Any], epochs: int, alpha: float) -> str:
    return (
        f"epoch {row['epoch']}/{epochs}  step {row['step']}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  val_EPE {row['val_flow_epe']:.3f}px  val_PCK@{alpha:g} {100 * row['val_pck']:.2f}% {_references_text(row)}  "
        f"lr_heads {row['lr_heads']:.2e}  {row['epoch_seconds']:.0f}s"
    )


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The training function every Ray worker runs; returns the history (rank 0's is the run's)."""
    import ray.train
    import ray.train.torch

    config = dict(config)
    fault = config.pop("_fault", {})
    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(_threads(cfg))
    device = ray.train.torch.get_device()
    _seed(cfg.seed * 1000 + rank)

    resume_from, own = _resume_source(cfg, ray.train.get_checkpoint())

    model = build_model(cfg.model, **cfg.model_kwargs)
    if resume_from is not None:
        model.load_state_dict(resume_from.model)
    optimizer = build_optimizer(
        model,
        backbone_lr=cfg.backbone_lr,
        head_lr=cfg.head_lr,
        weight_decay=cfg.weight_decay,
        freeze_backbone=cfg.freeze_backbone,
    )
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": cfg.find_unused_parameters}
    )

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
    )
    val_data = ShardDataset(
        cfg.shards, cfg.val_split, batch_size=cfg.val_batch_size, transforms=[resize], seed=cfg.seed, images="uint8"
    )
    loader_kwargs = {"worker_init_fn": _one_thread}

    def batches(data: ShardDataset):
        return data.loader(cfg.loader_workers, **loader_kwargs) if cfg.loader_workers else data

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

    if cfg.validate_before_training and resume_from is None:
        started = time.perf_counter()
        row = _row(0, 0, [], val_scores(), {}, time.perf_counter() - started, restarts)
        history.append(row)
        if rank == 0:
            print(
                f"untrained: val_loss {row['val_loss']:.4f}  val_EPE {row['val_flow_epe']:.3f}px  "
                f"val_PCK@{cfg.pck_alpha:g} {100 * row['val_pck']:.2f}% "
                f"{_references_text(row)}",
                flush=True,
            )
        ray.train.report({k: v for k, v in row.items() if k != "step_losses"})

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        train_data.set_epoch(epoch)
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=rank != 0 or not cfg.progress,
            file=sys.stdout,
            mininterval=10.0,
            ascii=True,
        )

        def on_step(i: int, result: Any) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.3f}", refresh=False)
            _maybe_inject_fault(fault, rank, step + i + 1)

        losses = train_epoch(
            model,
            train_batches,
            optimizer,
            scheduler,
            steps=steps,
            device=device,
            settings=settings,
            scaler=scaler,
            on_step=on_step,
        )
        bar.close()
        step += steps
        step_losses = (all_reduce_sum(torch.tensor(losses, dtype=torch.float64)) / world).tolist()
        scores = val_scores()
        lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
        row = _row(epoch + 1, step, step_losses, scores, lrs, time.perf_counter() - started, restarts)
        history.append(row)
        rng = _gather_rng(world)
        metrics = {k: v for k, v in row.items() if k != "step_losses"}
        if rank == 0:
            print(_epoch_line(row, cfg.epochs, cfg.pck_alpha), flush=True)
            folder = cfg.run_dir / CHECKPOINTS_DIR / f"epoch_{epoch + 1:03d}"
            save_checkpoint(  # atomic, straight into the run folder: Ray has nothing left to copy
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
                data_schema_version=DATA_SCHEMA_VERSION,
            )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                checkpoint_dir_name=f"{CHECKPOINTS_DIR}/{folder.name}",
                checkpoint_upload_fn=_already_persisted,
                delete_local_checkpoint_after_upload=False,
            )
        else:
            ray.train.report(metrics)
    return history


# ----------------------------------------------------------------------------------------------
# On the driver


def _init_ray(cfg: TrainConfig) -> bool:
    """Connect to the cluster named by ``ray_address`` / ``RAY_ADDRESS``, or start Ray in-process.

    Returns True when this process started Ray (and so shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # an in-process cluster reachable only from here
    # One machine that no cloud provider reclaims: Train's preemption watcher (an actor polling the
    # node's drain state) would only take CPU from the two training workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(
        address="local",  # never attach to another user's cluster on this machine by accident
        num_cpus=cfg.ray_num_cpus or cfg.num_workers * cfg.cpus_per_worker,
        num_gpus=None if cfg.use_gpu else 0,
        object_store_memory=cfg.object_store_mb * 2**20,
        include_dashboard=False,
        log_to_driver=True,
    )
    return True


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute here, on the driver: Ray workers may run in another folder."""

    def absolute(path: str) -> str:
        return path if not path or "://" in path else str(Path(path).expanduser().resolve())

    return cfg.replace(runs_dir=absolute(cfg.runs_dir), shards=absolute(cfg.shards), resume=absolute(cfg.resume))


def _fault_settings(run_dir: Path) -> dict[str, Any]:
    step = int(os.environ.get(FAULT_STEP_ENV, "0") or 0)
    rank = int(os.environ.get(FAULT_RANK_ENV, "0") or 0)
    return {"step": step, "rank": rank, "marker": str(run_dir / FAULT_MARKER)}


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
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
    """metrics.csv, steps.csv, model_final.pt and model_best.pt in the run folder."""
    _write_csv(run_dir / "metrics.csv", [{k: v for k, v in row.items() if k != "step_losses"} for row in history])
    steps, first = [], 0
    for row in history:
        for i, loss in enumerate(row["step_losses"]):
            steps.append({"step": first + i + 1, "epoch": row["epoch"], "train_loss": loss})
        first += len(row["step_losses"])
    _write_csv(run_dir / "steps.csv", steps)
    export_model(last, run_dir / "model_final.pt")
    export_model(best, run_dir / "model_best.pt")


def main(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg`` with Ray Train; returns a summary (run folder, epochs, steps, final and best scores)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints once, not again via Train's logger
    cfg = _absolute_paths(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    started_ray = _init_ray(cfg)
    started = time.perf_counter()
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={**cfg.to_dict(), "_fault": _fault_settings(run_dir)},
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers,
                use_gpu=cfg.use_gpu,
                resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=cfg.name,
                storage_path=str(run_dir.parent),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(
                    num_to_keep=cfg.checkpoints_to_keep,
                    checkpoint_score_attribute=BEST_METRIC,
                    checkpoint_score_order="max",
                ),
            ),
        )
        result = trainer.fit()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if result.error is not None:
        raise result.error
    history = result.return_value or load_checkpoint(Path(result.checkpoint.path) / CHECKPOINT_NAME).history
    best = result.get_best_checkpoint(metric=BEST_METRIC, mode="max") or result.checkpoint
    write_run_outputs(run_dir, history, Path(result.checkpoint.path), Path(best.path))
    final, best_row = history[-1], max((r for r in history if r["epoch"] > 0), key=lambda r: r["val_pck"])
    summary = {
        "run_dir": str(run_dir),
        "epochs": final["epoch"],
        "steps": final["step"],
        "final_val_pck": final["val_pck"],
        "best_val_pck": best_row["val_pck"],
        "best_epoch": best_row["epoch"],
        "untrained_val_pck": history[0]["val_pck"] if history[0]["epoch"] == 0 else None,
        "identity_val_pck": _reference_score(final, "identity_val_pck"),  # same validation pairs as val_pck
        "peer_val_pck": _reference_score(final, "peer_val_pck"),  # None when the peer was not run
        "peer_val_fallbacks": _reference_count(final, "peer_val_fallbacks"),
        "wall_seconds": time.perf_counter() - started,
    }
    print(yaml.safe_dump({"summary": summary}, sort_keys=False), flush=True)
    return summary


def _reference_score(row: Mapping[str, Any], key: str) -> float | None:
    """A reference column of a history row; None when it was not run (NaN) or not recorded."""
    value = row.get(key)
    return None if value is None or math.isnan(float(value)) else float(value)


def _reference_count(row: Mapping[str, Any], key: str) -> int | None:
    value = _reference_score(row, key)
    return None if value is None else int(value)


def cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python pipelines/train.py [CONFIG.yaml] [--key value ...]``; see :func:`config_from_args`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        print("settings (--key value):", ", ".join(TrainConfig().to_dict()))
        return {}
    return main(config_from_args(args))


if __name__ == "__main__":
    cli()
