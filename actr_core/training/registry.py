"""Model builders by name, so that a configuration file and a checkpoint can name their model.

``build_model(name, **overrides)`` accepts
- a registered name (``register_model`` below, or the builders ``actr_core.models`` exports), or
- an import path ``"package.module:callable"`` for a builder defined elsewhere (tests, user code).
"""

import importlib
from collections.abc import Callable

from torch import nn

__all__ = ["register_model", "build_model", "available_models"]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module] | None = None):
    """Register ``builder`` under ``name``; usable as a decorator (``@register_model("x")``)."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"a model builder named {name!r} is already registered ({_BUILDERS[name]})")
        _BUILDERS[name] = fn
        return fn

    return add if builder is None else add(builder)


def _models_package_builders() -> dict[str, Callable[..., nn.Module]]:
    """Builders that ``actr_core.models`` exposes: its own registry if it has one, else public builder functions."""
    try:
        models = importlib.import_module("actr_core.models")
    except ImportError:
        return {}
    registry = getattr(models, "MODEL_BUILDERS", None)
    if isinstance(registry, dict):
        return dict(registry)
    names = getattr(models, "__all__", [])
    return {n: getattr(models, n) for n in names if _looks_like_builder(n, getattr(models, n, None))}


def _looks_like_builder(name: str, obj: object) -> bool:
    return callable(obj) and not isinstance(obj, type) and name.startswith(("actr", "baseline", "mmnet"))


def available_models() -> list[str]:
    """Every name :func:`build_model` accepts without an import path."""
    return sorted({**_models_package_builders(), **_BUILDERS})


def _resolve(name: str) -> Callable[..., nn.Module]:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import model builder {name!r}: {error}") from error
    builders = {**_models_package_builders(), **_BUILDERS}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; available: {sorted(builders)} or 'package.module:builder'")
    return builders[name]


def build_model(name: str, **overrides) -> nn.Module:
    """Build the model registered as ``name`` with keyword ``overrides`` passed to its builder."""
    model = _resolve(name)(**overrides)
    if not isinstance(model, nn.Module):
        raise ValueError(f"builder {name!r} returned {type(model).__name__}, not an nn.Module")
    return model
