"""AdamW with the paper's two parameter groups, and the learning-rate schedules.

Groups (ACTR Sec. 4.1): the pretrained backbone learns slowly (6e-6), everything else — the
"heads": positional encodings, feature-learning blocks, flow super-resolution — ten times faster
(6e-5); weight decay 0.05 for both. A model names its backbone by exposing a ``backbone``
submodule; any parameter outside it is a head parameter. Freezing the backbone turns its
``requires_grad`` off and leaves it out of the optimiser.
"""

import math

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["parameter_groups", "build_optimizer", "lr_multiplier", "build_scheduler", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or the model itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def parameter_groups(
    model: nn.Module,
    *,
    backbone_lr: float,
    head_lr: float,
    weight_decay: float,
    freeze_backbone: bool = False,
) -> list[dict]:
    """AdamW parameter groups ``[backbone, heads]`` (the backbone group is left out when frozen or empty).

    ``freeze_backbone`` freezes the backbone's ``pretrained_part`` when it names one (a CNN
    backbone's new projection and tokens stay trainable, in the backbone group), else all of it.

    Each group carries a ``name`` ("backbone" / "heads"). Raises ``ValueError`` when the model has
    no ``backbone`` submodule, or when nothing would be trained.
    """
    model = unwrap_model(model)
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no `backbone` submodule; the optimiser groups need one "
            "(any parameter outside it belongs to the heads)"
        )
    backbone_ids = {id(p) for p in backbone.parameters()}
    if freeze_backbone:  # the pretrained part only, where the backbone says which it is
        getattr(backbone, "pretrained_part", backbone).requires_grad_(False)
    backbone_params = [p for p in backbone.parameters() if p.requires_grad]
    head_params = [p for p in model.parameters() if id(p) not in backbone_ids and p.requires_grad]
    groups = []
    if backbone_params:
        groups.append({"name": "backbone", "params": backbone_params, "lr": backbone_lr, "weight_decay": weight_decay})
    if head_params:
        groups.append({"name": "heads", "params": head_params, "lr": head_lr, "weight_decay": weight_decay})
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameter (freeze_backbone={freeze_backbone})")
    return groups


def build_optimizer(
    model: nn.Module,
    *,
    backbone_lr: float,
    head_lr: float,
    weight_decay: float,
    freeze_backbone: bool = False,
) -> AdamW:
    """AdamW over :func:`parameter_groups` (torch's default betas and eps)."""
    return AdamW(
        parameter_groups(
            model,
            backbone_lr=backbone_lr,
            head_lr=head_lr,
            weight_decay=weight_decay,
            freeze_backbone=freeze_backbone,
        )
    )


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Factor on each group's base lr before optimiser step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then either
    ``1`` ("constant") or a half cosine from 1 to ``min_ratio`` over the remaining steps ("cosine").
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0
) -> LambdaLR:
    """A ``LambdaLR`` stepping :func:`lr_multiplier` once per optimiser step."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")

    def factor(step: int) -> float:
        return lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule, min_ratio=min_ratio)

    return LambdaLR(optimizer, factor)
