"""Calibrate a trained model's match confidence on a validation split; score it on a test split.

    python -m pipelines.calibrate --checkpoint runs/quickstart/model_best.pt --shards shards/synthetic

Every valid keypoint of the ``--fit-split`` pairs gives one match: its measures of doubt (relative
cycle and flip errors, the spread of the model's correlation when it has one, the flatness of the
source image; :mod:`actr_core.calibration`) and whether it is correct at ``--alpha`` (the library's
PCK rule, standard protocol). A logistic model in the logs of the measures is fitted to them
(:func:`actr_core.calibration.fit_calibration`) and
written to ``calibration.json`` beside the checkpoint, where ``actr match --checkpoint`` and
``Matcher.from_checkpoint`` find it. The same is then measured on the ``--test-split`` pairs, never
used for fitting: precision and recall of the matches with confidence > ``--min-confidence``, and
the AUC of the confidence as a ranking of correct over wrong matches. Prints them; ``actr
quickstart`` runs this after training and puts them in ``REPORT.md``.
"""

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CalibrateConfig", "main", "parse_args", "cli", "format_scores"]


@dataclasses.dataclass(frozen=True)
class CalibrateConfig:
    """Fit the confidence calibration of a checkpoint on a validation split; score it on a test split."""

    checkpoint: Path  # a checkpoint written by actr train
    shards: str = "shards/synthetic"  # shard set URL (pipelines/make_shards.py)
    fit_split: str = "val"  # split the calibration is fitted on (never the test split)
    test_split: str = "test"  # split it is scored on ("" skips scoring)
    alpha: float = 0.1  # PCK α of a correct match (standard protocol's threshold: the target box for synthetic and SPair pairs)
    min_confidence: float = 0.5  # precision and recall are of matches with confidence above this
    batch_size: int = 20  # pairs per batch
    limit: int = 0  # read only this many batches of each split (0: all)
    out: Path | None = None  # where calibration.json goes (default: beside the checkpoint)
    device: str = "cpu"  # torch device of the model

    def __post_init__(self) -> None:
        if self.fit_split == self.test_split:
            raise ValueError(f"--fit-split and --test-split must differ, both are {self.fit_split!r}")
        if not self.alpha > 0 or not 0 <= self.min_confidence <= 1:
            raise ValueError(f"--alpha must be > 0 and --min-confidence in [0, 1], got {self.alpha}, {self.min_confidence}")
        if self.batch_size < 1 or self.limit < 0:
            raise ValueError(f"--batch-size must be >= 1 and --limit >= 0, got {self.batch_size}, {self.limit}")


def _measures(model: Any, cfg: CalibrateConfig, split: str, size: tuple[int, int]):
    from actr_core.calibration import collect_match_features
    from actr_core.data import Resize, ShardDataset

    data = ShardDataset(
        cfg.shards, split, batch_size=cfg.batch_size, training=False, transforms=[Resize(size)], rank=0, world_size=1,
        max_batches=cfg.limit or None, images="uint8",
    )  # fmt: skip
    return collect_match_features(model, data.loader(num_workers=0), alpha=cfg.alpha, device=cfg.device)


def main(cfg: CalibrateConfig) -> dict:
    """Fit, save and score; returns ``{"calibration", "path", "fit", "test"}`` (scores as in
    :func:`actr_core.calibration.calibration_scores`; ``test`` None when skipped)."""
    import torch

    from actr_core.calibration import CALIBRATION_FILE, calibration_scores, fit_calibration
    from actr_core.training.checkpoint import load_model_from_checkpoint

    model, info = load_model_from_checkpoint(cfg.checkpoint, map_location=cfg.device)
    size = tuple(info["input_size"])
    measures, correct = _measures(model, cfg, cfg.fit_split, size)
    calibration = fit_calibration(measures, correct, alpha=cfg.alpha, fitted_on=f"{cfg.shards} split {cfg.fit_split}")
    path = calibration.save(cfg.out / CALIBRATION_FILE if cfg.out else cfg.checkpoint.parent / CALIBRATION_FILE)

    def scores(measures, y):
        confidence = calibration(**{name: torch.from_numpy(e) for name, e in measures.items()})
        return calibration_scores(confidence.numpy(), y, cfg.min_confidence)

    report = {"calibration": dataclasses.asdict(calibration), "path": str(path), "fit": scores(measures, correct), "test": None}
    if cfg.test_split:
        report["test"] = scores(*_measures(model, cfg, cfg.test_split, size))
    print(f"wrote {path}")
    print(format_scores(report, cfg.fit_split, cfg.test_split, cfg.min_confidence))
    return report


def format_scores(report: dict, fit_split: str, test_split: str, threshold: float = 0.5) -> str:
    """Markdown lines: precision, recall (confidence > threshold) and AUC on each split."""
    alpha = report["calibration"]["alpha"]
    lines = [
        f"| split | matches | correct at α = {alpha:g} | confidence > {threshold:g} | precision | recall | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, key in ((f"{fit_split} (fitted on)", "fit"), (f"{test_split} (held out)", "test")):
        s = report.get(key)
        if s:
            lines.append(
                f"| {name} | {s['matches']} | {100 * s['correct_rate']:.1f} % | {s['selected']} | "
                f"{s['precision']:.3f} | {s['recall']:.3f} | {s['auc']:.3f} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str], prog: str = "python -m pipelines.calibrate") -> CalibrateConfig:
    """Command line → :class:`CalibrateConfig`."""
    from pipelines.entry import parse_config

    return parse_config(CalibrateConfig, argv, prog=prog, description=CalibrateConfig.__doc__)


def cli(argv: Sequence[str], prog: str = "python -m pipelines.calibrate") -> int:
    """Entry point: exit status 0 (user errors: see :mod:`pipelines.entry`)."""
    main(parse_args(argv, prog))
    return 0


if __name__ == "__main__":
    from pipelines.entry import run

    sys.exit(run(cli))
