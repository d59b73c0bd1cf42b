"""Writing and checking WebDataset shard sets: deterministic, resumable, parallel, on any fsspec URL.

Layout of a shard set at ``out`` (a local path or fsspec URL)::

    out/manifest.json           settings, per-shard sample count / sha256 / bytes, totals
    out/<split>-000000.tar      WebDataset shards; sample keys ``<split>_<index:07d>``
    ...

Determinism: every pair is built from ``(settings, split, index)`` alone; tar members carry fixed
metadata (mtime 0, uid/gid 0, empty owner names, mode 0644, USTAR) in a fixed order; images are
encoded by Pillow with fixed options; the manifest has no timestamps. The same settings therefore
give byte-identical shards, whatever the number of processes.

Resumability: a shard is built in memory, written to ``<name>.tmp`` and renamed; the manifest
(``"complete": false`` while running) is rewritten atomically after every shard. A rerun with the
same settings keeps every shard whose size and sha256 match its manifest entry, removes stale
``.tmp`` files and rebuilds the rest, so a killed run finishes with the same bytes.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from actr_core.data.errors import DataError, check_on_error
from actr_core.data.readers import PairReader, open_reader
from actr_core.data.records import join, open_root
from actr_core.data.samples import JPEG_QUALITY, PseudoFlow, build_sample, encode_sample, sample_size
from actr_core.data.schema import IMAGE_FORMATS, MANIFEST_NAME, SCHEMA_VERSION, SHARD_MEMBERS, SPLITS
from actr_core.data.synthetic import SyntheticConfig, SyntheticPairs

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
    "iter_tar",
    "sha256_hex",
]

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("synthetic", "spair", "pfpascal", "pfwillow")
MANIFEST_FORMAT = 1  # version of the manifest's own layout
_TAR_MODE = 0o644
_MEMBER_ORDER = ("src", "trg", "flow.npy", "valid.npy", "kps.json", "meta.json")


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
        size = sample_size(self.size)
        object.__setattr__(self, "size", size)
        if self.synthetic.size != size:
            object.__setattr__(self, "synthetic", dataclasses.replace(self.synthetic, size=size))
        if self.source == "synthetic":
            counts = dict(self.pairs)
            missing = [s for s in self.splits if s not in counts]
            if missing:
                raise ValueError(f"pairs gives no count for splits {missing}")

    def to_json(self) -> dict[str, Any]:
        """The settings as plain JSON values (the manifest's ``settings``)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def reader(self, split: str, storage_options: Mapping[str, Any] | None = None) -> PairReader:
        """The pair reader of ``split``; bad pairs always raise here (the writer applies ``on_error``)."""
        if self.source == "synthetic":
            return SyntheticPairs(split, dict(self.pairs)[split], config=self.synthetic, seed=self.seed)
        return open_reader(self.source, self.root, split, storage_options=storage_options)


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


def _tar_bytes(entries: Sequence[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = _TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _member_rank(member: str) -> int:
    head = member.split(".")[0] if member.split(".")[0] in ("src", "trg") else member
    return _MEMBER_ORDER.index(head)


@functools.lru_cache(maxsize=8)
def _cached_reader(settings: ShardSettings, split: str, storage_items: tuple[tuple[str, Any], ...]) -> PairReader:
    return settings.reader(split, dict(storage_items))


def _build_shard(
    settings: ShardSettings, task: ShardTask, storage_items: tuple[tuple[str, Any], ...] = ()
) -> tuple[ShardTask, bytes, int, list[dict[str, str]]]:
    """Build one shard in memory; returns (task, tar bytes, sample count, skipped pairs)."""
    reader = _cached_reader(settings, task.split, storage_items)
    entries: list[tuple[str, bytes]] = []
    skipped: list[dict[str, str]] = []
    count = 0
    for index in range(task.start, task.stop):
        try:
            sample = build_sample(reader.load(index), settings.size, settings.pseudo)
        except DataError as error:
            if settings.on_error == "raise":
                raise
            skipped.append({"where": error.where, "reason": error.reason})
            continue
        members = encode_sample(sample, settings.image_format, settings.jpeg_quality)
        key = f"{task.split}_{index:07d}"
        for member in sorted(members, key=_member_rank):
            entries.append((f"{key}.{member}", members[member]))
        count += 1
    return task, _tar_bytes(entries), count, skipped


def plan_shards(settings: ShardSettings, storage_options: Mapping[str, Any] | None = None) -> list[ShardTask]:
    """The shards of a shard set, in manifest order."""
    tasks = []
    for split in settings.splits:
        n = len(settings.reader(split, storage_options))
        if settings.limit is not None:
            n = min(n, settings.limit)
        per = settings.samples_per_shard
        tasks.extend(ShardTask(split, k, k * per, min(n, (k + 1) * per)) for k in range(-(-n // per)))
    return tasks


def read_manifest(out: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The manifest of the shard set at ``out``, or None when there is none."""
    fs, root = open_root(out, storage_options)
    path = join(root, MANIFEST_NAME)
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except json.JSONDecodeError as error:
        raise DataError(path, f"manifest is not valid JSON: {error}") from error


def shard_urls(out: str, split: str, manifest: Mapping[str, Any] | None = None) -> list[tuple[str, int]]:
    """(URL, sample count) of every shard of ``split``, from the manifest."""
    manifest = manifest if manifest is not None else read_manifest(out)
    if manifest is None:
        raise DataError(join(str(out), MANIFEST_NAME), "no manifest: not a shard set (run make_shards first)")
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in the shard set (has {sorted(manifest['splits'])})")
    base = str(out).rstrip("/")
    return [(f"{base}/{entry['name']}", int(entry["samples"])) for entry in manifest["splits"][split]["shards"]]


def _manifest(settings: ShardSettings, tasks: Sequence[ShardTask], done: Mapping[str, dict], complete: bool) -> dict:
    splits: dict[str, Any] = {}
    for split in settings.splits:
        entries = [done[t.name] for t in tasks if t.split == split and t.name in done]
        splits[split] = {
            "shards": entries,
            "samples": sum(e["samples"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
            "skipped": sum(len(e["skipped"]) for e in entries),
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
) -> Iterator[tuple[ShardTask, bytes, int, list[dict[str, str]]]]:
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
    """
    fs, root = open_root(out, storage_options)
    fs.makedirs(root, exist_ok=True)
    settings_json = settings.to_json()
    tasks = plan_shards(settings, storage_options)
    planned = {t.name for t in tasks}
    existing = read_manifest(out, storage_options)
    if existing is not None and existing.get("settings") != settings_json:
        if not overwrite:
            raise ValueError(
                f"{out} holds a shard set made with other settings; pass overwrite=True (--overwrite) to replace it"
            )
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
                if entry["name"] in planned and fs.exists(path) and fs.size(path) == entry["bytes"]:
                    if sha256_hex(fs.cat_file(path)) == entry["sha256"]:
                        done[entry["name"]] = entry
    todo = [t for t in tasks if t.name not in done]
    if done:
        logger.info("%s: %d of %d shards already complete; building %d", out, len(done), len(tasks), len(todo))

    manifest_path = join(root, MANIFEST_NAME)
    storage_items = tuple(sorted((storage_options or {}).items()))
    bar = tqdm(total=sum(t.stop - t.start for t in todo), unit="pair", desc="make_shards", disable=not progress)
    try:
        for task, data, count, skipped in _run_tasks(settings, todo, workers, storage_items, mp_context):
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
    return manifest


_BLOCK = 512
_END_BLOCK = bytes(_BLOCK)
_REGULAR_TYPES = (b"0", b"\0", b"7")
_PAX_TYPES = (b"x", b"g")
_GNU_LONG_NAME = b"L"
_GNU_LONG_LINK = b"K"


def _read_exact(stream: Any, n: int) -> bytes:
    """``n`` bytes from ``stream`` (fewer only at the end of the stream)."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as error:
        raise tarfile.ReadError(f"bad {what} field {field!r}") from error


def _tar_members(stream: Any) -> Iterator[tuple[str, bytes]]:
    """(name, content) of the regular members of a tar stream (ustar, GNU long names, pax paths).

    A header with a bad checksum, a member cut short or a missing header block raises
    ``tarfile.ReadError``; a stream ending cleanly between members ends the archive (the manifest's
    sample count catches a shard cut exactly there).
    """
    long_name: str | None = None
    while True:
        header = _read_exact(stream, _BLOCK)
        if not header or header == _END_BLOCK:
            return
        if len(header) < _BLOCK:
            raise tarfile.ReadError(f"truncated header ({len(header)} of {_BLOCK} bytes)")
        stored = _octal(header[148:156], "checksum")
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise tarfile.ReadError("bad header checksum")
        size = _octal(header[124:136], "size")
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        content = _read_exact(stream, size)
        if len(content) < size:
            raise tarfile.ReadError(f"member {name.decode('utf-8', 'replace')} is truncated ({len(content)} of {size} bytes)")
        padding = -size % _BLOCK
        if padding and len(_read_exact(stream, padding)) < padding:
            raise tarfile.ReadError(f"member {name.decode('utf-8', 'replace')} lacks its padding")
        if kind == _GNU_LONG_NAME:
            long_name = content.split(b"\0", 1)[0].decode("utf-8")
            continue
        if kind in _PAX_TYPES or kind == _GNU_LONG_LINK:
            if kind == b"x":
                for record in content.decode("utf-8").splitlines():
                    field = record.partition(" ")[2]
                    if field.startswith("path="):
                        long_name = field[len("path=") :]
            continue
        if kind in _REGULAR_TYPES:
            yield (long_name if long_name is not None else name.decode("utf-8")), content
        long_name = None


def iter_tar(data: Any, where: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of each sample of a tar stream or bytes; a truncated or corrupt tar raises :class:`DataError`.

    ``data`` is a binary file object or bytes (uncompressed tar). Members are grouped by the key
    before the first dot of their base name, as WebDataset does.
    """
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    key, members = None, {}
    try:
        for name, content in _tar_members(stream):
            base = name.rsplit("/", 1)[-1]
            sample_key, dot, member = base.partition(".")
            if not dot:
                continue
            if sample_key != key:
                if members:
                    yield key, members
                key, members = sample_key, {}
            members[member] = content
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as error:
        raise DataError(where, f"truncated or corrupt tar (after sample {key!r}): {error}") from error
    if members:
        yield key, members


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
    """Check a shard set against its manifest: presence, sizes, sha256, no stray shards; with ``deep``,
    also that every tar parses and holds the listed number of complete samples."""
    problems: list[str] = []
    fs, root = open_root(out, storage_options)
    try:
        manifest = read_manifest(out, storage_options)
    except DataError as error:
        return VerifyReport(str(out), 0, 0, (str(error),))
    if manifest is None:
        return VerifyReport(str(out), 0, 0, (f"{join(root, MANIFEST_NAME)}: no manifest",))
    if not manifest.get("complete"):
        problems.append("manifest says the shard set is incomplete (a run was interrupted; rerun make_shards)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    listed, shards, samples = set(), 0, 0
    for split, info in manifest.get("splits", {}).items():
        for entry in info.get("shards", []):
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
                    count = 0
                    for key, members in iter_tar(data, path):
                        lacking = [m for m in ("flow.npy", "valid.npy", "kps.json", "meta.json") if m not in members]
                        if lacking or not any(m.startswith("src.") for m in members):
                            problems.append(f"{name}: sample {key} lacks {lacking or ['src image']}")
                        count += 1
                except DataError as error:
                    problems.append(str(error))
                    continue
                if count != entry["samples"]:
                    problems.append(f"{name}: {count} samples, manifest says {entry['samples']} (split {split})")
            samples += entry["samples"]
    for path in fs.glob(join(root, "*.tar")):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name not in listed:
            problems.append(f"{name}: shard not listed in the manifest")
    return VerifyReport(str(out), shards, samples, tuple(problems))
