"""The ``actr`` command: match on a known warp, one-line user errors, non-zero exit status."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import float32_tolerance

from pipelines.cli import known_warp, main


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["match", "missing.jpg", "--known-warp", "--model", "actr_tiny"], "missing.jpg: no such image file"),
        (["match", "{photo}", "--model", "actr_tiny"], "either a target image or --known-warp"),
        (["match", "{photo}", "{bad}", "--model", "actr_tiny"], "bad.jpg: cannot read image"),
        (["match", "{photo}", "--known-warp", "--checkpoint", "{bad}"], "bad.jpg"),
        (["nonsense"], "unknown command 'nonsense'"),
    ],
)
def test_user_errors_are_one_line_with_status_2(args, message, photo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACTR_DEBUG", raising=False)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00not an image")
    argv = [a.format(photo=photo, bad=bad) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
