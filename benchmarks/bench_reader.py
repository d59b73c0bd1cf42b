"""Shard reader throughput, this version against 0.1.0, and what the main job's training step consumes.

    python pipelines/make_shards.py --source synthetic          # shards/synthetic, if it is missing
    python benchmarks/bench_reader.py --old-tree /tmp/base_0_1_0

Reader: pairs per second of ``ShardDataset(..., training=True, images="uint8")`` over the training
split of ``--shards`` (the main job's shard set, stored at 256 px, read as stored, no augmentation)
through ``.loader(--workers)``. The clock starts when the first batch arrives (worker start-up
excluded) and stops at the end of the epoch. Each measurement runs in its own process: this tree's
reader with ``PYTHONPATH`` set to this repository, the old one with ``PYTHONPATH=--old-tree``, so the
two packages never mix (each reports the ``actr_core`` it imported). The two alternate, ``--repeats``
times each, so a change in the machine's load touches both alike; the median is reported.

Training step: seconds per step of ``--config``'s model at its per-worker batch size and input
size, with its threads per worker, in this process (``--steps`` timed after one warm-up step on
batches read beforehand). The job's workers step in parallel, so the job consumes
``num_workers × batch_size / step seconds`` pairs per second. ``--step-seconds S`` takes a step
time instead of measuring it (e.g. docs/training.md's 1.85 s on the 2-core Xeon).

Prints one line per measurement and a summary (reader ÷ consumption); ``--json PATH`` writes the
figures. Measurements on a shared machine: the load average before and after is printed with them.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_RESULT = "RESULT "  # prefix of a child's result line on stdout


def measure_reader(shards: str, split: str, batch_size: int, workers: int) -> dict[str, Any]:
    """One training epoch of whichever ``actr_core`` this process imports; pairs/s after the first batch."""
    import actr_core
    from actr_core.data import ShardDataset

    dataset = ShardDataset(shards, split, batch_size=batch_size, training=True, rank=0, world_size=1, images="uint8")
    pairs, start = 0, None
    for batch in dataset.loader(workers):
        if start is None:  # the first batch starts the clock
            start = time.perf_counter()
            continue
        pairs += len(batch.pair_id)
    elapsed = time.perf_counter() - start
    return {"pairs": pairs, "seconds": elapsed, "pairs_per_second": pairs / elapsed, "actr_core": actr_core.__file__}


def measure_step(config: str, shards: str, steps: int) -> dict[str, Any]:
    """Seconds per training step of ``config``'s model at its batch size (one warm-up step, then ``steps``)."""
    import torch
    import yaml

    from actr_core.data import Resize, ShardDataset, prepare_batch
    from actr_core.models import build_model
    from actr_core.training import train_step

    cfg = yaml.safe_load(Path(config).read_text())
    torch.set_num_threads(int(cfg.get("cpus_per_worker", 1)))
    torch.manual_seed(0)
    data = ShardDataset(
        shards, "train", batch_size=cfg["batch_size"], training=True, transforms=[Resize(cfg["image_size"])],
        rank=0, world_size=1, images="uint8", max_batches=steps + 1,
    )  # fmt: skip
    batches = [prepare_batch(batch) for batch in data]
    model = build_model(cfg["model"], **cfg.get("model_kwargs", {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.get("head_lr", 1e-3)))
    train_step(model, batches[0], optimizer)  # warm-up
    start = time.perf_counter()
    for batch in batches[1:]:
        train_step(model, batch, optimizer)
    seconds = (time.perf_counter() - start) / (len(batches) - 1)
    return {"step_seconds": seconds, "batch_size": cfg["batch_size"], "num_workers": int(cfg.get("num_workers", 1))}


def _child(mode: str, args: Sequence[str], tree: Path) -> dict[str, Any]:
    """Run this script's ``--child mode`` with ``PYTHONPATH=tree``; its result line as a dict."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} measurement with PYTHONPATH={tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(_RESULT) :])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure, print and return the figures (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default="shards/synthetic", help="shard set (made by pipelines/make_shards.py)")
    p.add_argument("--split", default="train")
    p.add_argument("--old-tree", type=Path, help="a checkout of 0.1.0 to compare with (omit: this reader only)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per batch (8: the batch of the documented figures)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each reader, alternating")
    p.add_argument("--config", default=str(ROOT / "configs" / "small_cpu.yaml"), help="training config of the step")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--step-seconds", type=float, help="a step time to use instead of measuring it")
    p.add_argument("--json", dest="json_path", help="write the figures here")
    p.add_argument("--child", choices=("reader", "step"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "reader":
        print(_RESULT + json.dumps(measure_reader(args.shards, args.split, args.batch_size, args.workers)))
        return {}
    if args.child == "step":
        print(_RESULT + json.dumps(measure_step(args.config, args.shards, args.steps)))
        return {}
    if not (Path(args.shards) / "manifest.json").exists():
        p.error(f"{args.shards} holds no manifest.json: run python pipelines/make_shards.py --source synthetic")
    if args.old_tree is not None and not (args.old_tree / "actr_core" / "data").is_dir():
        p.error(f"--old-tree {args.old_tree} is not a checkout of actr_core")
    trees = {"new": ROOT} | ({"old": args.old_tree.resolve()} if args.old_tree is not None else {})
    reader_args = ["--shards", str(Path(args.shards).resolve()), "--split", args.split,
                   "--batch-size", str(args.batch_size), "--workers", str(args.workers)]  # fmt: skip
    results: dict[str, Any] = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "runs": []}
    for repeat in range(args.repeats):
        for name, tree in trees.items():
            run = {"reader": name, "repeat": repeat, **_child("reader", reader_args, tree)}
            results["runs"].append(run)
            print(f"{name} reader, repeat {repeat}: {run['pairs_per_second']:.1f} pairs/s "
                  f"({run['pairs']} pairs in {run['seconds']:.2f} s; {run['actr_core']})")  # fmt: skip
    for name in trees:
        results[f"{name}_pairs_per_second"] = statistics.median(
            r["pairs_per_second"] for r in results["runs"] if r["reader"] == name
        )
    if args.step_seconds is not None:
        cfg = __import__("yaml").safe_load(Path(args.config).read_text())
        step = {"step_seconds": args.step_seconds, "batch_size": cfg["batch_size"], "num_workers": cfg.get("num_workers", 1)}
        step["source"] = "given"
    else:
        step_args = ["--config", args.config, "--shards", str(Path(args.shards).resolve()), "--steps", str(args.steps)]
        step = {**_child("step", step_args, ROOT), "source": "measured"}
    consumed = step["num_workers"] * step["batch_size"] / step["step_seconds"]
    results.update(step=step, consumed_pairs_per_second=consumed, load_average_after=os.getloadavg())
    results["ratio"] = results["new_pairs_per_second"] / consumed
    print(f"training step ({step['source']}): {step['step_seconds']:.2f} s per step of {step['batch_size']} pairs "
          f"x {step['num_workers']} workers = {consumed:.1f} pairs/s consumed")  # fmt: skip
    old = f", old reader {results['old_pairs_per_second']:.1f} pairs/s" if "old" in trees else ""
    print(f"median: new reader {results['new_pairs_per_second']:.1f} pairs/s{old}; "
          f"new reader / consumption = {results['ratio']:.1f}x")  # fmt: skip
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']} ({os.cpu_count()} CPUs)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
