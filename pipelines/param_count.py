"""Parameter counts of every registered model, beside the paper's Table 3.

    python pipelines/param_count.py            # all registered models
    python pipelines/param_count.py --only actr_released

Models come from the registry of ``actr_core.models`` (``register_model``); a builder that
registers with ``paper_row=`` appears beside that row of Table 3. Models are built on the meta
device (no memory, no weights). For ACTR as released the count of the released checkpoint, with
the modules its code creates but never uses, is printed too (172,810,369 for ViT-B).
"""

import dataclasses
import sys
import warnings
from collections.abc import Sequence

import torch

# The ACTR paper (CVPR 2023), Table 3: parameters in millions.
PAPER_TABLE3 = {"ACTR": 172.8, "ACTR-S": 44.2}
# Rows this library offers that Table 3 does not list with a count.
OTHER_ROWS = ("Baseline",)


@dataclasses.dataclass(frozen=True)
class ParamCountConfig:
    """Parameter counts of every registered model, beside the paper's Table 3."""

    only: tuple[str, ...] | None = None  # registered model names to count (default: all)


def build_on_meta(builder):
    """Build without allocating memory when the builder allows it (else on the CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random-initialisation notices
        try:
            with torch.device("meta"):
                return builder()
        except Exception:  # a builder that cannot run on meta still gets counted
            return builder()


def count_rows(only: list[str] | None = None) -> list[dict]:
    from actr_core.models import ACTRReleasedConfig, model_entries, official_parameter_count, parameter_count

    rows = []
    for entry in model_entries():
        if only and entry.name not in only:
            continue
        model = build_on_meta(entry.builder)
        row = {
            "name": entry.name,
            "paper_row": entry.paper_row or "",
            "paper_m": entry.paper_params_m,
            "all": parameter_count(model),
            "trainable": parameter_count(model, trainable_only=True),
            "note": entry.description,
        }
        if isinstance(getattr(model, "config", None), ACTRReleasedConfig):  # ACTR as released
            row["checkpoint"] = official_parameter_count(model)
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    header = f"{'model':<22}{'paper row':<11}{'paper (M)':>10}{'ours (M)':>11}{'exact':>14}{'trainable (M)':>15}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        paper = f"{r['paper_m']:.1f}" if r["paper_m"] is not None else "-"
        lines.append(
            f"{r['name']:<22}{r['paper_row']:<11}{paper:>10}{r['all'] / 1e6:>11.3f}{r['all']:>14,}"
            f"{r['trainable'] / 1e6:>15.3f}  {r['note']}"
        )
        if "checkpoint" in r:
            lines.append(
                f"{'  released checkpoint':<22}{r['paper_row']:<11}{paper:>10}{r['checkpoint'] / 1e6:>11.3f}"
                f"{r['checkpoint']:>14,}{'':>15}  incl. modules the released code creates but never uses"
            )
    covered = {r["paper_row"] for r in rows}
    for row_name, value in PAPER_TABLE3.items():
        if row_name not in covered:
            lines.append(f"{'(not registered)':<22}{row_name:<11}{value:>10.1f}{'-':>11}{'-':>14}{'-':>15}")
    for row_name in OTHER_ROWS:
        if row_name not in covered:
            lines.append(f"{'(not registered)':<22}{row_name:<11}{'-':>10}{'-':>11}{'-':>14}{'-':>15}")
    return "\n".join(lines)


def main(cfg: ParamCountConfig) -> list[dict]:
    """Count, print the table, return its rows; an unregistered name in ``only`` is a ``ValueError``."""
    from actr_core.models import model_entries

    unknown = sorted(set(cfg.only or ()) - {entry.name for entry in model_entries()})
    if unknown:
        raise ValueError(f"--only: no registered model named {unknown}; registered: {[e.name for e in model_entries()]}")
    rows = count_rows(list(cfg.only) if cfg.only else None)
    print(render(rows))
    return rows


def cli(argv: Sequence[str], prog: str = "python pipelines/param_count.py") -> int:
    """Entry point: exit status 0 (user errors: see :mod:`pipelines.entry`)."""
    from pipelines.entry import parse_config

    main(parse_config(ParamCountConfig, argv, prog=prog, description=__doc__.split("\n\n")[0]))
    return 0


if __name__ == "__main__":
    from pipelines.entry import run

    sys.exit(run(cli))
