"""Reader throughput: pairs per second delivered by the shard pipeline, without and with augmentation.

    python pipelines/make_shards.py --source synthetic --out shards/synthetic --pairs 2000
    python benchmarks/data_throughput.py --shards shards/synthetic --workers 2 --batch-size 32

Reads the training split as training does (shard and sample shuffling, full batches in the schema)
through a ``DataLoader`` with ``--workers`` processes, with the images delivered either as uint8
(``images="uint8"``, what ``pipelines/train.py`` and ``pipelines/evaluate.py`` use: the batch is
normalised on the model's device by ``prepare_batch``) or as ImageNet-normalised float32
(``images="normalised"``, normalised in the loader workers). The clock
starts when the first batch arrives (worker start-up excluded) and stops after ``--epochs`` epochs.
Also reports the CPU time per pair of the loader workers and of the main process, which shows
what the figures would be on idle cores when the machine is shared. Prints one line per mode
and, with ``--json``, writes the figures to a file.
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time

import torch

from actr_core.data import IMAGE_MODES, PairBatch, ShardDataset, read_manifest, train_transforms


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark run."""

    shards: str  # shard set directory or URL
    split: str = "train"  # split to read
    batch_size: int = 32  # pairs per batch
    workers: int = 2  # DataLoader worker processes
    epochs: int = 2  # epochs timed per mode (after the first batch)
    modes: tuple[str, ...] = ("plain", "augmented")  # without / with the training augmentation
    images: tuple[str, ...] = ("uint8", "normalised")  # image modes of ShardDataset
    json_path: str | None = None  # where to write the results
    read: bool = False  # the main process reads every byte of each batch (a consumer's page faults)


def measure(cfg: Config, augmented: bool, images: str) -> dict[str, float]:
    """Pairs per second of one mode."""
    dataset = ShardDataset(
        cfg.shards,
        cfg.split,
        batch_size=cfg.batch_size,
        training=True,
        transforms=train_transforms() if augmented else (),
        rank=0,
        world_size=1,
        images=images,
    )
    pairs, start, every = 0, None, 0
    children, main_cpu = _children_cpu(), time.process_time()
    loader = dataset.loader(cfg.workers)  # workers persist across epochs
    for epoch in range(cfg.epochs + 1):
        dataset.set_epoch(epoch)
        for batch in loader:
            every += len(batch.pair_id)
            if cfg.read:
                _read_every_byte(batch)
            if start is None:  # the first batch of the first epoch starts the clock
                start = time.perf_counter()
                continue
            pairs += len(batch.pair_id)
    elapsed = time.perf_counter() - start
    del loader  # joins the workers, whose CPU time then counts
    worker_ms = (_children_cpu() - children) / every * 1e3
    main_ms = (time.process_time() - main_cpu) / every * 1e3
    return {
        "pairs": pairs,
        "seconds": elapsed,
        "pairs_per_second": pairs / elapsed,
        "worker_cpu_ms_per_pair": worker_ms,
        "main_cpu_ms_per_pair": main_ms,
    }


def _read_every_byte(batch: PairBatch) -> None:
    """Touch every page of the batch's buffers, as a consumer that uses all of it would."""
    fields = [getattr(batch, f.name) for f in dataclasses.fields(batch)] + list(batch.flags.values())
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage() for v in fields if isinstance(v, torch.Tensor)}
    for storage in storages.values():
        torch.empty(0, dtype=torch.uint8).set_(storage).max()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(cfg: Config) -> dict[str, object]:
    """Run the modes and print/write the figures."""
    manifest = read_manifest(cfg.shards)
    if manifest is None:
        raise SystemExit(f"{cfg.shards} holds no manifest.json: run pipelines/make_shards.py first")
    settings = manifest["settings"]
    results: dict[str, object] = {
        "shards": cfg.shards,
        "split": cfg.split,
        "samples": manifest["splits"][cfg.split]["samples"],
        "size": settings["size"],
        "image_format": settings["image_format"],
        "batch_size": cfg.batch_size,
        "workers": cfg.workers,
        "read": cfg.read,
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    for mode in cfg.modes:
        for images in cfg.images:
            figures = measure(cfg, augmented=mode == "augmented", images=images)
            results[f"{mode}/{images}"] = figures
            print(
                f"{mode:9s} {images:10s} {figures['pairs_per_second']:8.1f} pairs/s ({figures['pairs']} pairs in "
                f"{figures['seconds']:.1f} s); CPU per pair: loader workers {figures['worker_cpu_ms_per_pair']:.2f} ms, "
                f"main process {figures['main_cpu_ms_per_pair']:.2f} ms"
            )
    results["load_average_after"] = os.getloadavg()
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']}")
    if cfg.json_path:
        with open(cfg.json_path, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> :class:`Config`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="shards/synthetic")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=("plain", "augmented"), default=["plain", "augmented"])
    parser.add_argument("--images", nargs="+", choices=IMAGE_MODES, default=["uint8", "normalised"])
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--read", action="store_true", help="read every byte of each batch in the main process")
    args = parser.parse_args(argv)
    return Config(
        args.shards,
        args.split,
        args.batch_size,
        args.workers,
        args.epochs,
        tuple(args.modes),
        tuple(args.images),
        args.json_path,
        args.read,
    )


if __name__ == "__main__":
    main(parse_args())
    sys.exit(0)
