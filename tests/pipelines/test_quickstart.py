"""The main job's report: the model beside identity and the classical peer, bootstrap intervals,
the learning curve, per-photo rows; written whole or not at all."""

import csv

import pytest

from actr_core.data import collate
from actr_core.data.samples import build_sample
from actr_core.data.synthetic import SyntheticConfig, SyntheticPairs
from actr_core.metrics import IdentityPredictor, evaluate
from pipelines import quickstart


def _history(path):
    nan = float("nan")
    rows = [
        {
            "epoch": 0,
            "step": 0,
            "train_loss": nan,
            "val_loss": 9.0,
            "val_flow_epe": 5.0,
            "val_pck": 0.05,
            "identity_val_pck": 0.2225,
            "peer_val_pck": nan,
            "peer_val_fallbacks": nan,
        },
        {
            "epoch": 1,
            "step": 10,
            "train_loss": 6.0,
            "val_loss": 5.0,
            "val_flow_epe": 3.0,
            "val_pck": 0.4,
            "identity_val_pck": 0.2225,
            "peer_val_pck": nan,
            "peer_val_fallbacks": nan,
        },
    ]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_report_puts_every_score_beside_identity_and_says_what_it_means(tmp_path):
    run = tmp_path / "runs" / "qs"
    (run / "eval").mkdir(parents=True)
    _history(run / "metrics.csv")
    reader = SyntheticPairs("test", 6, config=SyntheticConfig(size=(64, 64)))
    batches = [collate([build_sample(reader.load(i), 64) for i in range(j, j + 3)]) for j in (0, 3)]
    # the model's place taken by a zero-motion predictor: the report, not the model, is under test
    results = evaluate(IdentityPredictor(), batches, references=("identity",), progress=False)
    cfg = quickstart.QuickstartConfig(name="qs", runs_dir=str(tmp_path / "runs"), pairs=2000)
    summary = {"untrained_val_pck": 0.05, "best_val_pck": 0.4, "best_epoch": 1, "identity_val_pck": 0.2225, "peer_val_pck": None}
    train_cfg = {"model": "toy", "image_size": 48, "num_workers": 2, "pck_alpha": 0.1}
    quickstart.write_report(run / "REPORT.md", cfg, summary, results, {"1/5 synthetic shards": 17.0}, train_cfg, CALIBRATION)

    text = (run / "REPORT.md").read_text()
    photos = len(results["category"])
    assert "1,600 training pairs" in text and f"6 test pairs of {photos} photos" in text
    assert "| model `toy` |" in text and "| identity |" in text
    assert "| classical peer | not run | not run |" in text
    assert "- model − identity: " in text and "at α = 0.05" in text and "at α = 0.1" in text
    assert f"the pairs, not the {photos} photos, are resampled" in text
    assert quickstart.MEANING in text
    assert "classical peer: not run" in text  # the per-photo table says so too
    assert "identity on the same validation pairs: 22.2 %; classical peer: not run" in text
    assert (run / "learning_curve.png").stat().st_size > 0 and (run / "eval" / "pck_curve_trained.png").stat().st_size > 0
    assert not list(run.glob(".*.tmp"))  # written to a temporary name, then renamed
    assert "## Match confidence: calibrated on validation, scored on test" in text
    assert "| val (fitted on) | 4000 | 87.1 % | 3867 | 0.889 | 0.987 | 0.816 |" in text
    assert "| test (held out) | 4000 | 77.9 % | 3904 | 0.788 | 0.988 | 0.728 |" in text
    assert "fitted on the 4000 matches of shards/synthetic split val" in text and "`calibration.json`" in text
    assert "estimated from its relative cycle error (to the target" in text and "and relative flip error (how far" in text
    assert "slopes -1.230, -0.610 on the logs of the measures" in text


CALIBRATION = {  # a report of pipelines.calibrate.main
    "calibration": {
        "intercept": -3.05,
        "slopes": [-1.23, -0.61],
        "alpha": 0.1,
        "features": ["cycle", "flip"],
        "fitted_on": "shards/synthetic split val",
        "n_matches": 4000,
    },
    "path": "runs/qs/calibration.json",
    "fit": {"precision": 0.8886, "recall": 0.9866, "auc": 0.8161, "selected": 3867, "matches": 4000, "correct_rate": 0.87075},
    "test": {"precision": 0.7884, "recall": 0.9876, "auc": 0.7279, "selected": 3904, "matches": 4000, "correct_rate": 0.77925},
}


def test_report_says_when_the_confidence_could_not_be_calibrated():
    lines = quickstart._calibration_lines("fitting needs at least 2 correct and 2 wrong matches, got 0 and 160")
    assert "Not calibrated (fitting needs at least 2 correct and 2 wrong matches, got 0 and 160)" in "\n".join(lines)
    assert quickstart._calibration_lines(None) == []


@pytest.mark.slow
def test_the_main_job_runs_end_to_end_and_exits_0(tmp_path, monkeypatch):
    """``actr quickstart`` on a small shard set, one short epoch: shards, Ray training, evaluation, report."""
    from pipelines.cli import main

    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")  # only Ray's own killer could fail this run
    monkeypatch.chdir(tmp_path)
    argv = ["quickstart", "--name", "qs", "--runs-dir", "runs", "--shards", "shards", "--pairs", "400", "--eval-batches", "1",
            "--epochs", "1", "--steps-per-epoch", "2", "--no-val-peer", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = (tmp_path / "runs" / "qs" / "REPORT.md").read_text()
    assert "| model `actr_conv_tiny` |" in report and "| identity |" in report
    assert "## Match confidence: calibrated on validation, scored on test" in report  # fitted, or why not
    assert (tmp_path / "runs" / "qs" / "model_best.pt").exists()
