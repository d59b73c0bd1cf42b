"""A loopback HTTP server and fabricated artefacts for the tests of ``actr_core.hub`` and ``actr reproduce``.

The server (127.0.0.1, an ephemeral port, started and stopped by the test) serves files by path
with HTTP ``Range`` support, can cut a transfer after a number of bytes, and answers
``/uc?export=download&id=ID`` like Google Drive does for large files: an HTML page whose
``download-form`` leads to ``/download?id=ID&confirm=t&uuid=...``, the only URL that gives the bytes.
The fabricated artefacts are in the real formats: a released ACTR checkpoint (``{"state_dict":
...}`` under the released key names, random weights, the tiny sizes of :mod:`tiny_released`) and
SPair-71k as a ``SPair-71k.tar.gz`` in the official layout (the SPair fixture of tests/data).
"""

import contextlib
import dataclasses
import importlib.util
import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import torch

from actr_core import hub

DRIVE_UUID = "0b1c2d3e"


@dataclasses.dataclass
class Loopback:
    """What the server serves and what it saw."""

    port: int = 0
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)  # path -> bytes
    drive: dict[str, bytes] = dataclasses.field(default_factory=dict)  # Drive file id -> bytes
    cut_after: dict[str, int] = dataclasses.field(default_factory=dict)  # path -> bytes sent before cutting (once)
    requests: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)  # (path with query, Range)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(state: Loopback) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, body: bytes, content_type: str = "application/octet-stream", cut: int | None = None) -> None:
            start, status = 0, 200
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes="):
                start, status = int(wanted[6:].split("-")[0]), 206
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body) - start))
            self.send_header("ETag", f'"{hash(body) & 0xFFFFFFFF:x}"')
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body[start:] if cut is None else body[start : start + cut])
                self.wfile.flush()
            if cut is not None:
                self.close_connection = True

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            state.requests.append((self.path, self.headers.get("Range")))
            if parts.path == "/uc" and query.get("id") in state.drive:  # Drive's confirmation page
                form = (
                    f'<form id="download-form" action="{state.url("/download")}" method="get">'
                    f'<input type="hidden" name="id" value="{query["id"]}"><input type="hidden" name="export" value="download">'
                    f'<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="{DRIVE_UUID}"></form>'
                )
                page = f"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>\n{form}\n</body></html>"
                return self._send(page.encode(), "text/html; charset=utf-8")
            if parts.path == "/download" and query.get("id") in state.drive:
                if query.get("confirm") != "t" or query.get("uuid") != DRIVE_UUID:
                    return self.send_error(403, "no confirmation token")
                return self._send(state.drive[query["id"]])
            if parts.path in state.files:
                cut = None if self.headers.get("Range") else state.cut_after.pop(parts.path, None)
                return self._send(state.files[parts.path], cut=cut)
            self.send_error(404)

    return Handler


def isolate_hub(monkeypatch, cache: Path) -> None:
    """A fresh download cache at ``cache``; both offline variables unset (a test sets what it tests)."""
    monkeypatch.setenv(hub.CACHE_ENV, str(cache))
    monkeypatch.delenv(hub.OFFLINE_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@contextlib.contextmanager
def loopback_server() -> Iterator[Loopback]:
    """Serve a :class:`Loopback` on 127.0.0.1 for the duration of the block."""
    state = Loopback()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def released_checkpoint_bytes(seed: int = 0) -> bytes:
    """A checkpoint as the released code saves it (``{"state_dict": ...}``, released key names),
    random weights, the sizes of ``tiny_released.TINY_RELEASED``."""
    from tiny_released import tiny_released_model

    from actr_core.models import to_official_state_dict

    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save({"state_dict": to_official_state_dict(tiny_released_model())}, buffer)
    return buffer.getvalue()


def _data_fixtures():
    spec = importlib.util.spec_from_file_location("data_fixtures", Path(__file__).parent / "data" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spair_archive_bytes(tmp: Path, pairs_per_split: int = 3) -> bytes:
    """``SPair-71k.tar.gz`` in the official layout: one top folder ``SPair-71k/`` with ``Layout/large``,
    ``PairAnnotation`` and ``JPEGImages`` (the SPair fixture of tests/data)."""
    root = tmp / "SPair-71k"
    _data_fixtures().make_spair(str(root), pairs_per_split=pairs_per_split)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(root, arcname="SPair-71k")
    return buffer.getvalue()


def tar_with(members: dict[str, bytes]) -> bytes:
    """A tar.gz holding ``members`` under exactly the given names (``../evil`` included)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def served_artefact(server: Loopback, art: hub.Artefact, data: bytes, *, drive: bool = False, **changes) -> hub.Artefact:
    """``art`` with its sources moved onto the loopback server (a plain URL, or a Drive id)."""
    if drive:
        server.drive[art.name] = data
        return dataclasses.replace(art, urls=(), drive_ids=(art.name,), drive_folder=None, **changes)
    server.files[f"/{art.filename}"] = data
    return dataclasses.replace(art, urls=(server.url(f"/{art.filename}"),), drive_ids=(), drive_folder=None, **changes)
