"""Training configuration: one frozen dataclass of what the training needs, free of any framework.

No tensors here. The defaults are the paper's optimiser settings (ACTR, Sec. 4.1) on a small CPU
run; the model, data and scale come from a YAML file in ``configs/`` or the command line of
``pipelines/train.py``, which adds its own Ray settings (workers, resources, fault tolerance).
"""

import dataclasses
import logging
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from actr_core.metrics import PROTOCOLS

__all__ = ["TrainConfig", "load_config", "RAY_SETTINGS_OF_0_1_0"]

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
# Settings that actr_core 0.1.0 kept in TrainConfig and that now belong to the Ray pipeline
# (pipelines/train.py RaySettings): a 0.1.0 config.yaml or checkpoint config still loads, without them.
RAY_SETTINGS_OF_0_1_0 = frozenset(
    {
        "num_workers",
        "use_gpu",
        "cpus_per_worker",
        "find_unused_parameters",
        "ray_address",
        "ray_num_cpus",
        "object_store_mb",
        "max_failures",
        "checkpoints_to_keep",
    }
)
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; written to ``runs/<name>/config.yaml`` and into every checkpoint."""

    # --- run folder -------------------------------------------------------------------------
    name: str = "run"  # the run folder is <runs_dir>/<name>
    runs_dir: str = "runs"  # parent of run folders; Ray's RunConfig.storage_path
    # --- model ------------------------------------------------------------------------------
    model: str = "actr_small"  # registered builder name (actr_core.models.build_model)
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # builder overrides
    # --- data: a shard set written by pipelines/make_shards.py (local path or any fsspec URL) --
    shards: str = "shards/synthetic"  # the shard set's folder, holding manifest.json
    train_split: str = "train"  # the split trained on
    val_split: str = "val"  # model selection happens on this split, never on "test"
    allow_incomplete: bool = False  # train on an interrupted shard set's shards (logged; kept in config.yaml)
    image_size: int = 256  # model input side H = W; shards are resized to it (paper Sec. 4.1: 256; ACTR_h 512)
    augment: bool = True  # the released code's training augmentation (photometric set + box-preserving crop)
    batch_size: int = 8  # per Ray worker (paper: 8 at 256, 6 at 512)
    val_batch_size: int = 8  # per Ray worker during validation
    shuffle_buffer: int = 256  # training samples in the shuffle buffer (per loader worker)
    loader_workers: int = 0  # DataLoader processes per Ray worker; 0 = read in the training process
    # --- schedule ---------------------------------------------------------------------------
    epochs: int = 10  # passes over the training split (or steps_per_epoch steps each)
    steps_per_epoch: int = 0  # cap on optimiser steps per epoch (each worker); 0 = all the full batches of the split
    val_steps: int = 0  # cap on validation batches per worker; 0 = the whole validation split
    validate_before_training: bool = True  # score the untrained model first (row "epoch 0" of metrics.csv)
    # --- optimiser (paper Sec. 4.1: AdamW, backbone 6e-6, heads 6e-5, weight decay 0.05) ----
    backbone_lr: float = 6e-6  # AdamW learning rate of the pretrained backbone (paper Sec. 4.1)
    head_lr: float = 6e-5  # AdamW learning rate of everything else (paper Sec. 4.1)
    weight_decay: float = 0.05  # AdamW weight decay (paper Sec. 4.1)
    freeze_backbone: bool = False  # the released code freezes the backbone (peer_code.md §1.3)
    lr_schedule: str = "constant"  # "cosine" (to min_lr_ratio) or "constant", after warm-up
    warmup_steps: int = 0  # linear warm-up from 1/warmup_steps of the lr
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of each group's lr
    clip_grad_norm: float = 0.0  # 0 = no clipping
    precision: str = "fp32"  # "bf16" / "fp16" autocast where the device table allows it (CUDA; actr_core.blocks.device_table)
    #   ("fp16" adds a GradScaler); CPU runs fp32 whatever is asked
    seed: int = 0  # seeds model initialisation (with the rank), shuffling and augmentation
    # --- validation metric ------------------------------------------------------------------
    pck_alpha: float = 0.1  # PCK@0.1, the paper's headline metric
    val_protocol: str = "standard"  # actr_core.metrics scoring protocol (target-side threshold per dataset)
    val_peer: bool = True  # also score the classical peer (ORB + RANSAC, once per pair); identity always
    # --- run ---------------------------------------------------------------------------------
    resume: str = ""  # a checkpoint file (or a folder holding checkpoint.pt) to start from
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        _check_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("val_protocol", self.val_protocol, sorted(PROTOCOLS))
        positive = {
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "val_batch_size": self.val_batch_size,
            "epochs": self.epochs,
            "pck_alpha": self.pck_alpha,
        }
        bad = {k: v for k, v in positive.items() if not v > 0}
        if bad:
            raise ValueError(f"these settings must be > 0: {bad}")
        non_negative = {
            "backbone_lr": self.backbone_lr,
            "head_lr": self.head_lr,
            "weight_decay": self.weight_decay,
            "warmup_steps": self.warmup_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "clip_grad_norm": self.clip_grad_norm,
            "steps_per_epoch": self.steps_per_epoch,
            "val_steps": self.val_steps,
            "loader_workers": self.loader_workers,
            "shuffle_buffer": self.shuffle_buffer,
        }
        bad = {k: v for k, v in non_negative.items() if v < 0}
        if bad:
            raise ValueError(f"these settings must be >= 0: {bad}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.name or os.sep in self.name or self.name in (".", ".."):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (YAML- and checkpoint-safe)."""
        out = dataclasses.asdict(self)
        out["model_kwargs"] = dict(self.model_kwargs)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping; unknown keys raise ``ValueError`` naming them.

        The Ray settings of a 0.1.0 configuration (:data:`RAY_SETTINGS_OF_0_1_0`) are left out
        with a note: ``pipelines/train.py`` reads them into its own settings.
        """
        legacy = sorted(set(values) & RAY_SETTINGS_OF_0_1_0)
        if legacy:
            _log.info("Ray settings %s are not training settings (pipelines/train.py reads them); left out", legacy)
            values = {k: v for k, v in values.items() if k not in RAY_SETTINGS_OF_0_1_0}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied (and checked)."""
        return self.from_dict({**self.to_dict(), **changes})

    @property
    def run_dir(self) -> Path:
        """``<runs_dir>/<name>``, absolute."""
        return Path(self.runs_dir).expanduser().resolve() / self.name


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise naming the field."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is not None and issubclass(typing.get_origin(hint), Mapping):
        if isinstance(value, str):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} must be a boolean, got {value!r}")
    if hint is str:
        return "" if value is None else str(value)
    if hint in (int, float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if hint is float and number == number:
            return number
        if hint is int and number.is_integer():
            return int(number)
    raise ValueError(f"{key} must be {hint.__name__}, got {value!r}")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of settings (no checks yet; :meth:`TrainConfig.from_dict` does them)."""
    text = Path(path).read_text()
    values = yaml.safe_load(text) or {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{path} must hold a YAML mapping of settings, got {type(values).__name__}")
    return dict(values)
