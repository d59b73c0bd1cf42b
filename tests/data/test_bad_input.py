"""Bad input, case by case: converted (image modes) or reported with the file and reason; raise or counted skip."""

import io
import json
import logging
import tarfile

import fsspec
import numpy as np
import pytest
from PIL import Image

from actr_core.data import (
    DataError,
    PFPascalReader,
    PFWillowReader,
    ShardDataset,
    ShardSettings,
    SPairReader,
    make_shards,
    verify_shards,
)
from actr_core.data.records import image_to_rgb, load_image
from actr_core.data.shards import _tar_bytes, sha256_hex, tar_samples

# ----------------------------------------------------------------------------------------------
# Readers


def _spair_with(root, builders, rel_json_edit=None, image_bytes=None):
    tree = builders.spair(root, pairs_per_split=2)
    line = "000000-2008_000000-2008_000001:cat"
    if rel_json_edit is not None:
        ann = builders.spair_annotation(4, 0, category="cat")
        rel_json_edit(ann)
        tree.write(f"PairAnnotation/trn/{line}.json", json.dumps(ann))
    if image_bytes is not None:
        tree.write("JPEGImages/cat/2008_000000.jpg", image_bytes)
    return tree, line


def test_corrupt_jpeg_is_reported_with_the_file(memory_root, builders):
    good = builders.image(40, 30, 0)
    _spair_with(memory_root, builders, image_bytes=good[: len(good) // 2])
    with pytest.raises(DataError, match=r"JPEGImages/cat/2008_000000.jpg: cannot decode image"):
        SPairReader(memory_root, "train").load(0)


def test_skip_counts_and_logs_at_the_end_of_the_pass(memory_root, builders, caplog):
    good = builders.image(40, 30, 0)
    _spair_with(memory_root, builders, image_bytes=b"not a jpeg at all")
    reader = SPairReader(memory_root, "train", on_error="skip")
    with caplog.at_level(logging.WARNING, logger="actr_core.data.readers"):
        records = list(reader)
    assert len(records) == 1 and reader.skipped.count == 1
    assert "skipped 1 pairs" in caplog.text and "2008_000000.jpg" in caplog.text
    with pytest.raises(DataError):
        list(SPairReader(memory_root, "train"))  # the default raises
    del good


def test_missing_annotation_file(memory_root, builders):
    tree, line = _spair_with(memory_root, builders)
    tree.remove(f"PairAnnotation/trn/{line}.json")
    with pytest.raises(DataError, match=r"PairAnnotation/trn/.*\.json: annotation file not found"):
        SPairReader(memory_root, "train").load(0)


def test_missing_image_file(memory_root, builders):
    tree, _ = _spair_with(memory_root, builders)
    tree.remove("JPEGImages/cat/2008_000001.jpg")
    with pytest.raises(DataError, match="2008_000001.jpg: image file not found"):
        SPairReader(memory_root, "train").load(0)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda a: a["trg_kps"].pop(), "keypoint count mismatch: 4 source vs 3 target"),
        (lambda a: a["src_kps"][2].__setitem__(0, float("nan")), r"NaN or inf in keypoint rows \[2\]"),
        (lambda a: a.__setitem__("trg_bndbox", [5, 5, 5, 20]), "target box .* zero area"),
        (lambda a: a.pop("occlusion"), "lacks fields"),
    ],
)
def test_spair_annotation_faults(memory_root, builders, edit, match):
    _spair_with(memory_root, builders, rel_json_edit=edit)
    with pytest.raises(DataError, match=match):
        SPairReader(memory_root, "train").load(0)


def test_pfpascal_keypoint_count_mismatch(memory_root, builders):
    tree = builders.pfpascal(memory_root)
    tree.write("Annotations/aeroplane/2009_000112.mat", builders.mat(builders.pf_kps(112, n=5), [1, 2, 37, 27]))
    with pytest.raises(DataError, match="keypoint count mismatch: 5 source vs 6 target"):
        PFPascalReader(memory_root, "test").load(0)


def test_pfpascal_nothing_visible_in_both(memory_root, builders):
    tree = builders.pfpascal(memory_root)
    tree.write("Annotations/aeroplane/2009_000112.mat", builders.mat(builders.pf_kps(112, invisible=range(6)), [1, 2, 37, 27]))
    with pytest.raises(DataError, match="no keypoint visible in both images"):
        PFPascalReader(memory_root, "test").load(0)


def test_pfpascal_zero_area_box_and_missing_mat(memory_root, builders):
    tree = builders.pfpascal(memory_root)
    tree.write("Annotations/aeroplane/2009_000113.mat", builders.mat(builders.pf_kps(113), [3, 1, 3, 28]))
    with pytest.raises(DataError, match=r"2009_000113.mat: target box .* zero area"):
        PFPascalReader(memory_root, "test").load(0)
    tree.remove("Annotations/aeroplane/2009_000113.mat")
    with pytest.raises(DataError, match="2009_000113.mat: annotation file not found"):
        PFPascalReader(memory_root, "test").load(0)


def test_pfwillow_short_row_and_nan(memory_root, builders):
    tree = builders.pfwillow(memory_root)
    header = "imageA,imageB," + ",".join(f"{a}{c}{i}" for a in "XY" for c in "AB" for i in range(1, 11))
    short = builders.willow_row(0, 200)[:-1]
    nan = builders.willow_row(0, 200)
    nan[5] = "nan"
    tree.write("test_pairs.csv", "\n".join([header, ",".join(map(str, short)), ",".join(map(str, nan))]) + "\n")
    reader = PFWillowReader(memory_root)
    with pytest.raises(DataError, match="row 1: keypoint count mismatch: expected 40 numbers"):
        reader.load(0)
    with pytest.raises(DataError, match="row 2: NaN or inf in keypoint rows"):
        reader.load(1)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_image_modes_are_converted_to_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 300)
    else:
        image = rgb.convert(mode)
    out = image_to_rgb(image, "x.png")
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    if mode == "RGBA":
        np.testing.assert_array_equal(out, np.asarray(rgb))  # alpha dropped, colours kept


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")])
def test_readers_convert_image_modes(memory_root, builders, mode, fmt):
    tree = builders.spair(memory_root, pairs_per_split=1)
    tree.write("JPEGImages/cat/2008_000000.jpg", builders.image(40, 30, 0, mode=mode, fmt=fmt))
    record = SPairReader(memory_root, "train").load(0)
    assert record.src_image.shape == (30, 40, 3) and record.src_image.dtype == np.uint8
    assert load_image(tree.fs, f"{tree.path}/JPEGImages/cat/2008_000000.jpg").shape == (30, 40, 3)


def test_make_shards_skip_lists_the_bad_pairs(memory_root, builders):
    root = memory_root + "/data"
    tree = builders.spair(root, pairs_per_split=3)
    tree.remove("PairAnnotation/val/000001-2008_000008-2008_000009:dog.json")
    out = memory_root + "/shards"
    settings = ShardSettings(source="spair", root=root, size=32, samples_per_shard=2)
    with pytest.raises(DataError, match="annotation file not found"):
        make_shards(out, settings, progress=False)
    manifest = make_shards(out, ShardSettings(**{**settings.__dict__, "on_error": "skip"}), progress=False, overwrite=True)
    val = manifest["splits"]["val"]
    assert val["samples"] == 2 and val["skipped"] == 1 and manifest["totals"]["skipped"] == 1
    (skip,) = val["shards"][0]["skipped"]
    assert skip["where"].endswith("000001-2008_000008-2008_000009:dog.json") and "not found" in skip["reason"]


# ----------------------------------------------------------------------------------------------
# Shards on the reading side


def _shard_root(memory_root, tiny_settings_factory):
    make_shards(memory_root, tiny_settings_factory(pairs=(("train", 8), ("val", 1), ("test", 8))), progress=False)
    return fsspec.filesystem("memory"), memory_root.removeprefix("memory://")


def _record(fs, root, name, data):
    """Write ``data`` as shard ``name`` and record its size and sha256 in the manifest (a shard written bad)."""
    fs.pipe_file(f"{root}/{name}", data)
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    split = manifest["splits"][name.split("-")[0]]
    entry = next(e for e in split["shards"] if e["name"] == name)
    for where in (split, manifest["totals"]):
        where["bytes"] += len(data) - entry["bytes"]
    entry["bytes"], entry["sha256"] = len(data), sha256_hex(data)
    fs.pipe_file(f"{root}/manifest.json", json.dumps(manifest).encode())


def _rewrite(fs, path, edit):
    samples = [{"__key__": key, **edit(key, dict(members))} for key, members in tar_samples(fs.cat_file(path), path)]
    _record(fs, path.rsplit("/", 1)[0], path.rsplit("/", 1)[1], _tar_bytes(samples))


def _read(memory_root, on_error="raise", split="test", training=False):
    dataset = ShardDataset(memory_root, split, batch_size=2, training=training, rank=0, world_size=1, on_error=on_error)
    return [p for batch in dataset for p in batch.pair_id], dataset


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_evaluation_stops_at_a_shard_that_differs_from_the_manifest(memory_root, tiny_settings_factory, on_error):
    """A shard is read whole and checked before any of its samples is used; evaluation stops there."""
    fs, root = _shard_root(memory_root, tiny_settings_factory)
    data = fs.cat_file(f"{root}/test-000001.tar")
    fs.pipe_file(f"{root}/test-000001.tar", data[: len(data) // 2])
    with pytest.raises(DataError, match=r"test-000001.tar: sha256 [0-9a-f]{16}… differs from the manifest's"):
        _read(memory_root, on_error=on_error)


def test_training_skips_and_counts_a_damaged_shard(memory_root, tiny_settings_factory, caplog):
    fs, root = _shard_root(memory_root, tiny_settings_factory)
    data = bytearray(fs.cat_file(f"{root}/train-000000.tar"))
    data[3000] ^= 0xFF
    fs.pipe_file(f"{root}/train-000000.tar", bytes(data))
    with pytest.raises(DataError, match="train-000000.tar: sha256"):
        _read(memory_root, split="train", training=True)
    with caplog.at_level(logging.WARNING, logger="actr_core.data.pipeline"):
        ids, dataset = _read(memory_root, on_error="skip", split="train", training=True)
    assert dataset.skipped.count == 4 and len(ids) == 4  # the whole shard left out, its 4 samples counted
    assert all(int(p[-6:]) >= 4 for p in ids)  # only the intact shard's pairs
    assert "skipped 4 samples" in caplog.text and "train-000000.tar: sha256" in caplog.text


def test_truncated_tar_with_a_matching_manifest(memory_root, tiny_settings_factory):
    """A shard recorded truncated (its sha256 matches): the tar does not parse, named with the shard."""
    fs, root = _shard_root(memory_root, tiny_settings_factory)
    data = fs.cat_file(f"{root}/test-000000.tar")
    _record(fs, root, "test-000000.tar", data[:600])  # inside the first member's content (a cut at a header ends the tar)
    with pytest.raises(DataError, match=r"test-000000.tar: truncated or corrupt tar"):
        _read(memory_root)
    assert any("truncated or corrupt tar" in p for p in verify_shards(memory_root).problems)


def test_missing_shard(memory_root, tiny_settings_factory):
    fs, root = _shard_root(memory_root, tiny_settings_factory)
    fs.rm(f"{root}/test-000001.tar")
    fs.rm(f"{root}/train-000001.tar")
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match="test-000001.tar: shard not found"):
            _read(memory_root, on_error=on_error)
    ids, dataset = _read(memory_root, on_error="skip", split="train", training=True)
    assert len(ids) == 4 and dataset.skipped.count == 4


def test_corrupt_jpeg_in_a_shard(memory_root, tiny_settings_factory, caplog):
    fs, root = _shard_root(memory_root, tiny_settings_factory)

    def damage(key, members):
        if key == "test_0000002":
            members["trg.jpg"] = members["trg.jpg"][:200]
        return members

    _rewrite(fs, f"{root}/test-000000.tar", damage)
    with pytest.raises(DataError, match=r"test-000000.tar#test_0000002 trg.jpg: cannot decode image"):
        _read(memory_root)
    with caplog.at_level(logging.WARNING, logger="actr_core.data.pipeline"):
        ids, dataset = _read(memory_root, on_error="skip")
    assert len(ids) == 7 and dataset.skipped.count == 1 and "synthetic-test-000002" not in ids
    assert "skipped 1 samples" in caplog.text


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("valid.npy") and m, r"lacks members \['valid.npy'\]"),
        (lambda m: {**m, "kps.json": m["kps.json"].replace(b'"trg":[[', b'"trg":[[NaN,0],[')}, "count mismatch"),
        (
            lambda m: {
                **m,
                "kps.json": m["kps.json"]
                .replace(b'"src":[[', b'"src":[[NaN,0],[')
                .replace(b'"trg":[[', b'"trg":[[0,0],[')
                .replace(b'"src_orig":[[', b'"src_orig":[[0,0],[')
                .replace(b'"trg_orig":[[', b'"trg_orig":[[0,0],[')
                .replace(b'"valid":[', b'"valid":[true,'),
            },
            "NaN or inf in keypoints",
        ),
        (lambda m: {**m, "flow.npy": _nan_flow(m["flow.npy"])}, "NaN or inf in the stored flow"),
        (lambda m: {**m, "meta.json": b"{"}, "invalid JSON"),
        (lambda m: {**m, "valid.npy": _pickled_npy()}, "cannot read .npy: .*allow_pickle=False"),
    ],
)
def test_bad_members_in_a_shard(memory_root, tiny_settings_factory, edit, match):
    fs, root = _shard_root(memory_root, tiny_settings_factory)
    _rewrite(fs, f"{root}/test-000001.tar", lambda key, members: edit(members) if key == "test_0000005" else members)
    with pytest.raises(DataError, match=match):
        _read(memory_root)
    ids, dataset = _read(memory_root, on_error="skip")
    assert len(ids) == 7 and dataset.skipped.count == 1


def _nan_flow(data: bytes) -> bytes:
    flow = np.load(io.BytesIO(data)).copy()
    flow[0, 1, 1] = np.nan
    buffer = io.BytesIO()
    np.save(buffer, flow)
    return buffer.getvalue()


def _pickled_npy() -> bytes:
    """An .npy of Python objects: loading it would unpickle, which the reader refuses."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def test_fewer_samples_than_the_manifest_promises(memory_root, tiny_settings_factory):
    fs, root = _shard_root(memory_root, tiny_settings_factory)
    path = f"{root}/test-000000.tar"
    kept = [{"__key__": k, **m} for k, m in tar_samples(fs.cat_file(path), path)[:3]]
    _record(fs, root, "test-000000.tar", _tar_bytes(kept))
    with pytest.raises(DataError, match="test-000000.tar: 3 samples, the manifest says 4"):
        _read(memory_root)


def test_tar_samples_on_garbage():
    with pytest.raises(DataError, match="truncated or corrupt tar"):
        tar_samples(b"\x00" * 100 + b"garbage" * 100, "g.tar")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("a.src.jpg")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"0123456789"))
    assert tar_samples(buffer.getvalue(), "ok.tar") == [("a", {"src.jpg": b"0123456789"})]
