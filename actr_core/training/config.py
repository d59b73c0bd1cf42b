"""Training configuration: one frozen dataclass, read from YAML and ``--key value`` overrides.

No tensors here. The defaults are the paper's optimiser settings (ACTR, Sec. 4.1) on a small CPU
run; the model, data and scale come from a YAML file in ``configs/`` or the command line.
"""

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from actr_core.metrics import PROTOCOLS

__all__ = ["TrainConfig", "load_config", "parse_overrides", "config_from_args"]

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")


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
    train_split: str = "train"
    val_split: str = "val"  # model selection happens on this split, never on "test"
    image_size: int = 256  # model input side H = W; shards are resized to it (paper Sec. 4.1: 256; ACTR_h 512)
    augment: bool = True  # the released code's training augmentation (photometric set + box-preserving crop)
    batch_size: int = 8  # per Ray worker (paper: 8 at 256, 6 at 512)
    val_batch_size: int = 8  # per Ray worker during validation
    shuffle_buffer: int = 256  # training samples in the shuffle buffer (per loader worker)
    loader_workers: int = 0  # DataLoader processes per Ray worker; 0 = read in the training process
    # --- schedule ---------------------------------------------------------------------------
    epochs: int = 10
    steps_per_epoch: int = 0  # cap on optimiser steps per epoch (each worker); 0 = all the full batches of the split
    val_steps: int = 0  # cap on validation batches per worker; 0 = the whole validation split
    validate_before_training: bool = True  # score the untrained model first (row "epoch 0" of metrics.csv)
    # --- optimiser (paper Sec. 4.1: AdamW, backbone 6e-6, heads 6e-5, weight decay 0.05) ----
    backbone_lr: float = 6e-6
    head_lr: float = 6e-5
    weight_decay: float = 0.05
    freeze_backbone: bool = False  # the released code freezes the backbone (peer_code.md §1.3)
    lr_schedule: str = "constant"  # "cosine" (to min_lr_ratio) or "constant", after warm-up
    warmup_steps: int = 0  # linear warm-up from 1/warmup_steps of the lr
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of each group's lr
    clip_grad_norm: float = 0.0  # 0 = no clipping
    precision: str = "fp32"  # "bf16" / "fp16" autocast on GPU ("fp16" adds a GradScaler); CPU uses fp32
    seed: int = 0
    # --- validation metric ------------------------------------------------------------------
    pck_alpha: float = 0.1  # PCK@0.1, the paper's headline metric
    val_protocol: str = "standard"  # actr_core.metrics scoring protocol (target-side threshold per dataset)
    # Score the classical peer (ORB + RANSAC homography, actr_core.metrics.references) beside the model on
    # the validation pairs, once per pair (then cached); identity (zero motion) is always scored.
    val_peer: bool = True
    # --- Ray Train / resources --------------------------------------------------------------
    num_workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker; backend nccl instead of gloo
    cpus_per_worker: int = 1  # Ray CPU resource per worker = torch threads + loader_workers (docs/training.md)
    find_unused_parameters: bool = False  # DDP option for models with branches unused in a step
    ray_address: str = ""  # "" = RAY_ADDRESS if set, else Ray started in-process
    ray_num_cpus: int = 0  # in-process Ray only; 0 = num_workers * cpus_per_worker
    object_store_mb: int = 256  # in-process Ray only; the default would take a third of the RAM
    max_failures: int = 1  # Ray FailureConfig: restarts from the last checkpoint after a failure
    checkpoints_to_keep: int = 2  # Ray CheckpointConfig.num_to_keep (the best by val PCK is kept)
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
            "num_workers": self.num_workers,
            "cpus_per_worker": self.cpus_per_worker,
            "object_store_mb": self.object_store_mb,
            "pck_alpha": self.pck_alpha,
            "checkpoints_to_keep": self.checkpoints_to_keep,
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
            "max_failures": self.max_failures,
            "ray_num_cpus": self.ray_num_cpus,
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
        """Build from a mapping; unknown keys raise ``ValueError`` naming them."""
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


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """``["--key", "value", "--other=3"]`` → ``{"key": "value", "other": "3"}`` (values stay strings).

    Dashes in keys become underscores; a key given twice keeps its last value.
    """
    out: dict[str, str] = {}
    items = list(args)
    i = 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"expected --key value, got {token!r} in {items}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise ValueError(f"--{key} has no value")
            value = items[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def config_from_args(args: Sequence[str]) -> TrainConfig:
    """The command line of ``pipelines/train.py``: ``[CONFIG.yaml] [--config PATH] [--key value ...]``.

    Later sources win: dataclass defaults < YAML file < ``--key value`` overrides.
    """
    items = list(args)
    values: dict[str, Any] = {}
    if items and not items[0].startswith("--"):
        values.update(load_config(items.pop(0)))
    overrides = parse_overrides(items)
    if "config" in overrides:
        values.update(load_config(overrides.pop("config")))
    values.update(overrides)
    return TrainConfig.from_dict(values)
