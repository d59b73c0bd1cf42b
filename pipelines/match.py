"""Match two images (or a photo and a known warp of it) with one model: ``actr match``.

    python pipelines/match.py photo.jpg --known-warp --model actr_tiny --size 64
    python pipelines/match.py cat_a.jpg cat_b.jpg --checkpoint runs/quickstart/model_best.pt

Writes ``matches.png`` (the matches drawn on the pair) and ``matches.json`` (keypoints, confidence,
cycle error; with ``--known-warp`` the true matches and PCK) in ``--out``.
"""

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import tyro

from pipelines.cli import known_warp
from pipelines.entry import check_device, parse_config

__all__ = ["MatchConfig", "parse_args", "main", "cli"]


@dataclasses.dataclass(frozen=True)
class MatchConfig:
    """Match two images (or a photo and a known warp of it) with one model; PNG and JSON out."""

    source: tyro.conf.Positional[Path]  # source image file
    target: tyro.conf.Positional[Path | None] = None  # target image file (omit with --known-warp)
    checkpoint: Path | None = None  # a checkpoint written by actr train (give one of checkpoint, released, model)
    released: Path | None = None  # a released ACTR checkpoint (model_best.pth)
    model: str | None = None  # a registered builder name (random weights; for trying the plumbing)
    size: int = 256  # input side for --model
    keypoints: Path | None = None  # JSON list of [x, y] source points (default: a 6×6 grid)
    known_warp: bool = False  # target = a random homography of the source; prints PCK
    seed: int = 0  # seed of the known warp
    alpha: float = 0.1  # PCK threshold as a fraction of the target's longer side
    out: Path = Path("match_out")  # output folder
    device: str | None = None  # torch device (default: the Matcher's choice)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.checkpoint, self.released, self.model)) != 1:
            raise ValueError("give one of --checkpoint, --released, --model")
        if self.known_warp == (self.target is not None):
            raise ValueError("give either a target image or --known-warp, not both or neither")
        if self.keypoints and self.known_warp:
            raise ValueError("--keypoints cannot be combined with --known-warp (its matches come from the warp)")


def _build_matcher(args: MatchConfig):
    from actr_core.api import Matcher

    if args.checkpoint:
        return Matcher.from_checkpoint(args.checkpoint, device=args.device)
    if args.released:
        return Matcher.from_released(args.released, device=args.device)
    from actr_core.models import build_model

    return Matcher(build_model(args.model), (args.size, args.size), device=args.device)


def parse_args(argv: Sequence[str], prog: str = "python pipelines/match.py") -> MatchConfig:
    """Command line → :class:`MatchConfig`."""
    return parse_config(MatchConfig, argv, prog=prog, description=MatchConfig.__doc__)


def main(args: MatchConfig) -> dict:
    """Match, draw, write ``matches.png`` and ``matches.json``; returns the JSON report."""
    import numpy as np
    import torch

    from actr_core.api import load_image
    from actr_core.metrics import pck
    from actr_core.viz.matches import plot_matches

    if args.device:
        check_device(args.device)
    source = load_image(args.source)
    gt = valid = None
    if args.known_warp:
        target, grid_kps, gt, valid = known_warp(source, seed=args.seed)
    else:
        target = load_image(args.target)
        h, w = source.shape[-2:]
        xs, ys = np.linspace(0.1 * w, 0.9 * w, 6), np.linspace(0.1 * h, 0.9 * h, 6)
        grid_kps = torch.from_numpy(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)).float()
    if args.keypoints:
        try:
            kps = torch.tensor(json.loads(args.keypoints.read_text()), dtype=torch.float32)
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{args.keypoints}: not a JSON list of [x, y] pairs ({err})") from None
    else:
        kps = grid_kps
    matcher = _build_matcher(args)
    result = matcher(source, target, kps)

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "source": str(args.source),
        "target": "known warp" if args.known_warp else str(args.target),
        "source_keypoints": kps.tolist(),
        "target_keypoints": result.keypoints.tolist(),
        "confidence": result.confidence.tolist(),
        "cycle_error_px": result.cycle_error.tolist(),
        "convention": "(x, y) pixels of each original image, pixel centres at integers",
    }
    if gt is not None:
        threshold = torch.tensor([float(max(target.shape[-2:]))])
        score = pck(result.keypoints[None], gt[None], threshold, args.alpha, valid[None])
        report.update(ground_truth=gt.tolist(), valid=valid.tolist(), alpha=args.alpha, pck=float(score[0]))
        correct = (result.keypoints - gt).norm(dim=-1) <= args.alpha * threshold
        title = f"PCK@{args.alpha:g} (image side) = {100 * float(score[0]):.1f}% on a known warp"
        from torchvision.utils import save_image

        save_image(target, args.out / "target.png")
    else:
        correct, title = result.confidence >= 0.5, "green: cycle-consistent (confidence ≥ 0.5), red: not"
    png = plot_matches(source, target, kps, result.keypoints, gt, correct, args.out / "matches.png", valid=valid, title=title)
    (args.out / "matches.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {png} and {args.out / 'matches.json'}")
    if gt is not None:
        print(f"PCK@{args.alpha:g} against the known warp: {100 * report['pck']:.1f}% ({int(valid.sum())} points)")
    return report


def cli(argv: Sequence[str], prog: str = "python pipelines/match.py") -> int:
    """Entry point: parse, match; exit status 0 (user errors: see :mod:`pipelines.entry`)."""
    main(parse_args(argv, prog))
    return 0


if __name__ == "__main__":
    from pipelines.entry import run

    sys.exit(run(cli))
