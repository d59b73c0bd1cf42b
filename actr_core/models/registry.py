"""A registry of model builders, so that scripts (parameter counts, training, evaluation) can list
and build every model by name without knowing its module.

A builder registers itself where it is defined::

    @register_model("actr_base", paper_row="ACTR", paper_params_m=172.8)
    def actr_base(...) -> CorrespondenceModel: ...

and its module is imported by :mod:`actr_core.models`, so ``model_entries()`` sees it.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from actr_core.models.base import CorrespondenceModel

__all__ = ["ModelEntry", "register_model", "model_entries", "get_model_entry", "build_model"]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One registered builder and what the paper reports for it."""

    name: str
    builder: Callable[..., CorrespondenceModel]
    description: str = ""
    paper_row: str | None = None  # the row of the paper's Table 3 it corresponds to, if any
    paper_params_m: float | None = None  # parameters in millions as printed in that row


_ENTRIES: dict[str, ModelEntry] = {}


_Builder = TypeVar("_Builder", bound=Callable[..., CorrespondenceModel])  # a builder keeps its own return type


def register_model(
    name: str, *, description: str = "", paper_row: str | None = None, paper_params_m: float | None = None
) -> Callable[[_Builder], _Builder]:
    """Decorator registering a builder under ``name`` (names are unique)."""

    def decorate(builder: _Builder) -> _Builder:
        if name in _ENTRIES and _ENTRIES[name].builder is not builder:
            raise ValueError(f"a model named {name!r} is already registered ({_ENTRIES[name].builder.__module__})")
        doc = (builder.__doc__ or "").strip().splitlines()
        _ENTRIES[name] = ModelEntry(
            name=name,
            builder=builder,
            description=description or (doc[0] if doc else ""),
            paper_row=paper_row,
            paper_params_m=paper_params_m,
        )
        return builder

    return decorate


def model_entries() -> tuple[ModelEntry, ...]:
    """Every registered builder, in registration order."""
    return tuple(_ENTRIES.values())


def get_model_entry(name: str) -> ModelEntry:
    """The entry registered under ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in _ENTRIES:
        raise ValueError(f"no model named {name!r}; registered: {sorted(_ENTRIES)}")
    return _ENTRIES[name]


def build_model(name: str, **kwargs: Any) -> CorrespondenceModel:
    """Build the model registered under ``name``."""
    return get_model_entry(name).builder(**kwargs)
