"""Weights and data sets by name: a registry of public artefacts, a checked cache, safe extraction.

Nothing here runs at import, and nothing downloads unless asked by name (:func:`fetch`,
:func:`fetch_dataset`, :func:`load_pretrained`, ``actr download``, ``actr reproduce``,
``create_vit(weights="ibot-vitb16")``). What it does on such a request:

* **Registry** (:data:`ARTEFACTS`): each :class:`Artefact` names its public sources (plain URLs,
  Google Drive file ids, or a file inside a Google Drive folder) and, where known, its size and
  sha256. An entry without a published checksum is *unverified*: its sha256 is printed on first
  download and recorded beside the file, and every later use checks the file against that record.
* **Cache**: ``$ACTR_CORE_CACHE``, default ``$XDG_CACHE_HOME/actr_core`` (``~/.cache/actr_core``);
  one folder per artefact (``<cache>/<name>/<file>``). Data sets are extracted into a folder of
  your choice (default ``<cache>/datasets``) in the layout the readers of :mod:`actr_core.data` expect.
* **Download** with `gdown <https://github.com/wkentaro/gdown>`_ (the ``hub`` extra): a progress
  bar, resume of a partial download by an HTTP ``Range`` request (``If-Range`` guards against a
  changed remote file), Google Drive's large-file confirmation page; the file is written under a
  temporary name, its size and sha256 checked, then renamed into the cache (a crash never leaves a
  half-written or unchecked file under the final name). A checksum mismatch deletes the download
  and raises :class:`ChecksumError`.
* **Extraction** (:func:`extract_archive`): tar (any compression) and zip; a member whose path,
  or link target, would land outside the target folder (``../``, absolute paths) rejects the whole
  archive before anything is written; extraction goes to a temporary folder renamed into place.
* **Offline**: ``ACTR_CORE_OFFLINE=1`` uses the cache only; a missing artefact raises
  :class:`OfflineError` naming the file, its URL and where to place it by hand. ``HF_HUB_OFFLINE=1``
  governs only weights that go through timm / huggingface_hub (``timm:<name>`` backbones).

Downloaded checkpoints are read with ``torch.load(weights_only=True)`` only; the released
``args.pkl`` is never needed or read.
"""

import dataclasses
import hashlib
import importlib
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from actr_core.api import Matcher
    from actr_core.models.config import ACTRReleasedConfig

__all__ = [
    "ARTEFACTS",
    "CACHE_ENV",
    "OFFLINE_ENV",
    "Artefact",
    "ChecksumError",
    "HubError",
    "OfflineError",
    "cache_dir",
    "dataset_root",
    "extract_archive",
    "fetch",
    "fetch_dataset",
    "get_artefact",
    "is_offline",
    "load_pretrained",
    "load_released_model",
    "resolve_weights",
    "sha256_file",
]

_log = logging.getLogger(__name__)

CACHE_ENV = "ACTR_CORE_CACHE"  # the cache folder (default: $XDG_CACHE_HOME/actr_core)
OFFLINE_ENV = "ACTR_CORE_OFFLINE"  # "1": cache only, never a network request
#: a Google Drive file by id (answers large files with a confirmation page first)
DRIVE_FILE_URL = "https://drive.google.com/uc?export=download&id={id}"
HUB_EXTRA = "pip install 'actr_core[hub]'"
TIMEOUT_S = 60.0  # seconds without a byte before a connection counts as cut
RETRIES = 2  # reconnections (each resuming where the transfer stopped) before giving up
_CHUNK = 1 << 20
_COMPLETE = ".actr_core_complete"  # marker written into an extracted data set folder, holding the archive's sha256


class HubError(ValueError):
    """An artefact that cannot be had: unknown name, failed download, bad archive (one line)."""


class ChecksumError(HubError):
    """A file whose size or sha256 is not the expected one (a fresh download is deleted, a cached file left)."""


class OfflineError(HubError):
    """Offline mode and the artefact is not in the cache (the message says where to place it)."""


@dataclasses.dataclass(frozen=True)
class Artefact:
    """A public file by name: where it comes from, what it must be, what it is for."""

    name: str
    kind: str  # "weights" (a backbone checkpoint), "actr" (a released ACTR checkpoint), "dataset" (an archive)
    filename: str  # its name in the cache
    source: str  # where the sources below are published
    urls: tuple[str, ...] = ()  # plain URLs, tried first, in order
    drive_ids: tuple[str, ...] = ()  # Google Drive file ids (mirrors), tried next
    drive_folder: str | None = None  # a Google Drive folder URL holding the file at ``folder_path``
    folder_path: str | None = None  # the file's path inside ``drive_folder`` (e.g. "spair/model_best.pth")
    sha256: str | None = None  # None: unverified (printed and recorded on first download)
    size: int | None = None  # bytes, where known
    folder: str | None = None  # data sets: the folder the archive holds (the reader's root)
    model_config: "ACTRReleasedConfig | None" = None  # "actr": the model's sizes (None: the released ones)
    note: str = ""  # what it is, for ``actr download --list``

    @property
    def verified(self) -> bool:
        """Whether a published checksum pins the file."""
        return self.sha256 is not None


_ACTR_FOLDER = "https://drive.google.com/drive/folders/1ooKn4hJ65N352wYuWOnMXnjaVT1e0pVn"
_ACTR_SOURCE = "released ACTR README (github YXSUNMADMAX/ACTR): 'Download pre-trained weights on [Link]'"
_CATS_SOURCE = "released ACTR/CATs data/download.py (Google Drive ids of the benchmark archives)"
_IBOT = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/{}/checkpoint_teacher.pth"
_IBOT_SOURCE = "iBOT release (github bytedance/ibot, README: pre-trained models, 'backbone' checkpoint)"

#: every artefact known by name; none has a published checksum, so all are unverified
ARTEFACTS: Mapping[str, Artefact] = {
    a.name: a
    for a in (
        Artefact(
            "actr-spair", "actr", "model_best.pth", _ACTR_SOURCE, drive_folder=_ACTR_FOLDER, folder_path="spair/model_best.pth",
            note="ACTR (ViT-B/16, 256×256) trained on SPair-71k, released checkpoint (selected on the test split by its authors)",
        ),
        Artefact(
            "actr-pfpascal", "actr", "model_best.pth", _ACTR_SOURCE, drive_folder=_ACTR_FOLDER,
            folder_path="pfpascal/model_best.pth",
            note="ACTR (ViT-B/16, 256×256) trained on PF-PASCAL, released checkpoint (selected on the test split by its authors)",
        ),
        Artefact(
            "ibot-vitb16", "weights", "ibot_vitb16_teacher.pth", _IBOT_SOURCE, urls=(_IBOT.format("vitb_16"),),
            note="iBOT ViT-B/16 teacher (ImageNet-1k): ACTR's backbone (paper Sec. 4)",
        ),
        Artefact(
            "ibot-vits16", "weights", "ibot_vits16_teacher.pth", _IBOT_SOURCE, urls=(_IBOT.format("vits_16"),),
            note="iBOT ViT-S/16 teacher (ImageNet-1k): ACTR-S's backbone (paper Table 3)",
        ),
        Artefact(
            "spair", "dataset", "SPair-71k.tar.gz",
            "SPair-71k's official archive (cvlab.postech.ac.kr/research/SPair-71k); mirror: " + _CATS_SOURCE,
            urls=("http://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz",),
            drive_ids=("1s73NVEFPro260H1tXxCh1ain7oApR8of",), folder="SPair-71k",
            note="SPair-71k: 70,958 pairs, 18 categories",
        ),
        Artefact(
            "pfpascal", "dataset", "PF-PASCAL.tar.gz", _CATS_SOURCE, drive_ids=("1OOwpGzJnTsFXYh-YffMQ9XKM_Kl_zdzg",),
            folder="PF-PASCAL", note="PF-PASCAL with the trn/val/test pair lists of the released code",
        ),
        Artefact(
            "pfwillow", "dataset", "PF-WILLOW.tar.gz", _CATS_SOURCE, drive_ids=("1tDP0y8RO5s45L-vqnortRaieiWENQco_",),
            folder="PF-WILLOW", note="PF-WILLOW: 900 test pairs, 10 classes",
        ),
    )
}  # fmt: skip


def get_artefact(name: "str | Artefact") -> Artefact:
    """The registry entry ``name`` (an :class:`Artefact` passes through); :class:`HubError` if unknown."""
    if isinstance(name, Artefact):
        return name
    if name not in ARTEFACTS:
        raise HubError(f"no artefact named {name!r}; known: {', '.join(ARTEFACTS)}")
    return ARTEFACTS[name]


def cache_dir() -> Path:
    """``$ACTR_CORE_CACHE``, else ``$XDG_CACHE_HOME/actr_core``, else ``~/.cache/actr_core``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "actr_core"


def is_offline() -> bool:
    """``ACTR_CORE_OFFLINE`` set to anything but ``""`` or ``"0"``."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _gdown() -> Any:
    try:
        import gdown
    except ModuleNotFoundError:
        raise HubError(f"downloading needs the optional package 'gdown': {HUB_EXTRA}") from None
    return gdown


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _check(art: Artefact, path: Path, hint: str = "delete the file to fetch it again") -> str:
    """Check ``path`` against the entry's size and sha256 (or the sha256 recorded at first download)."""
    if art.size is not None and path.stat().st_size != art.size:
        raise ChecksumError(f"{path}: {path.stat().st_size} bytes, but {art.name} has {art.size} ({hint})")
    digest = sha256_file(path)
    expected = art.sha256 or (_sidecar(path).read_text().strip() if _sidecar(path).is_file() else None)
    if expected is not None and digest != expected:
        raise ChecksumError(f"{path}: sha256 {digest}, but {art.name} must have {expected} ({hint})")
    return digest


def _sources(art: Artefact) -> list[tuple[str, str]]:
    """(what, url) pairs to try in order; a Drive folder is listed (by gdown) to find the file's id."""
    out = [("url", url) for url in art.urls] + [("drive", DRIVE_FILE_URL.format(id=i)) for i in art.drive_ids]
    if art.drive_folder:
        out.append(("folder", art.drive_folder))
    return out


def _folder_file_url(art: Artefact, folder_url: str) -> str:
    """The Drive file URL of ``art.folder_path`` inside the folder ``folder_url`` (listed with gdown)."""
    listing = _gdown().download_folder(url=folder_url, skip_download=True, quiet=True)
    paths = [str(PurePosixPath(str(item.path))) for item in listing or ()]
    for item, path in zip(listing or (), paths):
        if path == art.folder_path or path.endswith("/" + str(art.folder_path)):
            return DRIVE_FILE_URL.format(id=item.id)
    raise HubError(f"the Drive folder {folder_url} holds no {art.folder_path!r} (it lists {paths[:8]})")


def _confirmed(url: str) -> str:
    """The download URL behind Google Drive's large-file confirmation page (the page parsed by gdown)."""
    import requests

    gdown = _gdown()
    with requests.get(url, stream=True, timeout=TIMEOUT_S) as response:
        response.raise_for_status()
        if not response.headers.get("Content-Type", "").startswith("text/html"):
            return url
        page = response.text
    try:
        return importlib.import_module("gdown.download").get_url_from_gdrive_confirmation(page)
    except gdown.exceptions.FileURLRetrievalError as err:
        raise HubError(f"{url}: Google Drive gave no download link ({str(err).splitlines()[0]})") from None


def _download(art: Artefact, what: str, url: str, part: Path, progress: bool, retries: int) -> None:
    gdown = _gdown()
    if what == "folder":
        url = _folder_file_url(art, url)
    if what in ("drive", "folder"):
        url = _confirmed(url)
    gdown.download(url, str(part), quiet=not progress, resume=True, timeout=TIMEOUT_S, retries=retries)


def fetch(name: "str | Artefact", *, progress: bool = True, retries: int = RETRIES) -> Path:
    """The cached file of the artefact ``name``, downloaded and checked first if it is not there.

    A file already in the cache is checked against the entry's sha256, or, for an unverified entry,
    the sha256 recorded at its first download (recorded now, with a warning, for a file placed by
    hand). Raises :class:`OfflineError` under ``ACTR_CORE_OFFLINE=1`` when the file is missing,
    :class:`ChecksumError` for a wrong file, :class:`HubError` when every source failed (a partial
    download is kept: calling again resumes it).
    """
    art = get_artefact(name)
    path = cache_dir() / art.name / art.filename
    if path.is_file():
        if not art.verified and not _sidecar(path).is_file():
            digest = _check(art, path)
            _sidecar(path).write_text(digest + "\n")
            _log.warning("%s: file placed by hand, unverified entry; sha256 %s recorded in %s", art.name, digest, _sidecar(path))
        else:
            _check(art, path)
        return path
    if is_offline():
        where = art.urls[0] if art.urls else art.drive_folder or DRIVE_FILE_URL.format(id=art.drive_ids[0])
        pinned = f" (sha256 {art.sha256})" if art.sha256 else ""
        raise OfflineError(
            f"{art.name} is not in the cache and {OFFLINE_ENV}=1: download {where}"
            f"{' (' + str(art.folder_path) + ')' if art.folder_path else ''} and place it at {path}{pinned}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    import filelock  # a dependency of gdown

    _gdown()
    with filelock.FileLock(str(path.with_name(f".{art.filename}.lock"))):  # one downloader per file
        if path.is_file():  # another process finished it meanwhile
            _check(art, path)
            return path
        return _fetch_locked(art, path, progress, retries)


def _fetch_locked(art: Artefact, path: Path, progress: bool, retries: int) -> Path:
    problems = []
    for index, (what, url) in enumerate(_sources(art)):
        # one partial file per source (gdown keeps ``<name><random>.part`` beside it until complete), so
        # that a resumed download never splices the bytes of two mirrors
        part = path.with_name(f".{art.filename}.{index}.download")
        try:
            _download(art, what, url, part, progress, retries)
            break
        except HubError as err:
            problems.append(str(err))
        except Exception as err:  # gdown and requests raise their own kinds (network, HTTP status, cut transfer)
            problems.append(f"{url}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    else:
        raise HubError(f"{art.name}: every source failed (a partial download is resumed by running again): {'; '.join(problems)}")
    try:
        digest = _check(art, part, "the download was deleted")
    except ChecksumError:
        part.unlink()
        raise
    if not art.verified:
        print(f"{art.name}: sha256 {digest} (unverified entry: no published checksum; recorded beside the file)", file=sys.stderr)
        _sidecar(path).write_text(digest + "\n")
    os.replace(part, path)
    for stale in path.parent.glob(f".{art.filename}.*.download*"):  # other sources' partial files
        stale.unlink()
    return path


# ---------------------------------------------------------------------------------------------- archives


def _inside(root: Path, member: str) -> bool:
    target = (root / member).resolve()
    return target == root or root in target.parents


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a tar (any compression) or zip archive into the folder ``dest``; returns ``dest``.

    Every member is checked first: an absolute path, a path with ``..`` leading outside ``dest``, a
    link whose target lies outside ``dest``, or a device file raises :class:`HubError` naming it, and
    nothing is written. The members go to a temporary folder inside ``dest``'s parent, then each
    top-level entry is renamed into ``dest`` (existing entries of the same name are replaced).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.extract.") as tmp:
        root = Path(tmp).resolve()
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                for m in tar.getmembers():
                    bad = not _inside(root, m.name) or m.name.startswith("/")
                    if m.issym():
                        bad = bad or not _inside(root, str(PurePosixPath(m.name).parent / m.linkname))
                    if m.islnk():
                        bad = bad or not _inside(root, m.linkname)
                    if bad or m.isdev():
                        raise HubError(
                            f"{archive}: member {m.name!r} would be written outside the target folder; archive rejected"
                        )
                tar.extractall(root, filter="data")  # the standard library's own check as well
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if name.startswith(("/", "\\")) or not _inside(root, name):
                        raise HubError(f"{archive}: member {name!r} would be written outside the target folder; archive rejected")
                zf.extractall(root)
        else:
            raise HubError(f"{archive}: neither a tar nor a zip archive")
        for entry in root.iterdir():
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
    return dest


def fetch_dataset(name: str, root: str | os.PathLike | None = None, *, progress: bool = True, retries: int = RETRIES) -> Path:
    """The folder of the data set ``name`` (``spair``, ``pfpascal``, ``pfwillow``) under ``root``
    (default ``<cache>/datasets``): its archive fetched (:func:`fetch`) and extracted there when the
    folder is not complete yet. Idempotent: a complete folder carries a marker and is returned as is."""
    art = get_artefact(name)
    if art.kind != "dataset" or art.folder is None:
        raise HubError(f"{name!r} is a {art.kind} artefact, not a data set")
    root = Path(root) if root is not None else cache_dir() / "datasets"
    folder = root / art.folder
    if (folder / _COMPLETE).is_file():
        return folder
    archive = fetch(art, progress=progress, retries=retries)
    extract_archive(archive, root)
    if not folder.is_dir():
        raise HubError(f"{archive} holds no folder {art.folder!r} (top level: {sorted(p.name for p in root.iterdir())[:8]})")
    (folder / _COMPLETE).write_text(sha256_file(archive) + "\n")
    return folder


def dataset_root(name: str, root: str | os.PathLike | None = None, *, download: bool = True, progress: bool = True) -> Path:
    """The folder a reader of the data set ``name`` opens: ``root`` itself when it is that folder
    (holds the data set's pair lists), else ``root/<folder>`` when present, else (``download``)
    :func:`fetch_dataset` into ``root``."""
    art = get_artefact(name)
    if art.kind != "dataset" or art.folder is None:
        raise HubError(f"{name!r} is a {art.kind} artefact, not a data set")
    listing = {"spair": "Layout", "pfpascal": "test_pairs.csv", "pfwillow": "test_pairs.csv"}.get(name, _COMPLETE)
    base = Path(root) if root is not None else cache_dir() / "datasets"
    for candidate in (base, base / art.folder):
        if (candidate / listing).exists():
            return candidate
    if not download:
        raise FileNotFoundError(f"no {art.folder} under {base}: run `actr download {name} --root {base}` or pass its folder")
    return fetch_dataset(name, base, progress=progress)


# ---------------------------------------------------------------------------------------------- models


def load_released_model(name: str, *, progress: bool = True) -> "tuple[nn.Module, tuple[int, int]]":
    """A released ACTR checkpoint by name (``actr-spair``, ``actr-pfpascal``) as ACTR as released,
    loaded strictly (:func:`actr_core.models.load_official_actr`), and its input size."""
    from actr_core.models import load_official_actr
    from actr_core.models.config import ACTR_RELEASED_CONFIG

    art = get_artefact(name)
    if art.kind != "actr":
        known = ", ".join(n for n, a in ARTEFACTS.items() if a.kind == "actr")
        raise HubError(f"{name!r} is a {art.kind} artefact, not a released ACTR checkpoint ({known})")
    config = art.model_config or ACTR_RELEASED_CONFIG
    model = load_official_actr(fetch(art, progress=progress), config=config)
    return model, (config.image_size, config.image_size)


def load_pretrained(name: str, *, device: Any = None, progress: bool = True, **matcher_kwargs: Any) -> "Matcher":
    """``actr_core.Matcher`` of a released ACTR checkpoint by name (downloaded into the cache once,
    checked): ``load_pretrained("actr-spair")``; see :func:`load_released_model`."""
    from actr_core.api import Matcher

    model, size = load_released_model(name, progress=progress)
    return Matcher(model, size, device=device, **matcher_kwargs)


def resolve_weights(weights: Any) -> Any:
    """A backbone weights argument with artefact names (``"ibot-vitb16"``) replaced by their cached
    file (fetched first); an existing local path of the same name wins; anything else passes through."""
    if isinstance(weights, str) and weights in ARTEFACTS and not Path(weights).exists():
        art = ARTEFACTS[weights]
        if art.kind != "weights":
            raise HubError(f"{weights!r} is a {art.kind} artefact, not backbone weights")
        return fetch(art)
    return weights
