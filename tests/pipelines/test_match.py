"""``actr match``: batch mode (a folder, a CSV), failures counted, input size and half precision,
calibrated confidence from the checkpoint's folder, valid JSON, one-line user errors."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import actr_core.api
from actr_core.blocks import cpu_bf16_refusal
from actr_core.calibration import ConfidenceCalibration
from actr_core.training import save_checkpoint
from pipelines.cli import main
from pipelines.match import json_safe

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "training"))  # the stand-in matcher of the training tests
from training_toys import TOY_NAME, ToyMatcher  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("run")
    return save_checkpoint(folder / "model_best.pt", model=ToyMatcher(), builder=TOY_NAME, config={"image_size": 32})


def _photo(path: Path, h: int, w: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    for i, name in enumerate(("a", "b", "c")):
        _photo(folder / f"{name}.png", 40 + 8 * i, 56, i)
    (folder / "notes.txt").write_text("not an image, not paired")
    return folder


def _strict_json(path: Path) -> dict:
    def refuse(word):
        raise AssertionError(f"{path} holds {word}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _match(*argv, capsys=None):
    status = main(["match", *map(str, argv), "--no-progress"])
    return status, (capsys.readouterr() if capsys else None)


def test_a_folder_matches_consecutive_pairs_one_json_each(photos, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    status, _ = _match(photos, "--checkpoint", checkpoint, "--out", out)
    assert status == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["a__b.json", "b__c.json", "summary.json"]
    report = _strict_json(out / "a__b.json")
    assert report["source_size"] == [40, 56] and report["target_size"] == [48, 56] and report["input_size"] == [32, 32]
    assert len(report["confidence"]) == 36 and report["calibrated"] is False and report["min_confidence"] == 0.5
    assert report["confident"] == [c >= 0.5 for c in report["confidence"]]
    assert (out / "a__b.png").stat().st_size > 0 and _strict_json(out / "summary.json") == {
        "pairs": 2,
        "failed": 0,
        "failures": [],
    }


def test_a_failed_pair_is_reported_and_counted_and_the_rest_done(photos, checkpoint, tmp_path, capsys):
    (photos / "b.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    status, io = _match(photos, "--checkpoint", checkpoint, "--out", out, capsys=capsys)
    assert status == 1  # a check failed: not every pair was matched
    summary = _strict_json(out / "summary.json")
    assert (summary["pairs"], summary["failed"]) == (2, 2) and "b.png: cannot read image" in summary["failures"][0]["error"]
    assert io.err.count("failed: ") == 2 and "0 of 2 pairs matched; 2 failed" in io.out
    _photo(photos / "d.png", 30, 30, 9)
    status, io = _match(photos, "--checkpoint", checkpoint, "--out", out, capsys=capsys)
    assert status == 1 and (out / "c__d.json").exists() and "1 of 3 pairs matched" in io.out


def test_a_csv_of_pairs_with_and_without_out_names(photos, checkpoint, tmp_path, capsys):
    csv = photos / "pairs.csv"
    csv.write_text("src,trg,out\na.png,c.png,first.json\nc.png,b.png,\nb.png,missing.png,x.json\n")
    out = tmp_path / "out"
    status, io = _match("--pairs", csv, "--checkpoint", checkpoint, "--out", out, capsys=capsys)
    assert status == 1 and "missing.png: no such image file" in io.err
    assert (out / "first.json").exists() and (out / "c__b.json").exists() and not (out / "x.json").exists()
    csv.write_text("source,target\na.png,b.png\n")
    status, io = _match("--pairs", csv, "--checkpoint", checkpoint, "--out", out, capsys=capsys)
    assert status == 2 and "needs a header row with columns src,trg[,out]" in io.err


def test_input_size_and_size_are_honoured_with_a_checkpoint(photos, checkpoint, tmp_path):
    for flags, expected in ((["--size", "48"], [48, 48]), (["--input-size", "32", "48"], [32, 48]), ([], [32, 32])):
        out = tmp_path / "-".join(flags or ["default"])
        assert _match(photos / "a.png", photos / "b.png", "--checkpoint", checkpoint, "--out", out, *flags)[0] == 0
        assert _strict_json(out / "matches.json")["input_size"] == expected


def test_half_precision_on_cpu_is_bf16_and_fp16_is_refused(photos, checkpoint, tmp_path, capsys):
    out = tmp_path / "half"
    status, io = _match(photos / "a.png", photos / "b.png", "--checkpoint", checkpoint, "--out", out, "--half", capsys=capsys)
    if refusal := cpu_bf16_refusal():  # e.g. an AMX CPU under ATEN_CPU_CAPABILITY=default
        assert status == 2 and io.err.strip().endswith(f"PyTorch refuses bf16 attention here ({refusal})")
    else:
        assert status == 0 and _strict_json(out / "matches.json")["precision"] == "bf16"
    status, io = _match(
        photos / "a.png", photos / "b.png", "--checkpoint", checkpoint, "--half", "--half-dtype", "fp16", capsys=capsys
    )
    assert status == 2 and io.err.strip().endswith("fp16 matching is not supported on cpu (it runs on cuda)")


def test_a_cpu_that_refuses_bf16_attention_is_a_one_line_user_error(photos, checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(actr_core.api, "cpu_bf16_refusal", lambda: "pack_vnni2 is only supported when avx512 is supported")
    status, io = _match(photos / "a.png", photos / "b.png", "--checkpoint", checkpoint, "--half", capsys=capsys)
    assert status == 2 and "Traceback" not in io.err and len(io.err.strip().splitlines()) == 1
    assert io.err.strip().endswith(
        "bf16 matching is not supported on this CPU: PyTorch refuses bf16 attention here "
        "(pack_vnni2 is only supported when avx512 is supported)"
    )


def test_the_calibration_beside_the_checkpoint_is_used(photos, checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / "model_best.pt")
    ConfidenceCalibration(-3.0, (-1.6,), 0.1, ("cycle",), "val", 100).save(run / "calibration.json")
    out = tmp_path / "out"
    assert (
        _match(photos / "a.png", photos / "b.png", "--checkpoint", run / "model_best.pt", "--out", out, "--min-confidence", "0")[
            0
        ]
        == 0
    )
    report = _strict_json(out / "matches.json")
    assert report["calibrated"] is True and report["calibration_alpha"] == 0.1 and all(report["confident"])
    expected = ConfidenceCalibration(-3.0, (-1.6,), 0.1)(cycle=torch.tensor(report["cycle_error_relative"], dtype=torch.float64))
    np.testing.assert_allclose(report["confidence"], expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{a}", "{b}", "--out", "{file}"], "--out {file}: is a file; give a folder"),
        (["{a}", "{photos}"], "photos: is a folder, not an image file"),
        (["{a}", "{tiny}"], "tiny.png: the image is 1×1 pixels, too small to match"),
        (["{a}", "{b}", "--keypoints", "{nan_kps}"], "NaN or infinite, e.g. row 1 = [nan, 2.0]"),
        (["{a}", "{b}", "--min-confidence", "1.5"], "--min-confidence must lie in [0, 1], got 1.5"),
        (["{a}", "{b}", "--input-size", "0"], "--input-size takes N or H W, positive, got 0"),
        (["{a}", "{b}", "--size", "32", "--input-size", "32"], "give --input-size or --size, not both"),
        (["{photos}", "{b}"], "batch mode (a folder or --pairs) takes no target image"),
    ],
)
def test_user_errors_are_one_line_exit_2(argv, message, photos, checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _photo(tmp_path / "tiny.png", 1, 1, 0)
    (tmp_path / "nan.json").write_text("[[1.0, 1.0], [NaN, 2.0]]")
    names = dict(a=photos / "a.png", b=photos / "b.png", file=tmp_path / "file", photos=photos, tiny=tmp_path / "tiny.png",
                 nan_kps=tmp_path / "nan.json")  # fmt: skip
    words = [w.format(**names) for w in argv]
    status, io = _match(*words, "--checkpoint", checkpoint, capsys=capsys)
    assert status == 2 and message.format(**names) in io.err and len(io.err.strip().splitlines()) == 1


def test_json_has_no_nan():
    assert json_safe({"a": [1.0, float("nan"), [float("inf")]], "b": "x", "c": 2}) == {"a": [1.0, None, [None]], "b": "x", "c": 2}
