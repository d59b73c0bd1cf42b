"""pipelines/train.py: configuration files, run outputs, the fault hook, and a Ray run killed mid-way.

The Ray test (marked ``slow``, about 1-2 minutes on 2 cores) trains a tiny ACTR with 2 gloo workers
on a tiny synthetic shard set, SIGKILLs one worker through the fault-injection hook in the second
epoch, and checks that Ray restarts from the last checkpoint and finishes with the expected steps.
"""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actr_core.training import TrainConfig, config_from_args, load_checkpoint, load_config, load_model_from_checkpoint
from pipelines import train

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))  # the stand-in matcher of the training tests
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_file_is_valid(path):
    cfg = TrainConfig.from_dict(load_config(path))
    assert cfg.name == path.stem


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_names_a_registered_model(path):
    from actr_core.models import model_entries

    name = TrainConfig.from_dict(load_config(path)).model
    registered = {entry.name for entry in model_entries()}
    assert name in registered


def test_small_cpu_config_with_overrides():
    cfg = config_from_args([str(ROOT / "configs" / "small_cpu.yaml"), "--epochs", "1", "--num_workers", "1"])
    assert (cfg.epochs, cfg.num_workers, cfg.use_gpu) == (1, 1, False)


def test_history_rows_and_epoch_lines_carry_the_references(tmp_path):
    from actr_core.training import ValidationResult

    scores = ValidationResult(loss=0.5, pck=0.25, batches=2, pairs=8, references={"identity": 0.5, "classical_peer": 0.875},
                              reference_fallbacks={"identity": 0, "classical_peer": 1})  # fmt: skip
    row = train._row(1, 10, [1.0], scores, {"heads": 1e-3}, 3.0, 0)
    assert (row["identity_val_pck"], row["peer_val_pck"], row["peer_val_fallbacks"]) == (0.5, 0.875, 1)
    line = train._epoch_line(row, 2, 0.1)
    assert "val_PCK@0.1 25.00% (identity 50.00%, peer 87.50%)" in line
    no_peer = train._row(2, 20, [1.0], ValidationResult(0.5, 0.25, 2, 8, {"identity": 0.5}, {"identity": 0}), {}, 3.0, 0)
    assert math.isnan(no_peer["peer_val_pck"]) and "(identity 50.00%, peer not run)" in train._epoch_line(no_peer, 2, 0.1)
    assert train._reference_score(row, "peer_val_pck") == 0.875 and train._reference_score(no_peer, "peer_val_pck") is None
    assert train._reference_count(row, "peer_val_fallbacks") == 1 and train._reference_score({}, "peer_val_pck") is None
    # a run resumed from a checkpoint written before the reference columns: every column is kept
    old = {k: v for k, v in row.items() if not k.startswith(("identity_", "peer_"))}
    train._write_csv(tmp_path / "metrics.csv", [old, row])
    rows = _rows(tmp_path / "metrics.csv")
    assert rows[0]["identity_val_pck"] == "" and rows[1]["identity_val_pck"] == "0.5"
    assert config_from_args(["--val_peer", "false"]).val_peer is False and TrainConfig().val_peer


def test_thread_budget():
    assert train._threads(TrainConfig(cpus_per_worker=1)) == 1
    assert train._threads(TrainConfig(cpus_per_worker=6, loader_workers=4)) == 2
    assert train._threads(TrainConfig(cpus_per_worker=2, loader_workers=4)) == 1


def test_fault_hook_fires_once_on_the_chosen_rank_and_step(tmp_path, monkeypatch):
    kills = []
    monkeypatch.setattr(train.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    fault = {"step": 3, "rank": 1, "marker": str(tmp_path / ".fault")}
    train._maybe_inject_fault(fault, rank=0, step=3)
    train._maybe_inject_fault(fault, rank=1, step=2)
    assert kills == []
    train._maybe_inject_fault(fault, rank=1, step=3)
    train._maybe_inject_fault(fault, rank=1, step=3)  # the marker exists: no second kill
    assert len(kills) == 1 and (tmp_path / ".fault").exists()
    train._maybe_inject_fault({"step": 0, "rank": 0, "marker": str(tmp_path / "x")}, rank=0, step=0)
    assert len(kills) == 1


def test_fault_settings_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(train.FAULT_STEP_ENV, "7")
    monkeypatch.setenv(train.FAULT_RANK_ENV, "1")
    assert train._fault_settings(tmp_path) == {"step": 7, "rank": 1, "marker": str(tmp_path / train.FAULT_MARKER)}
    monkeypatch.delenv(train.FAULT_STEP_ENV)
    assert train._fault_settings(tmp_path)["step"] == 0


def test_help_lists_the_settings(capsys):
    assert train.cli(["--help"]) == {}
    assert "head_lr" in capsys.readouterr().out


def _tiny_shards(path: Path) -> Path:
    from actr_core.data import ShardSettings, make_shards

    settings = ShardSettings(
        source="synthetic",
        splits=("train", "val"),
        pairs=(("train", 16), ("val", 4)),
        size=(64, 64),
        samples_per_shard=4,
    )
    make_shards(str(path), settings, progress=False)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ray_run_survives_a_killed_worker_and_resumes_from_the_last_checkpoint(tmp_path):
    shards = _tiny_shards(tmp_path / "shards")
    epochs, steps_per_epoch, kill_after = 3, 2, 3  # the kill lands in epoch 2, after epoch 1's checkpoint
    args = [
        "--name", "fault", "--runs_dir", str(tmp_path / "runs"), "--shards", str(shards),
        "--model", "actr_tiny", "--model_kwargs", "{image_size: [64, 64], warn_random_init: false}",
        "--image_size", "64", "--batch_size", "2", "--val_batch_size", "4", "--epochs", str(epochs),
        "--steps_per_epoch", str(steps_per_epoch), "--head_lr", "3e-4", "--backbone_lr", "1e-4",
        "--augment", "false", "--num_workers", "2", "--max_failures", "1", "--progress", "false",
        "--checkpoints_to_keep", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({train.FAULT_STEP_ENV: str(kill_after), train.FAULT_RANK_ENV: "1", "HF_HUB_OFFLINE": "1"})
    # The failure under test is the injected one: Ray's own out-of-memory killer (which acts on the
    # whole machine's memory, other processes included) must not add a second, unplanned one.
    env["RAY_memory_monitor_refresh_ms"] = "0"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "train.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    run = tmp_path / "runs" / "fault"
    assert (run / train.FAULT_MARKER).read_text().startswith("killed rank 1 after step 3")
    # the run finished with the expected number of steps, each epoch recorded once, epochs 2-3 after a restart
    metrics = _rows(run / "metrics.csv")
    assert [int(r["epoch"]) for r in metrics] == [0, 1, 2, 3]
    # the references are scored on the same validation pairs every epoch (computed once, even across the restart)
    assert len({r["identity_val_pck"] for r in metrics}) == 1 and 0.0 <= float(metrics[0]["identity_val_pck"]) <= 1.0
    assert len({r["peer_val_pck"] for r in metrics}) == 1 and 0.0 <= float(metrics[0]["peer_val_pck"]) <= 1.0
    assert "(identity " in log and "summary:" in log and "identity_val_pck: " in log and "peer_val_pck: " in log
    assert [int(r["restarts"]) for r in metrics] == [0, 0, 1, 1]
    assert [int(r["step"]) for r in metrics] == [0, 2, 4, 6]
    assert [int(r["step"]) for r in _rows(run / "steps.csv")] == list(range(1, 7))
    final = load_checkpoint(run / "model_final.pt")
    assert (final.epoch, final.step) == (epochs, epochs * steps_per_epoch)
    assert sorted(final.rng) == [] and final.config["name"] == "fault"
    # every checkpoint file left in the run folder is complete and self-describing
    files = sorted(run.glob("checkpoints/*/checkpoint.pt"))
    assert files and all(load_checkpoint(p).builder == "actr_tiny" for p in files)
    assert sorted(load_checkpoint(files[-1]).rng) == [0, 1]  # both ranks' RNG states
    assert not list(run.rglob("*.tmp"))
    # the best model is chosen on the validation split and rebuilds from its file alone
    best_pck = max(float(r["val_pck"]) for r in metrics if int(r["epoch"]) > 0)
    best_epochs = {int(r["epoch"]) for r in metrics if int(r["epoch"]) > 0 and float(r["val_pck"]) == best_pck}
    model, info = load_model_from_checkpoint(run / "model_best.pt")
    assert info["epoch"] in best_epochs and info["input_size"] == (64, 64)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64))
    assert out.flow.shape == (1, 2, 16, 16)
    assert (run / "config.yaml").exists()


def test_driver_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = train._absolute_paths(TrainConfig(runs_dir="runs", shards="s3://bucket/shards", resume="a/b.pt"))
    assert cfg.runs_dir == str(tmp_path.resolve() / "runs") and cfg.shards == "s3://bucket/shards"
    assert cfg.resume == str(tmp_path.resolve() / "a" / "b.pt")
    assert train._absolute_paths(TrainConfig()).resume == ""


def _save_epoch(run_dir: Path, epoch: int) -> Path:
    from training_toys import TOY_NAME, ToyMatcher  # noqa: F401  (registers the stand-in)

    from actr_core.training import save_checkpoint

    path = run_dir / train.CHECKPOINTS_DIR / f"epoch_{epoch:03d}" / "checkpoint.pt"
    return save_checkpoint(path, model=ToyMatcher(), builder=TOY_NAME, epoch=epoch, step=10 * epoch)


def test_resume_source_prefers_the_newest_complete_checkpoint_of_the_run(tmp_path):
    cfg = TrainConfig(name="r", runs_dir=str(tmp_path))
    assert train._resume_source(cfg, None) == (None, False)
    _save_epoch(cfg.run_dir, 1)
    newest = _save_epoch(cfg.run_dir, 2)
    broken = cfg.run_dir / train.CHECKPOINTS_DIR / "epoch_003" / "checkpoint.pt"
    broken.parent.mkdir()
    broken.write_bytes(newest.read_bytes()[:100])  # e.g. a copy cut short by a crash
    ckpt, own = train._resume_source(cfg, None)
    assert own and ckpt.epoch == 2


def test_resume_option_when_the_run_has_no_checkpoint(tmp_path):
    other = _save_epoch(tmp_path / "other", 4)
    cfg = TrainConfig(name="fresh", runs_dir=str(tmp_path), resume=str(other))
    ckpt, own = train._resume_source(cfg, None)
    assert not own and ckpt.step == 40
