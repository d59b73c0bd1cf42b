"""Match two images, a photo and a known warp of it, or many pairs at once, with one model: ``actr match``.

    python pipelines/match.py photo.jpg --known-warp --model actr_tiny --size 64
    python pipelines/match.py cat_a.jpg cat_b.jpg --checkpoint runs/quickstart/model_best.pt
    python pipelines/match.py photos/ --checkpoint runs/quickstart/model_best.pt --out matches/
    python pipelines/match.py --pairs pairs.csv --checkpoint runs/quickstart/model_best.pt --half

One pair writes ``matches.png`` (the matches drawn on copies at most 640 px long) and
``matches.json`` (keypoints in original pixels, confidence, cycle error; with ``--known-warp`` the
true matches and PCK; the warp is made on a copy of the source at most 640 px long) in ``--out``. Batch mode
writes one JSON and one PNG per pair, ``<source stem>__<target stem>.json`` in ``--out`` (or the
CSV's ``out`` column): a **folder** of images matches each image with the next one in name order
(consecutive pairs: a, b, c → a–b, b–c); with ``--known-warp``, each image with a known warp of
itself; a **CSV** (``--pairs``) has a header row with columns ``src,trg`` and optionally ``out``
(paths relative to the CSV's folder; ``out`` relative to ``--out``). A pair that fails is reported
in one line and counted, the others are done; the exit status is then 1.

Matches are drawn green when their confidence is at least ``--min-confidence`` (default 0.5). With a
checkpoint whose folder holds ``calibration.json`` (written by ``actr quickstart`` or
``python -m pipelines.calibrate``), the confidence is the estimated probability that the match is
correct at the calibration's α; without one it is an uncalibrated cycle-consistency score and the
JSON says ``"calibrated": false``.
"""

import csv
import dataclasses
import itertools
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import tyro

from pipelines.cli import known_warp
from pipelines.entry import EXIT_CHECK_FAILED, EXIT_OK, check_device, parse_config

__all__ = ["MatchConfig", "parse_args", "main", "cli", "batch_pairs", "match_pair", "json_safe"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # images a folder contributes
PREVIEW_SIDE = 640  # longer side (px) of the images drawn and of a --known-warp source: bounded memory


@dataclasses.dataclass(frozen=True)
class MatchConfig:
    """Match two images, a folder of images or the pairs of a CSV with one model; PNG and JSON out."""

    source: tyro.conf.Positional[Path | None] = None  # source image, or a folder of images (consecutive pairs)
    target: tyro.conf.Positional[Path | None] = None  # target image file (omit with --known-warp, a folder or --pairs)
    checkpoint: Path | None = None  # a checkpoint written by actr train (give one of checkpoint, released, model)
    released: Path | None = None  # a released ACTR checkpoint (model_best.pth)
    model: str | None = None  # a registered builder name (random weights; for trying the plumbing)
    input_size: tuple[int, ...] | None = None  # model input N or H W (default: the checkpoint's; 256 for --model)
    size: int | None = None  # the same as --input-size N (the 0.1.0 spelling)
    pairs: Path | None = None  # CSV with a header row and columns src,trg[,out]: one JSON per pair
    keypoints: Path | None = None  # JSON list of [x, y] source points (default: a 6×6 grid)
    known_warp: bool = False  # target = a random homography of the source; prints PCK
    seed: int = 0  # seed of the known warp
    alpha: float = 0.1  # PCK threshold as a fraction of the target's longer side
    min_confidence: float = 0.5  # matches at or above this confidence are drawn green, the others red
    half: bool = False  # run the model in half precision (--half-dtype): CPU takes bf16, CUDA bf16 or fp16
    half_dtype: Literal["bf16", "fp16"] = "bf16"  # the half precision of --half
    out: Path = Path("match_out")  # output folder (created; must not be a file)
    device: str | None = None  # torch device (default: the Matcher's choice)
    progress: bool = True  # progress bar in batch mode

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.checkpoint, self.released, self.model)) != 1:
            raise ValueError("give one of --checkpoint, --released, --model")
        if (self.source is None) == (self.pairs is None):
            raise ValueError("give a source image (or folder) or --pairs CSV, not both or neither")
        folder = self.source is not None and self.source.is_dir()
        if self.pairs is None and not folder and self.known_warp == (self.target is not None):
            raise ValueError("give either a target image or --known-warp, not both or neither")
        if (folder or self.pairs is not None) and self.target is not None:
            raise ValueError("batch mode (a folder or --pairs) takes no target image")
        if self.pairs is not None and self.known_warp:
            raise ValueError("--known-warp takes a source image or a folder, not --pairs")
        if self.keypoints and self.known_warp:
            raise ValueError("--keypoints cannot be combined with --known-warp (its matches come from the warp)")
        if self.size is not None and self.input_size is not None:
            raise ValueError("give --input-size or --size, not both")
        side = (self.size,) if self.size is not None else self.input_size
        if side is not None and (len(side) not in (1, 2) or min(side) <= 0):
            raise ValueError(f"--input-size takes N or H W, positive, got {' '.join(map(str, side))}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"--min-confidence must lie in [0, 1], got {self.min_confidence}")
        if not self.alpha > 0:
            raise ValueError(f"--alpha must be positive, got {self.alpha}")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out}: is a file; give a folder")

    @property
    def model_input(self) -> tuple[int, int] | None:
        """``(H, W)`` from --input-size / --size, or None for the model's own."""
        side = (self.size,) if self.size is not None else self.input_size
        return None if side is None else (int(side[0]), int(side[-1]))


def _build_matcher(args: MatchConfig):
    from actr_core.api import Matcher

    precision = args.half_dtype if args.half else "fp32"
    common: dict[str, Any] = dict(device=args.device, precision=precision)
    if args.checkpoint:
        return Matcher.from_checkpoint(args.checkpoint, input_size=args.model_input, **common)
    if args.released:
        return Matcher.from_released(args.released, input_size=args.model_input, **common)
    from actr_core.models import build_model

    return Matcher(build_model(str(args.model)), args.model_input or (256, 256), **common)


def json_safe(value: Any) -> Any:
    """Nested lists/dicts with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(report), indent=1, allow_nan=False))
    os.replace(tmp, path)  # never half a file


def batch_pairs(args: MatchConfig) -> list[tuple[Path, Path | None, Path]]:
    """``(source, target or None for a known warp, JSON path)`` of every pair of a batch run."""
    if args.pairs is not None:
        if not args.pairs.is_file():
            raise FileNotFoundError(f"--pairs {args.pairs}: no such CSV file")
        with open(args.pairs, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"src", "trg"} <= set(rows[0]):
            raise ValueError(f"--pairs {args.pairs}: needs a header row with columns src,trg[,out] and at least one row")
        base = args.pairs.parent
        return [
            (
                base / row["src"],
                base / row["trg"],
                args.out / (row.get("out") or f"{Path(row['src']).stem}__{Path(row['trg']).stem}.json"),
            )
            for row in rows
        ]
    assert args.source is not None  # checked in MatchConfig
    images = sorted(p for p in args.source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(images) < (1 if args.known_warp else 2):
        raise ValueError(
            f"{args.source}: holds {len(images)} image(s) with suffixes {', '.join(IMAGE_SUFFIXES)}; too few to pair"
        )
    if args.known_warp:
        return [(p, None, args.out / f"{p.stem}__known_warp.json") for p in images]
    return [(a, b, args.out / f"{a.stem}__{b.stem}.json") for a, b in itertools.pairwise(images)]


def _grid_keypoints(h: int, w: int):
    import numpy as np
    import torch

    xs, ys = np.linspace(0.1 * w, 0.9 * w, 6), np.linspace(0.1 * h, 0.9 * h, 6)
    return torch.from_numpy(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)).float()


def _preview(image: Any, size: tuple[int, int]) -> tuple[Any, float, float]:
    """A copy at most PREVIEW_SIDE px long (drawn, or warped), and the scale (x, y) from ``size`` to it."""
    from actr_core.api import load_image

    h, w = size
    scale = min(1.0, PREVIEW_SIDE / max(h, w))
    ph, pw = max(2, round(h * scale)), max(2, round(w * scale))
    return load_image(image, (ph, pw)), pw / w, ph / h


def match_pair(matcher, args: MatchConfig, source: Path, target: Path | None, json_path: Path) -> dict:
    """Match one pair, draw it, write ``json_path`` and the PNG beside it; returns the JSON report."""
    import torch

    from actr_core.api import image_size
    from actr_core.metrics import pck
    from actr_core.viz.matches import plot_matches

    src_size = image_size(source)
    gt = valid = None
    if target is None:  # a known warp of a copy of the source at most PREVIEW_SIDE long
        src_in, _, _ = _preview(source, src_size)
        trg_in, grid_kps, gt, valid = known_warp(src_in, seed=args.seed)
        src_size = trg_size = (int(src_in.shape[-2]), int(src_in.shape[-1]))
    else:
        src_in, trg_in, trg_size = source, target, image_size(target)
        grid_kps = _grid_keypoints(*src_size)
    if args.keypoints:
        try:
            kps = torch.tensor(json.loads(args.keypoints.read_text()), dtype=torch.float32)
        except (json.JSONDecodeError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{args.keypoints}: not a JSON list of [x, y] pairs ({err})") from None
    else:
        kps = grid_kps
    result = matcher(src_in, trg_in, kps)
    report: dict = {
        "source": str(source),
        "target": "known warp" if target is None else str(target),
        "source_size": list(src_size),
        "target_size": list(trg_size),
        "source_keypoints": kps.tolist(),
        "target_keypoints": result.keypoints.tolist(),
        "confidence": result.confidence.tolist(),
        "calibrated": result.calibrated,
        "calibration_alpha": result.calibration_alpha,
        "min_confidence": args.min_confidence,
        "input_size": list(matcher.input_size),
        "precision": matcher.precision,
        "cycle_error_px": result.cycle_error.tolist(),
        "cycle_error_relative": result.cycle_error_relative.tolist(),
        "convention": "(x, y) pixels of each original image, pixel centres at integers; relative cycle error = "
        "pixels / longer side of the source image",
    }
    confident = result.confidence >= args.min_confidence
    kind = "calibrated P(correct)" if result.calibrated else "uncalibrated cycle score"
    if gt is not None:
        threshold = torch.tensor([float(max(trg_size))])
        score = pck(result.keypoints[None], gt[None], threshold, args.alpha, valid[None])
        correct = (result.keypoints - gt).norm(dim=-1) <= args.alpha * threshold
        report.update(ground_truth=gt.tolist(), valid=valid.tolist(), alpha=args.alpha, pck=float(score[0]))
        title = f"PCK@{args.alpha:g} (image side) = {100 * float(score[0]):.1f}% on a known warp"
        src_view, trg_draw, sx, sy, tx, ty = src_in, trg_in, 1.0, 1.0, 1.0, 1.0
    else:
        correct = confident
        title = f"green: confidence ≥ {args.min_confidence:g} ({kind}), red: below"
        src_view, sx, sy = _preview(source, src_size)
        trg_draw, tx, ty = _preview(target, trg_size)
    report["confident"] = confident.tolist()

    def scaled(points, fx: float, fy: float):  # into the drawn copy, pixel centres at integers
        return None if points is None else (points + 0.5) * torch.tensor([fx, fy]) - 0.5

    json_path.parent.mkdir(parents=True, exist_ok=True)
    png = plot_matches(
        src_view, trg_draw, scaled(kps, sx, sy), scaled(result.keypoints, tx, ty), scaled(gt, tx, ty), correct,
        json_path.with_suffix(".png"), valid=valid, title=title,
    )  # fmt: skip
    _write_json(json_path, report)
    print(f"wrote {png} and {json_path}")
    if gt is not None:
        print(f"PCK@{args.alpha:g} against the known warp: {100 * report['pck']:.1f}% ({int(valid.sum())} points)")
    return report


def parse_args(argv: Sequence[str], prog: str = "python pipelines/match.py") -> MatchConfig:
    """Command line → :class:`MatchConfig`."""
    return parse_config(MatchConfig, argv, prog=prog, description=MatchConfig.__doc__)


def main(args: MatchConfig) -> dict:
    """Match one pair, or every pair of a batch; returns the JSON report (batch: counts and failures)."""
    from tqdm.auto import tqdm

    if args.device:
        check_device(args.device)
    batch = args.pairs is not None or (args.source is not None and args.source.is_dir())
    pairs = batch_pairs(args) if batch else [(args.source, args.target, args.out / "matches.json")]
    matcher = _build_matcher(args)
    if not batch:
        return match_pair(matcher, args, *pairs[0])  # type: ignore[arg-type]
    failures: list[dict] = []
    bar = tqdm(pairs, desc="pairs", unit="pair", disable=not args.progress)
    for source, target, json_path in bar:
        try:
            match_pair(matcher, args, source, target, json_path)
        except (ValueError, OSError, RuntimeError) as err:  # reported and counted; the other pairs go on
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            failures.append({"source": str(source), "target": str(target), "error": message})
            tqdm.write(f"failed: {source} → {target or 'known warp'}: {message}", file=sys.stderr)
    summary = {"pairs": len(pairs), "failed": len(failures), "failures": failures}
    args.out.mkdir(parents=True, exist_ok=True)
    _write_json(args.out / "summary.json", summary)
    print(f"{len(pairs) - len(failures)} of {len(pairs)} pairs matched; {len(failures)} failed (see {args.out / 'summary.json'})")
    return summary


def cli(argv: Sequence[str], prog: str = "python pipelines/match.py") -> int:
    """Entry point: exit status 0, or 1 when a pair of a batch failed (user errors: see :mod:`pipelines.entry`)."""
    report = main(parse_args(argv, prog))
    return EXIT_CHECK_FAILED if report.get("failed") else EXIT_OK


if __name__ == "__main__":
    from pipelines.entry import run

    sys.exit(run(cli))
