"""Test-session set-up: hypothesis profiles and a switch for run-time shape checks."""

import contextlib
import os

import jaxtyping
import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

settings.register_profile("ci", deadline=None, derandomize=True, database=None, max_examples=40)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)  # tests are tiny: one thread each, and pytest-xdist runs one process per core


@contextlib.contextmanager
def jaxtyping_disabled():
    """Turn the run-time shape checks off, so that error-path tests meet our own ``ValueError``."""
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", previous)


@pytest.fixture
def no_typecheck():
    """Fixture form of :func:`jaxtyping_disabled`."""
    with jaxtyping_disabled():
        yield


@pytest.fixture(scope="session")
def tiny_train_shards(tmp_path_factory):
    """A synthetic shard set small enough for a training run in seconds: 8 train and 4 val pairs at
    64 px, 4 per shard (read only; shared by the training tests)."""
    from actr_core.data import ShardSettings, make_shards

    path = tmp_path_factory.mktemp("shards") / "tiny"
    settings = ShardSettings(
        source="synthetic", splits=("train", "val"), pairs=(("train", 8), ("val", 4)), size=(64, 64), samples_per_shard=4
    )
    make_shards(str(path), settings, progress=False)
    return path
