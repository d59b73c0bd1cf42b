"""Resident memory of this process, its peak, and a reset of the peak (Linux ``/proc``).

The peak is the kernel's high-water mark of the resident set (``VmHWM`` in ``/proc/self/status``,
the same figure as ``resource.getrusage(...).ru_maxrss``). Writing ``5`` to
``/proc/self/clear_refs`` resets it to the current resident set, so a peak can be measured over one
phase (a forward pass) rather than the life of the process. Where ``/proc`` is missing the peak
falls back to ``ru_maxrss`` and cannot be reset (:func:`reset_peak_rss` returns ``False``).
"""

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

__all__ = ["peak_rss_mb", "release_free_memory", "reset_peak_rss", "rss_mb"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_HIWATER = "5"  # clear_refs command: reset the peak resident set size to the current one
_KIB_PER_MIB = 1024


def _status_mb(field: str) -> float | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / _KIB_PER_MIB
    return None


def rss_mb() -> float:
    """Current resident set size in MiB (``VmRSS``)."""
    value = _status_mb("VmRSS")
    if value is None:  # pragma: no cover - non-Linux
        return peak_rss_mb()
    return value


def peak_rss_mb() -> float:
    """Peak resident set size in MiB since the process started or the last :func:`reset_peak_rss`."""
    value = _status_mb("VmHWM")
    if value is None:  # pragma: no cover - non-Linux: ru_maxrss is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / (_KIB_PER_MIB**2 if sys.platform == "darwin" else _KIB_PER_MIB)
    return value


def reset_peak_rss() -> bool:
    """Reset the peak to the current resident set; ``False`` where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text(_RESET_HIWATER)
    except OSError:
        return False
    return True


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``), so the resident set
    no longer counts memory freed by an earlier phase (e.g. loading a checkpoint). ``False`` where
    the C library has no ``malloc_trim``."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # pragma: no cover - not glibc
        return False
    trim(0)
    return True
