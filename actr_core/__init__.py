"""actr_core: semantic correspondence with ACTR (CVPR 2023) and MMNet (ICCV 2021).

Subpackages: ``flow`` (pure geometry), ``blocks`` (building blocks), ``models``,
``data``, ``metrics``. Importing the package never imports Ray; ``Matcher`` (the one-call image
matcher of :mod:`actr_core.api`) is imported on first use.
"""

__version__ = "0.2.0"

__all__ = ["__version__", "Matcher", "MatchResult"]


def __getattr__(name: str):
    if name in ("Matcher", "MatchResult"):
        from actr_core import api

        return getattr(api, name)
    raise AttributeError(f"module 'actr_core' has no attribute {name!r}")
