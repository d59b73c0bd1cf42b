"""The documentation names tests and modules that exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_named_in_conventions_exists():
    text = (ROOT / "docs" / "conventions.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)::([\w:]+)`", text)
    short = re.findall(r"`::(test_\w+)`", text)
    assert len(refs) >= 10
    files = {f for f, _ in refs}
    for path, name in refs:
        source = (ROOT / path).read_text()
        assert f"def {name.split('::')[-1]}(" in source, f"{path}::{name} is named in docs/conventions.md but missing"
    for name in short:
        assert any(f"def {name}(" in (ROOT / f).read_text() for f in files), f"::{name} missing"


def test_every_convention_section_names_a_test():
    text = (ROOT / "docs" / "conventions.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    for section in sections:
        assert "tests/" in section, f"section {section.splitlines()[0]!r} names no test"


def test_import_actr_core_does_not_import_ray():
    code = (
        "import sys, actr_core, actr_core.flow, actr_core.blocks, actr_core.models, actr_core.data, "
        "actr_core.metrics; print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_blocks_all_lists_the_paper_blocks():
    from actr_core import blocks

    for name in (
        "biased_cross_attention",
        "target_reweighting",
        "multihead_correlation",
        "soft_argmax",
        "masked_flow_loss",
        "DualWindowFlowSR",
        "BiasedCrossAttention",
        "TargetReweighting",
        "MultiHeadCorrelation",
        "SoftArgmax",
        "MaskedFlowLoss",
    ):
        assert name in blocks.__all__


def test_api_reference_is_current():
    """docs/api.md is generated from the docstrings; regenerate with scripts/gen_api_docs.py."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
