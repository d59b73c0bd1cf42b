"""make_shards on the command line: one-line user errors (exit 2) for a busy folder (a real concurrent
writer), --pairs 0 and --out naming a file; a failed run leaves no new empty folder; the PF-PASCAL flip option."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import pipelines.make_shards as make_shards_cli
from pipelines.entry import run

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--pairs", "12", "--size", "32", "--samples-per-shard", "2", "--workers", "0", "--no-progress"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_second_writer_is_a_one_line_user_error(tmp_path, capsys):
    out, ready, release = tmp_path / "shards", tmp_path / "ready", tmp_path / "release"
    code = textwrap.dedent(f"""
        import pathlib, time
        from actr_core.data import make_shards
        import pipelines.make_shards as cli

        def wait(name):  # holds the lock after its first shard until told to go on
            pathlib.Path({str(ready)!r}).touch()
            while not pathlib.Path({str(release)!r}).exists():
                time.sleep(0.05)

        cfg = cli.parse_args(["--out", {str(out)!r}, *{SMALL!r}])
        make_shards(cfg.out, cfg.settings, progress=False, on_shard=wait)
    """)
    first = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first writer ended early"
            time.sleep(0.05)
        assert run(make_shards_cli.cli, ["--out", str(out), *SMALL], prog="actr make-shards") == 2
        assert "is in use by another make_shards process" in _one_line(capsys)
    finally:
        release.touch()
        assert first.wait(timeout=300) == 0
    assert run(make_shards_cli.cli, ["--out", str(out), "--verify"], prog="actr make-shards") == 0


@pytest.mark.parametrize("pairs", ["0", "-3"])
def test_no_pairs_is_refused(tmp_path, capsys, pairs):
    assert (
        run(make_shards_cli.cli, ["--out", str(tmp_path / "s"), "--pairs", pairs, "--no-progress"], prog="actr make-shards") == 2
    )
    assert f"--pairs must be >= 1, got {pairs}" in _one_line(capsys)
    assert not (tmp_path / "s").exists()


def test_out_naming_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(make_shards_cli.cli, ["--out", str(tmp_path / "file"), *SMALL], prog="actr make-shards") == 2
    assert "is a file, not a shard set folder" in _one_line(capsys)


def test_a_failed_run_leaves_no_new_empty_folder(tmp_path, capsys):
    out = tmp_path / "new" / "shards"
    argv = ["--source", "spair", "--root", str(tmp_path / "missing"), "--out", str(out), "--no-progress"]
    assert run(make_shards_cli.cli, argv, prog="actr make-shards") == 2
    assert "not found here nor at" in _one_line(capsys)
    assert not out.exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    argv[argv.index("--out") + 1] = str(tmp_path / "kept")
    assert run(make_shards_cli.cli, argv, prog="actr make-shards") == 2
    assert (tmp_path / "kept").is_dir()


def test_pfpascal_flip_option(tmp_path):
    root = ["--source", "pfpascal", "--root", str(tmp_path)]
    assert make_shards_cli.parse_args(root).settings.pfpascal_flip == "one_based"
    cfg = make_shards_cli.parse_args([*root, "--pfpascal-flip", "released"])
    assert cfg.settings.pfpascal_flip == "released" and cfg.settings.to_json()["pfpascal_flip"] == "released"
    assert json.dumps(cfg.settings.to_json())  # recorded in the manifest as plain JSON
    with pytest.raises(Exception, match="pfpascal"):
        make_shards_cli.parse_args([*root, "--pfpascal-flip", "mirror"])
