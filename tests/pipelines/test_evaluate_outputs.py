"""pipelines/evaluate.py outputs: locked while written (real concurrent processes), whole or previous on a
full disk (a patched writer raising ENOSPC), incomplete shard sets refused or said in every output."""

import contextlib
import errno
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor

import actr_core.files
import pipelines.evaluate as pipeline
from actr_core.data import ShardSettings, SyntheticConfig, make_shards
from actr_core.metrics import load_results
from actr_core.models.base import CorrespondenceModel, MatchOutput
from pipelines.entry import run

REPO = Path(__file__).resolve().parents[2]


class ShiftMatcher(CorrespondenceModel):
    """One H/4-grid cell to the right everywhere (fast; no weights)."""

    def forward(self, src: Tensor, trg: Tensor) -> MatchOutput:
        b, _, h, w = src.shape
        flow = torch.zeros(b, 2, h // self.flow_stride, w // self.flow_stride)
        flow[:, 0] = 1.0
        return MatchOutput(flow=flow)

    def loss(self, output: MatchOutput, batch) -> Tensor:
        return output.flow.sum() * 0.0


def _shards(root: Path, *, stop_after: int | None = None, splits=("test",)) -> str:
    """Synthetic shards at 64 px (test: 6 pairs in 3 shards); ``stop_after`` shards, then an interruption."""
    settings = ShardSettings(
        pairs=(("train", 4), ("val", 2), ("test", 6)), splits=splits, size=(64, 64), samples_per_shard=2,
        synthetic=SyntheticConfig(n_kps=6),
    )  # fmt: skip
    written: list[str] = []

    def interrupt(name: str) -> None:
        written.append(name)
        if stop_after is not None and len(written) >= stop_after:
            raise KeyboardInterrupt  # as a killed run: manifest with complete: false

    with contextlib.suppress(KeyboardInterrupt):
        make_shards(str(root), settings, progress=False, on_shard=interrupt)
    return str(root)


def _args(shards: str, out: Path, *extra: str) -> list[str]:
    return ["--model", "shift", "--shards", shards, "--out", str(out), "--no-progress", "--no-figures", "--no-peer",
            "--loader-workers", "0", "--batch-size", "2", *extra]  # fmt: skip


@pytest.fixture
def shift_model(monkeypatch):
    monkeypatch.setattr(pipeline, "load_model", lambda cfg: (ShiftMatcher(), "shift", (64, 64)))


def test_full_disk_keeps_the_previous_results(tmp_path, shift_model, monkeypatch, capsys):
    shards, out = _shards(tmp_path / "shards"), tmp_path / "eval"
    assert run(pipeline.cli, _args(shards, out), prog="actr evaluate") == 0
    before = {name: (out / name).read_bytes() for name in ("results.nc", "table.txt")}

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(actr_core.files, "_write_all", full)
    capsys.readouterr()
    assert run(pipeline.cli, _args(shards, out, "--alphas", "0.2"), prog="actr evaluate") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on the device" in err[0] and "results.nc" in err[0]
    assert {name: (out / name).read_bytes() for name in before} == before  # both previous files, together
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert load_results(out / "results.nc")["alpha"].values.tolist() != [0.2]


def test_a_second_evaluation_into_the_same_folder_fails_at_once(tmp_path, shift_model, capsys):
    shards, out = _shards(tmp_path / "shards"), tmp_path / "eval"
    ready, release = tmp_path / "ready", tmp_path / "release"
    code = textwrap.dedent(f"""
        import pathlib, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import pipelines.evaluate as pipeline
        from pipelines.entry import run
        from test_evaluate_outputs import ShiftMatcher, _args
        opened = pipeline.open_batches

        def slow(cfg, size):  # holds --out's lock until told to go on
            batches, total = opened(cfg, size)
            pathlib.Path({str(ready)!r}).touch()
            while not pathlib.Path({str(release)!r}).exists():
                time.sleep(0.05)
            return batches, total

        pipeline.load_model = lambda cfg: (ShiftMatcher(), "shift", (64, 64))
        pipeline.open_batches = slow
        sys.exit(run(pipeline.cli, _args({shards!r}, pathlib.Path({str(out)!r})), prog="actr evaluate"))
    """)
    first = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first evaluation ended early"
            time.sleep(0.05)
        started = time.monotonic()
        assert run(pipeline.cli, _args(shards, out), prog="actr evaluate") == 2
        assert time.monotonic() - started < 60  # at once, not after the first one finished
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by an evaluation" in err[0]
    finally:
        release.touch()
        assert first.wait(timeout=300) == 0
    assert load_results(out / "results.nc").sizes["pair"] == 6  # the first one's results, whole


def test_an_interrupted_set_is_refused_or_scored_and_said(tmp_path, shift_model, capsys):
    shards = _shards(tmp_path / "shards", stop_after=1)  # test: 1 of 3 shards
    assert run(pipeline.cli, _args(shards, tmp_path / "refused"), prog="actr evaluate") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "complete: false" in err[0] and "allow_incomplete" in err[0]
    assert not (tmp_path / "refused").exists()  # nothing written, no empty folder left
    out = tmp_path / "partial"
    assert run(pipeline.cli, _args(shards, out, "--allow-incomplete"), prog="actr evaluate") == 0
    results = load_results(out / "results.nc")
    assert results.sizes["pair"] == 2 and results.attrs["allow_incomplete"] == "true"
    assert "complete: false" in results.attrs["data_incomplete"]
    table = (out / "table.txt").read_text()
    assert table.count("INCOMPLETE DATA (read with allow_incomplete)") == 2 and "allow_incomplete true" in table
    complete = tmp_path / "complete"
    assert run(pipeline.cli, _args(_shards(tmp_path / "whole"), complete), prog="actr evaluate") == 0
    assert load_results(complete / "results.nc").attrs["allow_incomplete"] == "false"
    assert "INCOMPLETE" not in (complete / "table.txt").read_text()


def test_a_split_never_written_says_the_set_is_incomplete(tmp_path, shift_model, capsys):
    shards = _shards(tmp_path / "shards", stop_after=1, splits=("train", "val", "test"))  # stopped in train
    for extra in ((), ("--allow-incomplete",)):
        assert run(pipeline.cli, _args(shards, tmp_path / "eval", *extra), prog="actr evaluate") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "incomplete" in err[0]
    assert "split 'test' has no shards written: the shard set is incomplete" in err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--limit", "-1"], "--limit must be >= 0, got -1"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ],
)
def test_bad_numbers_are_one_line_user_errors(argv, message, capsys):
    assert run(pipeline.cli, ["--model", "actr_tiny", "--shards", "x", *argv], prog="actr evaluate") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_out_naming_a_file_is_a_user_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert (
        run(pipeline.cli, ["--model", "actr_tiny", "--shards", "x", "--out", str(tmp_path / "file")], prog="actr evaluate") == 2
    )
    assert "is a file, not a folder" in capsys.readouterr().err
