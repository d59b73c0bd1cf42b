"""actr_core: semantic correspondence with ACTR (CVPR 2023) and MMNet (ICCV 2021).

Subpackages: ``flow`` (pure geometry), ``blocks`` (building blocks), ``models``,
``data``, ``metrics``. Importing the package never imports Ray.
"""

__version__ = "0.1.0"

from actr_core.api import Matcher, MatchResult  # noqa: E402  (light: torch, PIL; never Ray)

__all__ = ["__version__", "Matcher", "MatchResult"]
