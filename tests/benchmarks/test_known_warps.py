"""benchmarks/known_warps.py: the generalisation check scores the model and both references on the same warps."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actr_core.api import Matcher, load_image
from actr_core.calibration import ConfidenceCalibration
from actr_core.models import build_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def known_warps():
    spec = importlib.util.spec_from_file_location("known_warps", ROOT / "benchmarks" / "known_warps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_recovers_pure_homographies_and_identity_does_not(known_warps):
    image = load_image(known_warps.default_photo())
    torch.manual_seed(0)
    matcher = Matcher(build_model("actr_conv_tiny", image_size=(64, 64), warn_random_init=False), (64, 64))
    row = known_warps.score_warps(matcher, image, strength=0.2, seeds=range(2), alpha=0.05)
    assert set(row) == {"model", "identity", "classical peer", "peer fall-backs"}
    # The warps are exact homographies of a textured photo: the peer fits them (unless it fell back).
    assert row["peer fall-backs"] == 0 and row["classical peer"] >= 95.0
    # Corners moved by up to 20 % of the image: most points move further than 5 % of its side.
    assert row["identity"] < 60.0
    assert 0.0 <= row["model"] <= 100.0
    calibration = ConfidenceCalibration(2.0, (-0.5, -0.5), 0.05, ("cycle", "flip"))
    scores = known_warps.score_warps(Matcher(matcher.model, (64, 64), calibration=calibration), image, 0.2, range(2), 0.05)
    assert scores["model"] == pytest.approx(row["model"])  # the mirrored pass changes no prediction
    for key in ("confidence precision", "confidence recall", "confidence auc"):
        assert math.isnan(scores[key]) or 0.0 <= scores[key] <= 1.0  # NaN: no match selected, or one kind only


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    script = ROOT / "benchmarks" / "known_warps.py"
    for args in ([str(tmp_path / "missing.pt")], [str(tmp_path / "missing.pt"), "--seeds", "0"]):
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("known_warps.py: error: ")
