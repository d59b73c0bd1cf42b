"""Data set roots (the folder or its parent, as the released code takes), annotated image sizes that
disagree with the JPEG (the JPEG's is used and counted), and PF-PASCAL's flip arithmetic in manifests."""

import json

import numpy as np
import pytest

from actr_core.data import DataError, PFPascalReader, PFWillowReader, ShardSettings, SPairReader, make_shards
from actr_core.data.shards import read_manifest


@pytest.mark.parametrize(
    "folder, build, reader",
    [
        ("SPair-71k", "spair", lambda root: SPairReader(root, "test")),
        ("PF-PASCAL", "pfpascal", lambda root: PFPascalReader(root, "test")),
        ("PF-WILLOW", "pfwillow", lambda root: PFWillowReader(root)),
    ],
)
def test_the_folder_or_its_parent(root_url, builders, folder, build, reader):
    getattr(builders, build)(f"{root_url}/{folder}")
    from_parent, from_folder = reader(root_url), reader(f"{root_url}/{folder}")
    assert len(from_parent) == len(from_folder) == 3
    a, b = from_parent.load(0), from_folder.load(0)
    assert a.pair_id == b.pair_id
    np.testing.assert_array_equal(a.src_image, b.src_image)


def test_a_wrong_root_names_both_paths(root_url, builders):
    builders.spair(f"{root_url}/elsewhere")
    with pytest.raises(DataError) as caught:
        SPairReader(root_url, "test")
    message = str(caught.value)
    assert "Layout/large/test.txt not found here nor at" in message and "SPair-71k/Layout/large/test.txt" in message
    assert "give the SPair-71k folder or its parent" in message


def _mismatched_spair(root: str, builders) -> str:
    """An SPair tree whose first test pair declares a source size other than its JPEG's (40 × 30)."""
    tree = builders.spair(root)
    line = "000000-2008_000012-2008_000013:cat"
    ann = json.loads(tree.fs.cat_file(f"{tree.path}/PairAnnotation/test/{line}.json"))
    ann["src_imsize"] = [500, 375, 3]
    tree.write(f"PairAnnotation/test/{line}.json", json.dumps(ann))
    return line


def test_annotated_size_disagreeing_with_the_image_uses_the_image(memory_root, builders):
    line = _mismatched_spair(memory_root, builders)
    record = SPairReader(memory_root, "test").load(0)
    assert record.pair_id == line and record.src_size == (30, 40)  # the JPEG's (H, W), not 375 × 500
    assert record.size_corrected == ("src_imsize says W×H = 500×375, the image is 40×30 (used)",)
    assert SPairReader(memory_root, "test").load(1).size_corrected == ()


def test_the_manifest_counts_size_corrections(memory_root, builders):
    _mismatched_spair(f"{memory_root}/data", builders)
    settings = ShardSettings(source="spair", root=f"{memory_root}/data", splits=("test",), size=32, samples_per_shard=2)
    manifest = make_shards(f"{memory_root}/shards", settings, progress=False)
    assert manifest["totals"]["size_corrected"] == 1 and manifest["splits"]["test"]["size_corrected"] == 1
    entry = manifest["splits"]["test"]["shards"][0]
    assert entry["size_corrected"][0]["pair"].startswith("000000-") and "500×375" in entry["size_corrected"][0]["reason"]


@pytest.mark.parametrize("flip", ["one_based", "released"])
def test_pfpascal_flip_is_recorded_and_changes_only_flipped_training_pairs(memory_root, builders, flip):
    builders.pfpascal(f"{memory_root}/data")
    settings = ShardSettings(source="pfpascal", root=f"{memory_root}/data", splits=("train",), size=32, pfpascal_flip=flip)
    manifest = make_shards(f"{memory_root}/{flip}", settings, progress=False)
    assert read_manifest(f"{memory_root}/{flip}")["settings"]["pfpascal_flip"] == flip == manifest["settings"]["pfpascal_flip"]
    assert "pfpascal_flip" not in ShardSettings().to_json()  # other sources keep their recorded settings


def test_pfpascal_flip_arithmetic_reaches_the_shards(memory_root, builders):
    """The same training row flipped by W + 1 − x and by W − x: keypoints 1 px apart (before resizing)."""
    from actr_core.data import ShardDataset

    builders.pfpascal(f"{memory_root}/data")
    flipped = {}
    for flip in ("one_based", "released"):
        settings = ShardSettings(source="pfpascal", root=f"{memory_root}/data", splits=("train",), size=40, pfpascal_flip=flip)
        make_shards(f"{memory_root}/{flip}", settings, progress=False)
        batch = next(iter(ShardDataset(f"{memory_root}/{flip}", "train", batch_size=3, rank=0, world_size=1)))
        row = batch.pair_id.index(next(p for p in batch.pair_id if p.endswith("-flip")))
        flipped[flip] = batch.src_kps_orig[row][batch.annotated_kps[row]]
    difference = (flipped["one_based"] - flipped["released"]).numpy()  # keypoints are stored to 1e-4 px
    np.testing.assert_allclose(difference, [[1.0, 0.0]] * len(difference), rtol=0, atol=1e-3)


def test_a_set_of_another_flip_needs_overwrite(memory_root, builders):
    builders.pfpascal(f"{memory_root}/data")
    base = dict(source="pfpascal", root=f"{memory_root}/data", splits=("train",), size=32)
    make_shards(f"{memory_root}/s", ShardSettings(**base), progress=False)
    with pytest.raises(ValueError, match="other settings"):
        make_shards(f"{memory_root}/s", ShardSettings(**base, pfpascal_flip="released"), progress=False)
