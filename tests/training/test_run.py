"""actr_core.training.run: one training process end to end, resume, history rows, epoch lines, run files."""

import csv
import math
from pathlib import Path

import pytest
from training_toys import TOY_NAME, ToyMatcher

from actr_core.training import (
    CHECKPOINTS_DIR,
    TrainConfig,
    ValidationResult,
    checkpoint_folder,
    discard_unreported,
    epoch_line,
    fit,
    history_row,
    latest_checkpoint,
    load_checkpoint,
    load_model_from_checkpoint,
    resume_source,
    run_summary,
    save_checkpoint,
    untrained_line,
    write_csv,
    write_run_outputs,
)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _scores(pck: float, peer: float | None = 0.875) -> ValidationResult:
    references = {"identity": 0.5} | ({} if peer is None else {"classical_peer": peer})
    fallbacks = {"identity": 0} | ({} if peer is None else {"classical_peer": 1})
    return ValidationResult(loss=0.5, pck=pck, batches=2, pairs=8, references=references, reference_fallbacks=fallbacks)


def test_history_rows_and_epoch_lines_carry_the_references():
    row = history_row(1, 10, [1.0, 3.0], _scores(0.25), {"heads": 1e-3}, 3.0, 0)
    assert (row["identity_val_pck"], row["peer_val_pck"], row["peer_val_fallbacks"]) == (0.5, 0.875, 1)
    assert row["train_loss"] == 2.0 and row["step_losses"] == [1.0, 3.0]
    assert "val_PCK@0.1 25.00% (identity 50.00%, peer 87.50%)" in epoch_line(row, 2, 0.1)
    assert epoch_line(row, 2, 0.1).startswith("epoch 1/2  step 10  train_loss 2.0000")
    no_peer = history_row(0, 0, [], _scores(0.25, peer=None), {}, 3.0, 0)
    assert math.isnan(no_peer["peer_val_pck"]) and math.isnan(no_peer["train_loss"])
    assert untrained_line(no_peer, 0.1).startswith("untrained: ") and "(identity 50.00%, peer not run)" in untrained_line(
        no_peer, 0.1
    )


def test_csv_keeps_every_column_of_rows_from_older_runs(tmp_path):
    row = {k: v for k, v in history_row(1, 10, [1.0], _scores(0.25), {}, 3.0, 0).items() if k != "step_losses"}
    old = {k: v for k, v in row.items() if not k.startswith(("identity_", "peer_"))}  # written before the references
    write_csv(tmp_path / "metrics.csv", [old, row])
    rows = _rows(tmp_path / "metrics.csv")
    assert rows[0]["identity_val_pck"] == "" and rows[1]["identity_val_pck"] == "0.5"
    assert not list(tmp_path.glob(".*.tmp"))


def test_summary_picks_the_best_validation_epoch_and_the_references():
    history = [
        history_row(0, 0, [], _scores(0.1, peer=None), {}, 1.0, 0),
        history_row(1, 5, [1.0], _scores(0.4, peer=None), {}, 1.0, 0),
        history_row(2, 10, [0.5], _scores(0.3, peer=None), {}, 1.0, 0),
    ]
    summary = run_summary(Path("runs/x"), history, 12.0)
    assert (summary["best_epoch"], summary["best_val_pck"], summary["final_val_pck"]) == (2 - 1, 0.4, 0.3)
    assert (summary["untrained_val_pck"], summary["identity_val_pck"], summary["peer_val_pck"]) == (0.1, 0.5, None)
    assert summary["peer_val_fallbacks"] is None and summary["steps"] == 10


def _save_epoch(run_dir: Path, epoch: int) -> Path:
    path = checkpoint_folder(run_dir, epoch) / "checkpoint.pt"
    return save_checkpoint(path, model=ToyMatcher(), builder=TOY_NAME, epoch=epoch, step=10 * epoch)


def test_resume_source_is_the_framework_s_record_never_a_newer_file_of_the_run_folder(tmp_path):
    cfg = TrainConfig(name="r", runs_dir=str(tmp_path))
    assert resume_source(cfg) == (None, False) and latest_checkpoint(cfg.run_dir) is None
    _save_epoch(cfg.run_dir, 1)
    newest = _save_epoch(cfg.run_dir, 2)  # written, but its writer died before the framework recorded it
    broken = cfg.run_dir / CHECKPOINTS_DIR / "epoch_003" / "checkpoint.pt"
    broken.parent.mkdir()
    broken.write_bytes(newest.read_bytes()[:100])  # e.g. a copy cut short by a crash
    assert resume_source(cfg) == (None, False)  # the run folder alone is not a source
    restored = load_checkpoint(checkpoint_folder(cfg.run_dir, 1))
    ckpt, own = resume_source(cfg, restored)
    assert own and ckpt.epoch == 1
    assert latest_checkpoint(cfg.run_dir).epoch == 2  # without a framework: the newest complete file
    # the folders after the restored epoch escape the framework's retention: they are deleted
    assert discard_unreported(cfg.run_dir, 1) == [checkpoint_folder(cfg.run_dir, 2), checkpoint_folder(cfg.run_dir, 3)]
    assert sorted(p.name for p in (cfg.run_dir / CHECKPOINTS_DIR).iterdir()) == ["epoch_001"]
    assert discard_unreported(cfg.run_dir, 1) == []


def test_resume_from_the_framework_then_from_the_option(tmp_path):
    other = _save_epoch(tmp_path / "other", 4)
    cfg = TrainConfig(name="fresh", runs_dir=str(tmp_path), resume=str(other))
    ckpt, own = resume_source(cfg)
    assert not own and ckpt.step == 40
    restored = load_checkpoint(_save_epoch(tmp_path / "elsewhere", 1))
    assert resume_source(cfg, restored) == (restored, True)


def test_fit_in_one_process_writes_checkpoints_and_resumes_after_a_stop(tiny_train_shards, tmp_path, capsys):
    cfg = TrainConfig(
        name="one", runs_dir=str(tmp_path), shards=str(tiny_train_shards), model="actr_tiny",
        model_kwargs={"image_size": [64, 64], "warn_random_init": False}, image_size=64, augment=False,
        batch_size=2, val_batch_size=4, epochs=1, steps_per_epoch=2, head_lr=3e-4, backbone_lr=1e-4,
        val_peer=False, progress=False,
    )  # fmt: skip
    reports = []
    steps = []
    history = fit(cfg, report=lambda metrics, folder: reports.append((metrics, folder)), on_step=steps.append)
    assert [row["epoch"] for row in history] == [0, 1] and steps == [1, 2]
    assert reports[0][1] is None and reports[1][1] == checkpoint_folder(cfg.run_dir, 1)
    assert "step_losses" not in reports[1][0] and reports[1][0]["step"] == 2
    out = capsys.readouterr().out
    assert "untrained: " in out and "epoch 1/1  step 2" in out

    # the same run asked for a second epoch continues from the checkpoint its caller restored (as after a
    # killed worker); a newer, never recorded folder is deleted by rank 0 and that epoch trained again
    stale = checkpoint_folder(cfg.run_dir, 2)
    stale.mkdir()
    (stale / "checkpoint.pt").write_bytes(b"never recorded")
    history = fit(cfg.replace(epochs=2), on_step=steps.append, restored=latest_checkpoint(cfg.run_dir))
    assert [row["epoch"] for row in history] == [0, 1, 2] and [row["restarts"] for row in history] == [0, 0, 1]
    assert steps == [1, 2, 3, 4] and "resumed from epoch 1, step 2" in capsys.readouterr().out
    last = load_checkpoint(checkpoint_folder(cfg.run_dir, 2))
    assert (last.epoch, last.step, sorted(last.rng)) == (2, 4, [0]) and last.config == cfg.replace(epochs=2).to_dict()

    write_run_outputs(cfg.run_dir, history, checkpoint_folder(cfg.run_dir, 2), checkpoint_folder(cfg.run_dir, 1))
    assert [int(r["epoch"]) for r in _rows(cfg.run_dir / "metrics.csv")] == [0, 1, 2]
    assert [int(r["step"]) for r in _rows(cfg.run_dir / "steps.csv")] == [1, 2, 3, 4]
    _model, info = load_model_from_checkpoint(cfg.run_dir / "model_best.pt")
    assert info["epoch"] == 1 and info["input_size"] == (64, 64)
    assert load_checkpoint(cfg.run_dir / "model_final.pt").rng == {}


def test_fit_names_a_split_too_small_for_one_batch(tiny_train_shards, tmp_path):
    kwargs = {"image_size": [64, 64], "warn_random_init": False}
    cfg = TrainConfig(
        name="small", runs_dir=str(tmp_path), shards=str(tiny_train_shards), model="actr_tiny", model_kwargs=kwargs, batch_size=64
    )
    with pytest.raises(ValueError, match="no full batch of 64"):
        fit(cfg)
