"""Shard sets: manifest, determinism, resumability, single writer, verification, benchmark sources."""

import json
import pickle
import subprocess
import sys
import time

import fsspec
import pytest
from batches import assert_same_batch

from actr_core.data import DataError, ShardDataset, ShardSettings, check_manifest, make_shards, read_manifest, verify_shards
from actr_core.data.shards import LOCK_NAME, manifest_problems, plan_shards, sha256_hex, tar_samples
from actr_core.files import FolderLockedError


def _files(url: str) -> dict[str, bytes]:
    """The shard set's files by name (the local writer's lock file left out)."""
    fs, root = fsspec.core.url_to_fs(url)
    paths = fs.ls(root, detail=False)
    return {path.rsplit("/", 1)[-1]: fs.cat_file(path) for path in paths if not path.endswith(LOCK_NAME)}


def test_manifest_lists_every_shard(memory_root, tiny_settings_factory):
    settings = tiny_settings_factory()
    manifest = make_shards(memory_root, settings, progress=False)
    files = _files(memory_root)
    assert manifest["complete"] and manifest["schema_version"] == 1
    assert manifest["settings"] == settings.to_json()
    assert [e["name"] for e in manifest["splits"]["test"]["shards"]] == [f"test-{k:06d}.tar" for k in range(4)]
    assert [e["samples"] for e in manifest["splits"]["test"]["shards"]] == [4, 4, 4, 1]
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            assert entry["bytes"] == len(files[entry["name"]]) and entry["sha256"] == sha256_hex(files[entry["name"]])
    assert manifest["totals"] == {
        "shards": 6 + 2 + 4,
        "samples": 41,
        "bytes": sum(len(v) for k, v in files.items() if k.endswith(".tar")),
        "skipped": 0,
        "size_corrected": 0,
    }
    assert json.loads(files["manifest.json"]) == manifest
    assert verify_shards(memory_root).ok


def test_sample_members_and_order(memory_root, tiny_settings_factory):
    """webdataset's TarWriter writes a sample's members in name order, with the fixed metadata."""
    make_shards(memory_root, tiny_settings_factory(pairs=(("train", 1), ("val", 1), ("test", 1))), progress=False)
    data = _files(memory_root)["val-000000.tar"]
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [
        f"val_0000000.{m}" for m in ("flow.npy", "kps.json", "meta.json", "src.jpg", "trg.jpg", "valid.npy")
    ]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}


def test_same_settings_give_identical_bytes_anywhere_with_any_process_count(tmp_path, memory_root, tiny_settings_factory):
    settings = tiny_settings_factory(pairs=(("train", 9), ("val", 2), ("test", 3)))
    make_shards(memory_root, settings, progress=False)
    make_shards(f"file://{tmp_path}/b", settings, progress=False, workers=2)
    assert _files(memory_root) == _files(str(tmp_path / "b"))


def test_png_images(memory_root, tiny_settings_factory):
    make_shards(
        memory_root, tiny_settings_factory(image_format="png", pairs=(("train", 1), ("val", 1), ("test", 2))), progress=False
    )
    batch = next(iter(ShardDataset(memory_root, "test", batch_size=2, rank=0, world_size=1)))
    assert batch.src_image.shape == (2, 3, 32, 48)
    assert any(
        name.endswith(".png") for _, members in tar_samples(_files(memory_root)["test-000000.tar"], "t") for name in members
    )


def test_rerun_skips_complete_shards_and_rebuilds_damaged_ones(memory_root, tiny_settings_factory):
    settings = tiny_settings_factory()
    make_shards(memory_root, settings, progress=False)
    reference = _files(memory_root)
    fs = fsspec.filesystem("memory")
    root = memory_root.removeprefix("memory://")
    # what a kill leaves behind: a truncated shard, a missing one, a temp file, an incomplete manifest
    fs.pipe_file(f"{root}/train-000001.tar", reference["train-000001.tar"][:5000])
    fs.rm(f"{root}/test-000002.tar")
    fs.pipe_file(f"{root}/train-000003.tar.tmp", b"partial")
    manifest = json.loads(reference["manifest.json"])
    manifest["complete"] = False
    manifest["splits"]["val"]["shards"] = manifest["splits"]["val"]["shards"][:1]
    fs.pipe_file(f"{root}/manifest.json", json.dumps(manifest).encode())
    assert not verify_shards(memory_root).ok
    rebuilt = []
    make_shards(memory_root, settings, progress=False, on_shard=rebuilt.append)
    assert sorted(rebuilt) == ["test-000002.tar", "train-000001.tar", "val-000001.tar"]
    assert _files(memory_root) == reference


def test_other_settings_need_overwrite(memory_root, tiny_settings_factory):
    make_shards(memory_root, tiny_settings_factory(), progress=False)
    other = tiny_settings_factory(seed=1, pairs=(("train", 2), ("val", 1), ("test", 1)))
    with pytest.raises(ValueError, match="other settings"):
        make_shards(memory_root, other, progress=False)
    make_shards(memory_root, other, progress=False, overwrite=True)
    assert sorted(_files(memory_root)) == ["manifest.json", "test-000000.tar", "train-000000.tar", "val-000000.tar"]
    assert verify_shards(memory_root).ok


class TestVerify:
    def test_detects_tampering_missing_and_stray_shards(self, memory_root, tiny_settings_factory):
        make_shards(memory_root, tiny_settings_factory(pairs=(("train", 5), ("val", 1), ("test", 1))), progress=False)
        fs, root = fsspec.filesystem("memory"), memory_root.removeprefix("memory://")
        data = bytearray(fs.cat_file(f"{root}/train-000000.tar"))
        data[700] ^= 0xFF
        fs.pipe_file(f"{root}/train-000000.tar", bytes(data))
        fs.rm(f"{root}/val-000000.tar")
        fs.pipe_file(f"{root}/extra-000000.tar", b"")
        report = verify_shards(memory_root)
        text = "\n".join(report.problems)
        assert not report.ok
        assert "train-000000.tar: sha256 differs" in text
        assert "val-000000.tar: missing" in text
        assert "extra-000000.tar: shard not listed" in text
        assert "FAILED" in str(report)

    def test_without_manifest(self, memory_root):
        report = verify_shards(memory_root)
        assert not report.ok and "no manifest" in report.problems[0]

    def test_deep_check_counts_samples(self, memory_root, tiny_settings_factory):
        make_shards(memory_root, tiny_settings_factory(pairs=(("train", 3), ("val", 1), ("test", 1))), progress=False)
        fs, root = fsspec.filesystem("memory"), memory_root.removeprefix("memory://")
        manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
        entry = manifest["splits"]["train"]["shards"][0]  # a consistent manifest that promises a fourth pair
        entry["samples"] = entry["stop"] = 4
        manifest["splits"]["train"]["samples"] += 1
        manifest["totals"]["samples"] += 1
        fs.pipe_file(f"{root}/manifest.json", json.dumps(manifest).encode())
        assert "3 samples, manifest says 4" in "\n".join(verify_shards(memory_root).problems)
        assert verify_shards(memory_root, deep=False).ok


@pytest.mark.parametrize(
    "source, splits", [("spair", ("train", "val", "test")), ("pfpascal", ("train", "test")), ("pfwillow", ("test",))]
)
def test_benchmark_sources(memory_root, builders, source, splits):
    root = memory_root + "/data"
    getattr(builders, source)(root)
    out = memory_root + "/shards"
    settings = ShardSettings(source=source, root=root, splits=splits, size=(32, 48), samples_per_shard=2)
    manifest = make_shards(out, settings, progress=False)
    assert manifest["totals"]["samples"] == 3 * len(splits)
    batch = next(iter(ShardDataset(out, splits[-1], batch_size=3, rank=0, world_size=1)))
    assert batch.dataset == (source,) * 3 and batch.flow.shape == (3, 2, 8, 12)
    assert batch.valid_flow.any()
    assert ("viewpoint_variation" in batch.flags) == (source == "spair")


def test_limit_and_plan(memory_root, builders):
    builders.spair(memory_root, pairs_per_split=5)
    settings = ShardSettings(source="spair", root=memory_root, limit=3, samples_per_shard=2, size=32)
    tasks = plan_shards(settings)
    assert [(t.name, t.start, t.stop) for t in tasks if t.split == "val"] == [("val-000000.tar", 0, 2), ("val-000001.tar", 2, 3)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"source": "caltech"}, "source must be one of"),
        ({"source": "spair"}, "needs root"),
        ({"splits": ("trn",)}, "unknown split"),
        ({"image_format": "webp"}, "image_format"),
        ({"samples_per_shard": 0}, "samples_per_shard"),
        ({"size": (30, 32)}, "multiple"),
        ({"pairs": (("train", 1),)}, "no count for splits"),
        ({"on_error": "ignore"}, "on_error"),
    ],
)
def test_settings_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShardSettings(**kwargs)


def test_read_manifest_absent(memory_root):
    assert read_manifest(memory_root) is None


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_tar_samples_group_members_for_every_header_format(fmt):
    """webdataset's tar iteration groups members by key (directory included) in any header format."""
    import io
    import tarfile

    formats = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
    folder = "" if fmt == "ustar" else "d/" + "x" * 150 + "/"  # beyond ustar's 100-character names
    names = [f"{folder}k1.src.jpg", f"{folder}k1.meta.json", f"{folder}k2.src.jpg"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=formats[fmt]) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            payload = name.encode() * 7
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    got = tar_samples(buffer.getvalue(), fmt)
    assert [(k, sorted(m)) for k, m in got] == [(f"{folder}k1", ["meta.json", "src.jpg"]), (f"{folder}k2", ["src.jpg"])]
    assert got[0][1]["src.jpg"] == names[0].encode() * 7


def test_tar_samples_report_a_cut_member_and_stop_at_a_damaged_header():
    from actr_core.data.shards import _tar_bytes

    data = _tar_bytes([{"__key__": "k", "src.jpg": b"abc" * 300, "meta.json": b"{}"}, {"__key__": "m", "src.jpg": b"x"}])
    with pytest.raises(DataError, match="cut.tar: truncated or corrupt tar"):
        tar_samples(data[:2000], "cut.tar")  # inside the second member's content (k.meta.json, then k.src.jpg)
    damaged = bytearray(data)
    damaged[512 * 5 + 10] ^= 0x01  # the third member's name (m.src.jpg): its header checksum no longer matches
    # Python's tarfile ends the archive at a bad header after the first; the sample count and sha256 catch it
    assert [key for key, _ in tar_samples(bytes(damaged), "bad.tar")] == ["k"]


# ----------------------------------------------------------------------------------------------
# Manifest checks, the single writer, compatibility


def _edit_manifest(url: str, edit) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    manifest = edit(manifest)
    fs.pipe_file(f"{root}/manifest.json", json.dumps(manifest).encode())


def _drop_entry(manifest):
    shards = manifest["splits"]["train"]["shards"]
    removed = shards.pop(1)
    for where in (manifest["splits"]["train"], manifest["totals"]):
        where["samples"] -= removed["samples"]
        where["bytes"] -= removed["bytes"]
    manifest["totals"]["shards"] -= 1
    return manifest


def _duplicate_entry(manifest):
    manifest["splits"]["val"]["shards"].append(dict(manifest["splits"]["val"]["shards"][0]))
    return manifest


def _wrong_total(manifest):
    manifest["totals"]["samples"] += 1
    return manifest


@pytest.mark.parametrize(
    "edit, match, incomplete",
    [
        (lambda m: {**m, "complete": False}, "complete: false", True),
        (_drop_entry, r"split 'train': missing shard entries \(train-000001.tar\)", True),
        (_duplicate_entry, "shard val-000000.tar is listed twice", False),
        (_wrong_total, "totals.samples says 42, the shard entries add up to 41", False),
        (lambda m: {**m, "manifest_format": 2}, "made by another version of actr_core .*pipelines/make_shards.py", False),
    ],
)
def test_readers_refuse_a_bad_manifest_naming_the_problem(memory_root, tiny_settings_factory, edit, match, incomplete):
    make_shards(memory_root, tiny_settings_factory(), progress=False)
    _edit_manifest(memory_root, edit)
    with pytest.raises(DataError, match=match):
        ShardDataset(memory_root, "train", batch_size=2, rank=0, world_size=1)
    assert not verify_shards(memory_root).ok and any(
        __import__("re").search(match, p) for p in verify_shards(memory_root).problems
    )
    if incomplete:  # an interrupted run's shards can still be read on request
        dataset = ShardDataset(memory_root, "train", batch_size=2, rank=0, world_size=1, allow_incomplete=True)
        assert sum(len(b.pair_id) for b in dataset) == sum(count for _, count, _ in dataset.shards) > 0
    else:
        with pytest.raises(DataError, match=match):
            ShardDataset(memory_root, "train", batch_size=2, rank=0, world_size=1, allow_incomplete=True)


def test_a_manifest_that_is_not_a_json_object(memory_root, tiny_settings_factory):
    make_shards(memory_root, tiny_settings_factory(), progress=False)
    _edit_manifest(memory_root, lambda m: [m])
    with pytest.raises(DataError, match="manifest.json: manifest is not a JSON object"):
        ShardDataset(memory_root, "train", batch_size=2, rank=0, world_size=1, allow_incomplete=True)
    assert "not a JSON object" in verify_shards(memory_root).problems[0]
    assert manifest_problems([1])[1] and not any(manifest_problems(json.loads(json.dumps({})))[0])


def test_an_interrupted_run_lists_itself_as_incomplete(memory_root, tiny_settings_factory):
    """The manifest a killed run leaves (written after each shard) is refused until the run is finished."""
    settings = tiny_settings_factory()

    def stop_after_two(name, written=[]):  # noqa: B006 (counts the calls of this run)
        written.append(name)
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_shards(memory_root, settings, progress=False, on_shard=stop_after_two)
    incomplete, broken = manifest_problems(read_manifest(memory_root))
    assert (
        not broken and any("complete: false" in p for p in incomplete) and any("missing shard entries" in p for p in incomplete)
    )
    with pytest.raises(DataError, match="allow_incomplete=True reads the shards written so far"):
        check_manifest(read_manifest(memory_root), "m")
    make_shards(memory_root, settings, progress=False)
    assert manifest_problems(read_manifest(memory_root)) == ([], [])


def test_verify_checks_stored_content_against_the_settings(memory_root, tiny_settings_factory):
    make_shards(memory_root, tiny_settings_factory(pairs=(("train", 2), ("val", 1), ("test", 1))), progress=False)
    _edit_manifest(memory_root, lambda m: {**m, "settings": {**m["settings"], "size": [64, 96]}})
    text = "\n".join(verify_shards(memory_root).problems)
    assert "has images of [(32, 48), (32, 48)], settings say size [64, 96]" in text
    assert "has flow (2, 8, 12), settings say (2, 16, 24)" in text
    _edit_manifest(memory_root, lambda m: {**m, "settings": {**m["settings"], "size": [32, 48], "image_format": "png"}})
    assert "lacks ['src.png', 'trg.png']" in "\n".join(verify_shards(memory_root).problems)


_WRITER = """
import pathlib, sys, time
from actr_core.data import make_shards
sys.path.insert(0, {tests!r})
from conftest import tiny_settings

def hold(name):
    pathlib.Path({ready!r}).touch()
    while not pathlib.Path({release!r}).exists():
        time.sleep(0.05)

make_shards({out!r}, tiny_settings(), progress=False, on_shard=hold)
"""


def test_a_second_concurrent_writer_fails_at_once(tmp_path, tiny_settings_factory):
    """Two real processes on one local folder: the second make_shards fails with a clear message while the first runs."""
    out, ready, release = tmp_path / "set", tmp_path / "ready", tmp_path / "release"
    code = _WRITER.format(
        tests=str(__import__("pathlib").Path(__file__).parent), ready=str(ready), release=str(release), out=str(out)
    )
    first = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():  # the first writer holds the lock, waiting after its first shard
            assert first.poll() is None and time.monotonic() < deadline, "the first writer ended early"
            time.sleep(0.05)
        with pytest.raises(FolderLockedError, match="in use by another make_shards process"):
            make_shards(str(out), tiny_settings_factory(), progress=False)
    finally:
        release.touch()
        assert first.wait(timeout=300) == 0
    assert verify_shards(str(out)).ok
    make_shards(str(out), tiny_settings_factory(), progress=False)  # the lock is free again


def test_data_error_pickles_with_its_message_and_count():
    error = pickle.loads(pickle.dumps(DataError("s/test-000001.tar", "shard not found", count=4)))
    assert type(error) is DataError and str(error) == "s/test-000001.tar: shard not found"
    assert (error.where, error.reason, error.count) == ("s/test-000001.tar", "shard not found", 4)


def test_shards_of_the_0_1_0_member_layout_read_the_same(memory_root, tiny_settings_factory):
    """0.1.0 wrote a sample's members as src, trg, flow.npy, valid.npy, kps.json, meta.json (own tar writer,
    same metadata): such a shard set, with its manifest, reads into the same batches."""
    import io
    import tarfile

    make_shards(memory_root, tiny_settings_factory(pairs=(("train", 1), ("val", 1), ("test", 5))), progress=False)
    new = list(ShardDataset(memory_root, "test", batch_size=2, rank=0, world_size=1))
    fs, root = fsspec.core.url_to_fs(memory_root)
    order = ("src.jpg", "trg.jpg", "flow.npy", "valid.npy", "kps.json", "meta.json")

    def old_layout(manifest):
        for entry in manifest["splits"]["test"]["shards"]:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, members in tar_samples(fs.cat_file(f"{root}/{entry['name']}"), entry["name"]):
                    for member in order:
                        info = tarfile.TarInfo(f"{key}.{member}")
                        info.size, info.mtime, info.mode, info.uname, info.gname = len(members[member]), 0, 0o644, "", ""
                        tar.addfile(info, io.BytesIO(members[member]))
            data = buffer.getvalue()
            fs.pipe_file(f"{root}/{entry['name']}", data)
            manifest["totals"]["bytes"] += len(data) - entry["bytes"]
            manifest["splits"]["test"]["bytes"] += len(data) - entry["bytes"]
            entry["bytes"], entry["sha256"] = len(data), sha256_hex(data)
        return manifest

    _edit_manifest(memory_root, old_layout)
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{root}/test-000000.tar"))) as tar:
        assert [n.split(".", 1)[1] for n in tar.getnames()[:6]] == list(order)
    assert verify_shards(memory_root).ok
    old = list(ShardDataset(memory_root, "test", batch_size=2, rank=0, world_size=1))
    assert len(old) == len(new) == 3
    for a, b in zip(old, new, strict=True):
        assert_same_batch(a, b)
