"""Evaluate a matcher: PCK table, netCDF results and the paper's four figures.

    python pipelines/evaluate.py --checkpoint runs/x/checkpoint.pt --shards shards/synthetic --split test \
        --protocol standard --alphas 0.05 0.1 0.15 --out runs/x/eval

Writes ``results.nc`` (xarray, engine h5netcdf), ``table.txt`` (per-image and per-keypoint PCK)
and ``pck_curve.png``, ``matches.png``, ``tps_warp.png``, ``path_flows.png``; prints the table.
The model is scored beside the reference predictors on the same pairs: identity (zero motion)
and the classical peer (ORB + RANSAC homography; ``--no-peer`` skips it), with paired bootstrap
intervals on the model's differences to them. CPU is enough. The ``released`` protocol reproduces how the released ACTR code scored; it is for
comparison only, and this script never selects models on the split it scores.

Every file is written whole or not at all (``actr_core.files``): a full disk keeps the previous
``results.nc`` and ``table.txt`` and ends in one line, exit status 1. ``--out`` is locked while an
evaluation writes there; a second one fails at once (exit status 2). An interrupted shard set is
refused unless ``--allow-incomplete``, which is then said in the table and in ``results.nc``.

Two small functions know the outside world and are the ones to swap: :func:`load_model`
(checkpoint or builder name → matcher) and :func:`open_batches` (shards → ``PairBatch`` batches).
"""

import dataclasses
import errno
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

from actr_core.data import PairBatch
from actr_core.data.pipeline import prepare_batch
from actr_core.files import folder_lock, write_files_atomic
from actr_core.metrics import (
    DEFAULT_ALPHAS,
    IDENTITY,
    MODEL,
    PROTOCOLS,
    REFERENCE_NAMES,
    evaluate,
    format_table,
    keypoint_correctness,
    results_bytes,
)
from actr_core.viz import plot_matches, plot_path_flows, plot_pck_curves, plot_tps_warps

# α grid of the PCK curve figure (paper Fig. 4 plots α up to 0.1 on SPair; we go to 0.2).
CURVE_ALPHAS = tuple(float(a) for a in np.round(np.linspace(0.01, 0.2, 20), 4))
MIN_MATCHES_FOR_WARP = 3  # thin-plate spline needs three matches
LOCK_NAME = ".evaluate.lock"  # held in --out while an evaluation writes there


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate a checkpoint or builder on a shard split: PCK table, netCDF results, figures."""

    checkpoint: str | None = None  # a training checkpoint (actr_core.training); wins over --model
    model: str | None = None  # a registered builder name (actr_core.models.model_entries), random weights
    seed: int = 0  # seeds the random weights of --model, so two runs score the same model
    shards: str | None = None  # shard set URL (any fsspec URL) made by pipelines/make_shards.py
    split: str = "test"  # split of the shard set to score (model selection uses "val", never this)
    protocol: str = "standard"  # scoring protocol, one of actr_core.metrics.PROTOCOLS (docs/evaluation.md)
    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # PCK tolerances of the table
    out: str = "runs/evaluate"  # output folder
    batch_size: int = 8  # pairs per batch
    limit: int = 0  # score only the first `limit` batches (0: all)
    device: str = "cpu"  # torch device of the model
    figures: bool = True  # draw the four figures (PCK curve, matches, TPS warp, path flows)
    figure_alpha: float = 0.1  # α of the correct/wrong colouring in the matches figure
    image_size: tuple[int, ...] | None = None  # model input N or H W (default: the checkpoint's; 256 for --model)
    loader_workers: int = 1  # DataLoader processes decoding shards
    progress: bool = True  # tqdm bar
    peer: bool = True  # score the classical peer (ORB + RANSAC) beside the model; identity always
    allow_incomplete: bool = False  # score an interrupted shard set's shards (said in every output)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if self.image_size is not None:
            if len(self.image_size) not in (1, 2):
                raise ValueError(f"image_size takes N or H W, got {self.image_size}")
            object.__setattr__(self, "image_size", (self.image_size[0], self.image_size[-1]))
        for flag, value, low in (("--batch-size", self.batch_size, 1), ("--limit", self.limit, 0),
                                 ("--loader-workers", self.loader_workers, 0)):  # fmt: skip
            if value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")


# ---------------------------------------------------------------------------------------------
# The two functions to swap when the training and data packages publish their loaders.


def load_model(cfg: EvaluateConfig) -> tuple[nn.Module, str, tuple[int, int]]:
    """The matcher to score, its name and its input size: from a training checkpoint, or a builder
    with random weights (input size ``cfg.image_size``)."""
    if cfg.checkpoint:
        from actr_core.training.checkpoint import load_model_from_checkpoint

        model, info = load_model_from_checkpoint(cfg.checkpoint, map_location=cfg.device)
        size = tuple(cfg.image_size) if cfg.image_size else tuple(info["input_size"])
        return model, f"{info['builder']} ({Path(cfg.checkpoint).name}, epoch {info['epoch']})", size
    if cfg.model:
        from actr_core.models import build_model

        side = cfg.image_size or (256, 256)
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model).to(cfg.device), f"{cfg.model} (untrained, seed {cfg.seed})", tuple(side)
    raise ValueError("give --checkpoint PATH or --model NAME")


def open_batches(cfg: EvaluateConfig, size: tuple[int, int]) -> tuple[Iterable[PairBatch], int]:
    """Batches (schema of ``actr_core.data``) of ``cfg.split``, read at the model's input ``size``:
    every sample exactly once, in a fixed order; and how many batches there are."""
    from actr_core.data import Resize, ShardDataset

    if not cfg.shards:
        raise ValueError("give --shards URL (a shard set made by pipelines/make_shards.py)")
    data = ShardDataset(
        cfg.shards,
        cfg.split,
        batch_size=cfg.batch_size,
        training=False,
        transforms=[Resize(size)],
        rank=0,
        world_size=1,
        max_batches=cfg.limit or None,
        images="uint8",  # normalised on the model's device (prepare_batch)
        allow_incomplete=cfg.allow_incomplete,
    )
    if len(data) == 0:
        raise ValueError(f"split {cfg.split!r} of {cfg.shards} holds no pairs to evaluate")
    return data.loader(num_workers=cfg.loader_workers), len(data)


# ---------------------------------------------------------------------------------------------


def _first_pair(batch: PairBatch, minimum: int) -> int:
    counts = batch.valid_kps.sum(dim=1)
    best = int(torch.argmax(counts))
    return next((i for i, c in enumerate(counts.tolist()) if c >= minimum), best)


def make_figures(
    model: nn.Module, batch: PairBatch, results: xr.Dataset, out: Path, cfg: EvaluateConfig, name: str
) -> list[Path]:
    """The four figures for one pair of ``batch`` (the first with enough valid keypoints)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_pck_curves({name: results}, out / "pck_curve.png", alphas=CURVE_ALPHAS)]  # with the references
    device = torch.device(cfg.device)
    batch = prepare_batch(batch, device)
    model.eval()
    with torch.no_grad():
        output = model(batch.src_image, batch.trg_image)
        pred = model.transfer(output, batch.src_kps, batch.valid_kps)
    i = _first_pair(batch, MIN_MATCHES_FOR_WARP)
    valid = batch.valid_kps[i]
    n = int(valid.shape[0])
    pair = batch.pair_id[i] or None  # "": an unnamed pair
    if pair is not None and pair in results["pair"].values:
        correct = keypoint_correctness(results, cfg.figure_alpha, MODEL).sel(pair=pair).values[:n]
        label = f"{pair}: PCK@{cfg.figure_alpha:g} {results.attrs['protocol']} protocol"
    else:
        correct = np.zeros(n, dtype=bool)
        label = "pair not in the results"
    src, trg = batch.src_image[i], batch.trg_image[i]
    kps = (batch.src_kps[i], pred[i], batch.trg_kps[i])
    written.append(plot_matches(src, trg, *kps, correct, out / "matches.png", valid=valid, title=label))
    if int(valid.sum()) >= MIN_MATCHES_FOR_WARP:
        written.append(plot_tps_warps(src, trg, *kps, out / "tps_warp.png", valid=valid, title=str(pair)))
    per_path = getattr(output, "flows_per_path", None)
    written.append(
        plot_path_flows(
            None if per_path is None else per_path[i],
            output.flow[i],
            out / "path_flows.png",
            gt=batch.flow[i] if batch.valid_flow[i].any() else None,  # none: no ground-truth flow
            valid_gt=batch.valid_flow[i],
            title=f"{name}: flows of {pair}",
        )
    )
    return written


def output_folder(out: str) -> tuple[Path, bool]:
    """``--out`` as a folder, created when missing; and whether it was created here (a file → ValueError)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder for the results")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    return path, created


def main(cfg: EvaluateConfig) -> xr.Dataset:
    """Score, save, print; returns the results dataset.

    The output folder is locked (``.evaluate.lock``) while this runs: a second evaluation into it
    fails at once. The results and the table are written together, each to a temporary name first
    (:func:`actr_core.files.write_files_atomic`): a crash or a full disk leaves the previous ones.
    A folder this call created is removed again when the evaluation fails before writing anything.
    """
    out, created = output_folder(cfg.out)
    try:
        with folder_lock(out, LOCK_NAME, "an evaluation"):
            return _evaluate_into(cfg, out)
    except BaseException:
        if created and not any(p.name != LOCK_NAME for p in out.iterdir()):
            (out / LOCK_NAME).unlink(missing_ok=True)
            out.rmdir()
        raise


def _evaluate_into(cfg: EvaluateConfig, out: Path) -> xr.Dataset:
    model, name, size = load_model(cfg)
    batches, total = open_batches(cfg, size)
    incomplete = list(getattr(getattr(batches, "dataset", None), "incomplete", None) or [])
    first: list[PairBatch] = []

    def keep_first(source: Iterable[PairBatch]) -> Iterator[PairBatch]:
        for batch in source:
            if not first:
                first.append(batch)
            yield batch

    results = evaluate(
        model,
        keep_first(batches),
        protocol=cfg.protocol,
        alphas=cfg.alphas,
        device=cfg.device,
        progress=cfg.progress,
        total=total,
        model_name=name,
        references=REFERENCE_NAMES if cfg.peer else (IDENTITY,),
    )
    results.attrs["split"] = cfg.split
    results.attrs["data"] = str(cfg.shards)
    results.attrs["allow_incomplete"] = str(cfg.allow_incomplete).lower()
    results.attrs["data_incomplete"] = "; ".join(incomplete)  # "" for a complete shard set
    table = format_table(results, "image") + "\n\n" + format_table(results, "keypoint") + "\n"
    write_files_atomic({out / "results.nc": results_bytes(results), out / "table.txt": table})
    print(table)
    if incomplete:
        logging.getLogger(__name__).warning("scored an incomplete shard set (--allow-incomplete): %s", "; ".join(incomplete))
    if cfg.figures and first:
        for path in make_figures(model, first[0], results, out, cfg, name):
            print(f"figure: {path}")
    print(f"results: {out / 'results.nc'}")
    return results


def parse_args(argv: Sequence[str], prog: str = "python pipelines/evaluate.py") -> EvaluateConfig:
    """Command line → :class:`EvaluateConfig`."""
    from pipelines.entry import parse_config

    return parse_config(EvaluateConfig, argv, prog=prog, description=__doc__.split("\n\n")[0])


def cli(argv: Sequence[str], prog: str = "python pipelines/evaluate.py") -> int:
    """Entry point: parse, check the device, run; exit status 0, 1 when the disk is full (one line; the
    previous results are kept), 2 for user errors (see :mod:`pipelines.entry`)."""
    from pipelines.entry import check_device

    cfg = parse_args(argv, prog)
    check_device(cfg.device)
    try:
        main(cfg)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(f"{prog}: error: {error.filename}: {error.strerror}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    from pipelines.entry import run

    sys.exit(run(cli))
