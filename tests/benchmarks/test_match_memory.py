"""benchmarks/match_memory.py: the dry run measures a real ``actr match`` subprocess and prints its figures."""

import match_memory


def test_dry_run_measures_a_subprocess_and_prints_the_figures(capsys):
    figures = match_memory.main(["--dry-run", "--threads", "1"])
    assert figures["status"] == 0 and figures["matches"] == 36 and (figures["width"], figures["height"]) == (160, 120)
    # a Python process that imported torch holds well over 50 MiB; the wall time covers imports and matching
    assert figures["peak_rss_gib"] > 50 / 1024 and figures["wall_s"] >= figures["import_s"] + figures["match_s"]
    out = capsys.readouterr().out
    assert "actr match on a 160 × 120 pair, 1 thread(s): peak RSS" in out and "(target 2)" in out
