"""Writing and checking WebDataset shard sets: deterministic, resumable, parallel, on any fsspec URL.

Layout of a shard set at ``out`` (a local path or fsspec URL)::

    out/manifest.json           settings, per-shard sample count / sha256 / bytes, totals
    out/<split>-000000.tar      WebDataset shards; sample keys ``<split>_<index:07d>``
    ...

Determinism: every pair is built from ``(settings, split, index)`` alone; shards are written by
``webdataset.TarWriter`` with fixed member metadata (mtime 0, uid/gid 0, empty owner names, mode
0644, USTAR; members of a sample in name order); images are encoded by Pillow with fixed options;
the manifest has no timestamps. The same settings therefore give byte-identical shards, whatever
the number of processes.

Resumability: a shard is built in memory, written to ``<name>.tmp`` and renamed; the manifest
(``"complete": false`` while running) is rewritten atomically after every shard. A rerun with the
same settings keeps every shard whose size and sha256 match its manifest entry, removes stale
``.tmp`` files and rebuilds the rest, so a killed run finishes with the same bytes.

Single writer: a shard set has one writer at a time. On a local folder :func:`make_shards` holds a
lock file (``.make_shards.lock``, ``filelock``) for the whole run, so a second concurrent run on the
same folder fails at once (:class:`~actr_core.files.FolderLockedError`, a ``ValueError``: the
command line reports it in one line, exit status 2); on object stores (``s3://`` ...) there is no lock, and keeping to one
writer is up to the caller.

Integrity: :func:`check_manifest` lists what is wrong with a manifest (not a JSON object, another
format or schema version, ``complete: false``, missing or duplicate shard entries, totals that
disagree with the shards); readers refuse such a manifest and :func:`verify_shards` reports it,
with the shards' sizes, sha256, sample counts and their agreement with the recorded settings.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import posixpath
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from tqdm.auto import tqdm
from webdataset.tariterators import group_by_keys, tar_file_expander

from actr_core.data.errors import DataError, check_on_error
from actr_core.data.readers import FLIP_OFFSETS, PairReader, open_reader
from actr_core.data.records import join, open_root
from actr_core.data.samples import JPEG_QUALITY, PseudoFlow, build_sample, encode_sample, sample_size
from actr_core.data.schema import FLOW_STRIDE, IMAGE_FORMATS, MANIFEST_NAME, SCHEMA_VERSION, SHARD_MEMBERS, SPLITS
from actr_core.data.synthetic import SyntheticConfig, SyntheticPairs
from actr_core.files import folder_lock

__all__ = [
    "SOURCES",
    "ShardSettings",
    "ShardTask",
    "VerifyReport",
    "make_shards",
    "verify_shards",
    "read_manifest",
    "plan_shards",
    "shard_urls",
    "check_manifest",
    "manifest_problems",
    "tar_samples",
    "sha256_hex",
    "LOCK_NAME",
]

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("synthetic", "spair", "pfpascal", "pfwillow")
MANIFEST_FORMAT = 1  # version of the manifest's own layout
_TAR_MODE = 0o644
LOCK_NAME = ".make_shards.lock"  # the single-writer lock file inside a local shard set folder
REBUILD_HINT = "rebuild it with pipelines/make_shards.py (the same settings, --overwrite)"


@dataclasses.dataclass(frozen=True)
class ShardSettings:
    """Everything that decides the bytes of a shard set (recorded in the manifest)."""

    source: str = "synthetic"  # one of SOURCES
    root: str | None = None  # data set root (benchmarks); None for synthetic pairs
    splits: tuple[str, ...] = SPLITS  # splits to write (PF-WILLOW has only "test")
    pairs: tuple[tuple[str, int], ...] = (("train", 1600), ("val", 200), ("test", 200))  # synthetic pairs per split
    limit: int | None = None  # at most this many pairs per split from a benchmark (None: all)
    size: int | tuple[int, int] = (256, 256)  # stored frame (H, W) or side: the paper's 256 px model input (Sec. 4.1)
    image_format: str = "jpg"  # "jpg" (default) or "png"
    jpeg_quality: int = JPEG_QUALITY  # Pillow JPEG quality
    samples_per_shard: int = 100  # pairs per tar (the last shard of a split may hold fewer)
    seed: int = 0  # synthetic pairs: seed of every pair's generator
    pseudo: PseudoFlow = PseudoFlow()  # pseudo-flow of benchmark pairs (paper Sec. 3.5)
    synthetic: SyntheticConfig = SyntheticConfig()  # synthetic warps; its size is replaced by `size`
    on_error: str = "raise"  # "raise" or "skip" bad pairs (skips are listed in the manifest)
    # PF-PASCAL training flips: x → W + 1 − x ("one_based", exact for its 1-based annotations), the released
    # loader's W − x ("released") or 0.1.0's W − 1 − x ("pixel_centre"); readers.FLIP_OFFSETS, docs/data.md.
    pfpascal_flip: str = "one_based"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"source {self.source!r} needs root (the data set's directory or URL)")
        for split in self.splits:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected a subset of {SPLITS}")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits {self.splits} repeat a split")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {self.limit}")
        check_on_error(self.on_error)
        if self.pfpascal_flip not in FLIP_OFFSETS:
            raise ValueError(f"pfpascal_flip must be one of {sorted(FLIP_OFFSETS)}, got {self.pfpascal_flip!r}")
        size = sample_size(self.size)
        object.__setattr__(self, "size", size)
        if self.synthetic.size != size:
            object.__setattr__(self, "synthetic", dataclasses.replace(self.synthetic, size=size))
        if self.source == "synthetic":
            counts = dict(self.pairs)
            missing = [s for s in self.splits if s not in counts]
            if missing:
                raise ValueError(f"pairs gives no count for splits {missing}")
            if any(counts[s] < 0 for s in self.splits) or not any(counts[s] for s in self.splits):
                raise ValueError(f"pairs {[(s, counts[s]) for s in self.splits]}: every count must be >= 0 and one > 0")

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON values (the manifest's ``settings``); ``pfpascal_flip`` only for PF-PASCAL."""
        values = json.loads(json.dumps(dataclasses.asdict(self)))
        if self.source != "pfpascal":
            del values["pfpascal_flip"]  # shapes no other source's bytes; sets of other sources keep their settings
        return values

    def reader(self, split: str, storage_options: Mapping[str, Any] | None = None) -> PairReader:
        """The pair reader of ``split``; bad pairs always raise here (the writer applies ``on_error``)."""
        if self.source == "synthetic":
            return SyntheticPairs(split, dict(self.pairs)[split], config=self.synthetic, seed=self.seed)
        if self.root is None:
            raise ValueError(f"source {self.source!r} needs root (the data set's directory or URL)")
        extra = {"flip": self.pfpascal_flip} if self.source == "pfpascal" else {}
        return open_reader(self.source, self.root, split, storage_options=storage_options, **extra)


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One shard to build: pairs ``start .. stop - 1`` of ``split``."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        """The shard's file name."""
        return f"{self.split}-{self.index:06d}.tar"


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _tar_bytes(samples: Sequence[Mapping[str, Any]]) -> bytes:
    """An uncompressed tar of WebDataset samples (``__key__`` plus members) with fixed member metadata:
    the same samples give the same bytes (``webdataset.TarWriter`` writes a sample's members in name order)."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, user="", group="", mode=_TAR_MODE, mtime=0, encoder=False) as writer:
        for sample in samples:
            writer.write(dict(sample))
    return buffer.getvalue()


def tar_samples(data: bytes, where: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, members) of each sample of an uncompressed tar, read by webdataset's tar iteration
    (members grouped by the key before the first dot of their base name, in any member order).

    A truncated or corrupt tar, or a member repeated within a sample, raises :class:`DataError` naming ``where``.
    """
    files = tar_file_expander([{"url": where, "stream": io.BytesIO(data)}], eof_value=None)
    samples = []
    try:
        for sample in group_by_keys(files):
            samples.append((sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}))
    except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeDecodeError) as error:
        last = repr(samples[-1][0]) if samples else "none"
        reason = error.args[0] if error.args else type(error).__name__
        raise DataError(where, f"truncated or corrupt tar (last whole sample {last}): {reason}") from error
    return samples


@functools.lru_cache(maxsize=8)
def _cached_reader(settings: ShardSettings, split: str, storage_items: tuple[tuple[str, Any], ...]) -> PairReader:
    return settings.reader(split, dict(storage_items))


def _build_shard(
    settings: ShardSettings, task: ShardTask, storage_items: tuple[tuple[str, Any], ...] = ()
) -> tuple[ShardTask, bytes, int, list[dict[str, str]], list[dict[str, str]]]:
    """Build one shard in memory; returns (task, tar bytes, sample count, skipped pairs, pairs whose
    annotated image size disagreed with the image and was replaced by the image's)."""
    reader = _cached_reader(settings, task.split, storage_items)
    samples: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    corrected: list[dict[str, str]] = []
    count = 0
    for index in range(task.start, task.stop):
        try:
            record = reader.load(index)
            sample = build_sample(record, settings.size, settings.pseudo)
        except DataError as error:
            if settings.on_error == "raise":
                raise
            skipped.append({"where": error.where, "reason": error.reason})
            continue
        if record.size_corrected:
            corrected.append({"pair": record.pair_id, "reason": "; ".join(record.size_corrected)})
        members = encode_sample(sample, settings.image_format, settings.jpeg_quality)
        samples.append({"__key__": f"{task.split}_{index:07d}", **members})
        count += 1
    return task, _tar_bytes(samples), count, skipped, corrected


def plan_shards(settings: ShardSettings, storage_options: Mapping[str, Any] | None = None) -> list[ShardTask]:
    """The shards of a shard set, in manifest order."""
    tasks: list[ShardTask] = []
    for split in settings.splits:
        n = len(settings.reader(split, storage_options))
        if settings.limit is not None:
            n = min(n, settings.limit)
        per = settings.samples_per_shard
        tasks.extend(ShardTask(split, k, k * per, min(n, (k + 1) * per)) for k in range(-(-n // per)))
    return tasks


def read_manifest(out: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest of the shard set at ``out``, or None when there is none; a manifest that is not
    valid JSON or not a JSON object raises :class:`DataError` (its content is checked by :func:`check_manifest`)."""
    fs, root = open_root(out, storage_options)
    path = join(root, MANIFEST_NAME)
    if not fs.exists(path):
        return None
    try:
        manifest = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(path, f"manifest is not valid JSON: {error}") from error
    if not isinstance(manifest, dict):
        raise DataError(path, f"manifest is not a JSON object (got a JSON {type(manifest).__name__}); {REBUILD_HINT}")
    return manifest


def manifest_problems(manifest: Any) -> tuple[list[str], list[str]]:
    """What is wrong with a manifest, as (incomplete, broken) lists of one-line messages.

    ``incomplete``: what an interrupted run leaves (``complete`` not true, shard entries or splits
    missing); :func:`check_manifest` lets these pass with ``allow_incomplete``. ``broken``: never
    readable as is (not a JSON object, another manifest format or schema version, malformed or
    duplicate entries, totals that disagree with the shard entries).
    """
    incomplete: list[str] = []
    broken: list[str] = []
    if not isinstance(manifest, dict):
        return incomplete, [f"manifest is not a JSON object (got {type(manifest).__name__}); {REBUILD_HINT}"]
    versions = (manifest.get("manifest_format"), manifest.get("schema_version"))
    if versions != (MANIFEST_FORMAT, SCHEMA_VERSION):
        broken.append(
            f"made by another version of actr_core (manifest_format {versions[0]!r}, schema_version {versions[1]!r}; "
            f"this version reads {MANIFEST_FORMAT} and {SCHEMA_VERSION}); {REBUILD_HINT}"
        )
        return incomplete, broken
    if manifest.get("complete") is not True:
        incomplete.append("manifest says complete: false (a make_shards run was interrupted; rerun it to finish)")
    settings, splits = manifest.get("settings"), manifest.get("splits")
    if not isinstance(settings, dict) or not isinstance(splits, dict):
        return incomplete, [*broken, "manifest lacks its settings or splits object"]
    seen: set[str] = set()
    totals = dict.fromkeys(("shards", "samples", "bytes", "skipped"), 0)
    for split in settings.get("splits", []):
        if split not in splits:
            incomplete.append(f"split {split!r} has no shard entries")
    for split, info in splits.items():
        try:
            entries = list(info["shards"])
            sums = {key: sum(int(e[key]) for e in entries) for key in ("samples", "bytes")}
            sums["skipped"] = sum(len(e["skipped"]) for e in entries)
            indices = []
            for entry in entries:
                name = str(entry["name"])
                if name in seen:
                    broken.append(f"shard {name} is listed twice")
                seen.add(name)
                indices.append(int(posixpath.splitext(name)[0].rsplit("-", 1)[1]))
                if int(entry["samples"]) + len(entry["skipped"]) != int(entry["stop"]) - int(entry["first"]):
                    broken.append(f"{name}: {entry['samples']} samples and {len(entry['skipped'])} skipped "
                                  f"do not make pairs {entry['first']}..{entry['stop']}")  # fmt: skip
        except (KeyError, TypeError, ValueError, IndexError) as error:
            broken.append(f"split {split!r}: malformed shard entry ({error!r})")
            continue
        missing = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        if settings.get("source") == "synthetic":
            wanted = dict(map(tuple, settings.get("pairs", []))).get(split)
            if wanted is not None and (int(entries[-1]["stop"]) if entries else 0) < wanted:
                missing.append(max(indices, default=-1) + 1)
        if missing:
            names = ", ".join(f"{split}-{k:06d}.tar" for k in missing[:3]) + (" ..." if len(missing) > 3 else "")
            incomplete.append(f"split {split!r}: missing shard entries ({names})")
        for key, value in sums.items():
            if info.get(key) != value:
                broken.append(f"split {split!r}: {key} says {info.get(key)!r}, its shard entries add up to {value}")
            totals[key] += value
        totals["shards"] += len(entries)
    listed = manifest.get("totals")
    for key, value in totals.items():
        if not isinstance(listed, dict) or listed.get(key) != value:
            got = listed.get(key) if isinstance(listed, dict) else None
            broken.append(f"totals.{key} says {got!r}, the shard entries add up to {value}")
    return incomplete, broken


def check_manifest(manifest: Any, where: str, *, allow_incomplete: bool = False) -> dict[str, Any]:
    """``manifest`` if a reader may use it, else :class:`DataError` at ``where`` naming every problem
    (see :func:`manifest_problems`; ``allow_incomplete`` lets an interrupted run's manifest through)."""
    incomplete, broken = manifest_problems(manifest)
    problems = broken if allow_incomplete else broken + incomplete
    if problems:
        hint = "" if broken or allow_incomplete else " (allow_incomplete=True reads the shards written so far)"
        raise DataError(where, "; ".join(problems) + hint)
    return manifest


def shard_urls(out: str, split: str, manifest: Mapping[str, Any] | None = None) -> list[tuple[str, int, str]]:
    """(URL, sample count, sha256) of every shard of ``split``, from the manifest."""
    manifest = manifest if manifest is not None else read_manifest(out)
    if manifest is None:
        raise DataError(join(str(out), MANIFEST_NAME), "no manifest: not a shard set (run make_shards first)")
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in the shard set (has {sorted(manifest['splits'])})")
    base = str(out).rstrip("/")
    shards = manifest["splits"][split]["shards"]
    return [(f"{base}/{entry['name']}", int(entry["samples"]), str(entry["sha256"])) for entry in shards]


def _manifest(settings: ShardSettings, tasks: Sequence[ShardTask], done: Mapping[str, dict], complete: bool) -> dict:
    splits: dict[str, Any] = {}
    for split in settings.splits:
        entries = [done[t.name] for t in tasks if t.split == split and t.name in done]
        splits[split] = {
            "shards": entries,
            "samples": sum(e["samples"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
            "skipped": sum(len(e["skipped"]) for e in entries),
            "size_corrected": sum(len(e.get("size_corrected", ())) for e in entries),
        }
    return {
        "manifest_format": MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "complete": complete,
        "members": dict(SHARD_MEMBERS),
        "settings": settings.to_json(),
        "splits": splits,
        "totals": {
            "shards": sum(len(s["shards"]) for s in splits.values()),
            "samples": sum(s["samples"] for s in splits.values()),
            "bytes": sum(s["bytes"] for s in splits.values()),
            "skipped": sum(s["skipped"] for s in splits.values()),
            "size_corrected": sum(s["size_corrected"] for s in splits.values()),
        },
    }


def _write_atomic(fs: Any, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core; no nested thread pools


def _run_tasks(
    settings: ShardSettings,
    tasks: Sequence[ShardTask],
    workers: int,
    storage_items: tuple[tuple[str, Any], ...],
    mp_context: str | None,
) -> Iterator[tuple[ShardTask, bytes, int, list[dict[str, str]], list[dict[str, str]]]]:
    if workers <= 0 or len(tasks) <= 1:
        for task in tasks:
            yield _build_shard(settings, task, storage_items)
        return
    method = mp_context or ("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    context = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)), mp_context=context, initializer=_init_worker
    ) as pool:
        futures = [pool.submit(_build_shard, settings, task, storage_items) for task in tasks]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def make_shards(
    out: str,
    settings: ShardSettings,
    *,
    workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    mp_context: str | None = None,
    on_shard: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the shard set of ``settings`` to ``out`` and return its manifest (see the module docstring).

    Args:
        out: local path or fsspec URL of the shard set's directory.
        settings: what to write.
        workers: processes building shards (0: in this process). Only this process writes to ``out``.
        progress: show a tqdm bar (pairs).
        overwrite: replace a shard set made with different settings (else ValueError).
        storage_options: fsspec options for ``out`` and the data set root.
        mp_context: multiprocessing start method (default: fork where available, else spawn).
        on_shard: called with each shard's name once it is written (progress hooks, tests).

    Raises:
        FolderLockedError: another process is writing the same local folder (see the module docstring).
        NotADirectoryError: ``out`` is a file.
    """
    fs, root = open_root(out, storage_options)
    if fs.exists(root) and not fs.isdir(root):
        raise NotADirectoryError(f"{out} is a file, not a shard set folder")
    created = not fs.exists(root)
    fs.makedirs(root, exist_ok=True)
    try:
        with _single_writer(fs, root):
            return _make_shards(out, fs, root, settings, workers, progress, overwrite, storage_options, mp_context, on_shard)
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty folder behind
            _remove_if_empty(fs, root)
        raise


@contextlib.contextmanager
def _single_writer(fs: Any, root: str) -> Iterator[None]:
    """Hold the shard set's lock file for the block on a local folder (nothing on other filesystems)."""
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    with folder_lock(root, LOCK_NAME, "another make_shards process (a shard set has one writer at a time)"):
        yield


def _remove_if_empty(fs: Any, root: str) -> None:
    """Remove ``root`` when it holds nothing but the lock file."""
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
        if set(names) <= {LOCK_NAME}:
            fs.rm(root, recursive=True)
    except OSError as error:  # never hide the run's own error behind a clean-up problem
        logger.debug("could not remove %s: %s", root, error)


def _make_shards(
    out: str,
    fs: Any,
    root: str,
    settings: ShardSettings,
    workers: int,
    progress: bool,
    overwrite: bool,
    storage_options: Mapping[str, Any] | None,
    mp_context: str | None,
    on_shard: Callable[[str], None] | None,
) -> dict[str, Any]:
    """:func:`make_shards` under the writer's lock."""
    settings_json = settings.to_json()
    tasks = plan_shards(settings, storage_options)
    planned = {t.name for t in tasks}
    existing = read_manifest(out, storage_options)
    recorded = existing.get("settings") if existing is not None else None
    if isinstance(recorded, dict) and recorded.get("source") == "pfpascal":
        recorded = {"pfpascal_flip": "pixel_centre", **recorded}  # sets of 0.1.0 flipped x → W − 1 − x
    if existing is not None and recorded != settings_json:
        if not overwrite:
            raise ValueError(f"{out} holds a shard set made with other settings; pass overwrite=True (--overwrite) to replace it")
        for split in existing.get("splits", {}).values():
            for entry in split.get("shards", []):
                if fs.exists(join(root, entry["name"])):
                    fs.rm(join(root, entry["name"]))
        existing = None
    for stale in fs.glob(join(root, "*.tmp")):
        fs.rm(stale)

    done: dict[str, dict] = {}
    if existing is not None:
        for split in existing.get("splits", {}).values():
            for entry in split.get("shards", []):
                path = join(root, entry["name"])
                if (
                    entry["name"] in planned
                    and fs.exists(path)
                    and fs.size(path) == entry["bytes"]
                    and sha256_hex(fs.cat_file(path)) == entry["sha256"]
                ):
                    done[entry["name"]] = entry
    todo = [t for t in tasks if t.name not in done]
    if done:
        logger.info("%s: %d of %d shards already complete; building %d", out, len(done), len(tasks), len(todo))

    manifest_path = join(root, MANIFEST_NAME)
    storage_items = tuple(sorted((storage_options or {}).items()))
    bar = tqdm(total=sum(t.stop - t.start for t in todo), unit="pair", desc="make_shards", disable=not progress)
    try:
        for task, data, count, skipped, corrected in _run_tasks(settings, todo, workers, storage_items, mp_context):
            _write_atomic(fs, join(root, task.name), data)
            done[task.name] = {
                "name": task.name,
                "split": task.split,
                "first": task.start,
                "stop": task.stop,
                "samples": count,
                "bytes": len(data),
                "sha256": sha256_hex(data),
                "skipped": skipped,
                "size_corrected": corrected,
            }
            _write_atomic(fs, manifest_path, _manifest_bytes(_manifest(settings, tasks, done, complete=False)))
            bar.update(task.stop - task.start)
            if on_shard is not None:
                on_shard(task.name)
    finally:
        bar.close()
    manifest = _manifest(settings, tasks, done, complete=True)
    _write_atomic(fs, manifest_path, _manifest_bytes(manifest))
    skipped_total = manifest["totals"]["skipped"]
    if skipped_total:
        logger.warning("%s: skipped %d bad pairs (listed per shard in %s)", out, skipped_total, MANIFEST_NAME)
    if manifest["totals"]["size_corrected"]:
        logger.warning("%s: %d pairs annotate an image size other than the image's; the image's was used (listed per "
                       "shard in %s)", out, manifest["totals"]["size_corrected"], MANIFEST_NAME)  # fmt: skip
    return manifest


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify_shards`: ``ok`` when ``problems`` is empty."""

    out: str
    shards: int
    samples: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when the shard set matches its manifest."""
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.out}: {self.shards} shards, {self.samples} samples"
        return head + (": OK" if self.ok else ": FAILED\n  " + "\n  ".join(self.problems))


def verify_shards(out: str, *, deep: bool = True, storage_options: Mapping[str, Any] | None = None) -> VerifyReport:
    """Check a shard set against its manifest: the manifest itself (:func:`manifest_problems`), every
    shard's presence, size and sha256, no stray shards; with ``deep``, also that every tar parses into
    the listed number of complete samples whose keys lie in the shard's pair range and whose content
    agrees with the recorded settings (image format and frame size, flow grid)."""
    problems: list[str] = []
    fs, root = open_root(out, storage_options)
    try:
        manifest = read_manifest(out, storage_options)
    except DataError as error:
        return VerifyReport(str(out), 0, 0, (str(error),))
    if manifest is None:
        return VerifyReport(str(out), 0, 0, (f"{join(root, MANIFEST_NAME)}: no manifest",))
    incomplete, broken = manifest_problems(manifest)
    problems.extend(incomplete + broken)
    if not isinstance(manifest.get("splits"), dict) or any("another version" in p for p in broken):
        return VerifyReport(str(out), 0, 0, tuple(problems))
    settings = manifest.get("settings", {})
    listed, shards, samples = set(), 0, 0
    for split, info in manifest["splits"].items():
        for entry in info.get("shards", []) if isinstance(info, dict) else []:
            shards += 1
            name = entry["name"]
            listed.add(name)
            path = join(root, name)
            if not fs.exists(path):
                problems.append(f"{name}: missing")
                continue
            data = fs.cat_file(path)
            if len(data) != entry["bytes"]:
                problems.append(f"{name}: {len(data)} bytes, manifest says {entry['bytes']}")
            if sha256_hex(data) != entry["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest")
                continue
            if deep:
                try:
                    content = tar_samples(data, path)
                except DataError as error:
                    problems.append(str(error))
                    continue
                problems.extend(_content_problems(name, content, entry, settings))
                if len(content) != entry["samples"]:
                    problems.append(f"{name}: {len(content)} samples, manifest says {entry['samples']} (split {split})")
            samples += entry["samples"]
    for path in fs.glob(join(root, "*.tar")):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name not in listed:
            problems.append(f"{name}: shard not listed in the manifest")
    return VerifyReport(str(out), shards, samples, tuple(problems))


def _content_problems(
    name: str, content: Sequence[tuple[str, Mapping[str, bytes]]], entry: Mapping[str, Any], settings: Mapping[str, Any]
) -> list[str]:
    """Disagreements between a shard's samples and its manifest entry and settings (first one per kind)."""
    problems: dict[str, str] = {}  # kind -> first message
    fmt = settings.get("image_format")
    h, w = settings.get("size", (0, 0))
    stride = settings.get("pseudo", {}).get("stride", FLOW_STRIDE)
    for key, members in content:
        split, _, index = key.rpartition("_")
        if not (index.isdigit() and entry["first"] <= int(index) < entry["stop"] and split == entry["split"]):
            problems.setdefault("key", f"{name}: sample {key} outside the shard's pairs {entry['first']}..{entry['stop']}")
        lacking = [m for m in (f"src.{fmt}", f"trg.{fmt}", "flow.npy", "valid.npy", "kps.json", "meta.json") if m not in members]
        if lacking:
            problems.setdefault("members", f"{name}: sample {key} lacks {lacking} (settings say image_format {fmt!r})")
            continue
        try:
            sizes = [Image.open(io.BytesIO(members[f"{side}.{fmt}"])).size[::-1] for side in ("src", "trg")]
            flow_shape = np.load(io.BytesIO(members["flow.npy"]), allow_pickle=False, mmap_mode=None).shape
        except (OSError, ValueError, SyntaxError) as error:
            problems.setdefault("decode", f"{name}: sample {key} does not decode: {error}")
            continue
        if any(tuple(size) != (h, w) for size in sizes):
            problems.setdefault("size", f"{name}: sample {key} has images of {sizes}, settings say size {[h, w]}")
        if flow_shape != (2, h // stride, w // stride):
            problems.setdefault(
                "flow", f"{name}: sample {key} has flow {flow_shape}, settings say {(2, h // stride, w // stride)}"
            )
    return list(problems.values())
