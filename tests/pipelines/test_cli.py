"""The ``actr`` command and the pipelines' shared entry: match on a known warp, one exit-status policy
for every command (0 success, 1 a failed check, 2 a user error in one line), fast ``--help``."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import float32_tolerance

from pipelines.cli import COMMANDS, known_warp, main

ROOT = Path(__file__).resolve().parents[2]
SMALL_SHARDS = ["--pairs", "30", "--size", "32x48", "--samples-per-shard", "4", "--n-kps", "6", "--workers", "0", "--no-progress"]


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    arr = (rng.random((48, 80, 3)) * 255).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(arr).save(path)
    return path


def test_known_warp_is_exact_for_identity_strength():
    image = torch.rand(3, 20, 30)
    target, src, trg, valid = known_warp(image, strength=0.0)
    # the identity grid normalised and back (4 roundings at the scale of the 30-px width) moves each sample by
    # that much; 4 bilinear weights of pixel values at most 1
    torch.testing.assert_close(target, image, atol=float32_tolerance(30.0, terms=8), rtol=0)
    torch.testing.assert_close(src, trg, atol=float32_tolerance(30.0, terms=8), rtol=0)
    assert valid.all()


def test_match_known_warp_writes_png_and_json(photo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["match", str(photo), "--known-warp", "--model", "actr_tiny", "--size", "64", "--out", str(out)]) == 0
    report = json.loads((out / "matches.json").read_text())
    assert 0.0 <= report["pck"] <= 1.0 and len(report["target_keypoints"]) == 36
    assert (out / "matches.png").stat().st_size > 10_000
    assert "PCK@0.1 against the known warp" in capsys.readouterr().out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "shards"
    assert main(["make-shards", "--out", str(out), *SMALL_SHARDS]) == 0
    return out


@pytest.fixture
def damaged(shards, tmp_path):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(shards, copy)
    shard = copy / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    return copy


# (command line, exit status, a word of the one-line error or None): per command, success, a bad path, a bad
# option, a failed check where the command has one, and a device this machine lacks.
EXIT_CASES = [
    (["match", "{photo}", "--known-warp", "--model", "actr_tiny", "--size", "64", "--out", "{tmp}/m"], 0, None),
    (["match", "missing.jpg", "--known-warp", "--model", "actr_tiny"], 2, "missing.jpg: no such image file"),
    (["match", "{photo}", "--model", "actr_tiny"], 2, "either a target image or --known-warp"),
    (["match", "{photo}", "{bad}", "--model", "actr_tiny"], 2, "bad.jpg: cannot read image"),
    (["match", "{photo}", "--known-warp", "--checkpoint", "{bad}"], 2, "bad.jpg"),
    (["match", "{photo}", "--known-warp", "--model", "actr_tiny", "--size", "big"], 2, "--size"),
    (["match", "{photo}", "--known-warp", "--model", "actr_tiny", "--device", "cuda:99"], 2, "'cuda:99' is not available"),
    (["make-shards", "--out", "{shards}", "--verify"], 0, None),
    (["make-shards", "--out", "{damaged}", "--verify"], 1, None),
    (["make-shards", "--out", "{tmp}/none", "--verify"], 2, "no shard set here"),
    (["make-shards", "--source", "spair", "--root", "{tmp}/none", "--out", "memory://never", "--workers", "0"], 2, "not found"),
    (["make-shards", "--size", "2x3x4", "--out", "memory://never"], 2, "--size must be N or HxW"),
    (["make-shards", "--format", "gif"], 2, "--format"),
    (["train", "{tmp}/none.yaml"], 2, "none.yaml: No such file"),
    (["train", "--epochs", "many"], 2, "--epochs"),
    (["train", "--shards", "{tmp}/none", "--bogus", "1"], 2, "--bogus"),
    (
        [
            "evaluate",
            "--model",
            "actr_tiny",
            "--shards",
            "{shards}",
            "--split",
            "val",
            "--image-size",
            "64",
            "--limit",
            "1",
            "--no-figures",
            "--no-peer",
            "--no-progress",
            "--loader-workers",
            "0",
            "--out",
            "{tmp}/e",
        ],
        0,
        None,
    ),
    (["evaluate", "--checkpoint", "{bad}", "--shards", "{shards}"], 2, "bad.jpg"),
    (["evaluate", "--model", "actr_tiny", "--shards", "{tmp}/none"], 2, "none"),
    (["evaluate", "--model", "actr_tiny", "--shards", "{shards}", "--protocol", "nope"], 2, "protocol must be one of"),
    (["evaluate", "--model", "actr_tiny", "--shards", "{shards}", "--device", "cuda:99"], 2, "'cuda:99' is not available"),
    (["params", "--only", "actr_released"], 0, None),
    (["params", "--only", "no_such_model"], 2, "no registered model named ['no_such_model']"),
    (["quickstart", "--train-config", "{tmp}/none.yaml"], 2, "none.yaml: No such file"),
    (["quickstart", "--epochs", "many"], 2, "--epochs"),
    (["calibrate", "--checkpoint", "{tmp}/none.pt", "--shards", "{shards}"], 2, "none.pt"),
    (["download", "nope"], 2, "no artefact named 'nope'"),
    (["reproduce", "--benchmark", "caltech"], 2, "--benchmark must be one of"),
    (["nonsense"], 2, "unknown command 'nonsense'"),
]


@pytest.mark.parametrize(("args", "status", "message"), EXIT_CASES, ids=[" ".join(c[0][:3]) for c in EXIT_CASES])
def test_exit_status_and_one_line_errors(args, status, message, photo, shards, damaged, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACTR_DEBUG", raising=False)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00not an image")
    values = {"photo": photo, "bad": bad, "tmp": tmp_path, "shards": shards, "damaged": damaged}
    argv = [a.format(**values) for a in args]
    assert main(argv) == status
    err = capsys.readouterr().err.strip()
    if status == 2:
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"actr {args[0]}: error: " if args[0] in COMMANDS else "actr: error: ")


def test_every_command_has_exit_cases():
    assert {c[0][0] for c in EXIT_CASES} >= set(COMMANDS)


def test_verbose_shows_the_traceback_and_quiet_prints_nothing(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ACTR_DEBUG", raising=False)
    assert main(["match", "missing.jpg", "--known-warp", "--model", "actr_tiny", "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("ACTR_DEBUG", "1")
    assert main(["match", "missing.jpg", "--known-warp", "--model", "actr_tiny"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("ACTR_DEBUG")
    out = tmp_path / "quiet"
    assert main(["match", str(photo), "--known-warp", "--model", "actr_tiny", "--size", "64", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == "" and (out / "matches.json").exists()


def test_help_and_version(capsys):
    import actr_core

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"actr {actr_core.__version__}"
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in COMMANDS) and "bench" not in COMMANDS and "--quiet" in text
    assert main([]) == 2
    for name in COMMANDS:  # each subcommand's usage line names it, and its help shows every option's comment
        assert main([name, "--help"]) == 0
        assert f"usage: actr {name} " in capsys.readouterr().out


def test_top_level_help_imports_neither_torch_nor_ray():
    code = "import sys; from pipelines.cli import main; main(['--help']); main(['--version']); " \
           "print(sorted(m for m in ('torch', 'ray', 'tyro') if m in sys.modules))"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["pipelines/make_shards.py", "--out", "{damaged}", "--verify"], 1),
        (["pipelines/param_count.py", "--only", "no_such_model"], 2),
        (["pipelines/train.py", "--epochs", "many"], 2),
        (["-m", "pipelines.cli", "make-shards", "--out", "{damaged}", "--verify"], 1),
    ],
)
def test_scripts_and_actr_return_the_commands_status(argv, status, damaged):
    done = subprocess.run(
        [sys.executable, *[a.format(damaged=damaged) for a in argv]], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == status, done.stderr[-2000:]
    if status == 2:
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_missing_optional_package_is_a_user_error(capsys):
    from pipelines.entry import EXIT_USER_ERROR, run

    def command(words, prog):
        raise ModuleNotFoundError("No module named 'xarray'", name="xarray")

    assert run(command, [], prog="actr evaluate") == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["actr evaluate: error: needs the optional package 'xarray': pip install 'actr_core[all]'"]


def test_quiet_silences_progress_bars(tmp_path, capsys):
    args = ["make-shards", "--out", str(tmp_path / "s"), "--pairs", "10", "--size", "64", "--workers", "0"]
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main([*args[:2], str(tmp_path / "t"), *args[3:]]) == 0
    assert "pair/s" in capsys.readouterr().err  # the bar is there without --quiet


def test_a_long_error_stays_whole_in_one_line(tmp_path):
    import dataclasses

    from pipelines.entry import UsageError, _first_problem, parse_config

    @dataclasses.dataclass(frozen=True)
    class Config:
        out: str = ""  # a folder

        def __post_init__(self) -> None:
            if self.out:
                raise ValueError(f"--out {self.out}: is a file; give a folder")

    long = str(tmp_path / ("a" * 120) / "file")
    with pytest.raises(UsageError) as error:
        parse_config(Config, ["--out", long], prog="x")
    assert f"--out {long}: is a file" in str(error.value) and "\n" not in str(error.value)
    ascii_box = (
        " Value error \n ----------- \n  Error parsing Config: bad value \n  ----------- \n  For full helptext, see x --help \n"
    )
    assert _first_problem(ascii_box) == "Error parsing Config: bad value"  # the box as drawn without UTF-8
