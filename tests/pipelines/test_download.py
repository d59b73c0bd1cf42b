"""``actr download`` on a loopback server: a data set by name, idempotent, checked; exit statuses."""

import hashlib

import pytest
from hub_server import isolate_hub, loopback_server, served_artefact, spair_archive_bytes

from actr_core import hub
from actr_core.data import SPairReader
from pipelines.cli import main


@pytest.fixture
def server(monkeypatch, tmp_path):
    isolate_hub(monkeypatch, tmp_path / "cache")
    with loopback_server() as state:
        yield state


def test_download_dataset_idempotent(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(
        hub.ARTEFACTS, "spair", served_artefact(server, hub.ARTEFACTS["spair"], spair_archive_bytes(tmp_path / "b"))
    )
    root = tmp_path / "data"
    assert main(["download", "spair", "--root", str(root), "--no-progress"]) == 0
    assert f"spair: {root / 'SPair-71k'}" in capsys.readouterr().out
    assert len(SPairReader(str(root / "SPair-71k"), "test")) == 3
    assert len(SPairReader(str(root), "test")) == 3  # what make-shards --root DIR opens
    seen = len(server.requests)
    assert main(["download", "spair", "--root", str(root)]) == 0 and len(server.requests) == seen


def test_download_exit_statuses(server, tmp_path, monkeypatch, capsys):
    data = b"weights" * 1000
    bad = served_artefact(server, hub.ARTEFACTS["ibot-vits16"], data, sha256=hashlib.sha256(b"other").hexdigest())
    monkeypatch.setitem(hub.ARTEFACTS, "ibot-vits16", bad)
    assert main(["download", "ibot-vits16", "--no-progress"]) == 1  # a failed check
    assert "check failed" in capsys.readouterr().err
    assert main(["download", "ibot-vitb16", "nope"]) == 2  # names checked before anything downloads
    assert "no artefact named 'nope'" in capsys.readouterr().err and server.requests[1:] == []
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    assert main(["download", "pfwillow", "--root", str(tmp_path)]) == 2
    assert "place it at" in capsys.readouterr().err
    assert main(["download", "--list"]) == 0 and "unverified" in capsys.readouterr().out
