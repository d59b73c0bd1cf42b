"""actr_core.hub on a loopback HTTP server: download, resume, checksums, Drive, extraction, offline, weights by name.

No test reaches a non-loopback address: every source of the registry entries used here is moved
onto a server on 127.0.0.1 that the test starts and stops (tests/hub_server.py).
"""

import dataclasses
import hashlib
import io
import os
from types import SimpleNamespace

import pytest
import torch
from hub_server import isolate_hub, loopback_server, released_checkpoint_bytes, served_artefact, spair_archive_bytes, tar_with

from actr_core import hub
from actr_core.data import SPairReader
from actr_core.models import create_vit

TINY = dict(depth=1, embed_dim=32, num_heads=2)
PAYLOAD = bytes(range(256)) * 8192  # 2 MiB


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """A fresh cache; both offline variables unset (each test sets what it means to test)."""
    isolate_hub(monkeypatch, tmp_path / "cache")


@pytest.fixture
def server():
    with loopback_server() as state:
        yield state


def weights_entry(server, data=PAYLOAD, **changes):
    art = hub.Artefact("blob", "weights", "blob.pth", "loopback test server", note="test")
    return served_artefact(server, art, data, **changes)


def test_download_checked_then_cache_hit(server):
    art = weights_entry(server, sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD))
    path = hub.fetch(art, progress=False)
    assert path == hub.cache_dir() / "blob" / "blob.pth" and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == [".blob.pth.lock", "blob.pth"]  # no partial file left
    seen = len(server.requests)
    assert hub.fetch(art, progress=False) == path and len(server.requests) == seen  # from the cache


def test_unverified_entry_prints_and_records_sha256_then_checks_it(server, capfd):
    art = weights_entry(server)
    path = hub.fetch(art, progress=False)
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert f"sha256 {digest} (unverified entry" in capfd.readouterr().err
    assert (path.parent / "blob.pth.sha256").read_text().strip() == digest
    path.write_bytes(PAYLOAD[:-1] + b"\x00")  # the file changes on disk later
    with pytest.raises(hub.ChecksumError, match="sha256"):
        hub.fetch(art, progress=False)


def test_resume_after_a_cut_connection(server):
    art = weights_entry(server, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    server.cut_after["/blob.pth"] = 1_300_000  # the connection closes after these bytes of the first request
    with pytest.raises(hub.HubError, match="partial download is resumed by running again"):
        hub.fetch(art, progress=False, retries=0)
    partial = [p for p in (hub.cache_dir() / "blob").iterdir() if p.name.endswith(".part")]
    kept = partial[0].stat().st_size  # whole blocks received before the cut
    assert len(partial) == 1 and 0 < kept <= 1_300_000
    assert hub.fetch(art, progress=False, retries=0).read_bytes() == PAYLOAD
    assert ("/blob.pth", f"bytes={kept}-") in server.requests  # the second call asked for the rest only
    assert not [p for p in (hub.cache_dir() / "blob").iterdir() if p.name.endswith(".part")]


def test_corrupt_bytes_rejected_by_checksum(server):
    art = weights_entry(server, sha256=hashlib.sha256(b"the published file").hexdigest())
    with pytest.raises(hub.ChecksumError, match=f"must have {art.sha256}"):
        hub.fetch(art, progress=False)
    assert [p.name for p in (hub.cache_dir() / "blob").iterdir()] == [".blob.pth.lock"]  # nothing kept


def test_wrong_size_rejected(server):
    with pytest.raises(hub.ChecksumError, match="bytes, but blob has"):
        hub.fetch(weights_entry(server, size=len(PAYLOAD) + 1), progress=False)


def test_google_drive_confirmation_page(server, monkeypatch):
    monkeypatch.setattr(hub, "DRIVE_FILE_URL", server.url("/uc?export=download&id={id}"))
    art = weights_entry(server, drive=True, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert hub.fetch(art, progress=False).read_bytes() == PAYLOAD
    paths = [path for path, _ in server.requests]
    assert paths[0] == "/uc?export=download&id=blob"  # the page, then the confirmed link
    assert any(p.startswith("/download?") and "confirm=t" in p and "uuid=" in p for p in paths[1:])


def test_offline_cache_hit_makes_no_request(server, monkeypatch):
    art = weights_entry(server)
    path = hub.fetch(art, progress=False)
    seen = len(server.requests)
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    assert hub.fetch(art, progress=False) == path and len(server.requests) == seen


def test_offline_cache_miss_names_file_and_place(server, monkeypatch):
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    art = weights_entry(server)
    place = hub.cache_dir() / "blob" / "blob.pth"
    with pytest.raises(hub.OfflineError, match="ACTR_CORE_OFFLINE=1") as info:
        hub.fetch(art, progress=False)
    assert art.urls[0] in str(info.value) and str(place) in str(info.value) and "\n" not in str(info.value)
    assert server.requests == []
    place.parent.mkdir(parents=True)
    place.write_bytes(PAYLOAD)  # placed by hand as told: used, its sha256 recorded
    assert hub.fetch(art, progress=False) == place and (place.parent / "blob.pth.sha256").is_file()


def test_unknown_name_and_failed_sources_are_one_line_errors(server):
    with pytest.raises(hub.HubError, match="no artefact named 'nope'; known: actr-spair"):
        hub.fetch("nope")
    art = dataclasses.replace(weights_entry(server), urls=(server.url("/missing.pth"),))
    with pytest.raises(hub.HubError, match="blob: every source failed.*404"):
        hub.fetch(art, progress=False)


@pytest.mark.parametrize(
    "members",
    [{"SPair-71k/ok.txt": b"x", "../escape.txt": b"x"}, {"/tmp/absolute.txt": b"x"}, {"a/../../escape.txt": b"x"}],
    ids=["dotdot", "absolute", "nested-dotdot"],
)
def test_path_traversal_archive_rejected(tmp_path, members):
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_with(members))
    dest = tmp_path / "data" / "root"
    with pytest.raises(hub.HubError, match="outside the target folder; archive rejected"):
        hub.extract_archive(archive, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "data" / "escape.txt").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["root"]  # no temporary folder left


def test_symlink_escaping_archive_rejected(tmp_path):
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        link = tarfile.TarInfo("SPair-71k/link")
        link.type, link.linkname = tarfile.SYMTYPE, "../../outside"
        tar.addfile(link)
    (tmp_path / "bad.tar").write_bytes(buffer.getvalue())
    with pytest.raises(hub.HubError, match="'SPair-71k/link'"):
        hub.extract_archive(tmp_path / "bad.tar", tmp_path / "root")


def test_dataset_downloaded_extracted_and_read(server, tmp_path, monkeypatch):
    archive = spair_archive_bytes(tmp_path / "build")
    monkeypatch.setitem(hub.ARTEFACTS, "spair", served_artefact(server, hub.ARTEFACTS["spair"], archive))
    folder = hub.fetch_dataset("spair", tmp_path / "datasets", progress=False)
    assert folder == tmp_path / "datasets" / "SPair-71k"
    assert len(SPairReader(str(folder), "test")) == 3
    seen = len(server.requests)
    assert hub.fetch_dataset("spair", tmp_path / "datasets", progress=False) == folder  # idempotent
    assert hub.dataset_root("spair", tmp_path / "datasets") == folder
    assert hub.dataset_root("spair", folder) == folder  # the folder itself
    assert len(server.requests) == seen
    with pytest.raises(FileNotFoundError, match="actr download spair --root"):
        hub.dataset_root("spair", tmp_path / "elsewhere", download=False)


def test_load_pretrained_from_a_drive_folder(server, monkeypatch):
    from tiny_released import TINY_RELEASED

    from actr_core import Matcher
    from actr_core.models import load_official_actr

    data = released_checkpoint_bytes()
    monkeypatch.setattr(hub, "DRIVE_FILE_URL", server.url("/uc?export=download&id={id}"))
    server.drive["file-spair"] = data
    listing = [
        SimpleNamespace(id="file-pf", path="pfpascal/model_best.pth"),
        SimpleNamespace(id="file-spair", path="spair/model_best.pth"),
    ]
    gdown = pytest.importorskip("gdown")
    monkeypatch.setattr(gdown, "download_folder", lambda **kwargs: listing)  # the folder listing (gdown scrapes Drive)
    art = dataclasses.replace(hub.ARTEFACTS["actr-spair"], model_config=TINY_RELEASED)
    monkeypatch.setitem(hub.ARTEFACTS, "actr-spair", art)
    matcher = Matcher.from_pretrained("actr-spair", progress=False)
    expected = load_official_actr(torch.load(io.BytesIO(data), weights_only=True), config=TINY_RELEASED)
    assert matcher.input_size == (64, 64)
    for (name, ours), (_, theirs) in zip(matcher.model.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name
    with pytest.raises(hub.HubError, match="not a released ACTR checkpoint"):
        hub.load_pretrained("spair")


def test_backbone_weights_by_name(server, monkeypatch):
    reference = create_vit("vit_small_patch16_224", warn_random_init=False, **TINY)
    teacher = {f"backbone.{k}": v + 1.0 for k, v in reference.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"teacher": teacher, "epoch": 1}, buffer)  # iBOT's checkpoint layout
    art = served_artefact(server, hub.ARTEFACTS["ibot-vits16"], buffer.getvalue())
    monkeypatch.setitem(hub.ARTEFACTS, "ibot-vits16", art)
    backbone = create_vit("vit_small_patch16_224", weights="ibot-vits16", **TINY)
    assert torch.equal(backbone.cls_token, teacher["backbone.cls_token"])
    with pytest.raises(hub.HubError, match="not backbone weights"):
        create_vit("vit_small_patch16_224", weights="spair", **TINY)


def test_timm_weights_from_a_prefilled_hugging_face_cache(tmp_path, monkeypatch):
    """``pretrained=True`` and ``weights="timm:..."`` load through timm's cache (offline: no request)."""
    import huggingface_hub
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    source = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY)
    state = {k: v + 0.5 for k, v in source.state_dict().items()}
    for repo in ("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "timm/vit_small_patch16_224.dino"):
        folder = tmp_path / "hf" / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
        save_file(state, str(folder / "snapshots" / ("0" * 40) / "model.safetensors"))
    for kwargs in ({"pretrained": True}, {"weights": "timm:vit_small_patch16_224.dino"}):
        backbone = create_vit("vit_small_patch16_224", **kwargs, **TINY)
        assert torch.equal(backbone.cls_token, state["cls_token"])
    with pytest.raises(ValueError, match="another architecture"):
        create_vit("vit_small_patch16_224", weights="timm:vit_base_patch16_224.dino", **TINY)
    with pytest.raises(ValueError, match="could not load pretrained weights 'vit_tiny_patch16_224'.*HF_HUB_OFFLINE"):
        create_vit("vit_tiny_patch16_224", pretrained=True, **TINY)


def test_actr_builder_pretrained_flag_is_never_ignored(tmp_path, monkeypatch):
    import huggingface_hub

    from actr_core.models import actr_tiny

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="could not load pretrained weights 'vit_tiny_patch16_224'"):
        actr_tiny(pretrained=True)
    with pytest.raises(ValueError, match="not both"):
        actr_tiny(pretrained=True, backbone_weights="ibot-vits16")


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv(hub.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / "actr_core"
    monkeypatch.setenv(hub.CACHE_ENV, os.fspath(tmp_path / "x"))
    assert hub.cache_dir() == tmp_path / "x"


def test_registry_entries_are_complete():
    for name, art in hub.ARTEFACTS.items():
        assert art.name == name and art.kind in ("weights", "actr", "dataset") and art.source
        assert art.urls or art.drive_ids or (art.drive_folder and art.folder_path), name
        assert (art.kind == "dataset") == (art.folder is not None), name
        assert art.sha256 is None or len(art.sha256) == 64  # none is known here: all unverified


def test_hub_imports_without_the_extra_and_names_it_when_needed(server, monkeypatch):
    import subprocess
    import sys

    code = "import sys, actr_core.hub; print(sorted(m for m in ('gdown', 'requests', 'torch') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    monkeypatch.setitem(sys.modules, "gdown", None)  # as if the hub extra were not installed
    with pytest.raises(hub.HubError, match=r"needs the optional package 'gdown': pip install 'actr_core\[hub\]'"):
        hub.fetch(weights_entry(server), progress=False)
    assert server.requests == []


def test_a_mirror_never_resumes_another_sources_partial_file(server):
    other = b"another archive" * 100_000
    art = weights_entry(server, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    server.files["/mirror.pth"] = PAYLOAD
    art = dataclasses.replace(art, urls=(server.url("/first.pth"), server.url("/mirror.pth")))
    server.files["/first.pth"] = other
    server.cut_after["/first.pth"] = 1_300_000  # the first source breaks off; the mirror starts from byte 0
    assert hub.fetch(art, progress=False, retries=0).read_bytes() == PAYLOAD
    assert ("/mirror.pth", None) in server.requests and not any(p == "/mirror.pth" and r for p, r in server.requests)
    assert sorted(p.name for p in (hub.cache_dir() / "blob").iterdir()) == [".blob.pth.lock", "blob.pth"]
