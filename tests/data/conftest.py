"""Fixtures for the data tests: tiny benchmark trees in their exact on-disk formats, local and in memory://."""

import csv
import io
import json
import uuid

import fsspec
import numpy as np
import pytest
import scipy.io
from PIL import Image

from actr_core.data.shards import ShardSettings, make_shards
from actr_core.data.synthetic import SyntheticConfig

VOC = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow")


def image_bytes(width: int, height: int, seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A smooth, real-looking test image (gradients plus noise) encoded in ``fmt``."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 255 / max(width - 1, 1), ys * 255 / max(height - 1, 1), (xs + ys) % 256], -1)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


class Tree:
    """A directory (local path or fsspec URL) to write fixture files into."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root)

    def write(self, rel: str, data: bytes | str) -> str:
        path = f"{self.path}/{rel}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data.encode() if isinstance(data, str) else data)
        return path

    def remove(self, rel: str) -> None:
        self.fs.rm(f"{self.path}/{rel}")


def spair_annotation(n: int, seed: int, src_size=(40, 30), trg_size=(48, 36), category="cat") -> dict:
    rng = np.random.default_rng(seed)
    (sw, sh), (tw, th) = src_size, trg_size
    return {
        "src_kps": rng.uniform([2, 2], [sw - 3, sh - 3], (n, 2)).round(1).tolist(),
        "trg_kps": rng.uniform([2, 2], [tw - 3, th - 3], (n, 2)).round(1).tolist(),
        "src_bndbox": [1, 1, sw - 2, sh - 2],
        "trg_bndbox": [2, 1, tw - 3, th - 2],
        "src_imsize": [sw, sh, 3],
        "trg_imsize": [tw, th, 3],
        "category": category,
        "viewpoint_variation": 1,
        "scale_variation": 2,
        "truncation": 0,
        "occlusion": 1,
    }


def make_spair(root: str, pairs_per_split: int = 3) -> Tree:
    """SPair-71k layout: Layout/large/{trn,val,test}.txt, PairAnnotation/<split>/<line>.json, JPEGImages/<cat>/<name>.jpg."""
    tree = Tree(root)
    seed = 0
    for split in ("trn", "val", "test"):
        lines = []
        for k in range(pairs_per_split):
            category = ("cat", "dog")[k % 2]
            src, trg = f"2008_{seed:06d}", f"2008_{seed + 1:06d}"
            line = f"{k:06d}-{src}-{trg}:{category}"
            lines.append(line)
            tree.write(f"JPEGImages/{category}/{src}.jpg", image_bytes(40, 30, seed))
            tree.write(f"JPEGImages/{category}/{trg}.jpg", image_bytes(48, 36, seed + 1))
            tree.write(f"PairAnnotation/{split}/{line}.json", json.dumps(spair_annotation(4 + k, seed, category=category)))
            seed += 2
        tree.write(f"Layout/large/{split}.txt", "\n".join(lines) + "\n")
    return tree


def mat_bytes(kps: np.ndarray, bbox) -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"kps": np.asarray(kps, dtype=np.float64), "bbox": np.asarray([bbox], dtype=np.float64)})
    return buffer.getvalue()


def pf_kps(seed: int, n: int = 6, size=(40, 30), invisible=()) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kps = rng.uniform([2, 2], [size[0] - 3, size[1] - 3], (n, 2)).round(1)
    kps[list(invisible)] = np.nan
    return kps


def make_pfpascal(root: str, pairs_per_split: int = 3) -> Tree:
    """PF-PASCAL layout: {trn,val,test}_pairs.csv, JPEGImages/<name>.jpg, Annotations/<class>/<stem>.mat."""
    tree = Tree(root)
    seed = 100
    for split in ("trn", "val", "test"):
        rows = [["source_image", "target_image", "class", "flip"]]
        for k in range(pairs_per_split):
            class_id = k % 3 + 1
            category = VOC[class_id - 1]
            src, trg = f"2009_{seed:06d}", f"2009_{seed + 1:06d}"
            tree.write(f"JPEGImages/{src}.jpg", image_bytes(40, 30, seed))
            tree.write(f"JPEGImages/{trg}.jpg", image_bytes(40, 30, seed + 1))
            # row 0 of the source is invisible in the source, row 1 of the target invisible in the target
            tree.write(f"Annotations/{category}/{src}.mat", mat_bytes(pf_kps(seed, invisible=(0,)), [1, 2, 37, 27]))
            tree.write(f"Annotations/{category}/{trg}.mat", mat_bytes(pf_kps(seed + 1, invisible=(1,)), [3, 1, 36, 28]))
            rows.append([f"PF-dataset-PASCAL/JPEGImages/{src}.jpg", f"PF-dataset-PASCAL/JPEGImages/{trg}.jpg", class_id, k % 2])
            seed += 2
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        tree.write(f"{split}_pairs.csv", buffer.getvalue())
    return tree


WILLOW_CLASSES = ("car(G)", "duck(S)")


def willow_row(k: int, seed: int) -> list:
    src_cls = WILLOW_CLASSES[k % 2]
    src_kps, trg_kps = pf_kps(seed, 10), pf_kps(seed + 1, 10)
    return [
        f"PF-dataset/{src_cls}/img_{seed:03d}.png",
        f"PF-dataset/{src_cls}/img_{seed + 1:03d}.png",
        *src_kps[:, 0], *src_kps[:, 1], *trg_kps[:, 0], *trg_kps[:, 1],
    ]  # fmt: skip


def make_pfwillow(root: str, pairs: int = 3) -> Tree:
    """PF-WILLOW layout: test_pairs.csv (paths, 10 x and 10 y per image), images under <class>/."""
    tree = Tree(root)
    header = ["imageA", "imageB"] + [f"{a}{c}{i}" for a in "XY" for c in "AB" for i in range(1, 11)]
    rows = [header]
    for k in range(pairs):
        seed = 200 + 2 * k
        row = willow_row(k, seed)
        rows.append(row)
        cls = WILLOW_CLASSES[k % 2]
        tree.write(f"{cls}/img_{seed:03d}.png", image_bytes(40, 30, seed, fmt="PNG"))
        tree.write(f"{cls}/img_{seed + 1:03d}.png", image_bytes(40, 30, seed + 1, fmt="PNG"))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    tree.write("test_pairs.csv", buffer.getvalue())
    return tree


def memory_url(tag: str) -> str:
    return f"memory://{tag}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["local", "memory"])
def root_url(request, tmp_path):
    """A fresh data set root: a local directory or an fsspec memory:// URL (removed afterwards)."""
    if request.param == "local":
        yield str(tmp_path / "dataset")
        return
    url = memory_url("dataset")
    yield url
    fs = fsspec.filesystem("memory")
    path = url.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def memory_root():
    url = memory_url("tmp")
    yield url
    fs = fsspec.filesystem("memory")
    path = url.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def builders():
    """The fixture-tree builders and helpers, for test modules (they do not import conftest)."""

    class Builders:
        spair = staticmethod(make_spair)
        pfpascal = staticmethod(make_pfpascal)
        pfwillow = staticmethod(make_pfwillow)
        image = staticmethod(image_bytes)
        tree = Tree
        spair_annotation = staticmethod(spair_annotation)
        mat = staticmethod(mat_bytes)
        pf_kps = staticmethod(pf_kps)
        willow_row = staticmethod(willow_row)

    return Builders


TINY = SyntheticConfig(size=(32, 48), n_kps=8)


def tiny_settings(**overrides) -> ShardSettings:
    """Small synthetic shard settings: H != W, uneven shards."""
    values = dict(pairs=(("train", 22), ("val", 6), ("test", 13)), samples_per_shard=4, size=(32, 48), synthetic=TINY)
    values.update(overrides)
    return ShardSettings(**values)


@pytest.fixture(scope="session")
def tiny_shards():
    """A synthetic shard set in memory:// shared by the loader tests (22 / 6 / 13 pairs, 4 per shard)."""
    url = memory_url("tiny-shards")
    make_shards(url, tiny_settings(), progress=False)
    return url


@pytest.fixture
def tiny_settings_factory():
    return tiny_settings
