"""Micro-benchmarks run and report every field (tiny sizes)."""

from actr_core.bench.micro import best_thread_seconds, refiner_chunk_timings, window_attention_timings


def test_window_attention_timings():
    rows = window_attention_timings(flows=1, size=16, channels=16, heads=2, windows=(4, 8), repeats=1)
    assert [r["window"] for r in rows] == [4, 8] and [r["tokens"] for r in rows] == [16, 64]
    assert all(r["fused_s"] > 0 and r["explicit_s"] > 0 for r in rows)


def test_refiner_chunk_timings():
    rows = refiner_chunk_timings(paths=2, size=4, repeats=1)
    assert [(r["module"], r["chunk"]) for r in rows] == [
        ("released refiner", 0),
        ("released refiner", 1),
        ("dual-window SR", 0),
        ("dual-window SR", 1),
    ]
    assert all(r["seconds"] > 0 for r in rows)


def test_best_thread_seconds_counts_cpu_work():
    assert best_thread_seconds(lambda: sum(range(10_000)), repeats=2) > 0
