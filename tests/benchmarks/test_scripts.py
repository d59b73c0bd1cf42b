"""Dry runs of the other benchmark scripts: block_choices.py, mmnet_vs_released.py, data_throughput.py."""

import json
import subprocess
import sys
from pathlib import Path

import block_choices
import pytest
from mmnet_vs_released import BenchConfig, main

ROOT = Path(__file__).resolve().parents[2]


def test_block_choices_reports_every_row(tmp_path):
    text = block_choices.main(str(tmp_path), min_run_time=0.01, small=True)
    assert (tmp_path / "micro.md").read_text() == text
    windows = block_choices.window_attention_timings(flows=1, size=16, channels=16, heads=2, windows=(4, 8), min_run_time=0.01)
    assert [r["tokens"] for r in windows] == [16, 64] and all(r["fused_s"] > 0 and r["explicit_s"] > 0 for r in windows)
    chunks = block_choices.refiner_chunk_timings(paths=2, size=4, min_run_time=0.01)
    assert [(r["module"], r["chunk"]) for r in chunks] == [
        ("released refiner", 0),
        ("released refiner", 1),
        ("dual-window SR", 0),
        ("dual-window SR", 1),
    ]
    assert all(r["seconds"] > 0 and r["peak_mb"] >= 0 for r in chunks)


def test_thread_seconds_counts_cpu_work():
    assert block_choices.thread_seconds(lambda: sum(range(10_000)), min_run_time=0.01) > 0


def test_mmnet_vs_released_dry_run_ours_only():
    result = main(BenchConfig(reference=None, backbone="tiny", height=64, width=96, threads=1, repeats=2, only="ours"))
    assert result["ours_params"] > 0 and result["ours_gflop"] > 0
    assert len(result["ours"]["times_s"]) == 2 and result["ours"]["min_s"] > 0 and result["ours"]["cpu_median_s"] > 0
    assert result["peak_rss_gb"] > 0 and "ours_vs_released" not in result


def test_mmnet_vs_released_command_line(tmp_path):
    out = tmp_path / "mmnet.json"
    args = ["--backbone", "tiny", "--height", "64", "--width", "96", "--threads", "1", "--repeats", "1", "--json", str(out)]
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mmnet_vs_released.py"), *args], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(out.read_text())["ours"]["median_s"] > 0
    with pytest.raises(ValueError, match="backbone = 'vgg'"):
        main(BenchConfig(reference=None, backbone="vgg"))


def test_data_throughput_dry_run(tmp_path):
    import data_throughput

    from actr_core.data import ShardSettings, make_shards

    settings = ShardSettings(source="synthetic", splits=("train",), pairs=(("train", 16),), size=(64, 64), samples_per_shard=4)
    make_shards(str(tmp_path / "shards"), settings, progress=False)
    cfg = data_throughput.parse_args(
        [
            "--shards",
            str(tmp_path / "shards"),
            "--workers",
            "0",
            "--batch-size",
            "4",
            "--epochs",
            "1",
            "--json",
            str(tmp_path / "reader.json"),
        ]
    )
    results = data_throughput.main(cfg)
    for mode in ("plain/uint8", "plain/normalised", "augmented/uint8", "augmented/normalised"):
        assert (
            results[mode]["pairs"] == 2 * 16 - 4 and results[mode]["pairs_per_second"] > 0
        )  # two epochs (the clock starts at the first batch, which is not counted)
    assert json.loads((tmp_path / "reader.json").read_text())["samples"] == 16
