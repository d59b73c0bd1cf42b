"""Argument checks shared by the blocks: each raises ``ValueError`` naming the offending values."""

import torch
from torch import Tensor


def check_rank(name: str, x: Tensor, rank: int, layout: str) -> None:
    """Raise unless ``x`` has ``rank`` dimensions (``layout`` names them for the message)."""
    if x.dim() != rank:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected {rank} dimensions ({layout})")


def check_bool(name: str, x: Tensor) -> None:
    """Raise unless ``x`` is a boolean tensor."""
    if x.dtype != torch.bool:
        raise ValueError(f"{name} has dtype {x.dtype}: expected a boolean mask (torch.bool)")


def check_positive(name: str, value: float) -> None:
    """Raise unless ``value`` is a finite number > 0."""
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} = {value!r}: expected a finite number > 0")


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    """Raise unless ``divisor`` divides ``value``."""
    if divisor <= 0 or value % divisor != 0:
        raise ValueError(f"{name} = {value} is not divisible by {divisor_name} = {divisor}")
