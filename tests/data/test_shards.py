"""Shard sets: manifest, determinism, resumability, verification, benchmark sources."""

import json

import fsspec
import pytest

from actr_core.data import ShardDataset, ShardSettings, make_shards, read_manifest, verify_shards
from actr_core.data.shards import iter_tar, plan_shards, sha256_hex


def _files(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    return {path.rsplit("/", 1)[-1]: fs.cat_file(path) for path in fs.ls(root, detail=False)}


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
    assert manifest["totals"] == {"shards": 6 + 2 + 4, "samples": 41, "bytes": sum(len(v) for k, v in files.items() if k.endswith(".tar")), "skipped": 0}
    assert json.loads(files["manifest.json"]) == manifest
    assert verify_shards(memory_root).ok


def test_sample_members_and_order(memory_root, tiny_settings_factory):
    make_shards(memory_root, tiny_settings_factory(pairs=(("train", 1), ("val", 1), ("test", 1))), progress=False)
    data = _files(memory_root)["val-000000.tar"]
    import tarfile, io  # noqa: E401

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [
        f"val_0000000.{m}" for m in ("src.jpg", "trg.jpg", "flow.npy", "valid.npy", "kps.json", "meta.json")
    ]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}


def test_same_settings_give_identical_bytes_anywhere_with_any_process_count(tmp_path, memory_root, tiny_settings_factory):
    settings = tiny_settings_factory(pairs=(("train", 9), ("val", 2), ("test", 3)))
    make_shards(memory_root, settings, progress=False)
    make_shards(f"file://{tmp_path}/b", settings, progress=False, workers=2)
    assert _files(memory_root) == _files(str(tmp_path / "b"))


def test_png_images(memory_root, tiny_settings_factory):
    make_shards(memory_root, tiny_settings_factory(image_format="png", pairs=(("train", 1), ("val", 1), ("test", 2))), progress=False)
    batch = next(iter(ShardDataset(memory_root, "test", batch_size=2, rank=0, world_size=1)))
    assert batch["src_image"].shape == (2, 3, 32, 48)
    assert any(name.endswith(".png") for _, members in iter_tar(_files(memory_root)["test-000000.tar"], "t") for name in members)


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
        manifest["splits"]["train"]["shards"][0]["samples"] = 4
        fs.pipe_file(f"{root}/manifest.json", json.dumps(manifest).encode())
        assert "3 samples, manifest says 4" in "\n".join(verify_shards(memory_root).problems)
        assert verify_shards(memory_root, deep=False).ok


@pytest.mark.parametrize("source, splits", [("spair", ("train", "val", "test")), ("pfpascal", ("train", "test")), ("pfwillow", ("test",))])
def test_benchmark_sources(memory_root, builders, source, splits):
    root = memory_root + "/data"
    getattr(builders, source)(root)
    out = memory_root + "/shards"
    settings = ShardSettings(source=source, root=root, splits=splits, size=(32, 48), samples_per_shard=2)
    manifest = make_shards(out, settings, progress=False)
    assert manifest["totals"]["samples"] == 3 * len(splits)
    batch = next(iter(ShardDataset(out, splits[-1], batch_size=3, rank=0, world_size=1)))
    assert batch["dataset"] == [source] * 3 and batch["flow"].shape == (3, 2, 8, 12)
    assert batch["valid_flow"].any()
    assert ("viewpoint_variation" in batch) == (source == "spair")


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
def test_iter_tar_matches_tarfile_for_every_header_format(fmt):
    import io
    import tarfile

    formats = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
    names = ["k1.src.jpg", "k1.meta.json", "k2.src.jpg"] if fmt == "ustar" else ["d/" + "x" * 150 + "/k1.src.jpg", "k1.meta.json", "k2.src.jpg"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=formats[fmt]) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            payload = name.encode() * 7
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    got = list(iter_tar(buffer.getvalue(), fmt))
    assert [(k, sorted(m)) for k, m in got] == [("k1", ["meta.json", "src.jpg"]), ("k2", ["src.jpg"])]
    assert got[0][1]["src.jpg"] == names[0].encode() * 7


def test_iter_tar_rejects_a_damaged_header():
    from actr_core.data import DataError
    from actr_core.data.shards import _tar_bytes

    data = bytearray(_tar_bytes([("k.src.jpg", b"abc"), ("k.meta.json", b"{}")]))
    data[512 + 512 + 10] ^= 0x01  # the second member's name: checksum no longer matches
    with pytest.raises(DataError, match="bad header checksum"):
        list(iter_tar(bytes(data), "bad.tar"))
