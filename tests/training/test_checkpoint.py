"""Checkpoints: self-describing round trip, foreign files rejected, writes atomic even when killed."""

import dataclasses
import os
import pickle
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from training_toys import TOY_NAME, ToyMatcher, make_batch

import actr_core
from actr_core.training import (
    CHECKPOINT_FORMAT,
    SCHEMA_VERSION,
    CheckpointError,
    atomic_save,
    build_optimizer,
    build_scheduler,
    export_model,
    load_checkpoint,
    load_model_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    train_step,
)
from actr_core.training import checkpoint as checkpoint_module

BUILDER = TOY_NAME


def _trained(tmp_path: Path):
    model = ToyMatcher(channels=4)
    opt = build_optimizer(model, backbone_lr=1e-3, head_lr=1e-2, weight_decay=0.05)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, schedule="cosine")
    for _ in range(3):
        train_step(model, make_batch(), opt)
        sched.step()
    path = save_checkpoint(
        tmp_path / "ckpt.pt",
        model=model,
        builder=BUILDER,
        builder_kwargs={"channels": 4},
        config={"image_size": 48, "name": "t"},
        optimizer=opt,
        scheduler=sched,
        epoch=1,
        step=3,
        history=[{"epoch": 1, "val_pck": 0.5}],
        data_schema_version=1,
    )
    return model, opt, sched, path


def test_round_trip_is_self_describing(tmp_path):
    model, _opt, sched, path = _trained(tmp_path)
    ckpt = load_checkpoint(path)
    assert ckpt.builder == BUILDER and ckpt.builder_kwargs == {"channels": 4}
    assert ckpt.config["name"] == "t" and (ckpt.epoch, ckpt.step) == (1, 3)
    assert ckpt.library_version == actr_core.__version__ and ckpt.schema_version == SCHEMA_VERSION
    assert ckpt.data_schema_version == 1 and ckpt.history == [{"epoch": 1, "val_pck": 0.5}]
    # weights_only load: only plain data in the file
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT
    # the model comes back from the builder name alone and computes the same thing
    rebuilt, info = load_model_from_checkpoint(path)
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt(batch.src_image, batch.trg_image).flow,  # exact: same weights
            model.eval()(batch.src_image, batch.trg_image).flow,
            atol=0,
            rtol=0,
        )
    assert info["input_size"] == (48, 48) and not rebuilt.training
    # optimiser and scheduler states restore
    opt2 = build_optimizer(rebuilt, backbone_lr=1e-3, head_lr=1e-2, weight_decay=0.05)
    opt2.load_state_dict(ckpt.optimizer)
    sched2 = build_scheduler(opt2, total_steps=10, warmup_steps=2, schedule="cosine")
    sched2.load_state_dict(ckpt.scheduler)
    assert sched2.last_epoch == sched.last_epoch == 3


def test_ddp_wrapped_model_saves_plain_keys(tmp_path):
    model = torch.nn.DataParallel(ToyMatcher())
    path = save_checkpoint(tmp_path / "c.pt", model=model, builder=BUILDER)
    assert not any(k.startswith("module.") for k in load_checkpoint(path).model)


def test_rng_states_restore_all_generators():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(first[0], second[0], atol=0, rtol=0)  # exact: the same stream
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_rng_in_checkpoint_per_rank(tmp_path):
    state = rng_state()
    expected = torch.rand(4)
    path = save_checkpoint(tmp_path / "c.pt", model=ToyMatcher(), builder=BUILDER, rng={0: state, 1: rng_state()})
    ckpt = load_checkpoint(path)
    assert sorted(ckpt.rng) == [0, 1]
    set_rng_state(ckpt.rng[0])
    torch.testing.assert_close(torch.rand(4), expected, atol=0, rtol=0)  # exact: the same stream


def test_folder_with_checkpoint_file_is_accepted(tmp_path):
    save_checkpoint(tmp_path / "checkpoint.pt", model=ToyMatcher(), builder=BUILDER)
    assert load_checkpoint(tmp_path).builder == BUILDER


class _Foreign:
    pass


@pytest.mark.parametrize(
    "write, word",
    [
        (lambda p: torch.save(ToyMatcher().state_dict(), p), "not an actr_core training checkpoint"),
        (lambda p: torch.save({"format": "other", "model": {}}, p), "expected format"),
        (lambda p: p.write_bytes(pickle.dumps(_Foreign(), protocol=2)), "not a readable"),
        (lambda p: p.write_text("hello"), "not a readable"),
        (lambda p: torch.save([1, 2, 3], p), "not an actr_core"),
    ],
)
def test_foreign_files_are_rejected(tmp_path, write, word):
    path = tmp_path / "foreign.pt"
    write(path)
    with pytest.raises(CheckpointError, match=word):
        load_checkpoint(path)
    assert issubclass(CheckpointError, ValueError)


def test_truncated_and_missing_and_newer_are_rejected(tmp_path):
    _, _, _, path = _trained(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")
    raw = torch.load(path, weights_only=True)
    raw["schema_version"] = SCHEMA_VERSION + 1
    torch.save(raw, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="schema version"):
        load_checkpoint(tmp_path / "newer.pt")


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    _, _, _, path = _trained(tmp_path)
    before = path.read_bytes()

    def half_then_crash(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=ToyMatcher(), builder=BUILDER, epoch=9)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_atomic_save_creates_folders(tmp_path):
    target = atomic_save({"a": torch.ones(2)}, tmp_path / "x" / "y.pt")
    assert torch.load(target, weights_only=True)["a"].sum() == 2


def _writer(path: Path, blob: torch.Tensor, ready_fd: int) -> None:
    """Child process: save forever (no tensor arithmetic after the fork), signal after the first save."""
    i = 0
    while True:
        i += 1
        atomic_save({"format": "x", "i": i, "blob": blob}, path)
        if i == 1:
            os.write(ready_fd, b"1")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_killed_writer_never_leaves_a_half_written_file(tmp_path):
    """SIGKILL a process in the middle of repeated saves: the file is always a complete earlier write."""
    path = tmp_path / "ckpt.pt"
    blob = torch.arange(1_000_000, dtype=torch.float32)
    rng = random.Random(0)
    for _ in range(6):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(read_fd)
                _writer(path, blob, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        assert os.read(read_fd, 1) == b"1"  # at least one save is complete
        os.close(read_fd)
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        obj = torch.load(path, weights_only=True)
        assert obj["i"] >= 1 and torch.equal(obj["blob"], blob)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt.pt"]
    # a killed writer may leave its temporary file (never under the checkpoint's name); it is never read
    assert all(name.startswith(".ckpt.pt.") and name.endswith(".tmp") for name in leftovers)


def test_export_model_drops_training_state_and_still_rebuilds(tmp_path):
    model, _, _, path = _trained(tmp_path)
    out = export_model(path, tmp_path / "model_final.pt")
    ckpt = load_checkpoint(out)
    assert ckpt.optimizer is None and ckpt.scheduler is None and ckpt.rng == {}
    assert ckpt.builder == BUILDER and ckpt.step == 3
    rebuilt, _ = load_model_from_checkpoint(out)
    for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # exact: copies
    assert out.stat().st_size < path.stat().st_size


def test_atomic_save_gives_the_usual_file_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        target = atomic_save({"a": 1}, tmp_path / "m.pt")
    finally:
        os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o644


def test_actr_conv_tiny_round_trip_with_nested_overrides_and_batchnorm_buffers(tmp_path):
    """The CPU recipe's model, with YAML-style nested overrides, trained one step (BatchNorm running
    statistics move): rebuilt from the checkpoint with equal weights, buffers and outputs."""
    from actr_core.models import build_model

    kwargs = {"image_size": [64, 64], "warn_random_init": False, "conv_backbone": {"embed_dim": 32}, "flow_sr": {"dim": 8}}
    torch.manual_seed(0)
    model = build_model("actr_conv_tiny", **kwargs)
    opt = build_optimizer(model, backbone_lr=1e-3, head_lr=1e-3, weight_decay=0.05)
    batch = make_batch(b=2, size=(64, 64))
    train_step(model, batch, opt)
    path = save_checkpoint(
        tmp_path / "conv.pt", model=model, builder="actr_conv_tiny", builder_kwargs=kwargs, config={"image_size": 64}
    )
    rebuilt, info = load_model_from_checkpoint(path)
    assert rebuilt.config == model.config and info["input_size"] == (64, 64)
    for (name, a), b in zip(rebuilt.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)  # exact: copies (running_mean/var included)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt(batch.src_image, batch.trg_image).flow,
            model(batch.src_image, batch.trg_image).flow,
            atol=0,
            rtol=0,
        )  # same ops, same weights


def test_a_builder_whose_numbers_changed_is_refused(tmp_path, monkeypatch):
    from actr_core.models import build_model, builders

    kwargs = {"image_size": [64, 64], "warn_random_init": False}
    model = build_model("actr_conv_tiny", **kwargs)
    path = save_checkpoint(tmp_path / "conv.pt", model=model, builder="actr_conv_tiny", builder_kwargs=kwargs)
    changed = dataclasses.replace(builders.ACTR_CONV_TINY_CONFIG, correlation_loss_weight=0.5)
    monkeypatch.setattr(builders, "ACTR_CONV_TINY_CONFIG", changed)
    with pytest.raises(CheckpointError, match=r"correlation_loss_weight.*saved \[1.0\].*now \[0.5\]"):
        load_model_from_checkpoint(path)
