"""pipelines/param_count.py: registered models counted beside the paper's Table 3."""

from pipelines.param_count import ParamCountConfig, main


def test_released_counts(capsys):
    rows = main(ParamCountConfig(only=("actr_released",)))
    assert len(rows) == 1
    row = rows[0]
    assert row["all"] == 144_245_856 and row["trainable"] == 58_447_200
    assert row["checkpoint"] == 172_810_369 and row["paper_m"] == 172.8
    out = capsys.readouterr().out
    assert "172,810,369" in out and "144,245,856" in out
