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

import argparse
import dataclasses
import logging
import os
import sys
import time

from actr_core.data.samples import JPEG_QUALITY, PseudoFlow
from actr_core.data.shards import SOURCES, ShardSettings, make_shards, verify_shards
from actr_core.data.synthetic import SyntheticConfig

HELD_OUT_FRACTION = 0.1  # --pairs N gives val and test round(0.1 N) synthetic pairs each, train the rest


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
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}")


def split_counts(total: int) -> tuple[tuple[str, int], ...]:
    """Pairs per split for ``--pairs total`` synthetic pairs: (train, rest), (val, 10 %), (test, 10 %)."""
    held_out = round(total * HELD_OUT_FRACTION)
    return (("train", total - 2 * held_out), ("val", held_out), ("test", held_out))


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> :class:`Config`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=SOURCES, default="synthetic")
    parser.add_argument("--root", help="data set directory or URL (benchmarks)")
    parser.add_argument("--out", help="shard set directory or fsspec URL (default shards/<source>)")
    parser.add_argument("--splits", nargs="+", help="splits to write (default: train val test; PF-WILLOW: test)")
    parser.add_argument("--pairs", type=int, default=2000, help="synthetic pairs in all (10%% val, 10%% test)")
    parser.add_argument("--limit", type=int, help="at most this many benchmark pairs per split")
    parser.add_argument("--size", type=_size, default=(256, 256), help="stored frame: N or HxW (default 256)")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", dest="image_format")
    parser.add_argument("--quality", type=int, default=JPEG_QUALITY, help="JPEG quality")
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="synthetic pairs: seed")
    synthetic = parser.add_argument_group("synthetic warps (ranges and distributions: docs/data.md)")
    synthetic.add_argument("--rotation", type=float, default=SyntheticConfig.rotation, help="max |angle|, degrees")
    synthetic.add_argument(
        "--scale", type=float, nargs=2, default=SyntheticConfig.scale, metavar=("LOW", "HIGH"), help="zoom range"
    )
    synthetic.add_argument("--translation", type=float, default=SyntheticConfig.translation, help="max shift per axis")
    synthetic.add_argument("--homography", type=float, default=SyntheticConfig.homography, help="max corner shift")
    synthetic.add_argument("--tps", type=float, default=SyntheticConfig.tps, help="max spline control point shift")
    synthetic.add_argument("--jitter", type=float, default=SyntheticConfig.jitter, help="brightness/contrast/saturation in 1 ± jitter")
    synthetic.add_argument(
        "--crop-scale", type=float, nargs=2, default=SyntheticConfig.crop_scale, metavar=("LOW", "HIGH"),
        help="source crop side / photo's shorter side",
    )
    parser.add_argument("--n-kps", type=int, default=SyntheticConfig.n_kps, help="synthetic keypoints per pair")
    parser.add_argument("--neighbourhood", type=float, default=PseudoFlow.neighbourhood, help="pseudo-flow side at 512 px")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (0: in this process)")
    parser.add_argument("--overwrite", action="store_true", help="replace a shard set made with other settings")
    parser.add_argument("--verify", action="store_true", help="only verify --out against its manifest")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or f"shards/{args.source}"
    if args.verify:
        return Config(out=out, settings=None, verify=True, progress=not args.no_progress)
    splits = tuple(args.splits) if args.splits else (("test",) if args.source == "pfwillow" else ("train", "val", "test"))
    settings = ShardSettings(
        source=args.source,
        root=args.root,
        splits=splits,
        pairs=split_counts(args.pairs),
        limit=args.limit,
        size=args.size,
        image_format=args.image_format,
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
    )
    return Config(out=out, settings=settings, workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)


def main(cfg: Config) -> int:
    """Make (or verify) the shard set; returns the process exit status."""
    if cfg.verify:
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


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(parse_args()))
