"""Download weights and data sets by name into the cache (data sets: extracted under --root): ``actr download``.

    actr download spair --root /data            # /data/SPair-71k, in the layout the readers expect
    actr download actr-spair ibot-vitb16          # into the cache ($ACTR_CORE_CACHE)
    actr download --list                           # every name, its source and whether it is verified

Idempotent (a present, checked file or a complete data set folder is not fetched again),
resumable (run again after a cut connection), checked (size and sha256 where published; for an
unverified entry the sha256 is printed and recorded at first download). ``ACTR_CORE_OFFLINE=1``
uses the cache only and says where to place a missing file. Exit status 1 when a file fails its
checksum, 2 for a user error (an unknown name, offline and missing, every source failed).
"""

import dataclasses
import sys
from collections.abc import Sequence

import tyro

from actr_core import hub


@dataclasses.dataclass(frozen=True)
class DownloadConfig:
    """Download weights and data sets by name."""

    names: tyro.conf.Positional[tuple[str, ...]] = ()  # artefact names (see --list): spair, pfpascal, pfwillow, actr-spair, ...
    root: str | None = None  # data sets: the folder to extract into (default: <cache>/datasets); weights go to the cache
    list: bool = False  # list the known names and exit
    progress: bool = True  # progress bar


def listing() -> str:
    """One line per artefact: name, kind, verified or not, what it is, where it comes from."""
    lines = [f"cache: {hub.cache_dir()}"]
    for art in hub.ARTEFACTS.values():
        check = "sha256 pinned" if art.verified else "unverified"
        lines.append(f"  {art.name:<14} {art.kind:<8} {check:<13} {art.note}\n  {'':<14} source: {art.source}")
    return "\n".join(lines)


def main(cfg: DownloadConfig) -> int:
    """Fetch every name; print where each one is. Returns the exit status."""
    if cfg.list or not cfg.names:
        print(listing())
        return 0 if cfg.list else 2
    for name in cfg.names:
        hub.get_artefact(name)  # every name known before anything downloads
    for name in cfg.names:
        art = hub.get_artefact(name)
        try:
            if art.kind == "dataset":
                where = hub.fetch_dataset(name, cfg.root, progress=cfg.progress)
            else:
                where = hub.fetch(name, progress=cfg.progress)
        except hub.ChecksumError as err:
            print(f"actr download: check failed: {err}", file=sys.stderr)
            return 1
        print(f"{name}: {where}")
    return 0


def cli(argv: Sequence[str], prog: str = "python pipelines/download.py") -> int:
    """Entry point (exit statuses: see the module docstring and :mod:`pipelines.entry`)."""
    from pipelines.entry import parse_config

    return main(parse_config(DownloadConfig, argv, prog=prog, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    from pipelines.entry import run

    sys.exit(run(cli))
