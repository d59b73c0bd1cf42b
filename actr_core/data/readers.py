"""Benchmark readers over fsspec: SPair-71k, PF-PASCAL and PF-WILLOW in their published layouts.

Axis legend: n keypoints · 2 (x, y) · 4 box (x1, y1, x2, y2).

Each reader lists the pairs of one split when it is built (reading only the pair list) and loads a
pair on demand (``reader.load(i)``) as a :class:`~actr_core.data.records.PairRecord`. Iterating a
reader yields every loadable pair; under ``on_error="skip"`` a bad pair is left out and counted,
and the count is logged at the end of the pass (``reader.skipped`` keeps the reasons).

Roots are local paths or fsspec URLs (``file://``, ``memory://``, ``s3://`` ...): the data set's
folder, or its parent holding ``SPair-71k/``, ``PF-PASCAL/`` or ``PF-WILLOW/`` (the released code's
``datapath``); a root that is neither fails with both paths named. Layouts:

- SPair-71k: ``Layout/large/{trn,val,test}.txt`` (lines ``pairid-src-trg:category``),
  ``PairAnnotation/<split>/<line>.json``, ``JPEGImages/<category>/<name>.jpg``. An annotation
  whose ``src_imsize``/``trg_imsize`` disagrees with the JPEG is read with the JPEG's size (as the
  released code does); the record lists it in ``size_corrected`` and shard manifests count it.
- PF-PASCAL: ``{trn,val,test}_pairs.csv`` (source path, target path, 1-based VOC class id, flip
  flag; only the basenames of the paths are used), ``JPEGImages/<name>``,
  ``Annotations/<class>/<stem>.mat`` (``kps`` n×2 with NaN for invisible points, ``bbox``).
- PF-WILLOW: ``test_pairs.csv`` (two paths, then 10 x and 10 y of the source keypoints, then the
  same for the target), images under ``<class>/``; the object box is the box around the keypoints
  (PF-WILLOW has no box annotation).
"""

import abc
import csv
import io
import json
import logging
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.io

from actr_core.data.errors import DataError, SkipLog, check_on_error
from actr_core.data.records import PairRecord, check_box, check_keypoints, join, load_image, open_root
from actr_core.data.schema import SPAIR_FLAGS, SPLITS

__all__ = [
    "PairReader",
    "SPairReader",
    "PFPascalReader",
    "PFWillowReader",
    "READERS",
    "VOC_CLASSES",
    "FLIP_OFFSETS",
    "open_reader",
]

logger = logging.getLogger(__name__)

# The 20 PASCAL VOC classes in the order of PF-PASCAL's 1-based class ids.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
PF_WILLOW_POINTS = 10  # keypoints per PF-WILLOW image (test_pairs.csv has 10 x then 10 y)
# PF-PASCAL's horizontal flip x → W + offset − x: "one_based" is the exact mirror of 1-based pixel
# centres (PF-PASCAL's own convention), "released" the released ACTR loader's W − x
# (data/pfpascal.py), "pixel_centre" the exact mirror of 0-based pixel centres (actr_core 0.1.0).
FLIP_OFFSETS: Mapping[str, int] = {"one_based": 1, "released": 0, "pixel_centre": -1}


class PairReader(abc.ABC):
    """A split of a pair data set: ``len(reader)`` pairs, ``reader.load(i)``, iteration with a skip policy."""

    dataset: str = ""

    def __init__(self, split: str, *, on_error: str = "raise"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.on_error = check_on_error(on_error)
        self.skipped = SkipLog(on_error, "pairs")

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load(self, index: int) -> PairRecord:
        """Pair ``index`` of the split; a bad pair raises :class:`DataError` whatever ``on_error`` says."""

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} out of range for {len(self)} pairs")
        return index

    def __iter__(self) -> Iterator[PairRecord]:
        log = SkipLog(self.on_error, "pairs")
        self.skipped = log
        for index in range(len(self)):
            try:
                record = self.load(index)
            except DataError as error:
                log.handle(error)
                continue
            yield record
        log.report(logger, f"{self.dataset} {self.split}")


class _FileReader(PairReader):
    """A reader rooted at a local path or fsspec URL."""

    def __init__(
        self,
        root: str,
        split: str,
        *,
        on_error: str = "raise",
        storage_options: Mapping[str, Any] | None = None,
    ):
        super().__init__(split, on_error=on_error)
        self.root = str(root)
        self.fs, self.path = open_root(self.root, storage_options)

    def _locate(self, marker: str, folder: str) -> None:
        """Accept the data set's folder (holding ``marker``) or its parent (holding ``folder/marker``, as
        the released code expects); else :class:`DataError` naming both paths tried."""
        here, below = join(self.path, marker), join(self.path, folder, marker)
        if self.fs.exists(here):
            return
        if self.fs.exists(below):
            self.path = join(self.path, folder)
            return
        raise DataError(here, f"{marker} not found here nor at {below}: give the {folder} folder or its parent as the root")

    def _read_bytes(self, path: str, what: str) -> bytes:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError as error:
            raise DataError(path, f"{what} not found") from error

    def _read_text(self, path: str, what: str) -> str:
        data = self._read_bytes(path, what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(path, f"{what} is not UTF-8 text: {error}") from error

    def _read_csv(self, path: str) -> list[list[str]]:
        rows = [row for row in csv.reader(io.StringIO(self._read_text(path, "pair list"))) if row]
        return rows


class SPairReader(_FileReader):
    """SPair-71k (``Layout/large``); keeps the viewpoint/scale/truncation/occlusion flags."""

    dataset = "spair"
    SPLIT_NAMES: Mapping[str, str] = {"train": "trn", "val": "val", "test": "test"}

    def __init__(self, root: str, split: str, **kwargs: Any):
        super().__init__(root, split, **kwargs)
        name = self.SPLIT_NAMES[split]
        self._locate(f"Layout/large/{name}.txt", "SPair-71k")
        listing = self._read_text(join(self.path, "Layout", "large", f"{name}.txt"), "pair list")
        self.lines = [line.strip() for line in listing.splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.lines)

    def load(self, index: int) -> PairRecord:
        line = self.lines[self._check_index(index)]
        ann_path = join(self.path, "PairAnnotation", self.SPLIT_NAMES[self.split], f"{line}.json")
        names, _, category = line.partition(":")
        parts = names.split("-")
        if len(parts) != 3 or not category:
            raise DataError(ann_path, f"pair list line {line!r} is not 'pairid-source-target:category'")
        try:
            ann = json.loads(self._read_text(ann_path, "annotation file"))
        except json.JSONDecodeError as error:
            raise DataError(ann_path, f"annotation is not valid JSON: {error}") from error
        missing = [k for k in ("src_kps", "trg_kps", "src_bndbox", "trg_bndbox", *SPAIR_FLAGS) if k not in ann]
        if missing:
            raise DataError(ann_path, f"annotation lacks fields {missing}")
        src_kps, trg_kps = check_keypoints(ann["src_kps"], ann["trg_kps"], ann_path)
        src_bbox = check_box(ann["src_bndbox"], ann_path, "source")
        trg_bbox = check_box(ann["trg_bndbox"], ann_path, "target")
        images, corrected = [], []
        for side, name in (("src", parts[1]), ("trg", parts[2])):
            image_path = join(self.path, "JPEGImages", category, f"{name}.jpg")
            image = load_image(self.fs, image_path)
            declared = ann.get(f"{side}_imsize")  # [W, H, C] in SPair
            if declared is not None and [int(declared[1]), int(declared[0])] != list(image.shape[:2]):
                # the released code sizes everything by the image it opened; so do we, and say so
                corrected.append(f"{side}_imsize says W×H = {declared[0]}×{declared[1]}, "
                                 f"the image is {image.shape[1]}×{image.shape[0]} (used)")  # fmt: skip
                logger.debug("%s: %s", ann_path, corrected[-1])
            images.append(image)
        return PairRecord(
            pair_id=line,
            dataset=self.dataset,
            split=self.split,
            category=category,
            src_image=images[0],
            trg_image=images[1],
            src_kps=src_kps,
            trg_kps=trg_kps,
            src_bbox=src_bbox,
            trg_bbox=trg_bbox,
            flags={flag: int(ann[flag]) for flag in SPAIR_FLAGS},
            size_corrected=tuple(corrected),
        )


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _is_header(row: Sequence[str], numeric_column: int) -> bool:
    try:
        float(row[numeric_column])
    except (ValueError, IndexError):
        return True
    return False


class PFPascalReader(_FileReader):
    """PF-PASCAL; keeps keypoints visible in both images; training rows with flip = 1 are mirrored.

    Convention:
        PF-PASCAL's keypoints and boxes are 1-based pixel centres (MATLAB; ``docs/data.md`` gives the
        evidence), and the reader keeps them as given. A horizontal flip of an image of width W
        therefore maps x to W + 1 − x (``flip="one_based"``, the default: the point stays on the
        same image content); a box (x1, y1, x2, y2) becomes (W + 1 − x2, y1, W + 1 − x1, y2).
        ``flip="released"`` uses the released loader's W − x, ``flip="pixel_centre"`` the W − 1 − x
        of 0-based pixel centres (actr_core 0.1.0). Both images of the pair are flipped, and the
        pair id gets the suffix ``-flip``.
    """

    dataset = "pfpascal"
    SPLIT_NAMES: Mapping[str, str] = {"train": "trn", "val": "val", "test": "test"}

    def __init__(self, root: str, split: str, *, apply_flip: bool = True, flip: str = "one_based", **kwargs: Any):
        if flip not in FLIP_OFFSETS:
            raise ValueError(f"flip must be one of {sorted(FLIP_OFFSETS)}, got {flip!r}")
        self.flip = flip
        super().__init__(root, split, **kwargs)
        self._locate(f"{self.SPLIT_NAMES[split]}_pairs.csv", "PF-PASCAL")
        self.csv_path = join(self.path, f"{self.SPLIT_NAMES[split]}_pairs.csv")
        rows = self._read_csv(self.csv_path)
        self.rows = rows[1:] if rows and _is_header(rows[0], 2) else rows
        self.apply_flip = apply_flip

    def __len__(self) -> int:
        return len(self.rows)

    def _annotation(self, category: str, image_name: str) -> tuple[np.ndarray, np.ndarray, str]:
        path = join(self.path, "Annotations", category, f"{_stem(image_name)}.mat")
        data = self._read_bytes(path, "annotation file")
        try:
            mat = scipy.io.loadmat(io.BytesIO(data))
        except Exception as error:  # scipy raises several types on corrupt .mat files
            raise DataError(path, f"cannot read .mat annotation: {error}") from error
        if "kps" not in mat or "bbox" not in mat:
            raise DataError(path, f"annotation lacks 'kps' or 'bbox' (has {sorted(k for k in mat if k[0] != '_')})")
        kps = np.asarray(mat["kps"], dtype=np.float64)
        if kps.ndim != 2 or kps.shape[1] != 2:
            raise DataError(path, f"'kps' must be (n, 2), got shape {kps.shape}")
        return kps, np.asarray(mat["bbox"], dtype=np.float64).reshape(-1), path

    def load(self, index: int) -> PairRecord:
        row = self.rows[self._check_index(index)]
        where = f"{self.csv_path} row {index + 1}"
        try:
            src_name, trg_name = posixpath.basename(row[0]), posixpath.basename(row[1])
            class_id = int(float(row[2]))
        except (IndexError, ValueError) as error:
            raise DataError(where, f"expected 'source,target,class[,flip]', got {row!r}") from error
        if not 1 <= class_id <= len(VOC_CLASSES):
            raise DataError(where, f"class id {class_id} outside 1..{len(VOC_CLASSES)}")
        category = VOC_CLASSES[class_id - 1]
        flip = self.apply_flip and self.split == "train" and len(row) > 3 and int(float(row[3])) == 1
        src_kps, src_box, src_ann = self._annotation(category, src_name)
        trg_kps, trg_box, trg_ann = self._annotation(category, trg_name)
        if src_kps.shape[0] != trg_kps.shape[0]:
            raise DataError(
                f"{src_ann} / {trg_ann}",
                f"keypoint count mismatch: {src_kps.shape[0]} source vs {trg_kps.shape[0]} target",
            )
        if np.isinf(src_kps).any() or np.isinf(trg_kps).any():
            raise DataError(f"{src_ann} / {trg_ann}", "inf in keypoints")
        both = ~np.isnan(src_kps).any(axis=1) & ~np.isnan(trg_kps).any(axis=1)  # NaN marks invisible
        if not both.any():
            raise DataError(f"{src_ann} / {trg_ann}", "no keypoint visible in both images")
        src_kps, trg_kps = check_keypoints(src_kps[both], trg_kps[both], f"{src_ann} / {trg_ann}")
        src_bbox = check_box(src_box, src_ann, "source")
        trg_bbox = check_box(trg_box, trg_ann, "target")
        src_image = load_image(self.fs, join(self.path, "JPEGImages", src_name))
        trg_image = load_image(self.fs, join(self.path, "JPEGImages", trg_name))
        pair_id = f"{index:05d}-{_stem(src_name)}-{_stem(trg_name)}"
        if flip:
            src_image, src_kps, src_bbox = _hflip(src_image, src_kps, src_bbox, FLIP_OFFSETS[self.flip])
            trg_image, trg_kps, trg_bbox = _hflip(trg_image, trg_kps, trg_bbox, FLIP_OFFSETS[self.flip])
            pair_id += "-flip"
        return PairRecord(
            pair_id=pair_id,
            dataset=self.dataset,
            split=self.split,
            category=category,
            src_image=src_image,
            trg_image=trg_image,
            src_kps=src_kps,
            trg_kps=trg_kps,
            src_bbox=src_bbox,
            trg_bbox=trg_bbox,
        )


def _hflip(image: np.ndarray, kps: np.ndarray, box: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirror an image and its annotations: x → W + offset − x (see :data:`FLIP_OFFSETS`)."""
    mirror = image.shape[1] + offset
    kps = kps.copy()
    kps[:, 0] = mirror - kps[:, 0]
    box = np.array([mirror - box[2], box[1], mirror - box[0], box[3]], dtype=np.float64)
    return np.ascontiguousarray(image[:, ::-1]), kps, box


class PFWillowReader(_FileReader):
    """PF-WILLOW (test split only); object boxes are the boxes around the annotated keypoints."""

    dataset = "pfwillow"

    def __init__(self, root: str, split: str = "test", **kwargs: Any):
        if split != "test":
            raise ValueError(f"PF-WILLOW has only a 'test' split, got {split!r}")
        super().__init__(root, split, **kwargs)
        self._locate("test_pairs.csv", "PF-WILLOW")
        self.csv_path = join(self.path, "test_pairs.csv")
        rows = self._read_csv(self.csv_path)
        self.rows = rows[1:] if rows and _is_header(rows[0], 2) else rows

    def __len__(self) -> int:
        return len(self.rows)

    def _image_path(self, listed: str) -> tuple[str, str]:
        parts = listed.strip().split("/")
        if len(parts) < 3:
            raise DataError(self.csv_path, f"image path {listed!r} is not '<root>/<class>/<file>'")
        return join(self.path, *parts[1:]), parts[1]

    def load(self, index: int) -> PairRecord:
        row = self.rows[self._check_index(index)]
        where = f"{self.csv_path} row {index + 1}"
        expected = 2 + 4 * PF_WILLOW_POINTS
        if len(row) != expected:
            raise DataError(
                where,
                f"keypoint count mismatch: expected {4 * PF_WILLOW_POINTS} numbers "
                f"({PF_WILLOW_POINTS} x and y per image), got {len(row) - 2}",
            )
        try:
            numbers = np.array([float(v) for v in row[2:]], dtype=np.float64)
        except ValueError as error:
            raise DataError(where, f"keypoint values are not numbers: {error}") from error
        n = PF_WILLOW_POINTS
        src_kps = numbers[: 2 * n].reshape(2, n).T
        trg_kps = numbers[2 * n :].reshape(2, n).T
        src_kps, trg_kps = check_keypoints(src_kps, trg_kps, where)
        src_path, category = self._image_path(row[0])
        trg_path, _ = self._image_path(row[1])
        src_bbox = check_box([*src_kps.min(0), *src_kps.max(0)], where, "source keypoint")
        trg_bbox = check_box([*trg_kps.min(0), *trg_kps.max(0)], where, "target keypoint")
        return PairRecord(
            pair_id=f"{index:05d}-{_stem(src_path)}-{_stem(trg_path)}",
            dataset=self.dataset,
            split=self.split,
            category=category,
            src_image=load_image(self.fs, src_path),
            trg_image=load_image(self.fs, trg_path),
            src_kps=src_kps,
            trg_kps=trg_kps,
            src_bbox=src_bbox,
            trg_bbox=trg_bbox,
        )


READERS: Mapping[str, type[_FileReader]] = {
    "spair": SPairReader,
    "pfpascal": PFPascalReader,
    "pfwillow": PFWillowReader,
}


def open_reader(name: str, root: str, split: str, **kwargs: Any) -> PairReader:
    """A benchmark reader by name (``spair``, ``pfpascal``, ``pfwillow``)."""
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(READERS)}")
    return READERS[name](root, split, **kwargs)
