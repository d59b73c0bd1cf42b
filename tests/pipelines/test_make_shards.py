"""pipelines/make_shards.py: arguments, byte-identical reruns, --verify, resuming after a kill."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import pytest

from actr_core.data import SyntheticConfig
from pipelines.make_shards import main, parse_args

SCRIPT = Path(__file__).resolve().parents[2] / "pipelines" / "make_shards.py"
SMALL = ["--pairs", "30", "--size", "32x48", "--samples-per-shard", "4", "--n-kps", "6", "--workers", "0", "--no-progress"]


def _files(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    names = {p.rsplit("/", 1)[-1]: p for p in fs.ls(root, detail=False)}
    return {name: fs.cat_file(p) for name, p in names.items() if not name.startswith(".")}  # not the writer's lock file


def test_defaults():
    cfg = parse_args([])
    assert cfg.out == "shards/synthetic" and not cfg.verify
    assert cfg.settings.size == (256, 256) and cfg.settings.image_format == "jpg"
    assert dict(cfg.settings.pairs) == {"train": 1600, "val": 200, "test": 200}
    assert parse_args(["--source", "pfwillow", "--root", "/x"]).settings.splits == ("test",)
    assert parse_args(["--out", "memory://a", "--verify"]).settings is None


def test_two_runs_are_byte_identical_on_file_and_memory_urls(tmp_path, capsys):
    first, second = f"file://{tmp_path}/a", "memory://cli-identical"
    assert main(parse_args(["--out", first, *SMALL])) == 0
    assert main(parse_args(["--out", second, *SMALL])) == 0
    assert "24 train" not in capsys.readouterr().out  # printed summary, not a split listing
    a, b = _files(first), _files(second)
    assert a == b and len(a) == 1 + 6 + 1 + 1  # manifest + 24/4 train + 3 val + 3 test shards
    assert main(parse_args(["--out", first, "--verify"])) == 0
    assert "OK" in capsys.readouterr().out
    fsspec.filesystem("memory").rm("/cli-identical", recursive=True)


def test_verify_fails_on_a_damaged_shard(tmp_path, capsys):
    out = str(tmp_path / "v")
    main(parse_args(["--out", out, *SMALL]))
    shard = tmp_path / "v" / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    assert main(parse_args(["--out", out, "--verify"])) == 1
    assert "val-000000.tar" in capsys.readouterr().out


def test_killed_run_resumes_to_the_same_bytes(tmp_path):
    """A process killed (SIGKILL) after some shards, rerun with the same command, ends byte-identical."""
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    main(parse_args(["--out", clean, *SMALL]))
    # the same settings, built by the library in a child that kills itself after its third shard
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.argv = ["make_shards", "--out", {killed!r}, *{SMALL!r}]
        from pipelines.make_shards import parse_args
        from actr_core.data.shards import make_shards
        cfg = parse_args()
        done = []
        def stop(name):
            done.append(name)
            if len(done) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        make_shards(cfg.out, cfg.settings, workers=0, progress=False, on_shard=stop)
        """
    )
    result = subprocess.run([sys.executable, "-c", child], cwd=SCRIPT.parents[1], timeout=120)
    assert result.returncode == -signal.SIGKILL
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["totals"]["shards"] == 3
    assert main(parse_args(["--out", killed, *SMALL])) == 0  # the same command again
    assert _files(killed) == _files(clean)


def test_synthetic_warp_flags():
    """Each warp factor has a flag; the defaults are the library's; the earlier mild set is reachable."""
    assert parse_args([]).settings.synthetic == SyntheticConfig()
    mild = parse_args(
        ["--rotation", "0", "--scale", "1", "1", "--translation", "0", "--homography", "0.2", "--tps", "0.06"]
        + ["--jitter", "0.15", "--crop-scale", "0.6", "1"]
    ).settings.synthetic
    assert (mild.rotation, mild.scale, mild.translation, mild.homography, mild.tps) == (0.0, (1.0, 1.0), 0.0, 0.2, 0.06)
    assert (mild.jitter, mild.crop_scale) == (0.15, (0.6, 1.0))
    with pytest.raises(ValueError, match=r"scale \(1.4, 0.7\)"):
        parse_args(["--scale", "1.4", "0.7"])
    with pytest.raises(ValueError, match="rotation must be .* got 200.0"):
        parse_args(["--rotation", "200"])


def test_source_choices_are_the_librarys():
    import typing

    from actr_core.data.shards import SOURCES
    from pipelines.make_shards import MakeShardsConfig

    assert typing.get_args(typing.get_type_hints(MakeShardsConfig)["source"]) == SOURCES


@pytest.mark.parametrize("argv", [["--size", "30"], ["--size", "2x3x4"], ["--format", "gif"]])
def test_bad_arguments(argv):
    with pytest.raises((SystemExit, ValueError)):
        main(parse_args(argv + ["--out", "memory://never"]))
