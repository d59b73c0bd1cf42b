"""TrainConfig: YAML + command-line overrides, type coercion, checks."""

import pytest

from actr_core.training import TrainConfig, config_from_args, parse_overrides


def test_defaults_are_the_paper_optimiser_settings():
    cfg = TrainConfig()
    assert (cfg.backbone_lr, cfg.head_lr, cfg.weight_decay) == (6e-6, 6e-5, 0.05)
    assert cfg.pck_alpha == 0.1


def test_parse_overrides_both_forms_and_dashes():
    assert parse_overrides(["--batch-size", "4", "--epochs=3", "--name", "x"]) == {
        "batch_size": "4",
        "epochs": "3",
        "name": "x",
    }


@pytest.mark.parametrize("args", [["batch_size", "4"], ["--epochs"], ["--"]])
def test_parse_overrides_rejects_malformed(args):
    with pytest.raises(ValueError):
        parse_overrides(args)


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from_yaml\nbatch_size: 3\nhead_lr: 1e-4\nmodel_kwargs: {depth: 2}\nuse_gpu: false\n")
    cfg = config_from_args([str(path), "--batch_size", "5", "--use_gpu", "true", "--model_kwargs", "{depth: 4}"])
    assert cfg.name == "from_yaml"
    assert cfg.batch_size == 5 and isinstance(cfg.batch_size, int)
    assert cfg.head_lr == 1e-4 and isinstance(cfg.head_lr, float)  # YAML reads "1e-4" as a string
    assert cfg.use_gpu is True
    assert cfg.model_kwargs == {"depth": 4}
    assert config_from_args(["--config", str(path)]).batch_size == 3


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
        ({"use_gpu": "maybe"}, "use_gpu"),
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
