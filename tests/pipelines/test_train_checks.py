"""pipelines/train.py before Ray starts: the driver's checks (one-line user errors, exit status 2), run
names, picklable errors (through pickle and a real Ray worker), and the allow-list of Ray's noise."""

import importlib
import json
import logging
import pickle
import pkgutil
from pathlib import Path

import pytest
import torch
import yaml

import actr_core
import pipelines
from actr_core.training import TrainConfig, build_optimizer, build_scheduler, export_model, save_checkpoint
from pipelines import train
from pipelines.entry import run

TINY = {"image_size": [64, 64], "warn_random_init": False}


@pytest.fixture
def shards(tiny_train_shards: Path) -> Path:
    return tiny_train_shards


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the driver gets as far as starting Ray."""

    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(train, "_init_ray", started)


def _argv(shards: Path, runs: Path, *more: str) -> list[str]:
    return [
        "--name", "r", "--runs-dir", str(runs), "--shards", str(shards), "--model", "actr_tiny",
        "--model-kwargs", json.dumps(TINY), "--image-size", "64", "--batch-size", "2", "--num-workers", "2", *more,
    ]  # fmt: skip


def _cfg(shards: Path, runs: Path, *more: str) -> tuple[TrainConfig, train.RaySettings]:
    cfg, ray_cfg = train.parse_args(_argv(shards, runs, *more))
    return train._absolute_paths(cfg), ray_cfg


def _fails(argv: list[str], capsys) -> str:
    """Run the command as `python pipelines/train.py` does: exit status 2 and one line on stderr."""
    assert run(train.cli, argv, prog="train.py") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_the_checks_pass_on_a_good_setting(shards, tmp_path):
    assert train.preflight(*_cfg(shards, tmp_path)) is False  # a new run


def test_a_missing_shard_set(tmp_path, capsys, no_ray):
    err = _fails(_argv(tmp_path / "nowhere", tmp_path / "runs"), capsys)
    assert "no shard set there (no manifest.json)" in err and not (tmp_path / "runs").exists()


def test_an_incomplete_or_inconsistent_manifest(shards, tmp_path, capsys, no_ray):
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((shards / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    assert "complete" in _fails(_argv(broken, tmp_path / "runs"), capsys)
    assert train.preflight(*_cfg(broken, tmp_path / "runs", "--allow-incomplete")) is False  # asked for: accepted, said
    assert "training on an incomplete shard set" in capsys.readouterr().err
    manifest["totals"]["samples"] += 1
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert "total" in _fails(_argv(broken, tmp_path / "runs"), capsys)


def test_a_split_that_is_not_there_or_too_small(shards, tmp_path, capsys, no_ray):
    assert "no 'test' split (it has ['train', 'val'])" in _fails(_argv(shards, tmp_path, "--val-split", "test"), capsys)
    assert "no full batch of 8 per worker" in _fails(_argv(shards, tmp_path, "--batch-size", "8"), capsys)


def test_an_image_size_the_model_cannot_take(shards, tmp_path, capsys, no_ray):
    err = _fails(_argv(shards, tmp_path, "--image-size", "100"), capsys)
    assert "image_size 100 does not fit model 'actr_tiny'" in err and "multiples of 16" in err
    assert "no model named 'nope'" in _fails(_argv(shards, tmp_path, "--model", "nope"), capsys)


def _checkpoint(path: Path, builder: str, kwargs: dict) -> Path:
    from actr_core.models import build_model

    model = build_model(builder, **kwargs)
    optimizer = build_optimizer(model, backbone_lr=1e-4, head_lr=1e-4, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, total_steps=4, warmup_steps=0, schedule="constant", min_ratio=0.0)
    return save_checkpoint(path, model=model, builder=builder, builder_kwargs=kwargs, optimizer=optimizer, scheduler=scheduler)


def test_a_resume_path_that_is_missing_foreign_or_of_another_model(shards, tmp_path, capsys, no_ray):
    assert "no checkpoint file at" in _fails(_argv(shards, tmp_path, "--resume", str(tmp_path / "none.pt")), capsys)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    assert "not an actr_core training checkpoint" in _fails(_argv(shards, tmp_path, "--resume", str(foreign)), capsys)
    other = _checkpoint(tmp_path / "conv.pt", "actr_conv_tiny", TINY)
    err = _fails(_argv(shards, tmp_path, "--resume", str(other)), capsys)
    assert "a checkpoint of model 'actr_conv_tiny'; this run trains 'actr_tiny'" in err
    wider = _checkpoint(tmp_path / "wide.pt", "actr_tiny", {**TINY, "image_size": [128, 128]})
    err = _fails(_argv(shards, tmp_path, "--resume", str(wider)), capsys)  # same builder, other weights
    assert "do not fit the model of builder 'actr_tiny'" in err and "other shapes" in err
    same = _checkpoint(tmp_path / "same.pt", "actr_tiny", TINY)
    exported = export_model(same, tmp_path / "model_best.pt")
    assert "cannot be resumed" in _fails(_argv(shards, tmp_path, "--resume", str(exported)), capsys)
    assert train.preflight(*_cfg(shards, tmp_path, "--resume", str(same))) is False


def test_a_device_the_machine_lacks(shards, tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--use-gpu: 0 CUDA GPU(s) visible to this process for 2 workers" in _fails(
        _argv(shards, tmp_path, "--use-gpu"), capsys
    )


def test_a_run_name_reused_with_other_settings_is_refused_before_ray_starts(shards, tmp_path, capsys, no_ray):
    cfg, ray_cfg = _cfg(shards, tmp_path)
    cfg.run_dir.mkdir(parents=True)
    saved = yaml.safe_dump(train._settings(cfg, ray_cfg), sort_keys=False)
    (cfg.run_dir / "config.yaml").write_text(saved)
    assert train.check_run_name(cfg, ray_cfg) is True  # the same settings: continued
    assert train.check_run_name(cfg, ray_cfg.__class__(**{**ray_cfg.__dict__, "max_failures": 3})) is True
    err = _fails(_argv(shards, tmp_path, "--model", "actr_conv_tiny", "--epochs", "3"), capsys)
    assert "run 'r'" in err and "was started with other settings" in err
    assert "model 'actr_tiny' there, 'actr_conv_tiny' now" in err and "epochs 10 there, 3 now" in err
    assert "image_size" not in err  # only the settings that differ are named
    assert (cfg.run_dir / "config.yaml").read_text() == saved  # never overwritten by a refused run


def test_a_0_1_0_run_folder_is_compared_by_its_values(shards, tmp_path):
    cfg, ray_cfg = _cfg(shards, tmp_path)
    cfg.run_dir.mkdir(parents=True)
    values = {k: str(v) if isinstance(v, (bool, int)) else v for k, v in train._settings(cfg, ray_cfg).items()}
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(values))  # e.g. "2" for 2, "True" for true
    assert train.check_run_name(cfg, ray_cfg) is True


# ----------------------------------------------------------------------------------------------
# Errors cross process boundaries


def _custom_exceptions() -> list[type[BaseException]]:
    """Every exception class defined in actr_core or pipelines."""
    for package in (actr_core, pipelines):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    found, todo = set(), [BaseException]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.split(".")[0] in ("actr_core", "pipelines"):
                found.add(sub)
    return sorted(found, key=lambda cls: cls.__qualname__)


def _instance(cls: type[BaseException]) -> BaseException:
    try:
        return cls("shards/x/train-000.tar", "sha256 differs from the manifest")
    except TypeError:
        return cls("shards/x/train-000.tar: sha256 differs from the manifest")


def test_every_custom_exception_pickles_with_its_message():
    classes = _custom_exceptions()
    names = {cls.__name__ for cls in classes}
    assert {"DataError", "CheckpointError", "OfficialCheckpointError", "ImageError", "UsageError"} <= names
    for cls in classes:
        error = _instance(cls)
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is cls and str(back) == str(error) and vars(back) == vars(error)


@pytest.mark.slow
def test_every_custom_exception_reaches_the_driver_from_a_ray_worker_with_its_message():
    import ray

    ray.init(address="local", num_cpus=1, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote(max_retries=0)
        def fail(error: BaseException) -> None:
            raise error

        for cls in _custom_exceptions():
            error = _instance(cls)
            with pytest.raises(cls) as raised:
                ray.get(fail.remote(error))
            assert str(error) in str(raised.value)
            if cls.__name__ == "DataError":
                assert (raised.value.where, raised.value.reason) == (error.where, error.reason)
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------------
# Ray's noise

NOISE = [
    "Started a local Ray instance.",
    "Requesting resources: {'CPU': 1} * 2",
    "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 1}] * 2",
    "Started training worker group of size 2: ",
    "- (ip=127.0.0.1, pid=24879) world_rank=0, local_rank=0, node_rank=0",
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor.",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "Moving model to device: cpu",
    "Wrapping provided model in DistributedDataParallel.",
    "Reporting training result 2: TrainingReport(checkpoint=None, metrics={'epoch': 1})",
    "A run snapshot was found in storage folder at: '/tmp/runs/t2'",
    "This snapshot contains a list of checkpoints reported via `ray.train.report` and will be loaded.",
    "If you meant to start a brand new training job without any information about previous checkpoints found in "
    "this directory, please configure a new, unique `RunConfig(name)` or delete the existing folder at '/tmp/runs/t2'",
]
REAL = [
    "[2026-12-03 04:08:27,697 E 24319 24330] (raylet) file_system_monitor.cc:116: /tmp/ray is over 95% full",
    "A worker died or was killed while executing a task by an unexpected system error.",
    "Retrying training after failure (1/1)",
    "epoch 1/2  step 2  train_loss 5.2928  val_loss 5.0896  val_EPE 5.090px  val_PCK@0.1 5.00%",
    "UserWarning: the backbone is randomly initialised",
    "Failed to query the GCS",
    "Failed to send resource request for train-f87a. If this only happens transiently during network partition",
    "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
]


def test_the_allow_list_matches_ray_noise_and_nothing_else():
    assert [line for line in NOISE if not train.ray_noise(line)] == []
    assert [line for line in REAL if train.ray_noise(line)] == []


def test_forwarded_noise_is_dropped_and_real_lines_still_show(caplog):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    seen = []
    dispatcher.add_handler("test_sink", lambda batch: seen.append(batch["lines"]))
    try:
        undo = train.quiet_ray_logs()
        dispatcher.emit({"pid": 1, "ip": "127.0.0.1", "is_err": False, "lines": NOISE + REAL})
        dispatcher.emit({"pid": 1, "ip": "127.0.0.1", "is_err": False, "lines": NOISE})  # nothing left: not printed
        logging.getLogger("ray").handlers[0].handle(logging.makeLogRecord({"msg": NOISE[0], "levelno": logging.INFO}))
        undo()
        dispatcher.emit({"pid": 1, "ip": "127.0.0.1", "is_err": False, "lines": NOISE[:1]})  # undone: all lines again
    finally:
        dispatcher.remove_handler("test_sink")
    assert seen == [REAL, NOISE[:1]]
    record = logging.makeLogRecord({"msg": "Started a local Ray instance.", "levelno": logging.INFO})
    assert not train._RayNoiseFilter().filter(record)
    assert train._RayNoiseFilter().filter(logging.makeLogRecord({"msg": REAL[0], "levelno": logging.WARNING}))
