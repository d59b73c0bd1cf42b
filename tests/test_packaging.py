"""Packaging: the core install is what the blocks and models need; everything else is an extra.

``import actr_core.blocks`` and ``import actr_core.models`` must load neither Ray nor webdataset nor
xarray, and every third-party module they do load must come from a core dependency (or one of its
own requirements), so that ``pip install actr_core`` without extras is enough to build models.
"""

import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import actr_core

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HEAVY = ("ray", "webdataset", "xarray", "matplotlib", "fsspec", "h5netcdf", "skimage", "scipy")


def _loaded_after(statement: str) -> set[str]:
    """Top-level module names in ``sys.modules`` after running ``statement`` in a fresh interpreter."""
    code = f"import sys, json; {statement}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names reachable from ``requirements`` through installed metadata (extras not followed)."""
    seen: set[str] = set()
    todo = [_name(r) for r in requirements]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_blocks_and_models_load_no_extras():
    loaded = _loaded_after("import actr_core.blocks, actr_core.models, actr_core.flow")
    assert not loaded & set(HEAVY), f"importing blocks/models loaded {sorted(loaded & set(HEAVY))}"


def test_blocks_and_models_need_only_core_dependencies():
    loaded = _loaded_after("import actr_core.blocks, actr_core.models, actr_core.flow")
    providers = metadata.packages_distributions()
    core = _closure(PYPROJECT["project"]["dependencies"]) | {"actr-core"}
    outside = {}
    for module in loaded:
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if dists and not dists & core and module not in sys.stdlib_module_names:
            outside[module] = sorted(dists)
    assert not outside, f"modules from outside the core dependencies: {outside}"


def test_core_dependencies_are_the_model_stack():
    core = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert core == {"torch", "timm", "einops", "jaxtyping", "numpy"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"data", "eval", "train", "all"} <= set(extras)
    assert any(_name(r) == "ray" for r in extras["train"]) and not any(_name(r) == "ray" for r in extras["data"] + extras["eval"])


def test_version_is_the_package_version():
    assert actr_core.__version__ == PYPROJECT["project"]["version"]
