"""Checkpoint content errors: one line naming the file and what is wrong, never a traceback from deep inside."""

from pathlib import Path

import pytest
import torch
from training_toys import TOY_NAME, ToyMatcher

from actr_core.models import OfficialCheckpointError, build_model, load_official_actr
from actr_core.training import (
    CheckpointError,
    build_meta_model,
    input_size_problem,
    load_checkpoint,
    load_model_from_checkpoint,
    save_checkpoint,
)
from actr_core.training.checkpoint import CHECKPOINT_FORMAT

TINY = {"image_size": [64, 64], "warn_random_init": False}


def _toy(path: Path, **kwargs) -> Path:
    return save_checkpoint(path, model=ToyMatcher(channels=4), builder=TOY_NAME, builder_kwargs={"channels": 4}, **kwargs)


def _edited(path: Path, edit) -> Path:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


def _one_line(error: pytest.ExceptionInfo, path: Path, *words: str) -> str:
    text = str(error.value)
    assert "\n" not in text and str(path) in text, text
    for word in words:
        assert word in text, text
    return text


def test_a_builder_that_does_not_match_the_weights_names_the_tensors(tmp_path):
    path = _edited(_toy(tmp_path / "c.pt"), lambda p: p.update(builder_kwargs={"channels": 8}))
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(path)
    _one_line(error, path, "do not fit the model of builder 'training_toy'", "other shapes", "backbone.weight (4, 3, 4, 4)")


def test_a_missing_model_entry_is_named(tmp_path):
    path = _edited(_toy(tmp_path / "c.pt"), lambda p: p.pop("model"))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    _one_line(error, path, "no 'model' entry")
    path = _edited(_toy(tmp_path / "d.pt"), lambda p: p.update(model=[1, 2]))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    _one_line(error, path, "not a state dict of tensors")


def test_a_missing_tensor_is_named(tmp_path):
    path = _edited(_toy(tmp_path / "c.pt"), lambda p: p["model"].pop("head.bias"))
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(path)
    _one_line(error, path, "1 missing tensors, first: head.bias")


def test_an_unknown_builder_is_named(tmp_path):
    path = _edited(_toy(tmp_path / "c.pt"), lambda p: p.update(builder="no_such_model"))
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(path)
    _one_line(error, path, "'no_such_model' is not a registered model")


def test_an_actr_core_checkpoint_given_to_the_released_loader(tmp_path):
    path = _toy(tmp_path / "c.pt")
    with pytest.raises(OfficialCheckpointError) as error:
        load_official_actr(path)
    _one_line(error, path, "is an actr_core training checkpoint", "load_model_from_checkpoint")
    assert torch.load(path, weights_only=True)["format"] == CHECKPOINT_FORMAT  # the format the released loader knows


@pytest.mark.parametrize("wrapped", [True, False], ids=["released_model_best", "bare_state_dict"])
def test_a_released_checkpoint_given_to_the_actr_core_loader(tmp_path, wrapped):
    state = ToyMatcher().state_dict()
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 3, "state_dict": state} if wrapped else state, path)
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(path)
    _one_line(error, path, "not an actr_core training checkpoint", "load_official_actr")


def test_a_checkpoint_whose_image_size_the_model_cannot_take(tmp_path):
    model = build_model("actr_conv_tiny", **TINY)
    path = save_checkpoint(
        tmp_path / "c.pt", model=model, builder="actr_conv_tiny", builder_kwargs=TINY, config={"image_size": 100}
    )
    with pytest.raises(CheckpointError) as error:
        load_model_from_checkpoint(path)
    _one_line(error, path, "cannot take its image_size 100", "multiples of 8")
    ok = save_checkpoint(
        tmp_path / "ok.pt", model=model, builder="actr_conv_tiny", builder_kwargs=TINY, config={"image_size": 96}
    )
    _rebuilt, info = load_model_from_checkpoint(ok)
    assert info["input_size"] == (96, 96)


def test_input_size_problem_runs_the_models_own_checks_without_memory():
    meta = build_meta_model("actr_tiny", TINY)
    assert all(p.is_meta for p in meta.parameters())
    assert input_size_problem(meta, 64) is None and input_size_problem(meta, 128) is None
    assert "multiples of 16" in input_size_problem(meta, 100)
    released = build_meta_model("actr_released", {"warn_random_init": False})
    assert input_size_problem(released, 256) is None
    assert "input size it was built for" in input_size_problem(released, 128)
