"""TrainConfig: YAML, type coercion, checks, configurations written by 0.1.0."""

import pytest
import yaml

from actr_core.training import RAY_SETTINGS_OF_0_1_0, TrainConfig, load_config


def test_defaults_are_the_paper_optimiser_settings():
    cfg = TrainConfig()
    assert (cfg.backbone_lr, cfg.head_lr, cfg.weight_decay) == (6e-6, 6e-5, 0.05)
    assert cfg.pck_alpha == 0.1


def test_yaml_values_take_the_fields_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from_yaml\nbatch_size: 3\nhead_lr: 1e-4\nmodel_kwargs: {depth: 2}\naugment: 'false'\n")
    cfg = TrainConfig.from_dict(load_config(path))
    assert cfg.name == "from_yaml" and cfg.batch_size == 3 and isinstance(cfg.batch_size, int)
    assert cfg.head_lr == 1e-4 and isinstance(cfg.head_lr, float)  # YAML reads "1e-4" as a string
    assert cfg.augment is False and cfg.model_kwargs == {"depth": 2}


def test_load_config_wants_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="YAML mapping"):
        load_config(path)


# The settings dict of a 0.1.0 run (config.yaml and every checkpoint's "config"): its Ray settings included.
CONFIG_OF_0_1_0 = {
    "name": "run", "runs_dir": "runs", "model": "actr_small", "model_kwargs": {}, "shards": "shards/synthetic",
    "train_split": "train", "val_split": "val", "image_size": 256, "augment": True, "batch_size": 8,
    "val_batch_size": 8, "shuffle_buffer": 256, "loader_workers": 0, "epochs": 10, "steps_per_epoch": 0,
    "val_steps": 0, "validate_before_training": True, "backbone_lr": 6e-6, "head_lr": 6e-5, "weight_decay": 0.05,
    "freeze_backbone": False, "lr_schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 0.0,
    "clip_grad_norm": 0.0, "precision": "fp32", "seed": 0, "pck_alpha": 0.1, "val_protocol": "standard",
    "val_peer": True, "num_workers": 2, "use_gpu": False, "cpus_per_worker": 1, "find_unused_parameters": False,
    "ray_address": "", "ray_num_cpus": 0, "object_store_mb": 256, "max_failures": 1, "checkpoints_to_keep": 2,
    "resume": "", "progress": True,
}  # fmt: skip


def test_a_0_1_0_configuration_loads_without_its_ray_settings(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**CONFIG_OF_0_1_0, "epochs": 3}, sort_keys=False))
    with caplog.at_level("INFO", logger="actr_core.training.config"):
        cfg = TrainConfig.from_dict(load_config(path))
    assert cfg.epochs == 3 and cfg == TrainConfig(epochs=3)
    added_since = {"allow_incomplete"}  # training settings that 0.1.0 did not have (CHANGELOG.md)
    assert set(cfg.to_dict()) == set(CONFIG_OF_0_1_0) - RAY_SETTINGS_OF_0_1_0 | added_since
    assert "num_workers" in caplog.text and "pipelines/train.py" in caplog.text
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({**CONFIG_OF_0_1_0, "num_workrs": 2})  # a misspelling is still an error


def test_round_trip_through_dict():
    cfg = TrainConfig(name="a", model_kwargs={"x": 1}, epochs=3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(epochs=4).epochs == 4


@pytest.mark.parametrize(
    "values, word",
    [
        ({"nonsense": 1}, "unknown"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "2.5"}, "batch_size"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"precision": "fp8"}, "precision"),
        ({"val_protocol": "nope"}, "val_protocol"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"augment": "maybe"}, "augment"),
        ({"name": "a/b"}, "name"),
        ({"min_lr_ratio": 2}, "min_lr_ratio"),
    ],
)
def test_bad_settings_raise_naming_them(values, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig.from_dict(values)


def test_run_dir_is_absolute(tmp_path):
    cfg = TrainConfig(name="r", runs_dir=str(tmp_path))
    assert cfg.run_dir == tmp_path.resolve() / "r"
