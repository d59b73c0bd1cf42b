"""Model lookup by name or import path."""

import pytest
from torch import nn
from training_toys import ToyMatcher

from actr_core.training import available_models, build_model, register_model


def test_import_path_with_overrides():
    model = build_model("training_toys:toy_matcher", channels=3)
    assert isinstance(model, ToyMatcher) and model.backbone.out_channels == 3


def test_register_and_build():
    register_model("test_toy_registered", lambda channels=2: ToyMatcher(channels))
    assert "test_toy_registered" in available_models()
    assert build_model("test_toy_registered").backbone.out_channels == 2


def test_register_twice_with_another_builder_raises():
    register_model("test_toy_twice", ToyMatcher)
    with pytest.raises(ValueError, match="already registered"):
        register_model("test_toy_twice", lambda: ToyMatcher())


@pytest.mark.parametrize("name, word", [("no_such_model", "unknown model"), ("no_module_xyz:f", "cannot import")])
def test_unknown_names(name, word):
    with pytest.raises(ValueError, match=word):
        build_model(name)


def test_builder_must_return_a_module():
    register_model("test_not_a_module", lambda: 3)
    with pytest.raises(ValueError, match="nn.Module"):
        build_model("test_not_a_module")
    assert isinstance(build_model("training_toys:toy_matcher"), nn.Module)
