"""Evaluate a matcher: PCK table, netCDF results and the paper's four figures.

    python pipelines/evaluate.py --checkpoint runs/x/checkpoint.pt --shards shards/synthetic --split test \
        --protocol standard --alphas 0.05 0.1 0.15 --out runs/x/eval

Writes ``results.nc`` (xarray, engine h5netcdf), ``table.txt`` (per-image and per-keypoint PCK)
and ``pck_curve.png``, ``matches.png``, ``tps_warp.png``, ``path_flows.png``; prints the table.
CPU is enough. The ``released`` protocol reproduces how the released ACTR code scored; it is for
comparison only, and this script never selects models on the split it scores.

Two small functions know the outside world and are the ones to swap: :func:`load_model`
(checkpoint or builder name → matcher) and :func:`open_batches` (shards → batches in the schema).
"""

import argparse
import dataclasses
import io
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import xarray as xr
from torch import nn

from actr_core.metrics import (
    DEFAULT_ALPHAS,
    PROTOCOLS,
    evaluate,
    format_table,
    keypoint_correctness,
    save_results,
)
from actr_core.viz import plot_matches, plot_path_flows, plot_pck_curves, plot_tps_warps

# α grid of the PCK curve figure (paper Fig. 4 plots α up to 0.1 on SPair; we go to 0.2).
CURVE_ALPHAS = tuple(float(a) for a in np.round(np.linspace(0.01, 0.2, 20), 4))
MIN_MATCHES_FOR_WARP = 3  # thin-plate spline needs three matches


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate, on what, how, and where the results go."""

    shards: str | None = None  # shard set URL (any fsspec URL) made by pipelines/make_shards.py
    split: str = "test"  # split of the shard set to score (model selection uses "val", never this)
    checkpoint: str | None = None  # a training checkpoint (actr_core.training); wins over --model
    model: str | None = None  # a registered builder name (actr_core.models.model_entries), random weights
    protocol: str = "standard"  # actr_core.metrics.PROTOCOLS
    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # PCK tolerances of the table
    out: str = "runs/evaluate"  # output folder
    batch_size: int = 8
    limit: int = 0  # score only the first `limit` batches (0: all)
    device: str = "cpu"
    figures: bool = True
    figure_alpha: float = 0.1  # α of the correct/wrong colouring in the matches figure
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# The two functions to swap when the training and data packages publish their loaders.


def load_model(cfg: EvaluateConfig) -> tuple[nn.Module, str]:
    """The matcher to score and its name: from a training checkpoint, or a builder with random weights."""
    if cfg.checkpoint:
        from actr_core.training.checkpoint import load_model_from_checkpoint

        model, info = load_model_from_checkpoint(cfg.checkpoint, map_location=cfg.device)
        return model, f"{info['builder']} ({Path(cfg.checkpoint).name}, epoch {info['epoch']})"
    if cfg.model:
        from actr_core.models import build_model

        return build_model(cfg.model).to(cfg.device), f"{cfg.model} (untrained)"
    raise ValueError("give --checkpoint PATH or --model NAME")


def open_batches(cfg: EvaluateConfig) -> tuple[Iterable[Mapping[str, Any]], int | None]:
    """Batches (schema of ``actr_core.data``) of ``cfg.split`` of the shard set, and how many there are."""
    from actr_core.data.shards import shard_urls

    if not cfg.shards:
        raise ValueError("give --shards URL (a shard set made by pipelines/make_shards.py)")
    shards = shard_urls(cfg.shards, cfg.split)
    pairs = sum(count for _, count in shards)
    total = -(-pairs // cfg.batch_size)
    if cfg.limit:
        total = min(total, cfg.limit)
    return _limited(_shard_batches([url for url, _ in shards], cfg.batch_size), cfg.limit), total


def _limited(batches: Iterable[Mapping[str, Any]], limit: int) -> Iterator[Mapping[str, Any]]:
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            return
        yield batch


def _shard_batches(urls: Sequence[str], batch_size: int) -> Iterator[dict[str, Any]]:
    """Every sample of the shards once, in order, collated into batches of ``batch_size``."""
    from actr_core.data.samples import decode_sample
    from actr_core.data.shards import iter_tar

    pending = []
    for url in urls:
        with fsspec.open(url, "rb") as handle:
            data = handle.read()
        for key, members in iter_tar(io.BytesIO(data), url):
            pending.append(decode_sample(members, f"{url}:{key}"))
            if len(pending) == batch_size:
                yield _collate(pending)
                pending = []
    if pending:
        yield _collate(pending)


def _collate(samples: Sequence[Any]) -> dict[str, Any]:
    """Stack decoded samples into a batch of the schema (keypoints padded with zeros, invalid)."""
    from actr_core.data.schema import SPAIR_FLAGS
    from actr_core.imaging import normalise_image

    n = max(int(s.src_kps.shape[0]) for s in samples)

    def padded(name: str) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(getattr(s, name), (0, 0, 0, n - getattr(s, name).shape[0])) for s in samples])

    batch: dict[str, Any] = {
        "src_image": normalise_image(torch.stack([s.src_image for s in samples])),
        "trg_image": normalise_image(torch.stack([s.trg_image for s in samples])),
        "src_kps": padded("src_kps"),
        "trg_kps": padded("trg_kps"),
        "src_kps_orig": padded("src_kps_orig"),
        "trg_kps_orig": padded("trg_kps_orig"),
        "valid_kps": torch.stack(
            [torch.nn.functional.pad(s.valid_kps, (0, n - s.valid_kps.shape[0]), value=False) for s in samples]
        ),
        "flow": torch.stack([s.flow for s in samples]),
        "valid_flow": torch.stack([s.valid_flow for s in samples]),
        "src_size": torch.tensor([s.src_size for s in samples], dtype=torch.int64),
        "trg_size": torch.tensor([s.trg_size for s in samples], dtype=torch.int64),
        "src_bbox": torch.stack([s.src_bbox for s in samples]),
        "trg_bbox": torch.stack([s.trg_bbox for s in samples]),
        "category": [s.category for s in samples],
        "pair_id": [s.pair_id for s in samples],
        "dataset": [s.dataset for s in samples],
    }
    for flag in SPAIR_FLAGS:
        if all(flag in s.flags for s in samples):
            batch[flag] = torch.tensor([int(s.flags[flag]) for s in samples], dtype=torch.int64)
    return batch


# ---------------------------------------------------------------------------------------------


def _first_pair(batch: Mapping[str, Any], minimum: int) -> int:
    counts = batch["valid_kps"].sum(dim=1)
    best = int(torch.argmax(counts))
    return next((i for i, c in enumerate(counts.tolist()) if c >= minimum), best)


def make_figures(
    model: nn.Module, batch: Mapping[str, Any], results: xr.Dataset, out: Path, cfg: EvaluateConfig, name: str
) -> list[Path]:
    """The four figures for one pair of ``batch`` (the first with enough valid keypoints)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_pck_curves({name: results}, out / "pck_curve.png", alphas=CURVE_ALPHAS)]
    device = torch.device(cfg.device)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    model.eval()
    with torch.no_grad():
        output = model(batch["src_image"], batch["trg_image"])
        pred = model.transfer(output, batch["src_kps"], batch["valid_kps"])
    i = _first_pair(batch, MIN_MATCHES_FOR_WARP)
    valid = batch["valid_kps"][i]
    n = int(valid.shape[0])
    pair = batch["pair_id"][i] if "pair_id" in batch else None
    if pair is not None and pair in results["pair"].values:
        correct = keypoint_correctness(results, cfg.figure_alpha).sel(pair=pair).values[:n]
        label = f"{pair}: PCK@{cfg.figure_alpha:g} {results.attrs['protocol']} protocol"
    else:
        correct = np.zeros(n, dtype=bool)
        label = "pair not in the results"
    src, trg = batch["src_image"][i], batch["trg_image"][i]
    kps = (batch["src_kps"][i], pred[i], batch["trg_kps"][i])
    written.append(plot_matches(src, trg, *kps, correct, out / "matches.png", valid=valid, title=label))
    if int(valid.sum()) >= MIN_MATCHES_FOR_WARP:
        written.append(plot_tps_warps(src, trg, *kps, out / "tps_warp.png", valid=valid, title=str(pair)))
    per_path = getattr(output, "flows_per_path", None)
    written.append(
        plot_path_flows(
            None if per_path is None else per_path[i],
            output.flow[i],
            out / "path_flows.png",
            gt=batch.get("flow", [None] * (i + 1))[i],
            valid_gt=batch.get("valid_flow", [None] * (i + 1))[i],
            title=f"{name}: flows of {pair}",
        )
    )
    return written


def main(cfg: EvaluateConfig) -> xr.Dataset:
    """Score, save, print; returns the results dataset."""
    model, name = load_model(cfg)
    batches, total = open_batches(cfg)
    first: list[Mapping[str, Any]] = []

    def keep_first(source: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
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
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results.attrs["split"] = cfg.split
    results.attrs["data"] = str(cfg.shards)
    save_results(results, out / "results.nc")
    table = format_table(results, "image") + "\n\n" + format_table(results, "keypoint") + "\n"
    (out / "table.txt").write_text(table)
    print(table)
    if cfg.figures and first:
        for path in make_figures(model, first[0], results, out, cfg, name):
            print(f"figure: {path}")
    print(f"results: {out / 'results.nc'}")
    return results


def parse_args(argv: Sequence[str] | None = None) -> EvaluateConfig:
    """Command-line arguments → :class:`EvaluateConfig`."""
    defaults = EvaluateConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="training checkpoint to evaluate")
    p.add_argument("--model", help="registered builder name (random weights) when no checkpoint is given")
    p.add_argument("--shards", help="shard set URL (local path or any fsspec URL)")
    p.add_argument("--split", default=defaults.split)
    p.add_argument("--protocol", default=defaults.protocol, choices=sorted(PROTOCOLS))
    p.add_argument("--alphas", type=float, nargs="+", default=list(defaults.alphas))
    p.add_argument("--out", default=defaults.out, help="output folder")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--limit", type=int, default=defaults.limit, help="score only this many batches (0: all)")
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--figure-alpha", type=float, default=defaults.figure_alpha)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    return EvaluateConfig(
        shards=a.shards,
        split=a.split,
        checkpoint=a.checkpoint,
        model=a.model,
        protocol=a.protocol,
        alphas=tuple(a.alphas),
        out=a.out,
        batch_size=a.batch_size,
        limit=a.limit,
        device=a.device,
        figures=not a.no_figures,
        figure_alpha=a.figure_alpha,
        progress=not a.no_progress,
    )


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, exit status 0; a user error prints one line and returns 2."""
    cfg = parse_args(argv)
    try:
        main(cfg)
    except (ValueError, FileNotFoundError) as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
