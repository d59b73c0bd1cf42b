"""actr_core.files: whole files or the previous ones (a patched writer raising ENOSPC), folder locks."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest
from matplotlib.figure import Figure

import actr_core.files as files
from actr_core.files import FolderLockedError, folder_lock, write_atomic, write_figure, write_files_atomic


def _full_disk_after(monkeypatch, good_writes: int) -> None:
    real, calls = files._write_all, []

    def write(fd: int, data: bytes) -> None:
        calls.append(len(data))
        if len(calls) > good_writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(files, "_write_all", write)


def test_write_atomic_replaces_whole_and_keeps_the_mode(tmp_path):
    path = write_atomic(tmp_path / "a.txt", "first")
    assert path.read_text() == "first"
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second" and os.listdir(tmp_path) == ["a.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_full_disk_keeps_every_previous_file(tmp_path, monkeypatch):
    a, b = tmp_path / "results.nc", tmp_path / "table.txt"
    write_files_atomic({a: b"old a", b: "old b"})
    _full_disk_after(monkeypatch, good_writes=1)  # the first new file fits, the second does not
    with pytest.raises(OSError) as caught:
        write_files_atomic({a: b"new a", b: "new b"})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(b)
    assert "table.txt keeps its previous content" in caught.value.strerror
    assert (a.read_bytes(), b.read_text()) == (b"old a", "old b")  # neither replaced
    assert sorted(os.listdir(tmp_path)) == ["results.nc", "table.txt"]  # no temporary file left


def test_full_disk_while_writing_a_figure_keeps_the_previous_png(tmp_path, monkeypatch):
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    path = write_figure(fig, tmp_path / "sub" / "curve.png")
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"
    fig.add_subplot().plot([0, 1], [0, 1])
    _full_disk_after(monkeypatch, good_writes=0)
    with pytest.raises(OSError, match="no space left"):
        write_figure(fig, path)
    assert path.read_bytes() == before and os.listdir(path.parent) == ["curve.png"]


def test_folder_lock_refuses_another_process(tmp_path):
    holder = textwrap.dedent(f"""
        import sys, time
        from actr_core.files import folder_lock
        with folder_lock({str(tmp_path)!r}, ".x.lock", "a test"):
            print("held", flush=True)
            sys.stdin.readline()
    """)
    other = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with (
            pytest.raises(FolderLockedError, match=r"is in use by a test .*\.x\.lock"),
            folder_lock(tmp_path, ".x.lock", "a test"),
        ):
            pass
    finally:
        other.communicate("\n", timeout=120)
    with folder_lock(tmp_path, ".x.lock", "a test"):  # free again once the other process let go
        pass
    assert issubclass(FolderLockedError, ValueError)  # a user error for the command line (exit 2)
