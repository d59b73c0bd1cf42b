"""benchmarks/bench_reader.py: both readers measured in their own processes, each importing its own tree,
and the training step's consumption measured with the config's model and batch size."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from actr_core.data import ShardSettings, SyntheticConfig, make_shards

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_reader.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "shards"
    settings = ShardSettings(
        pairs=(("train", 24), ("val", 1), ("test", 1)), size=(32, 48), samples_per_shard=6, synthetic=SyntheticConfig(n_kps=6)
    )
    make_shards(str(out), settings, progress=False)
    return out


def test_readers_and_step_are_measured_side_by_side(shards, tmp_path):
    """This tree stands in for the old one (a clean clone has no 0.1.0 checkout): the orchestration, the
    alternation, each child's import path and the consumption arithmetic are what is checked."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: actr_conv_tiny\nmodel_kwargs: {image_size: [64, 64], warn_random_init: false}\n"
        "image_size: 64\nbatch_size: 2\nnum_workers: 2\ncpus_per_worker: 1\nhead_lr: 1.0e-3\n"
    )
    out = tmp_path / "figures.json"
    command = [sys.executable, str(SCRIPT), "--shards", str(shards), "--old-tree", str(ROOT), "--repeats", "2",
               "--batch-size", "4", "--config", str(config), "--steps", "1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert [(r["reader"], r["repeat"]) for r in figures["runs"]] == [("new", 0), ("old", 0), ("new", 1), ("old", 1)]
    assert all(r["actr_core"] == str(ROOT / "actr_core" / "__init__.py") for r in figures["runs"])
    assert all(r["pairs"] == 24 - 4 for r in figures["runs"])  # 4 full batches per epoch, the first one untimed
    step = figures["step"]
    assert step["source"] == "measured" and step["batch_size"] == 2 and step["num_workers"] == 2
    assert figures["consumed_pairs_per_second"] == pytest.approx(2 * 2 / step["step_seconds"])
    assert figures["ratio"] == pytest.approx(figures["new_pairs_per_second"] / figures["consumed_pairs_per_second"])
    assert "new reader / consumption" in done.stdout


def test_missing_shards_and_a_foreign_old_tree_are_usage_errors(shards, tmp_path):
    for args, message in (
        (["--shards", str(tmp_path / "none")], "holds no manifest.json"),
        (["--shards", str(shards), "--old-tree", str(tmp_path)], "is not a checkout of actr_core"),
    ):
        done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False)
        assert done.returncode == 2 and message in done.stderr
