"""Train a matcher from shards with Ray Train (DDP over Ray workers), locally or on a cluster.

    python pipelines/train.py configs/small_cpu.yaml                     # Ray started in-process
    python pipelines/train.py configs/small_cpu.yaml --epochs 2 --name x  # flags override the YAML
    RAY_ADDRESS=127.0.0.1:6379 python pipelines/train.py configs/...     # an existing cluster
    ray job submit --working-dir . -- python pipelines/train.py configs/...

Settings: a YAML file (first argument, or ``--config``) over the defaults, then flags over the
YAML; ``--model-kwargs "{...}"`` is merged into the YAML's mapping (nested mappings too). The
training settings are the library's :class:`~actr_core.training.TrainConfig`; the Ray settings
(workers, resources, fault tolerance) are :class:`RaySettings` here. A YAML file or a run's
``config.yaml`` holds both, flat, as 0.1.0 wrote them.

Without a cluster address (``--ray-address`` or ``RAY_ADDRESS``) Ray starts inside this process
with ``num_workers × cpus_per_worker`` CPUs and a small object store, and stops with it. With one
(``ray job submit`` sets ``RAY_ADDRESS``) the cluster is used unchanged.

The run folder ``<runs_dir>/<name>/`` is Ray's experiment folder and holds ``config.yaml``,
``checkpoints/epoch_NNN/checkpoint.pt`` (one per epoch, the best by validation PCK and the latest
kept), ``metrics.csv`` (one row per epoch), ``steps.csv`` (training loss per step, mean over
workers), ``model_final.pt`` (last epoch) and ``model_best.pt`` (best validation PCK).

Every validation line (and ``metrics.csv``, and the summary) shows the model's PCK beside the
reference predictors' on the same validation pairs: identity (zero motion, ``identity_val_pck``)
and the classical peer (ORB + RANSAC homography, ``peer_val_pck``; ``--no-val-peer`` skips it).
The references are scored once per validation pair and reused at every epoch.

Before Ray starts, the driver checks what would otherwise fail on every worker after Ray's start
(:func:`preflight`, each a one-line user error, exit status 2): the shard set (manifest complete and
consistent, both splits present, a full batch per worker), the image size against the model, the
``--resume`` checkpoint (readable, of the same model, resumable), the device, and the run name: a
run folder that holds a run of other settings is refused (naming the settings that differ) and left
untouched; one of the same settings is continued from Ray's last checkpoint of it.

Ray's known-harmless log lines (an allow-list of patterns, :data:`RAY_NOISE`) are left out of the
log; everything else, real warnings included, is shown. Rank 0 prints one line per epoch.

Fault injection (tests, drills): ``ACTR_FAULT_AT_STEP=N`` SIGKILLs the worker of rank
``ACTR_FAULT_RANK`` (default 0) right after its N-th optimiser step, once per run folder (a
marker file ``.fault_injected`` makes it fire once); Ray then restarts the workers from the last
checkpoint (``max_failures``). See docs/training.md.
"""

import dataclasses
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from actr_core.training import RAY_SETTINGS_OF_0_1_0, TrainConfig, load_config

FAULT_STEP_ENV = "ACTR_FAULT_AT_STEP"
FAULT_RANK_ENV = "ACTR_FAULT_RANK"
FAULT_MARKER = ".fault_injected"
# Settings that may differ when a run is started again under its name: they change how it runs, not what it computes.
CONTINUE_FREELY = frozenset({"progress", "ray_address", "ray_num_cpus", "object_store_mb", "max_failures"})
# Ray's own lines that say nothing a user acts on (matched against each line, without Ray's "(actor pid=N)" prefix).
RAY_NOISE = tuple(
    re.compile(pattern)
    for pattern in (
        r"^Started a local Ray instance",
        r"^Requesting resources: ",
        r"^Attempting to start training worker group of size",
        r"^Started training worker group of size",
        r"^- \(ip=\S+, pid=\d+\) world_rank=\d+",
        r"^Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable",
        r"^Setting up process group for: ",
        r"^Moving model to device: ",
        r"^Wrapping provided model in DistributedDataParallel",
        r"^Reporting training result \d+: ",
        # a run started again under its name (the driver has said so: "continuing run ...")
        r"^A run snapshot was found in storage folder at: ",
        r"^This snapshot contains a list of checkpoints reported via `ray\.train\.report`",
        r"^If you meant to start a brand new training job without any information about previous checkpoints",
    )
)


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """How Ray Train runs a training configuration: workers, resources, fault tolerance (docs/training.md)."""

    num_workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker; backend nccl instead of gloo
    cpus_per_worker: int = 1  # Ray CPU resource per worker = torch threads + loader_workers (docs/training.md)
    find_unused_parameters: bool = False  # DDP option for models with branches unused in a step
    ray_address: str = ""  # "" = RAY_ADDRESS if set, else Ray started in-process
    ray_num_cpus: int = 0  # in-process Ray only; 0 = num_workers * cpus_per_worker
    object_store_mb: int = 256  # in-process Ray only; the default would take a third of the RAM
    max_failures: int = 1  # Ray FailureConfig: restarts from the last checkpoint after a failure
    checkpoints_to_keep: int = 2  # Ray CheckpointConfig.num_to_keep (the best by val PCK is kept)

    def __post_init__(self) -> None:
        positive = ("num_workers", "cpus_per_worker", "object_store_mb", "checkpoints_to_keep")
        bad = {k: getattr(self, k) for k in positive if not getattr(self, k) > 0}
        bad.update({k: getattr(self, k) for k in ("max_failures", "ray_num_cpus") if getattr(self, k) < 0})
        if bad:
            raise ValueError(f"these Ray settings must be > 0 (max_failures, ray_num_cpus >= 0): {bad}")


@dataclasses.dataclass(frozen=True)
class TrainCommand:
    """Train a matcher from shards with Ray Train (Ray started in-process unless a cluster is named)."""

    config: str = ""  # YAML file of settings (configs/*.yaml), also given as the first argument; flags override it
    train: TrainConfig = TrainConfig()  # what the training needs (actr_core.training.TrainConfig)
    ray: RaySettings = RaySettings()  # how Ray runs it


def split_settings(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A flat mapping of settings (a YAML file, a run's config.yaml, a 0.1.0 checkpoint's config) →
    ``(training settings, Ray settings)``."""
    ray = {k: v for k, v in values.items() if k in RAY_SETTINGS_OF_0_1_0}
    return {k: v for k, v in values.items() if k not in RAY_SETTINGS_OF_0_1_0}, ray


def ray_settings(values: Mapping[str, Any]) -> RaySettings:
    """:class:`RaySettings` from a mapping, values turned into the fields' types (YAML may give "2" or "true")."""
    kinds = {f.name: f.type for f in dataclasses.fields(RaySettings)}
    typed = {}
    for key, value in values.items():
        if kinds[key] is bool and isinstance(value, str):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        typed[key] = kinds[key](value)
    return RaySettings(**typed)


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, mapping by mapping (a nested mapping is merged, not replaced)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def parse_args(argv: Sequence[str], prog: str = "python pipelines/train.py") -> tuple[TrainConfig, RaySettings]:
    """``[CONFIG.yaml] [--config PATH] [--flag value ...]`` → the training and the Ray settings.

    Later sources win: defaults < YAML file < flags; ``--model-kwargs`` is merged into the YAML's.
    """
    words = list(argv)
    path = words.pop(0) if words and not words[0].startswith("-") else ""
    for i, word in enumerate(words):
        if word == "--config" and i + 1 < len(words):
            path = words[i + 1]
            del words[i : i + 2]
            break
        if word.startswith("--config="):
            path = word.partition("=")[2]
            del words[i]
            break
    train_values, ray_values = split_settings(load_config(path) if path else {})
    defaults = TrainCommand(path, TrainConfig.from_dict(train_values), ray_settings(ray_values))
    command = _parse(words, prog, defaults)
    merged = _merge(defaults.train.model_kwargs, command.train.model_kwargs)
    return command.train.replace(model_kwargs=merged), command.ray


def _parse(words: Sequence[str], prog: str, defaults: TrainCommand) -> TrainCommand:
    from pipelines.entry import parse_config

    return parse_config(
        TrainCommand, words, prog=prog, description=__doc__.split("\n\n")[0], default=defaults, omit_prefixes=True
    )


# ----------------------------------------------------------------------------------------------
# On each Ray worker


def _threads(cfg: TrainConfig, ray: RaySettings) -> int:
    """torch threads per Ray worker: its CPUs minus one per loader process (at least 1)."""
    return max(1, ray.cpus_per_worker - cfg.loader_workers)


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


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, Any]]:
    """What every Ray worker runs: :func:`actr_core.training.fit` with Ray's rank, device, DDP and reports."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import CheckpointConsistencyMode

    from actr_core.training import CHECKPOINT_NAME, CHECKPOINTS_DIR, fit, load_checkpoint

    cfg, ray_cfg, fault = TrainConfig.from_dict(config["train"]), RaySettings(**config["ray"]), config["fault"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(_threads(cfg, ray_cfg))
    restored = None
    if ray.train.get_checkpoint() is not None:
        with ray.train.get_checkpoint().as_directory() as folder:
            restored = load_checkpoint(Path(folder) / CHECKPOINT_NAME)

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        if folder is None:
            ray.train.report(metrics)
            return
        ray.train.report(  # the file is already in the run folder: Ray registers it and applies the retention
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
            checkpoint_dir_name=f"{CHECKPOINTS_DIR}/{folder.name}",
            checkpoint_upload_fn=_already_persisted,
            delete_local_checkpoint_after_upload=False,
        )
        # Wait until Ray has recorded it, so that a restart from here on restores this epoch (Ray's
        # record is the only source of a restart; an unrecorded newer folder is discarded then).
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    return fit(
        cfg,
        rank=rank,
        world=world,
        device=ray.train.torch.get_device(),
        wrap_model=lambda model: ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": ray_cfg.find_unused_parameters}
        ),
        report=report,
        restored=restored,
        on_step=lambda step: _maybe_inject_fault(fault, rank, step),
    )


# ----------------------------------------------------------------------------------------------
# On the driver: checks before Ray starts


def _settings(cfg: TrainConfig, ray_cfg: RaySettings) -> dict[str, Any]:
    """A run's settings, flat, as its ``config.yaml`` holds them (0.1.0's layout)."""
    return {**cfg.to_dict(), **dataclasses.asdict(ray_cfg)}


def check_run_name(cfg: TrainConfig, ray_cfg: RaySettings) -> bool:
    """Whether ``cfg.run_dir`` already holds this run (to be continued); ``ValueError`` naming the settings
    that differ when it holds a run of other settings (:data:`CONTINUE_FREELY` may differ)."""
    path = cfg.run_dir / "config.yaml"
    if not path.is_file():
        return False
    try:
        training, ray_values = split_settings(load_config(path))
        saved = _settings(_absolute_paths(TrainConfig.from_dict(training)), ray_settings(ray_values))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} cannot be read as a run's settings ({error}); use another --name") from error
    now = _settings(cfg, ray_cfg)
    differ = [key for key in now if key not in CONTINUE_FREELY and saved.get(key) != now[key]]
    if differ:
        listed = ", ".join(f"{key} {saved.get(key)!r} there, {now[key]!r} now" for key in differ)
        raise ValueError(
            f"run {cfg.name!r} ({cfg.run_dir}) was started with other settings ({listed}); use another --name, "
            f"or continue it with `python pipelines/train.py {path}`"
        )
    return True


def _check_shards(cfg: TrainConfig, world: int) -> None:
    """The shard set has a complete, consistent manifest, both splits, and a full batch per worker."""
    from actr_core.data import ShardDataset, check_manifest, read_manifest

    manifest = read_manifest(cfg.shards)
    if manifest is None:
        raise FileNotFoundError(f"{cfg.shards}: no shard set there (no manifest.json); write one with `actr make-shards`")
    where = f"{cfg.shards.rstrip('/')}/manifest.json"
    check_manifest(manifest, where, allow_incomplete=cfg.allow_incomplete)  # DataError (a ValueError) naming every problem
    if cfg.allow_incomplete and not manifest.get("complete", False):
        print(f"warning: {where}: training on an incomplete shard set (--allow-incomplete; kept in config.yaml)", file=sys.stderr)
    for split in dict.fromkeys((cfg.train_split, cfg.val_split)):
        if split not in manifest["splits"]:
            raise ValueError(f"{where}: no {split!r} split (it has {sorted(manifest['splits'])})")
        if not manifest["splits"][split]["samples"]:
            raise ValueError(f"{where}: the {split!r} split holds no pairs")
    train = ShardDataset(
        cfg.shards,
        cfg.train_split,
        batch_size=cfg.batch_size,
        training=True,
        rank=0,
        world_size=world,
        max_batches=cfg.steps_per_epoch or None,
        allow_incomplete=cfg.allow_incomplete,
    )
    if train.plan(max(1, cfg.loader_workers)).batches_per_rank[0] < 1:
        raise ValueError(
            f"the {cfg.train_split!r} split of {cfg.shards} gives no full batch of {cfg.batch_size} per worker "
            f"with {world} workers; make more shards or use a smaller batch_size"
        )


def _check_model_and_resume(cfg: TrainConfig) -> None:
    """The model takes ``image_size`` images, and ``resume`` is a resumable checkpoint of that model."""
    from actr_core.training import CheckpointError, build_meta_model, check_weights, input_size_problem, load_checkpoint

    try:
        model = build_meta_model(cfg.model, cfg.model_kwargs)  # structure only: no memory, no initialisation
    except (TypeError, ValueError) as error:
        raise ValueError(f"model {cfg.model!r} with model_kwargs {dict(cfg.model_kwargs)}: {error}") from error
    problem = input_size_problem(model, cfg.image_size)
    if problem is not None:
        raise ValueError(f"image_size {cfg.image_size} does not fit model {cfg.model!r}: {problem}")
    if not cfg.resume:
        return
    ckpt = load_checkpoint(cfg.resume)  # CheckpointError: missing, foreign or damaged file
    if ckpt.builder != cfg.model:
        raise CheckpointError(f"{ckpt.path}: a checkpoint of model {ckpt.builder!r}; this run trains {cfg.model!r}")
    check_weights(ckpt, model, cfg.model)
    if ckpt.optimizer is None or ckpt.scheduler is None:
        raise CheckpointError(
            f"{ckpt.path}: no optimiser or scheduler state (an exported model such as model_best.pt): it cannot be "
            f"resumed; give a checkpoints/epoch_NNN folder of the run"
        )


def _check_device(ray_cfg: RaySettings) -> None:
    """``use_gpu`` without a cluster: enough CUDA GPUs in this machine for the workers."""
    if not ray_cfg.use_gpu or ray_cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < ray_cfg.num_workers:
        raise ValueError(
            f"--use-gpu: {count} CUDA GPU(s) visible to this process for {ray_cfg.num_workers} workers "
            f"(and no Ray cluster is named)"
        )


def preflight(cfg: TrainConfig, ray_cfg: RaySettings) -> bool:
    """Every check the driver makes before Ray starts (module docstring); returns whether the run
    folder holds this run already (it is then continued). ``cfg``'s paths must be absolute."""
    continuing = check_run_name(cfg, ray_cfg)
    _check_device(ray_cfg)
    _check_shards(cfg, ray_cfg.num_workers)
    _check_model_and_resume(cfg)
    return continuing


# ----------------------------------------------------------------------------------------------
# On the driver: Ray


def ray_noise(line: str) -> bool:
    """Whether ``line`` is one of Ray's known-harmless messages (:data:`RAY_NOISE`)."""
    return any(pattern.search(line) for pattern in RAY_NOISE)


class _RayNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not ray_noise(record.getMessage())


def quiet_ray_logs() -> Callable[[], None]:
    """Leave Ray's known-harmless lines out of this driver's log (call it before ``ray.init``): the
    worker and actor lines Ray forwards here, and the records of the driver's ``ray`` loggers.
    Returns a function that undoes it.

    The forwarded lines pass through Ray's stream dispatcher (``ray._private.ray_logging``; Ray has
    no public hook for them), whose ``emit`` is replaced for this process by one that drops the
    noise lines of each batch before Ray prints it.
    """
    import ray  # noqa: F401  # sets up the "ray" logger's handlers
    from ray._private import ray_logging

    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    emit = dispatcher.emit

    def emit_without_noise(batch: dict[str, Any]) -> None:
        lines = [line for line in batch.get("lines", []) if not ray_noise(line)]
        if lines:
            emit({**batch, "lines": lines})

    dispatcher.emit = emit_without_noise  # type: ignore[method-assign]
    record_filter = _RayNoiseFilter()
    handlers = list(logging.getLogger("ray").handlers)
    for handler in handlers:
        handler.addFilter(record_filter)

    def undo() -> None:
        dispatcher.emit = emit  # type: ignore[method-assign]
        for handler in handlers:
            handler.removeFilter(record_filter)

    return undo


def _init_ray(ray_cfg: RaySettings) -> bool:
    """Connect to the cluster named by ``ray_address`` / ``RAY_ADDRESS``, or start Ray in-process.

    Returns True when this process started Ray (and so shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = ray_cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
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
        num_cpus=ray_cfg.ray_num_cpus or ray_cfg.num_workers * ray_cfg.cpus_per_worker,
        num_gpus=None if ray_cfg.use_gpu else 0,
        object_store_memory=ray_cfg.object_store_mb * 2**20,
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


def _user_error_of_workers(error: BaseException) -> ValueError | None:
    """A ``ValueError`` that every failed worker raised (e.g. too few shards for one batch), as one
    ``ValueError`` with its last line, so that it is reported as a user error; else None."""
    failures = list((getattr(error, "worker_failures", None) or {}).values())
    if not failures or not all(isinstance(failure, ValueError) for failure in failures):
        return None
    lines = [line.strip() for line in str(failures[0]).splitlines() if line.strip()]
    last = lines[-1] if lines else type(failures[0]).__name__
    return ValueError(last.removeprefix("ValueError: "))


def main(cfg: TrainConfig, ray_cfg: RaySettings | None = None) -> dict[str, Any]:
    """Train ``cfg`` with Ray Train; returns a summary (run folder, epochs, steps, final and best scores)."""
    import yaml

    ray_cfg = RaySettings() if ray_cfg is None else ray_cfg
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints once, not again via Train's logger
    address = ray_cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    if not address or address.split(":")[0] in ("127.0.0.1", "localhost"):
        # One machine: Ray's node address is the loopback one, so nothing listens on the machine's
        # network address (Ray's switch for its single-machine mode; read when Ray is first imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actr_core.training import BEST_METRIC, CHECKPOINT_NAME, load_checkpoint, run_summary, write_run_outputs

    cfg = _absolute_paths(cfg)
    run_dir = cfg.run_dir
    if preflight(cfg, ray_cfg):
        print(f"continuing run {cfg.name!r} in {run_dir} (same settings) from Ray's last checkpoint of it", flush=True)
    else:  # flat, as 0.1.0 wrote it: `python pipelines/train.py runs/<name>/config.yaml` repeats the run
        run_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(_settings(cfg, ray_cfg), sort_keys=False)
        tmp = run_dir / ".config.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / "config.yaml")
    undo_quiet = quiet_ray_logs()
    started_ray = _init_ray(ray_cfg)
    started = time.perf_counter()
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"train": cfg.to_dict(), "ray": dataclasses.asdict(ray_cfg), "fault": _fault_settings(run_dir)},
            torch_config=TorchConfig(backend="nccl" if ray_cfg.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=ray_cfg.num_workers,
                use_gpu=ray_cfg.use_gpu,
                resources_per_worker={"CPU": ray_cfg.cpus_per_worker, **({"GPU": 1} if ray_cfg.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=cfg.name,
                storage_path=str(run_dir.parent),
                failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                checkpoint_config=CheckpointConfig(
                    num_to_keep=ray_cfg.checkpoints_to_keep,
                    checkpoint_score_attribute=BEST_METRIC,
                    checkpoint_score_order="max",
                ),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as error:
            user_error = _user_error_of_workers(error)
            if user_error is None:
                raise
            raise user_error from error
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        undo_quiet()  # after the shutdown: Ray prints the lines still in flight while it stops
    if result.error is not None:
        raise result.error
    history = result.return_value or load_checkpoint(Path(result.checkpoint.path) / CHECKPOINT_NAME).history
    best = result.get_best_checkpoint(metric=BEST_METRIC, mode="max") or result.checkpoint
    write_run_outputs(run_dir, history, Path(result.checkpoint.path), Path(best.path))
    summary = run_summary(run_dir, history, time.perf_counter() - started)
    print(yaml.safe_dump({"summary": summary}, sort_keys=False), flush=True)
    return summary


def cli(argv: Sequence[str], prog: str = "python pipelines/train.py") -> int:
    """``python pipelines/train.py [CONFIG.yaml] [--flag value ...]``; see :func:`parse_args`."""
    main(*parse_args(argv, prog))
    return 0


if __name__ == "__main__":
    from pipelines.entry import run

    sys.exit(run(cli))
