"""Benchmark readers on fixtures in the exact on-disk formats, local and in memory://."""

import numpy as np
import pytest

from actr_core.data import DataError, PFPascalReader, PFWillowReader, SPairReader, open_reader
from actr_core.data.readers import VOC_CLASSES
from actr_core.data.schema import SPAIR_FLAGS


class TestSPair:
    def test_lists_pairs_and_loads_one(self, root_url, builders):
        builders.spair(root_url)
        reader = SPairReader(root_url, "train")
        assert len(reader) == 3
        record = reader.load(1)
        ann = builders.spair_annotation(5, 2, category="dog")
        assert record.pair_id == "000001-2008_000002-2008_000003:dog"
        assert (record.dataset, record.split, record.category) == ("spair", "train", "dog")
        assert record.src_image.shape == (30, 40, 3) and record.trg_image.shape == (36, 48, 3)
        assert record.src_image.dtype == np.uint8
        np.testing.assert_allclose(record.src_kps, ann["src_kps"])
        np.testing.assert_allclose(record.trg_kps, ann["trg_kps"])
        np.testing.assert_allclose(record.src_bbox, ann["src_bndbox"])
        np.testing.assert_allclose(record.trg_bbox, ann["trg_bndbox"])
        assert record.flags == {flag: ann[flag] for flag in SPAIR_FLAGS}
        assert record.src_size == (30, 40) and record.trg_size == (36, 48)
        assert record.flow is None

    @pytest.mark.parametrize("split", ["train", "val", "test"])
    def test_iterates_every_split(self, root_url, builders, split):
        builders.spair(root_url, pairs_per_split=2)
        records = list(SPairReader(root_url, split))
        assert len(records) == 2
        assert len({r.pair_id for r in records}) == 2

    def test_file_url(self, tmp_path, builders):
        builders.spair(str(tmp_path / "spair"))
        assert len(list(SPairReader(f"file://{tmp_path}/spair", "val"))) == 3


class TestPFPascal:
    def test_keeps_keypoints_visible_in_both(self, root_url, builders):
        builders.pfpascal(root_url)
        reader = PFPascalReader(root_url, "test")
        assert len(reader) == 3  # header row detected and dropped
        record = reader.load(0)
        src_all = builders.pf_kps(seed=100 + 2 * 6, invisible=(0,))  # test split starts at seed 112
        trg_all = builders.pf_kps(seed=100 + 2 * 6 + 1, invisible=(1,))
        np.testing.assert_allclose(record.src_kps, src_all[2:])
        np.testing.assert_allclose(record.trg_kps, trg_all[2:])
        assert record.category == VOC_CLASSES[0]
        np.testing.assert_allclose(record.src_bbox, [1, 2, 37, 27])
        assert record.pair_id == "00000-2009_000112-2009_000113"

    def test_class_ids_are_one_based(self, root_url, builders):
        builders.pfpascal(root_url)
        assert [r.category for r in PFPascalReader(root_url, "val")] == ["aeroplane", "bicycle", "bird"]

    @pytest.mark.parametrize("flip, offset", [("one_based", 1), ("released", 0), ("pixel_centre", -1)])
    def test_training_flip_mirrors_images_keypoints_and_boxes(self, root_url, builders, flip, offset):
        builders.pfpascal(root_url)
        plain = PFPascalReader(root_url, "train", apply_flip=False).load(1)
        flipped = PFPascalReader(root_url, "train", flip=flip).load(1)  # row 1 has flip = 1
        assert flipped.pair_id.endswith("-flip") and not plain.pair_id.endswith("-flip")
        w = plain.src_image.shape[1]
        np.testing.assert_array_equal(flipped.src_image, plain.src_image[:, ::-1])
        np.testing.assert_allclose(flipped.src_kps[:, 0], w + offset - plain.src_kps[:, 0])
        np.testing.assert_allclose(flipped.src_kps[:, 1], plain.src_kps[:, 1])
        np.testing.assert_allclose(flipped.trg_bbox, [w + offset - 36, 1, w + offset - 3, 28])

    def test_convention_flip_keeps_one_based_points_on_their_pixel(self, root_url, builders):
        """1-based x = c + 1 names array column c; the default W + 1 − x names the column the flip moves
        it to (W − 1 − c); the released W − x lands one column short, 0.1.0's W − 1 − x two."""
        builders.pfpascal(root_url)
        plain = PFPascalReader(root_url, "train", apply_flip=False).load(1)
        w = plain.src_image.shape[1]
        col = 5  # the pixel named by 1-based x = 6
        flipped = {f: PFPascalReader(root_url, "train", flip=f).load(1) for f in ("one_based", "released", "pixel_centre")}
        np.testing.assert_array_equal(flipped["one_based"].src_image[:, w - 1 - col], plain.src_image[:, col])
        # every keypoint's 0-based column (x − 1) mirrors to W − 1 − (x − 1) under the default only
        for flip, short in (("one_based", 0), ("released", 1), ("pixel_centre", 2)):
            np.testing.assert_allclose(flipped[flip].src_kps[:, 0] - 1, (w - 1) - (plain.src_kps[:, 0] - 1) - short)

    def test_unknown_flip_is_refused(self, root_url, builders):
        builders.pfpascal(root_url)
        with pytest.raises(ValueError, match="flip must be one of"):
            PFPascalReader(root_url, "train", flip="mirror")

    def test_validation_rows_are_never_flipped(self, root_url, builders):
        builders.pfpascal(root_url)
        assert not any(r.pair_id.endswith("-flip") for r in PFPascalReader(root_url, "val"))


class TestPFWillow:
    def test_reads_ten_x_then_ten_y(self, root_url, builders):
        builders.pfwillow(root_url)
        reader = PFWillowReader(root_url)
        assert len(reader) == 3
        record = reader.load(1)
        np.testing.assert_allclose(record.src_kps, builders.pf_kps(202, 10))
        np.testing.assert_allclose(record.trg_kps, builders.pf_kps(203, 10))
        assert record.category == "duck(S)"
        assert record.split == "test" and record.dataset == "pfwillow"

    def test_box_is_the_keypoint_extent(self, root_url, builders):
        builders.pfwillow(root_url)
        record = PFWillowReader(root_url).load(0)
        np.testing.assert_allclose(record.src_bbox, [*record.src_kps.min(0), *record.src_kps.max(0)])
        np.testing.assert_allclose(record.trg_bbox, [*record.trg_kps.min(0), *record.trg_kps.max(0)])

    def test_only_test_split(self, root_url, builders):
        builders.pfwillow(root_url)
        with pytest.raises(ValueError, match="only a 'test' split"):
            PFWillowReader(root_url, "train")


class TestCommon:
    def test_open_reader_by_name(self, memory_root, builders):
        builders.spair(memory_root)
        assert isinstance(open_reader("spair", memory_root, "test"), SPairReader)
        with pytest.raises(ValueError, match="unknown dataset"):
            open_reader("caltech", memory_root, "test")

    def test_unknown_split(self, memory_root, builders):
        builders.spair(memory_root)
        with pytest.raises(ValueError, match="split must be one of"):
            SPairReader(memory_root, "trn")

    def test_missing_pair_list_names_the_file(self, memory_root):
        with pytest.raises(DataError, match=r"Layout/large/trn.txt not found here nor at .*SPair-71k/Layout/large/trn.txt"):
            SPairReader(memory_root, "train")

    def test_index_out_of_range(self, memory_root, builders):
        builders.pfwillow(memory_root)
        with pytest.raises(IndexError):
            PFWillowReader(memory_root).load(3)
