"""pipelines/calibrate.py and its place in the main job: fitted on the validation split, written beside
the checkpoint, scored on the test split, reported in REPORT.md."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actr_core.blocks import masked_flow_loss
from actr_core.calibration import CALIBRATION_FILE, ConfidenceCalibration
from actr_core.data import ShardSettings, make_shards
from actr_core.models import CorrespondenceModel, MatchOutput, model_entries, register_model
from actr_core.training import save_checkpoint
from pipelines import calibrate
from pipelines.entry import run as run_command

DIFF_MODEL = "calibration_test_difference"  # registered below, for the checkpoint to be rebuilt


class DifferenceModel(CorrespondenceModel):
    """Moves each cell along x by the local image difference: no motion where both images agree, so its
    cycle error grows where the pair differs, which is also where zero motion is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, src, trg):
        difference = F.avg_pool2d((src - trg).abs().mean(1, keepdim=True), 4)
        return MatchOutput(flow=torch.cat([self.gain * difference, torch.zeros_like(difference)], 1))

    def loss(self, output, batch):
        return masked_flow_loss(output.flow, batch.flow, batch.valid_flow)


if DIFF_MODEL not in {entry.name for entry in model_entries()}:
    register_model(DIFF_MODEL)(DifferenceModel)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    settings = ShardSettings(
        source="synthetic", splits=("val", "test"), pairs=(("val", 12), ("test", 12)), size=(64, 64), samples_per_shard=6
    )
    make_shards(str(root / "shards"), settings, progress=False)
    save_checkpoint(root / "run" / "model_best.pt", model=DifferenceModel(), builder=DIFF_MODEL, config={"image_size": 64})
    return root


def test_fitted_on_validation_written_beside_the_checkpoint_scored_on_test(run, capsys):
    args = ["--checkpoint", str(run / "run" / "model_best.pt"), "--shards", str(run / "shards"), "--batch-size", "5"]
    report = calibrate.main(calibrate.parse_args(args))
    saved = ConfidenceCalibration.load(run / "run" / CALIBRATION_FILE)
    assert report["path"] == str(run / "run" / CALIBRATION_FILE) and saved.features and all(v < 0 for v in saved.slopes)
    assert saved.fitted_on == f"{run / 'shards'} split val" and saved.n_matches == report["fit"]["matches"]
    assert report["fit"]["matches"] > 100 and report["test"]["matches"] > 100 and 0 < report["test"]["correct_rate"] < 1
    assert report["fit"]["auc"] > 0.5  # the difference model's cycle error ranks its matches on the data it was fitted on
    out = capsys.readouterr().out
    assert "| val (fitted on) |" in out and "| test (held out) |" in out and "precision | recall | AUC" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint", "x.pt", "--fit-split", "test"], "--fit-split and --test-split must differ, both are 'test'"),
        (["--checkpoint", "x.pt", "--alpha", "0"], "--alpha must be > 0 and --min-confidence in [0, 1], got 0.0, 0.5"),
        (["--checkpoint", "missing.pt"], "missing.pt"),
    ],
)
def test_user_errors_are_one_line_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_command(calibrate.cli, argv, prog="python -m pipelines.calibrate") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
