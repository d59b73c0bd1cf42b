"""Output files that are whole or absent, and folders with one writer at a time.

Every result file of the library (``results.nc``, tables, figures, JSON, CSV) is rendered in
memory first and handed to :func:`write_atomic`, which writes it to a temporary name in the same
folder (``.<name>.<random>.tmp``: same file system, so the rename is atomic), flushes and fsyncs
it, and renames it over the destination. A crash or a full disk (``OSError`` ``ENOSPC``) therefore
leaves the previous file as it was and no temporary file behind.

:func:`folder_lock` holds a lock file (``filelock``) inside a folder for the duration of a block,
so that a second process writing the same folder fails at once with :class:`FolderLockedError`
instead of interleaving its files with the first one's.
"""

import contextlib
import errno
import io
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["FolderLockedError", "folder_lock", "write_atomic", "write_figure", "write_files_atomic"]


class FolderLockedError(ValueError):
    """Another process holds the folder's lock (a user error: two commands writing one folder)."""


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write fewer) and fsync it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` through a temporary file and a rename.

    The folder must exist. On any error (a full disk included) the temporary file is removed, the
    previous content of ``path`` is kept, and the error is raised again; ``ENOSPC`` is re-raised
    with the destination named, so the message says which file could not be written.
    """
    return write_files_atomic({path: data})[0]


def write_files_atomic(files: Mapping[str | os.PathLike, bytes | str]) -> list[Path]:
    """Several files as one step: every file is written to its temporary name first, then all are renamed.

    A failure while writing (a full disk) therefore replaces none of them: the previous files stay
    as they were, together. Same rules as :func:`write_atomic` otherwise; returns the paths.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for target, data in files.items():
            path = Path(target)
            payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as with open()
            staged.append((tmp, path))
            try:
                _write_all(fd, payload)
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise OSError(errno.ENOSPC, f"no space left on the device; {path.name} keeps its previous content",
                                  str(path)) from error  # fmt: skip
                raise
            finally:
                os.close(fd)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    return [path for _, path in staged]


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str, what: str) -> Iterator[Path]:
    """Hold the lock file ``folder/name`` for the block; another holder → :class:`FolderLockedError` at once.

    ``what`` names the writer in the message (e.g. "an evaluation"). The folder must exist. The
    lock file stays (empty) after release; holding it is what counts, not its presence.
    """
    import filelock

    lock_path = Path(folder) / name
    lock = filelock.FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise FolderLockedError(
            f"{folder} is in use by {what} in another process (it holds {lock_path}); wait for it to finish "
            "or choose another folder"
        ) from None
    try:
        yield lock_path
    finally:
        lock.release()


def write_figure(figure: Any, path: str | os.PathLike) -> Path:
    """A matplotlib figure as PNG at ``path`` (folders created), rendered in memory, then :func:`write_atomic`."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, buffer.getvalue())
