"""``actr reproduce`` end to end on a loopback server: a fabricated SPair-71k archive and a fabricated
released checkpoint are downloaded, extracted, loaded and scored; the paper's number stands beside ours."""

import dataclasses

import numpy as np
import pytest
import xarray as xr
from hub_server import isolate_hub, loopback_server, released_checkpoint_bytes, served_artefact, spair_archive_bytes
from tiny_released import TINY_RELEASED

from actr_core import hub
from pipelines.cli import main


@pytest.fixture
def served(monkeypatch, tmp_path):
    """actr-spair and spair moved onto a loopback server; an empty cache; both offline variables unset."""
    isolate_hub(monkeypatch, tmp_path / "cache")
    with loopback_server() as server:
        spair = served_artefact(server, hub.ARTEFACTS["spair"], spair_archive_bytes(tmp_path / "build", pairs_per_split=5))
        weights = served_artefact(server, hub.ARTEFACTS["actr-spair"], released_checkpoint_bytes(), model_config=TINY_RELEASED)
        monkeypatch.setitem(hub.ARTEFACTS, "spair", spair)
        monkeypatch.setitem(hub.ARTEFACTS, "actr-spair", weights)
        yield server


def test_reproduce_end_to_end(served, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["reproduce", "--benchmark", "spair", "--data-root", str(tmp_path / "data"), "--out", str(out), "--batch-size", "2"]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "paper: Table 1, row ACTR (iBOT-B, 256×256), column SPair-71K α_bbox" in printed
    assert "released checkpoint, selected on the test split by its authors" in printed
    for line in (
        "ours: actr-spair, released protocol",
        "ours: actr-spair, standard protocol",
        "ours − paper (released protocol)",
    ):
        assert line in printed
    assert "per category, PCK@0.1" in printed and "\ncat " in printed and "\ndog " in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "reproduce.nc",
        "reproduce.png",
        "results_released.nc",
        "results_standard.nc",
        "table.txt",
    ]
    with xr.open_dataset(out / "reproduce.nc", engine="h5netcdf") as table:
        table = table.load()
    assert table.attrs["paper_table"] == "Table 1" and int(table["n_pairs"]) == 5
    assert float(table["paper_pck"].sel(alpha=0.1)) == 62.1 and np.isnan(float(table["paper_pck"].sel(alpha=0.05)))
    ours = table["pck"].sel(protocol="released", predictor="model")
    np.testing.assert_allclose(table["difference"].sel(protocol="released", alpha=0.1), ours.sel(alpha=0.1) - 62.1)
    with xr.open_dataset(out / "results_standard.nc", engine="h5netcdf") as standard:
        expected = 100 * standard["pck_image_overall"].sel(predictor="identity").values
    np.testing.assert_allclose(table["pck"].sel(protocol="standard", predictor="identity").values, expected)
    assert set(table["predictor"].values) == {"model", "identity", "classical_peer"}
    # a second run uses the cache and the extracted folder: no request
    seen = len(served.requests)
    assert main([*argv, "--no-progress", "--no-peer", "--protocol", "standard", "--limit", "2"]) == 0
    assert len(served.requests) == seen
    assert "ours − paper (standard protocol)" in capsys.readouterr().out


def test_reproduce_user_errors(served, tmp_path, capsys, monkeypatch):
    assert main(["reproduce", "--benchmark", "caltech"]) == 2
    assert "--benchmark must be one of" in capsys.readouterr().err
    assert main(["reproduce", "--weights", str(tmp_path / "nope.pth"), "--data-root", str(tmp_path)]) == 2
    assert "neither a known checkpoint name nor a file" in capsys.readouterr().err
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    assert main(["reproduce", "--data-root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "actr-spair is not in the cache and ACTR_CORE_OFFLINE=1" in err and err.count("\n") == 1
    assert served.requests == []


def test_paper_results_name_their_table_and_row():
    from pipelines.reproduce import BENCHMARKS, paper_results

    for benchmark in BENCHMARKS:
        entry = paper_results(benchmark)
        assert entry["table"] in ("Table 1", "Table 2") and entry["row"].startswith("ACTR") and entry["pck"]
        assert entry["weights"] in hub.ARTEFACTS
    assert paper_results("pfpascal")["pck"] == {0.05: 81.2, 0.1: 94.0, 0.15: 97.0}
    assert dataclasses.is_dataclass(hub.ARTEFACTS["spair"])
