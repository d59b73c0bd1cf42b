"""pipelines/train.py: configuration files and flags, Ray settings, the fault hook, and a Ray run killed mid-way.

The Ray test (marked ``slow``, about 1-2 minutes on 2 cores) trains a tiny ACTR with 2 gloo workers
on a tiny synthetic shard set, SIGKILLs one worker through the fault-injection hook in the second
epoch, and checks that Ray restarts from the last checkpoint and finishes with the expected steps.
"""

import csv
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from actr_core.training import TrainConfig, load_checkpoint, load_config, load_model_from_checkpoint
from pipelines import train
from pipelines.entry import UsageError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))  # the stand-in matcher of the training tests
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_file_is_valid(path):
    cfg, ray = train.parse_args([str(path)])
    assert cfg.name == path.stem and cfg == TrainConfig.from_dict(load_config(path))
    assert ray == train.ray_settings(train.split_settings(load_config(path))[1])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_names_a_registered_model(path):
    from actr_core.models import model_entries

    name = TrainConfig.from_dict(load_config(path)).model
    registered = {entry.name for entry in model_entries()}
    assert name in registered


def test_small_cpu_config_with_overrides():
    cfg, ray = train.parse_args([str(ROOT / "configs" / "small_cpu.yaml"), "--epochs", "1", "--num_workers", "1"])
    assert (cfg.epochs, ray.num_workers, ray.use_gpu) == (1, 1, False)
    assert cfg.image_size == 128  # from the YAML
    cfg, ray = train.parse_args(["--config", str(ROOT / "configs" / "small_cpu.yaml"), "--head-lr", "1e-3", "--no-val-peer"])
    assert (cfg.name, cfg.head_lr, cfg.val_peer, ray.cpus_per_worker) == ("small_cpu", 1e-3, False, 1)
    assert train.parse_args([])[0] == TrainConfig() and train.parse_args([])[1] == train.RaySettings()


def test_model_kwargs_flag_merges_into_the_yaml_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_kwargs: {image_size: [128, 128], warn_random_init: false, flow_sr: {depth: 2, heads: 4}}\n")
    cfg, _ = train.parse_args([str(path), "--model_kwargs", "{image_size: [64, 64], flow_sr: {heads: 2}}"])
    assert cfg.model_kwargs == {"image_size": [64, 64], "warn_random_init": False, "flow_sr": {"depth": 2, "heads": 2}}
    assert train.parse_args([str(path)])[0].model_kwargs["flow_sr"] == {"depth": 2, "heads": 4}


def test_a_0_1_0_run_config_routes_its_ray_settings_to_the_pipeline(tmp_path):
    from test_config import CONFIG_OF_0_1_0

    path = tmp_path / "config.yaml"  # what a 0.1.0 run folder holds
    path.write_text(yaml.safe_dump({**CONFIG_OF_0_1_0, "num_workers": 3, "use_gpu": "false", "epochs": 2}))
    cfg, ray = train.parse_args([str(path)])
    assert cfg == TrainConfig(epochs=2) and ray == train.RaySettings(num_workers=3)
    training, ray_values = train.split_settings(CONFIG_OF_0_1_0)
    assert set(ray_values) == {f.name for f in dataclasses.fields(train.RaySettings)}
    assert TrainConfig.from_dict(training) == TrainConfig()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "x"], "--epochs"),
        (["--bogus", "1"], "--bogus"),
        (["--batch-size", "0"], "batch_size"),
        (["--num-workers", "0"], "num_workers"),
        (["--model-kwargs", "[1, 2]"], "YAML mapping"),
        (["--lr-schedule", "step"], "lr_schedule"),
    ],
)
def test_bad_flags_are_usage_errors_naming_them(argv, message):
    with pytest.raises(UsageError, match=message):
        train.parse_args(argv)


def test_missing_config_file_is_a_file_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        train.parse_args([str(tmp_path / "none.yaml")])


def test_thread_budget():
    assert train._threads(TrainConfig(), train.RaySettings(cpus_per_worker=1)) == 1
    assert train._threads(TrainConfig(loader_workers=4), train.RaySettings(cpus_per_worker=6)) == 2
    assert train._threads(TrainConfig(loader_workers=4), train.RaySettings(cpus_per_worker=2)) == 1


def test_a_value_error_on_every_worker_is_a_user_error():
    from ray.train import WorkerGroupError

    too_small = ValueError("the 'train' split of s gives no full batch of 64 per worker with 2 workers; make more shards")
    error = WorkerGroupError("snippet", {0: too_small, 1: ValueError("the same")})
    assert str(train._user_error_of_workers(error)) == str(too_small)
    assert train._user_error_of_workers(WorkerGroupError("snippet", {0: too_small, 1: RuntimeError("a bug")})) is None
    assert train._user_error_of_workers(RuntimeError("not from the workers")) is None


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


def test_help_lists_every_setting_with_its_comment(capsys):
    with pytest.raises(SystemExit) as done:
        train.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--head-lr" in text and "--num-workers" in text and "--no-val-peer" in text
    assert "Ray Train workers (DDP ranks)" in text  # each field's comment is its help


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
        "--name", "fault", "--runs-dir", str(tmp_path / "runs"), "--shards", str(shards),
        "--model", "actr_tiny", "--model-kwargs", "{image_size: [64, 64], warn_random_init: false}",
        "--image-size", "64", "--batch-size", "2", "--val-batch-size", "4", "--epochs", str(epochs),
        "--steps-per-epoch", str(steps_per_epoch), "--head-lr", "3e-4", "--backbone-lr", "1e-4",
        "--no-augment", "--num-workers", "2", "--max-failures", "1", "--no-progress",
        "--checkpoints-to-keep", "1",
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
    assert sorted(final.rng) == [] and final.config["name"] == "fault" and "num_workers" not in final.config
    # every checkpoint file left in the run folder is complete and self-describing
    files = sorted(run.glob("checkpoints/*/checkpoint.pt"))
    assert files and all(load_checkpoint(p).builder == "actr_tiny" for p in files)
    assert sorted(load_checkpoint(files[-1]).rng) == [0, 1]  # both ranks' RNG states
    assert not list(run.rglob("*.tmp"))
    # retention after the restart follows the documented policy: the checkpoints_to_keep (1) best by
    # val_pck plus the latest, every folder one that Ray recorded (none left over from the killed attempt)
    pck = {int(r["epoch"]): float(r["val_pck"]) for r in metrics if int(r["epoch"]) > 0}
    kept = {int(p.parent.name.removeprefix("epoch_")) for p in files}
    assert len(list(run.glob("checkpoints/*"))) == len(files)
    best = [e for e in kept if e != epochs]
    assert epochs in kept and len(best) <= 1 and max(pck[e] for e in kept) == max(pck.values())
    assert all(pck[e] >= pck[d] for e in best for d in set(pck) - kept)
    snapshot = (run / "checkpoint_manager_snapshot.json").read_text()
    assert all(f"epoch_{e:03d}" in snapshot for e in kept)
    # the log: one line per epoch (rank 0 only, no per-rank report lines), none of Ray's known noise
    assert [log.count(f"epoch {e}/{epochs}  step ") for e in range(1, epochs + 1)] == [1, 1, 1]
    assert "resumed from epoch 1, step 2 (restart 1 of this run)" in log
    assert "Reporting training result" not in log and "it/s]" not in log
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in log.splitlines()]  # Ray colours its prefixes
    assert not [line for line in plain if train.ray_noise(re.sub(r"^\(.*? pid=\d+\) ", "", line))]
    # the best model is chosen on the validation split and rebuilds from its file alone
    best_pck = max(float(r["val_pck"]) for r in metrics if int(r["epoch"]) > 0)
    best_epochs = {int(r["epoch"]) for r in metrics if int(r["epoch"]) > 0 and float(r["val_pck"]) == best_pck}
    model, info = load_model_from_checkpoint(run / "model_best.pt")
    assert info["epoch"] in best_epochs and info["input_size"] == (64, 64)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64))
    assert out.flow.shape == (1, 2, 16, 16)
    assert yaml.safe_load((run / "config.yaml").read_text())["num_workers"] == 2  # flat, as 0.1.0 wrote it


def test_driver_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = train._absolute_paths(TrainConfig(runs_dir="runs", shards="s3://bucket/shards", resume="a/b.pt"))
    assert cfg.runs_dir == str(tmp_path.resolve() / "runs") and cfg.shards == "s3://bucket/shards"
    assert cfg.resume == str(tmp_path.resolve() / "a" / "b.pt")
    assert train._absolute_paths(TrainConfig()).resume == ""
