"""Training, free of any framework: steps, epochs, optimiser groups, schedules, checkpoints.

``pipelines/train.py`` drives these with Ray Train; nothing here imports Ray.
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
from actr_core.training.config import TrainConfig, config_from_args, load_config, parse_overrides
from actr_core.training.loop import ValidationReferences, ValidationResult, all_reduce_sum, train_epoch, validate
from actr_core.training.optim import build_optimizer, build_scheduler, lr_multiplier, parameter_groups, unwrap_model
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
    "config_from_args",
    "load_config",
    "parse_overrides",
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
