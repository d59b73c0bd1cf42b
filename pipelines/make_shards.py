"""Write a data set as WebDataset shards with a manifest, or verify a shard set.

    python pipelines/make_shards.py --source synthetic --out shards/synthetic --pairs 2000 --size 256
    python pipelines/make_shards.py --out shards/synthetic --verify
    python pipelines/make_shards.py --source spair --root /data/SPair-71k --out s3://bucket/spair --size 512

The earlier, milder warps (identity PCK@0.1 about 91 %; other photos and draws, so other bytes):

    python pipelines/make_shards.py --out shards/mild --rotation 0 --scale 1 1 --translation 0 --homography 0.2 --tps 0.06 --jitter 0.15 --crop-scale 0.6 1

The output is deterministic (a second run gives byte-identical files) and resumable (rerun the
same command after an interruption). ``--out`` is a local path or any fsspec URL. The work is done
by ``actr_core.data.shards`` (see ``docs/data.md``); this script only parses arguments.
"""

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Literal

from actr_core.data.samples import JPEG_QUALITY, PseudoFlow
from actr_core.data.shards import ShardSettings, make_shards, read_manifest, verify_shards
from actr_core.data.synthetic import SyntheticConfig

HELD_OUT_FRACTION = 0.1  # --pairs N gives val and test round(0.1 N) synthetic pairs each, train the rest


@dataclasses.dataclass(frozen=True)
class MakeShardsConfig:
    """Write a data set as WebDataset shards with a manifest, or --verify a shard set (exit status 1 on damage)."""

    source: Literal["synthetic", "spair", "pfpascal", "pfwillow"] = "synthetic"  # pair reader (actr_core.data.shards.SOURCES)
    root: str | None = None  # data set directory or URL (benchmarks)
    out: str | None = None  # shard set directory or fsspec URL (default shards/<source>)
    splits: tuple[str, ...] | None = None  # splits to write (default: train val test; PF-WILLOW: test)
    pairs: int = 2000  # synthetic pairs in all (10 % val, 10 % test)
    limit: int | None = None  # at most this many benchmark pairs per split
    size: str = "256"  # stored frame: N or HxW (paper Sec. 4.1: 256)
    format: Literal["jpg", "png"] = "jpg"  # image encoding in the shards
    quality: int = JPEG_QUALITY  # JPEG quality
    samples_per_shard: int = 100  # pairs per tar file
    seed: int = 0  # synthetic pairs: seed
    rotation: float = SyntheticConfig.rotation  # synthetic warps: max |angle|, degrees (docs/data.md)
    scale: tuple[float, float] = SyntheticConfig.scale  # synthetic warps: zoom range LOW HIGH
    translation: float = SyntheticConfig.translation  # synthetic warps: max shift per axis, normalised units
    homography: float = SyntheticConfig.homography  # synthetic warps: max corner shift, normalised units
    tps: float = SyntheticConfig.tps  # synthetic warps: max spline control point shift, normalised units
    jitter: float = SyntheticConfig.jitter  # synthetic colours: brightness/contrast/saturation in 1 ± jitter
    crop_scale: tuple[float, float] = SyntheticConfig.crop_scale  # synthetic: source crop side / photo's shorter side
    n_kps: int = SyntheticConfig.n_kps  # synthetic keypoints per pair
    neighbourhood: float = PseudoFlow.neighbourhood  # benchmarks: pseudo-flow side at 512 px (paper Sec. 3.5)
    on_error: Literal["raise", "skip"] = "raise"  # a pair that cannot be read: stop, or skip it (listed in the manifest)
    # PF-PASCAL training flips: x → W+1−x (one_based, its annotations' own convention), W−x (released), W−1−x (pixel_centre)
    pfpascal_flip: Literal["one_based", "released", "pixel_centre"] = "one_based"
    workers: int = os.cpu_count() or 1  # processes (0: in this process)
    overwrite: bool = False  # replace a shard set made with other settings
    verify: bool = False  # only verify --out against its manifest
    progress: bool = True  # tqdm bar


@dataclasses.dataclass(frozen=True)
class Config:
    """What one invocation does."""

    out: str  # shard set directory (path or fsspec URL)
    settings: ShardSettings | None  # None with --verify
    workers: int = 0  # processes building shards
    verify: bool = False  # only check the shard set against its manifest
    overwrite: bool = False  # replace a shard set made with other settings
    progress: bool = True  # tqdm bar


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
        return int(parts[0]), int(parts[-1])
    raise ValueError(f"--size must be N or HxW, got {text!r}")


def split_counts(total: int) -> tuple[tuple[str, int], ...]:
    """Pairs per split for ``--pairs total`` synthetic pairs: (train, rest), (val, 10 %), (test, 10 %)."""
    held_out = round(total * HELD_OUT_FRACTION)
    return (("train", total - 2 * held_out), ("val", held_out), ("test", held_out))


def to_config(args: MakeShardsConfig) -> Config:
    """The command's options → what to do (the library's :class:`ShardSettings`, or a verification)."""
    out = args.out or f"shards/{args.source}"
    if args.verify:
        return Config(out=out, settings=None, verify=True, progress=args.progress)
    if args.source == "synthetic" and args.pairs < 1:
        raise ValueError(f"--pairs must be >= 1, got {args.pairs}")
    splits = tuple(args.splits) if args.splits else (("test",) if args.source == "pfwillow" else ("train", "val", "test"))
    settings = ShardSettings(
        source=args.source,
        root=args.root,
        splits=splits,
        pairs=split_counts(args.pairs),
        limit=args.limit,
        size=_size(args.size),
        image_format=args.format,
        jpeg_quality=args.quality,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        pseudo=PseudoFlow(neighbourhood=args.neighbourhood),
        synthetic=SyntheticConfig(
            n_kps=args.n_kps,
            rotation=args.rotation,
            scale=tuple(args.scale),
            translation=args.translation,
            homography=args.homography,
            tps=args.tps,
            jitter=args.jitter,
            crop_scale=tuple(args.crop_scale),
        ),
        on_error=args.on_error,
        pfpascal_flip=args.pfpascal_flip,
    )
    return Config(out=out, settings=settings, workers=args.workers, overwrite=args.overwrite, progress=args.progress)


def parse_args(argv: Sequence[str] | None = None, prog: str = "python pipelines/make_shards.py") -> Config:
    """Command line -> :class:`Config`."""
    from pipelines.entry import parse_config

    args = parse_config(MakeShardsConfig, sys.argv[1:] if argv is None else argv, prog=prog, description=__doc__.split("\n\n")[0])
    return to_config(args)


def main(cfg: Config) -> int:
    """Make (or verify) the shard set; returns the process exit status."""
    if cfg.verify:
        if read_manifest(cfg.out) is None:
            raise FileNotFoundError(f"{cfg.out}: no shard set here (no manifest.json)")  # a user error, not damage
        report = verify_shards(cfg.out)
        print(report)
        return 0 if report.ok else 1
    start = time.perf_counter()
    manifest = make_shards(cfg.out, cfg.settings, workers=cfg.workers, progress=cfg.progress, overwrite=cfg.overwrite)
    totals = manifest["totals"]
    print(
        f"{cfg.out}: {totals['shards']} shards, {totals['samples']} samples, {totals['bytes'] / 2**20:.1f} MiB, "
        f"{totals['skipped']} skipped, {time.perf_counter() - start:.1f} s"
    )
    return 0


def cli(argv: Sequence[str], prog: str = "python pipelines/make_shards.py") -> int:
    """Entry point: exit status 0, or 1 when ``--verify`` finds damage (user errors: :mod:`pipelines.entry`)."""
    return main(parse_args(argv, prog))


if __name__ == "__main__":
    from pipelines.entry import run

    sys.exit(run(cli))
