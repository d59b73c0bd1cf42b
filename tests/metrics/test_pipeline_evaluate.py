"""pipelines/evaluate.py end to end with a fake matcher and hand-made batches (model and data loading swapped)."""

import dataclasses

import torch

import pipelines.evaluate as pipeline
from actr_core.metrics import load_results


def test_main_writes_results_table_and_figures(tmp_path, monkeypatch, capsys, batch_factory, shift_matcher):
    box = [[100.0, 100.0, 300.0, 300.0]]
    batch = batch_factory(
        [[[100.0, 100.0], [200.0, 150.0], [150.0, 250.0], [0.0, 0.0]]] * 2,
        [[[132.0, 100.0], [232.0, 150.0], [182.0, 290.0], [0.0, 0.0]]] * 2,
        [[True, True, True, False]] * 2,
        src_bbox=box * 2,
        trg_bbox=box * 2,
        category=["a", "b"],
    )
    torch.manual_seed(0)
    batch = dataclasses.replace(batch, src_image=torch.randn_like(batch.src_image), trg_image=torch.randn_like(batch.trg_image))
    monkeypatch.setattr(pipeline, "load_model", lambda cfg: (shift_matcher, "shift", (64, 64)))
    monkeypatch.setattr(pipeline, "open_batches", lambda cfg, size: ([batch], 1))
    cfg = pipeline.parse_args(["--model", "fake", "--out", str(tmp_path), "--alphas", "0.1", "0.2", "--no-progress"])
    results = pipeline.main(cfg)
    printed = capsys.readouterr().out
    assert "all pairs" in printed and "66.7" in printed  # 2 of 3 keypoints within 20 px in both pairs
    assert results["pck_image_overall"].sel(predictor="model").values.tolist()[0] == 2 / 3
    assert results["predictor"].values.tolist() == ["model", "identity", "classical_peer"]
    back = load_results(tmp_path / "results.nc")
    assert back.attrs["protocol"] == "standard" and back.attrs["split"] == "test"
    assert back["predictor"].values.tolist() == ["model", "identity", "classical_peer"]
    table = (tmp_path / "table.txt").read_text()
    assert table.count("PCK per") == 2 and table.count("model − identity") == 2
    assert "classical peer: ORB + RANSAC homography" in table and "not run" not in table
    for name in ("pck_curve.png", "matches.png", "tps_warp.png", "path_flows.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_no_peer_scores_identity_only_and_says_so(tmp_path, monkeypatch, capsys, batch_factory, shift_matcher):
    batch = batch_factory([[[100.0, 100.0]]], [[[132.0, 100.0]]])
    monkeypatch.setattr(pipeline, "load_model", lambda cfg: (shift_matcher, "shift", (64, 64)))
    monkeypatch.setattr(pipeline, "open_batches", lambda cfg, size: ([batch], 1))
    cfg = pipeline.parse_args(["--model", "fake", "--out", str(tmp_path), "--no-progress", "--no-figures", "--no-peer"])
    assert not cfg.peer and pipeline.parse_args(["--model", "fake"]).peer
    results = pipeline.main(cfg)
    assert results["predictor"].values.tolist() == ["model", "identity"]
    assert "classical peer: not run" in capsys.readouterr().out
    assert load_results(tmp_path / "results.nc").attrs["reference_classical_peer"] == "not run"


def test_cli_reports_user_errors_in_one_line(capsys, tmp_path):
    from pipelines.entry import run

    assert run(pipeline.cli, ["--out", str(tmp_path), "--no-progress"], prog="actr evaluate") == 2
    assert "give --checkpoint PATH or --model NAME" in capsys.readouterr().err


def test_parse_args_defaults():
    cfg = pipeline.parse_args(["--model", "actr_tiny", "--shards", "memory://s", "--protocol", "released"])
    assert cfg.protocol == "released" and cfg.split == "test" and cfg.alphas == pipeline.DEFAULT_ALPHAS


def test_main_on_real_shards_reads_at_the_model_size(tmp_path):
    """Synthetic shards stored at 96 px, scored by an untrained tiny ACTR at 64 px: every test pair once."""
    from actr_core.data import ShardSettings, SyntheticConfig, make_shards

    settings = ShardSettings(
        source="synthetic",
        pairs=(("train", 0), ("val", 0), ("test", 6)),
        splits=("test",),
        size=(96, 96),
        samples_per_shard=4,
        synthetic=SyntheticConfig(n_kps=8),
    )
    make_shards(str(tmp_path / "shards"), settings, workers=0, progress=False)
    cfg = pipeline.parse_args(
        [
            "--model",
            "actr_tiny",
            "--shards",
            str(tmp_path / "shards"),
            "--image-size",
            "64",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "eval"),
            "--no-progress",
            "--no-figures",
            "--loader-workers",
            "0",
        ]
    )
    results = pipeline.main(cfg)
    assert results.sizes["pair"] == 6
    assert int(results["n_pairs"].sum()) == 6
    assert len(set(results["pair"].values.tolist())) == 6  # each pair exactly once
