"""The main job on the embedded default data, in one command.

    python -m pipelines.quickstart            (or: actr quickstart; or: bash scripts/quickstart.sh)

Steps: synthetic shards from scikit-image's bundled photos (``pipelines/make_shards.py``) → train
the small CPU configuration with Ray Train, started in-process (``pipelines/train.py`` with
``configs/small_cpu.yaml``) → evaluate the untrained and the trained model on the held-out test
photos (``pipelines/evaluate.py``) → a report folder ``runs/<name>/``: ``REPORT.md`` (PCK table,
trained vs untrained), ``eval/results.nc``, the figures, ``model_final.pt``/``model_best.pt``.
Every step is resumable: shards already written are verified and kept.
"""

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN_CONFIG = REPO / "configs" / "small_cpu.yaml"


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    """The main job's settings; the defaults fit 2 CPU cores in about 10 minutes."""

    name: str = "quickstart"  # report folder: <runs_dir>/<name>
    runs_dir: str = "runs"
    shards: str = "shards/synthetic"  # synthetic shard set (made if missing, verified if present)
    pairs: int = 2000  # synthetic pairs (80 % train, 10 % val, 10 % test)
    train_config: str = str(DEFAULT_TRAIN_CONFIG)  # YAML of pipelines/train.py
    train_overrides: tuple[str, ...] = ()  # extra "--key value" words for pipelines/train.py
    eval_batches: int = 0  # evaluate only this many test batches (0: the whole split)


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

    from pipelines import evaluate as evaluate_pipe
    from pipelines import make_shards as shards_pipe
    from pipelines import train as train_pipe

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    timings: dict[str, float] = {}
    run_dir = Path(cfg.runs_dir) / cfg.name
    report = run_dir / "REPORT.md"

    with _step("1/4 synthetic shards", timings):
        shards_pipe.main(shards_pipe.parse_args(["--source", "synthetic", "--out", cfg.shards, "--pairs", str(cfg.pairs)]))

    with _step("2/4 train (Ray Train, local)", timings):
        train_args = [
            cfg.train_config,
            "--name", cfg.name,
            "--runs_dir", cfg.runs_dir,
            "--shards", cfg.shards,
            *cfg.train_overrides,
        ]  # fmt: skip
        summary = train_pipe.main(train_pipe.config_from_args(train_args))
    train_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())

    results = {}
    with _step("3/4 evaluate on the held-out test photos", timings):
        common = dict(shards=cfg.shards, split="test", limit=cfg.eval_batches, batch_size=8)
        results["trained"] = evaluate_pipe.main(
            evaluate_pipe.EvaluateConfig(checkpoint=str(run_dir / "model_best.pt"), out=str(run_dir / "eval"), **common)
        )

    with _step("4/4 report", timings):
        write_report(report, cfg, summary, results["trained"], timings, train_cfg)
    print(f"\nReport: {report.resolve()}")
    return run_dir


def write_report(path: Path, cfg: QuickstartConfig, summary: dict, results, timings: dict, train_cfg: dict) -> None:
    """A Markdown report a person can read: what ran, how long, how well, where the files are."""
    from actr_core.metrics import format_table
    from actr_core.viz import plot_pck_curves

    run_dir = path.parent
    curves = plot_pck_curves({"trained": results}, run_dir / "eval" / "pck_curve_trained.png")
    lines = [
        f"# {cfg.name}: ACTR on the embedded synthetic data",
        "",
        f"Model `{train_cfg['model']}` at {train_cfg['image_size']} px, trained from random weights on "
        f"{cfg.pairs} synthetic pairs ({cfg.shards}) with {train_cfg['num_workers']} Ray workers.",
        "",
        "## Validation during training (model selection on the validation split)",
        "",
        f"- untrained validation PCK@{train_cfg['pck_alpha']}: {_pct(summary.get('untrained_val_pck'))}",
        f"- best validation PCK@{train_cfg['pck_alpha']}: {_pct(summary['best_val_pck'])} (epoch {summary['best_epoch']})",
        "",
        "## Test split (held-out photos), standard protocol",
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
        "- `eval/results.nc`: the full results (xarray / netCDF)",
        "- `eval/table.txt`, figures `eval/*.png` and `" + str(curves.relative_to(run_dir)) + "`",
        "- `metrics.csv`, `steps.csv`: per-epoch and per-step training metrics",
        "- `model_best.pt` (best on validation), `model_final.pt`: load with `actr_core.Matcher.from_checkpoint`",
    ]
    path.write_text("\n".join(lines) + "\n")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f} %"


def parse_args(argv: Sequence[str] | None = None) -> QuickstartConfig:
    defaults = QuickstartConfig()
    p = argparse.ArgumentParser(prog="actr quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=defaults.name)
    p.add_argument("--runs-dir", default=defaults.runs_dir)
    p.add_argument("--shards", default=defaults.shards)
    p.add_argument("--pairs", type=int, default=defaults.pairs)
    p.add_argument("--train-config", default=defaults.train_config)
    p.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    args, extra = p.parse_known_args(argv)
    return QuickstartConfig(
        name=args.name,
        runs_dir=args.runs_dir,
        shards=args.shards,
        pairs=args.pairs,
        train_config=args.train_config,
        train_overrides=tuple(extra),
        eval_batches=args.eval_batches,
    )


def cli(argv: Sequence[str] | None = None) -> Path:
    return main(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    cli()
