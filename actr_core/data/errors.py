"""Bad input: one error type that names the file and the reason, and the skip bookkeeping.

Every reader and the shard pipeline take ``on_error="raise"`` (the default: the first bad item
raises :class:`DataError`) or ``on_error="skip"`` (the item is left out, counted, and the count
with the reasons is logged as a warning at the end of the epoch). Nothing is dropped silently.
"""

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ON_ERROR", "DataError", "SkipLog", "check_on_error"]

ON_ERROR: tuple[str, ...] = ("raise", "skip")
_REASONS_SHOWN = 5  # how many reasons a summary line quotes


class DataError(ValueError):
    """A bad input item: ``where`` (file, shard URL or pair) and ``reason``."""

    def __init__(self, where: str, reason: str, *, count: int = 1):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
        self.count = count  # how many samples this error stands for (e.g. the rest of a truncated shard)

    def __reduce__(self) -> tuple[type, tuple[str, str], dict[str, int]]:
        """Pickle by the constructor's arguments (the default would call ``DataError(message)``), so the
        error crosses process boundaries (DataLoader workers, Ray) with its message and count."""
        return type(self), (self.where, self.reason), {"count": self.count}


def check_on_error(on_error: str) -> str:
    """Validate an ``on_error`` policy."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


@dataclasses.dataclass
class SkipLog:
    """Skipped items of one pass (epoch) and the policy that decides between raising and skipping."""

    on_error: str = "raise"
    what: str = "samples"  # noun used in the summary line
    errors: list[DataError] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        check_on_error(self.on_error)

    @property
    def count(self) -> int:
        """Number of skipped samples."""
        return sum(e.count for e in self.errors)

    def handle(self, error: DataError) -> None:
        """Raise ``error`` under ``on_error="raise"``; record it otherwise."""
        if self.on_error == "raise":
            raise error
        self.errors.append(error)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Route a :class:`DataError` raised in the block to :meth:`handle`."""
        try:
            yield
        except DataError as error:
            self.handle(error)

    def summary(self, context: str) -> str:
        """One line: how many were skipped and the first reasons."""
        shown = "; ".join(str(e) for e in self.errors[:_REASONS_SHOWN])
        more = f" (and {len(self.errors) - _REASONS_SHOWN} more)" if len(self.errors) > _REASONS_SHOWN else ""
        return f"{context}: skipped {self.count} {self.what}: {shown}{more}"

    def report(self, logger: logging.Logger, context: str) -> None:
        """Log the summary as a warning when something was skipped (end of an epoch)."""
        if self.errors:
            logger.warning(self.summary(context))
