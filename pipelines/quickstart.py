"""The main job on the embedded default data, in one command.

    python -m pipelines.quickstart            (or: actr quickstart; or: bash scripts/quickstart.sh)

Steps: synthetic shards from scikit-image's bundled photos (``pipelines/make_shards.py``) → train
the small CPU configuration with Ray Train, started in-process (``pipelines/train.py`` with
``configs/small_cpu.yaml``) → evaluate the trained model on the held-out test
photos beside identity and the classical peer (``pipelines/evaluate.py``) → calibrate its match
confidence on the validation split and score it on the test split (``pipelines/calibrate.py``) →
a report folder ``runs/<name>/``: ``REPORT.md`` (the three predictors' PCK with bootstrap
intervals, the confidence's precision, recall and AUC, the learning curve, per-photo rows),
``eval/results.nc``, the figures, ``model_final.pt``/``model_best.pt``, ``calibration.json``.
Every step is resumable: shards already written are verified and kept.
"""

import csv
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import tyro
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN_CONFIG = REPO / "configs" / "small_cpu.yaml"


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    """The main job on the embedded default data: shards, training, evaluation, report.

    Any other option (e.g. ``--epochs 1``) is an option of ``pipelines/train.py``, given after the YAML.
    """

    name: str = "quickstart"  # report folder: <runs_dir>/<name>
    runs_dir: str = "runs"  # parent of the report (and run) folder
    shards: str = "shards/synthetic"  # synthetic shard set (made if missing, verified if present)
    pairs: int = 2000  # synthetic pairs (80 % train, 10 % val, 10 % test)
    train_config: str = str(DEFAULT_TRAIN_CONFIG)  # YAML of pipelines/train.py (configs/small_cpu.yaml)
    eval_batches: int = 0  # evaluate only this many test batches (0: the whole split)
    train_overrides: tyro.conf.Suppress[tuple[str, ...]] = ()  # the other options, for pipelines/train.py


def _step(title: str, timings: dict[str, float]):
    class _Timer:
        def __enter__(self):
            print(f"\n=== {title} ===", flush=True)
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            timings[title] = time.perf_counter() - self.start
            if exc[0] is None:
                print(f"=== {title}: {timings[title]:.0f} s ===", flush=True)

    return _Timer()


def main(cfg: QuickstartConfig) -> Path:
    """Run the whole job; returns the report folder."""
    import torch

    from actr_core.calibration import CalibrationError
    from pipelines import calibrate as calibrate_pipe
    from pipelines import evaluate as evaluate_pipe
    from pipelines import make_shards as shards_pipe
    from pipelines import train as train_pipe

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    timings: dict[str, float] = {}
    run_dir = Path(cfg.runs_dir) / cfg.name
    report = run_dir / "REPORT.md"

    train_args = [cfg.train_config, "--name", cfg.name, "--runs-dir", cfg.runs_dir, "--shards", cfg.shards, *cfg.train_overrides]
    training, ray = train_pipe.parse_args(train_args)  # before any work: a bad option stops the job at once

    with _step("1/5 synthetic shards", timings):
        shards_pipe.main(shards_pipe.parse_args(["--source", "synthetic", "--out", cfg.shards, "--pairs", str(cfg.pairs)]))

    with _step("2/5 train (Ray Train, local)", timings):
        summary = train_pipe.main(training, ray)
    train_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())

    results = {}
    with _step("3/5 evaluate on the held-out test photos", timings):
        common = dict(shards=cfg.shards, split="test", limit=cfg.eval_batches, batch_size=8)
        results["trained"] = evaluate_pipe.main(
            evaluate_pipe.EvaluateConfig(checkpoint=str(run_dir / "model_best.pt"), out=str(run_dir / "eval"), **common)
        )

    with _step("4/5 calibrate the match confidence (fit on val, score on test)", timings):
        calibrate_cfg = calibrate_pipe.CalibrateConfig(
            checkpoint=run_dir / "model_best.pt", shards=cfg.shards, limit=cfg.eval_batches, batch_size=8
        )
        try:
            calibration: dict | str = calibrate_pipe.main(calibrate_cfg)
        except CalibrationError as err:  # e.g. a model too young to have wrong and right matches
            calibration = str(err)
            print(f"no calibration: {err}")

    with _step("5/5 report", timings):
        write_report(report, cfg, summary, results["trained"], timings, train_cfg, calibration=calibration)
    print(f"\nReport: {report.resolve()}")
    return run_dir


HEADLINE_ALPHAS = (0.05, 0.1)  # the table of REPORT.md (the paper's Table 1 reports 0.05, 0.1 and 0.15)
MEANING = (
    "What these numbers mean: the pairs are synthetic warps (rotation, scale, translation, perspective "
    "and a thin-plate spline, with colour jitter) of photos the model never saw in training; they "
    "measure whether the model learnt to match local image content under geometric change, not "
    "semantic correspondence between two instances of a category, and they are not comparable with "
    "SPair-71k or PF-PASCAL figures. Identity (zero motion) is the floor a model must beat; the "
    "classical peer fits one homography per pair, which these warps mostly are, so it is a strong "
    "geometric reference, not a semantic method."
)


def write_report(
    path: Path,
    cfg: QuickstartConfig,
    summary: dict,
    results,
    timings: dict,
    train_cfg: dict,
    calibration: dict | str | None = None,
) -> None:
    """A Markdown report a person can read: what ran, how well beside identity and the classical
    peer on the same pairs, how far its match confidence can be trusted (``calibration``: the
    report of :func:`pipelines.calibrate.main`, or why there is none), the learning curve, how long each step took,
    where the files are."""
    from actr_core.metrics import BOOTSTRAP_LEVEL, BOOTSTRAP_RESAMPLES, REFERENCE_LABELS, format_table, pck_difference
    from actr_core.viz import plot_learning_curve, plot_pck_curves
    from pipelines.make_shards import split_counts

    run_dir = path.parent
    curves = plot_pck_curves({"trained": results}, run_dir / "eval" / "pck_curve_trained.png")
    history = _read_history(run_dir / "metrics.csv")
    alpha = float(train_cfg["pck_alpha"])
    learning = plot_learning_curve(
        history, run_dir / "learning_curve.png", alpha=alpha, title=f"{train_cfg['model']}: training loss and validation PCK"
    )
    predictors = [str(p) for p in results["predictor"].values]
    overall = results["pck_image_overall"]
    rows = []
    for name in predictors:
        label = f"model `{train_cfg['model']}`" if name == "model" else REFERENCE_LABELS.get(name, name)
        cells = " | ".join(f"{100 * float(overall.sel(predictor=name, alpha=a)):.1f}" for a in HEADLINE_ALPHAS)
        rows.append(f"| {label} | {cells} |")
    if "classical_peer" not in predictors:
        rows.append("| classical peer | not run | not run |")
    differences = []
    for name in (p for p in predictors if p != "model"):
        parts = []
        for a in HEADLINE_ALPHAS:
            d = pck_difference(results, "model", name, a)
            parts.append(f"{100 * d.mean:+.1f} points [{100 * d.low:+.1f}, {100 * d.high:+.1f}] at α = {a:g}")
        differences.append(f"- model − {REFERENCE_LABELS.get(name, name)}: " + "; ".join(parts))
    n_pairs = int(results["n_pairs_scored_total"])
    n_train = dict(split_counts(cfg.pairs))["train"]
    photos = len(results["category"])
    attrs = results.attrs
    level = f"{100 * BOOTSTRAP_LEVEL:g} %"
    lines = [
        f"# {cfg.name}: ACTR on the embedded synthetic data",
        "",
        f"Model `{train_cfg['model']}` at {train_cfg['image_size']} px, trained from random weights on the "
        f"{n_train:,} training pairs of {cfg.shards} with {train_cfg['num_workers']} Ray workers; "
        f"scored on the {n_pairs} test pairs of {photos} photos held out from training and validation.",
        "",
        MEANING,
        "",
        "## Test split: the model beside identity and the classical peer (same pairs, same protocol)",
        "",
        f"PCK per image in %, protocol `{attrs.get('protocol')}`: {attrs.get('threshold_definition')}; "
        f"{attrs.get('coordinate_frame')}:",
        "",
        "| predictor | " + " | ".join(f"PCK@{a:g}" for a in HEADLINE_ALPHAS) + " |",
        "|---|" + "---|" * len(HEADLINE_ALPHAS),
        *rows,
        "",
        f"Differences with paired bootstrap {level} intervals ({BOOTSTRAP_RESAMPLES} resamples of the {n_pairs} pairs; "
        f"the pairs, not the {photos} photos, are resampled, so the intervals leave out photo-to-photo variation: "
        "see the per-photo rows below):",
        "",
        *differences,
        "",
        *_calibration_lines(calibration),
        f"![learning curve]({learning.relative_to(run_dir)})",
        "",
        f"![PCK curve]({curves.relative_to(run_dir)})",
        "",
        "## Validation during training (model selection on the validation split)",
        "",
        f"- untrained validation PCK@{alpha:g}: {_pct(summary.get('untrained_val_pck'))}",
        f"- best validation PCK@{alpha:g}: {_pct(summary['best_val_pck'])} (epoch {summary['best_epoch']})",
        f"- identity on the same validation pairs: {_pct(summary.get('identity_val_pck'))}; "
        f"classical peer: {_pct(summary.get('peer_val_pck'), missing='not run')}",
        "",
        "## Per photo, every α (test split)",
        "",
        "```",
        format_table(results, "image"),
        "```",
        "",
        "## Time per step (s)",
        "",
        *[f"- {k}: {v:.0f}" for k, v in timings.items()],
        "",
        "## Files",
        "",
        "- `eval/results.nc`: the full results, every predictor (xarray / netCDF)",
        "- `eval/table.txt`, figures `eval/*.png`, `"
        + str(curves.relative_to(run_dir))
        + "` and `"
        + str(learning.relative_to(run_dir))
        + "`",
        "- `metrics.csv`, `steps.csv`: per-epoch and per-step training metrics",
        "- `model_best.pt` (best on validation), `model_final.pt`: load with `actr_core.Matcher.from_checkpoint`",
        "- `calibration.json`: the confidence calibration, read by `Matcher.from_checkpoint` and `actr match --checkpoint`",
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # a crash never leaves half a report


def _calibration_lines(calibration: dict | str | None) -> list[str]:
    """The report's section on the calibrated match confidence (none when it was not run)."""
    from pipelines.calibrate import format_scores

    title = "## Match confidence: calibrated on validation, scored on test"
    if calibration is None:
        return []
    if isinstance(calibration, str):
        return [title, "", f"Not calibrated ({calibration}): `actr match` reports an uncalibrated confidence.", ""]
    from actr_core.calibration import FEATURE_DESCRIPTIONS

    c = calibration["calibration"]
    named = [FEATURE_DESCRIPTIONS.get(name, name) for name in c["features"]]
    measures = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
    return [
        title,
        "",
        f"`actr match` reports for each match a confidence: the probability that it is correct at α = {c['alpha']:g} "
        f"(PCK under the standard protocol, as in the table above), estimated from its {measures} by a logistic model fitted "
        f"on the {c['n_matches']} matches of {c['fitted_on']} (`calibration.json`: intercept {c['intercept']:.3f}, "
        f"slopes {', '.join(f'{v:.3f}' for v in c['slopes'])} on the logs of the measures, in that order). "
        "Matches with confidence > 0.5 are the confident ones; "
        "precision is the share of them that are correct, recall the share of the correct matches among them, "
        "AUC how well the confidence ranks correct above wrong matches (0.5: chance):",
        "",
        format_scores(calibration, "val", "test"),
        "",
    ]


def _read_history(path: Path) -> list[dict[str, float]]:
    """The rows of a training run's metrics.csv as numbers (empty cells as NaN)."""
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def _pct(value, missing: str = "n/a") -> str:
    return missing if value is None else f"{100 * float(value):.1f} %"


def parse_args(argv: Sequence[str], prog: str = "python -m pipelines.quickstart") -> QuickstartConfig:
    """Command line → :class:`QuickstartConfig`; options it does not know go to ``pipelines/train.py``."""
    from pipelines.entry import parse_config

    about = __doc__.split("\n\n")[0] + " Any other option (e.g. --epochs 1) goes to pipelines/train.py."
    cfg, extra = parse_config(QuickstartConfig, argv, prog=prog, description=about, return_unknown_args=True)
    return dataclasses.replace(cfg, train_overrides=tuple(extra))


def cli(argv: Sequence[str], prog: str = "python -m pipelines.quickstart") -> int:
    """Entry point: exit status 0 (user errors: see :mod:`pipelines.entry`)."""
    main(parse_args(argv, prog))
    return 0


if __name__ == "__main__":
    from pipelines.entry import run

    sys.exit(run(cli))
