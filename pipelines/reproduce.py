"""Evaluate a released ACTR checkpoint and print our PCK beside the paper's: ``actr reproduce``.

    actr reproduce --benchmark spair                 # actr-spair on SPair-71k test
    actr reproduce --benchmark pfwillow --data-root /data --device cuda

Fetches what is missing (the checkpoint into the cache, the data set under ``--data-root``; see
``actr download``), scores the test split with :func:`actr_core.metrics.evaluate` under the
released protocol (how the released code scored, which the paper's numbers come from) and the
standard one, the identity predictor (zero motion) and the classical peer on the same pairs, and
prints: the paper's number (table, row and column named; ``actr_core/paper_results.json``), ours
under each protocol, the references, and ours minus the paper under ``--protocol``; then the same
per category. The released checkpoints were selected on the test split by their authors: the
table says so. Writes ``reproduce.nc`` (the comparison), ``results_<protocol>.nc`` (every pair),
``table.txt`` and ``reproduce.png`` under ``--out``. CPU works (the bar shows the time left);
a GPU is much faster.
"""

import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from actr_core import hub
from actr_core.data import PairReader, build_sample, collate, open_reader
from actr_core.metrics import DEFAULT_ALPHAS, IDENTITY, MODEL, REFERENCE_LABELS, REFERENCE_NAMES, evaluate, save_results

BENCHMARKS = ("spair", "pfpascal", "pfwillow")
PROTOCOL_CHOICES = ("released", "standard")
SELECTION_NOTE = "released checkpoint, selected on the test split by its authors"


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """Evaluate a released ACTR checkpoint beside the paper's reported PCK."""

    benchmark: str = "spair"  # spair | pfpascal | pfwillow (test split)
    weights: str | None = None  # released checkpoint name (actr-spair, actr-pfpascal) or model_best.pth; default: the paper's
    data_root: str | None = None  # folder holding the data set (or the data set's folder); default <cache>/datasets
    protocol: str = "released"  # released | standard: the protocol compared with the paper (the other is printed beside it)
    out: str = "runs/reproduce"  # output folder
    batch_size: int = 8  # pairs per batch
    limit: int = 0  # score only the first `limit` pairs (0: all)
    device: str = "cpu"  # torch device
    peer: bool = True  # score the classical peer (ORB + RANSAC) beside the model; identity always
    download: bool = True  # fetch a missing checkpoint or data set (--no-download: use what is there)
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"--benchmark must be one of {BENCHMARKS}, got {self.benchmark!r}")
        if self.protocol not in PROTOCOL_CHOICES:
            raise ValueError(f"--protocol must be one of {PROTOCOL_CHOICES}, got {self.protocol!r}")
        if self.batch_size < 1 or self.limit < 0:
            raise ValueError(f"--batch-size must be >= 1 and --limit >= 0, got {self.batch_size}, {self.limit}")


def paper_results(benchmark: str) -> dict[str, Any]:
    """The paper's entry for ``benchmark`` (table, row, column, weights, ``pck`` {α: %}) from the package data."""
    text = resources.files("actr_core").joinpath("paper_results.json").read_text(encoding="utf-8")
    data = json.loads(text)
    entry = dict(data["results"][benchmark])
    entry["pck"] = {float(a): float(v) for a, v in entry["pck"].items()}
    entry["paper"] = data["paper"]
    return entry


def load_model(cfg: ReproduceConfig, weights: str) -> tuple[Any, tuple[int, int], str]:
    """The model, its input size and a label: a registered checkpoint by name, or a local released file."""
    if weights in hub.ARTEFACTS:
        if not cfg.download and not hub.is_offline():
            path = hub.cache_dir() / weights / hub.ARTEFACTS[weights].filename
            if not path.is_file():
                raise FileNotFoundError(f"{weights} is not in the cache ({path}) and --no-download was given")
        model, size = hub.load_released_model(weights, progress=cfg.progress)
        return model.to(cfg.device), size, weights
    if not Path(weights).is_file():
        raise FileNotFoundError(f"--weights {weights!r} is neither a known checkpoint name nor a file")
    from actr_core.models import load_official_actr
    from actr_core.models.config import ACTR_RELEASED_CONFIG

    side = ACTR_RELEASED_CONFIG.image_size
    return load_official_actr(weights).to(cfg.device), (side, side), Path(weights).name


def pair_batches(reader: PairReader, size: tuple[int, int], batch_size: int, count: int) -> Iterator[Mapping[str, Any]]:
    """The first ``count`` pairs of ``reader`` at the model's input ``size``, in batches of the data schema."""
    for start in range(0, count, batch_size):
        samples = [build_sample(reader.load(i), size) for i in range(start, min(start + batch_size, count))]
        yield collate(samples, images="uint8")


def _label(predictor: str, weights: str) -> str:
    return f"ours: {weights}" if predictor == MODEL else REFERENCE_LABELS.get(predictor, predictor)


def comparison(
    results: Mapping[str, xr.Dataset], paper: Mapping[str, Any], alphas: Sequence[float], cfg: ReproduceConfig, weights: str
) -> xr.Dataset:
    """Overall and per-category PCK (%) per protocol and predictor, the paper's number, and ours − paper."""
    protocols = list(results)
    predictors = [str(p) for p in results[protocols[0]]["predictor"].values]
    categories = [str(c) for c in results[protocols[0]]["category"].values]
    overall = np.array(
        [
            [[100 * float(results[pr]["pck_image_overall"].sel(predictor=p, alpha=a)) for a in alphas] for p in predictors]
            for pr in protocols
        ]
    )
    per_category = np.array(
        [[[[100 * float(results[pr]["pck_image"].sel(predictor=p, alpha=a, category=c)) for a in alphas] for c in categories] for p in predictors] for pr in protocols]
    )  # fmt: skip
    paper_pck = np.array([paper["pck"].get(a, np.nan) for a in alphas])
    model = predictors.index(MODEL)
    return xr.Dataset(
        {
            "pck": (("protocol", "predictor", "alpha"), overall, {"units": "%", "average": "per image, all pairs"}),
            "pck_category": (("protocol", "predictor", "category", "alpha"), per_category, {"units": "%"}),
            "paper_pck": (
                ("alpha",),
                paper_pck,
                {"units": "%", "source": f"{paper['table']}, row {paper['row']}, {paper['column']}"},
            ),
            "difference": (
                ("protocol", "alpha"),
                overall[:, model] - paper_pck,
                {"units": "percentage points", "meaning": "ours - paper"},
            ),
            "n_pairs": ((), int(results[protocols[0]]["n_pairs_total"]) if "n_pairs_total" in results[protocols[0]] else -1),
        },
        coords={"protocol": protocols, "predictor": predictors, "category": categories, "alpha": list(alphas)},
        attrs={
            "benchmark": cfg.benchmark,
            "split": "test",
            "paper": paper["paper"],
            "paper_table": paper["table"],
            "paper_row": paper["row"],
            "paper_column": paper["column"],
            "weights": weights,
            "weights_note": SELECTION_NOTE,
            "compared_protocol": cfg.protocol,
        },
    )


def format_comparison(table: xr.Dataset) -> str:
    """The printed table: the paper, ours and the references per protocol, the difference; then per category."""
    alphas = [float(a) for a in table["alpha"].values]
    cells = lambda values: "".join(f"{v:>9.1f}" if np.isfinite(v) else f"{'—':>9}" for v in values)
    head = f"{'':<52}" + "".join(f"{f'α={a:g}':>9}" for a in alphas)
    weights = table.attrs["weights"]
    lines = [
        f"{table.attrs['benchmark']} test, {int(table['n_pairs'])} pairs · weights {weights} ({table.attrs['weights_note']})",
        f"paper: {table.attrs['paper_table']}, row {table.attrs['paper_row']}, column {table.attrs['paper_column']}",
        "PCK per image in %; the paper's numbers come from the released protocol",
        "-" * len(head),
        head,
        "-" * len(head),
        f"{'paper (' + table.attrs['paper_table'] + ')':<52}" + cells(table["paper_pck"].values),
    ]
    for protocol in table["protocol"].values:
        for predictor in table["predictor"].values:
            name = f"{_label(str(predictor), weights)}, {protocol} protocol"
            lines.append(f"{name[:51]:<52}" + cells(table["pck"].sel(protocol=protocol, predictor=predictor).values))
    compared = table.attrs["compared_protocol"]
    lines.append(f"{'ours − paper (' + compared + ' protocol)':<52}" + cells(table["difference"].sel(protocol=compared).values))
    alpha = 0.1 if 0.1 in alphas else alphas[-1]
    columns = [(str(pr), str(p)) for p in table["predictor"].values for pr in table["protocol"].values]
    short = {MODEL: "ours", IDENTITY: "identity"}
    names = [f"{short.get(p, 'peer')} ({pr[:3]}.)" for pr, p in columns]
    lines += [
        "",
        f"per category, PCK@{alpha:g} in % (the paper reports no per-category numbers)",
        f"{'category':<20}" + "".join(f"{n:>17}" for n in names),
    ]
    for category in table["category"].values:
        values = [float(table["pck_category"].sel(protocol=pr, predictor=p, category=category, alpha=alpha)) for pr, p in columns]
        lines.append(f"{str(category)[:19]:<20}" + "".join(f"{v:>17.1f}" if np.isfinite(v) else f"{'—':>17}" for v in values))
    return "\n".join(lines)


def _write_atomic(path: Path, write: Any) -> Path:
    """``write(temporary path)``, then rename onto ``path`` (a crash leaves no half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_comparison(table: xr.Dataset, path: Path) -> Path:
    """Bars per α: the paper, ours and identity under each protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [float(a) for a in table["alpha"].values]
    bars = [("paper", table["paper_pck"].values)]
    for protocol in table["protocol"].values:
        for predictor in (MODEL, IDENTITY):
            bars.append(
                (
                    f"{_label(predictor, table.attrs['weights'])} ({protocol})",
                    table["pck"].sel(protocol=protocol, predictor=predictor).values,
                )
            )
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(bars)
    for i, (name, values) in enumerate(bars):
        ax.bar(np.arange(len(alphas)) + (i - (len(bars) - 1) / 2) * width, np.nan_to_num(values), width, label=name)
    ax.set_xticks(np.arange(len(alphas)), [f"α={a:g}" for a in alphas])
    ax.set_ylabel("PCK per image (%)")
    ax.set_ylim(0, 100)
    ax.set_title(
        f"{table.attrs['benchmark']} test: {table.attrs['weights']} ({SELECTION_NOTE}) vs {table.attrs['paper_table']}",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return _write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def main(cfg: ReproduceConfig) -> xr.Dataset:
    """Fetch, score under both protocols, print and save; returns the comparison."""
    paper = paper_results(cfg.benchmark)
    weights = cfg.weights or paper["weights"]
    model, size, label = load_model(cfg, weights)
    root = hub.dataset_root(cfg.benchmark, cfg.data_root, download=cfg.download, progress=cfg.progress)
    reader = open_reader(cfg.benchmark, str(root), "test")
    count = min(cfg.limit, len(reader)) if cfg.limit else len(reader)
    protocols = [cfg.protocol] + [p for p in PROTOCOL_CHOICES if p != cfg.protocol]
    alphas = sorted(set(DEFAULT_ALPHAS) | set(paper["pck"]))
    print(
        f"scoring {count} pairs of {root} under the {' and '.join(protocols)} protocols on {cfg.device} (the bars show the time left)"
    )
    results = {}
    for protocol in protocols:
        results[protocol] = evaluate(
            model,
            pair_batches(reader, size, cfg.batch_size, count),
            protocol=protocol,
            alphas=alphas,
            device=cfg.device,
            progress=cfg.progress,
            total=math.ceil(count / cfg.batch_size),
            model_name=f"{label} ({SELECTION_NOTE})",
            references=REFERENCE_NAMES if cfg.peer else (IDENTITY,),
        )
        results[protocol].attrs.update(split="test", data=str(root), weights_note=SELECTION_NOTE)
    table = comparison(results, paper, alphas, cfg, label)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for protocol, result in results.items():
        save_results(result, out / f"results_{protocol}.nc")
    save_results(table, out / "reproduce.nc")
    text = format_comparison(table)
    _write_atomic(out / "table.txt", lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    print(text)
    print(f"figure: {plot_comparison(table, out / 'reproduce.png')}")
    print(f"results: {out / 'reproduce.nc'}")
    return table


def cli(argv: Sequence[str], prog: str = "python pipelines/reproduce.py") -> int:
    """Entry point: parse, check the device, run; exit status 0 (user errors: see :mod:`pipelines.entry`)."""
    from pipelines.entry import check_device, parse_config

    cfg = parse_config(ReproduceConfig, argv, prog=prog, description=__doc__.split("\n\n")[0])
    check_device(cfg.device)
    main(cfg)
    return 0


if __name__ == "__main__":
    from pipelines.entry import run

    sys.exit(run(cli))
