"""Training, free of any framework: steps, epochs, optimiser groups, schedules, checkpoints.

``fit`` runs one training process; ``pipelines/train.py`` runs it on Ray Train workers. Nothing
here imports Ray.
"""

from actr_core.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    SCHEMA_VERSION,
    CheckpointError,
    TrainingCheckpoint,
    atomic_save,
    export_model,
    load_checkpoint,
    load_model_from_checkpoint,
    resolve_checkpoint_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from actr_core.training.config import RAY_SETTINGS_OF_0_1_0, TrainConfig, load_config
from actr_core.training.loop import ValidationReferences, ValidationResult, all_reduce_sum, train_epoch, validate
from actr_core.training.optim import build_optimizer, build_scheduler, lr_multiplier, parameter_groups, unwrap_model
from actr_core.training.run import (
    BEST_METRIC,
    CHECKPOINTS_DIR,
    checkpoint_folder,
    epoch_line,
    fit,
    history_row,
    latest_checkpoint,
    resume_source,
    run_summary,
    seed_everything,
    untrained_line,
    write_csv,
    write_run_outputs,
)
from actr_core.training.step import StepResult, StepSettings, move_batch, precision_settings, train_step

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "SCHEMA_VERSION",
    "CheckpointError",
    "TrainingCheckpoint",
    "atomic_save",
    "export_model",
    "load_checkpoint",
    "load_model_from_checkpoint",
    "resolve_checkpoint_path",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "TrainConfig",
    "RAY_SETTINGS_OF_0_1_0",
    "load_config",
    "BEST_METRIC",
    "CHECKPOINTS_DIR",
    "checkpoint_folder",
    "epoch_line",
    "fit",
    "history_row",
    "latest_checkpoint",
    "resume_source",
    "run_summary",
    "seed_everything",
    "untrained_line",
    "write_csv",
    "write_run_outputs",
    "ValidationReferences",
    "ValidationResult",
    "all_reduce_sum",
    "train_epoch",
    "validate",
    "build_optimizer",
    "build_scheduler",
    "lr_multiplier",
    "parameter_groups",
    "unwrap_model",
    "StepResult",
    "StepSettings",
    "move_batch",
    "precision_settings",
    "train_step",
]
