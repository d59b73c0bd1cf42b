"""The public surface of 0.1.0 is kept: every public name, config key, command and flag still exists,
or moved to a place listed here and in CHANGELOG.md.

The 0.1.0 inventory (``tests/fixtures/inventory_0_1_0.json``) was collected from the 0.1.0 tree:
``__all__`` of each subpackage, the fields of every public ``*Config`` / ``*Settings`` dataclass, and
every ``actr`` command with the flags its ``--help`` shows.
"""

import dataclasses
import importlib
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = json.loads((ROOT / "tests" / "fixtures" / "inventory_0_1_0.json").read_text())
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()

# 0.1.0 item -> where it is now ("module:name", "module:Config.field", "cli:command --flag") or why it went.
MOVED: dict[str, str] = {  # a value is where the item is now, or "removed: why"
    "actr_core.data:BATCH_KEYS": "removed: a batch is a typed PairBatch (actr_core.data:PairBatch); its dataclass fields are the schema",
    "actr_core.data:split_by_node": "removed: the epoch plan (actr_core.data:plan_epoch) assigns shards to ranks and workers",
    "actr_core.data:split_by_worker": "removed: the epoch plan (actr_core.data:plan_epoch) assigns shards to ranks and workers",
    "actr_core.models:ACTRReleased": "actr_core.models:actr_released",
    "actr_core.models:Matcher": "actr_core.models:CorrespondenceModel",
    "actr_core.training:config_from_args": "removed: command lines are parsed by tyro in pipelines (pipelines/entry.py); TrainConfig.from_dict reads YAML mappings",
    "actr_core.training:parse_overrides": "removed: command lines are parsed by tyro in pipelines (pipelines/entry.py); TrainConfig.from_dict reads YAML mappings",
    "actr_core.models:MMNetConfig.onednn_inference": "removed: the oneDNN inference path is gone (torch.compile is the fast path); MMNet builders accept and ignore the keyword",
    "actr_core.training:TrainConfig.checkpoints_to_keep": "pipelines.train:RaySettings.checkpoints_to_keep",
    "actr_core.training:TrainConfig.cpus_per_worker": "pipelines.train:RaySettings.cpus_per_worker",
    "actr_core.training:TrainConfig.find_unused_parameters": "pipelines.train:RaySettings.find_unused_parameters",
    "actr_core.training:TrainConfig.max_failures": "pipelines.train:RaySettings.max_failures",
    "actr_core.training:TrainConfig.num_workers": "pipelines.train:RaySettings.num_workers",
    "actr_core.training:TrainConfig.object_store_mb": "pipelines.train:RaySettings.object_store_mb",
    "actr_core.training:TrainConfig.ray_address": "pipelines.train:RaySettings.ray_address",
    "actr_core.training:TrainConfig.ray_num_cpus": "pipelines.train:RaySettings.ray_num_cpus",
    "actr_core.training:TrainConfig.use_gpu": "pipelines.train:RaySettings.use_gpu",
    "cli:bench": "removed: benchmarks run from a clone as python benchmarks/model_costs.py (and the other scripts in benchmarks/)",
    "cli:train --key": "removed: the generic --key value spelling is one flag per setting, --setting-name value",
    "cli:train --working-dir": "removed: never a flag of train; it appeared in the help's ray job submit example",
}


def _resolve(target: str) -> bool:
    """Whether ``module:name`` / ``module:Class.field`` / ``cli:command --flag`` exists now."""
    if target.startswith("cli:"):
        command, *flag = target[4:].split()
        return command in _commands() and all(f in _flags(command) for f in flag)
    module, _, name = target.partition(":")
    owner_name, _, field = name.partition(".")
    owner = getattr(importlib.import_module(module), owner_name, None)
    if owner is None:
        return False
    return not field or field in {f.name for f in dataclasses.fields(owner)}


@cache
def _help(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    return done.stdout + done.stderr


@cache
def _commands() -> frozenset[str]:
    return frozenset(re.findall(r"^  (\S+)\s", _help(), re.M))


@cache
def _flags(command: str) -> frozenset[str]:
    return frozenset(f.replace("_", "-") for f in re.findall(r"--[a-zA-Z][\w.-]*", _help(command)))


def _check(key: str, present: bool) -> None:
    if present:
        return
    assert key in MOVED, f"{key} of 0.1.0 is gone and not listed as moved"
    assert MOVED[key].startswith("removed: ") or _resolve(MOVED[key]), f"{key} moved to {MOVED[key]}, which does not exist"


NAMES = [(module, name) for module, names in BASE["names"].items() for name in names]
FIELDS = [(config, field) for config, fields in BASE["configs"].items() for field in fields]
FLAGS = [(command, flag) for command, flags in BASE["cli"].items() for flag in [""] + flags]


@pytest.mark.parametrize(("module", "name"), NAMES, ids=[f"{m}:{n}" for m, n in NAMES])
def test_public_name_kept(module, name):
    _check(f"{module}:{name}", hasattr(importlib.import_module(module), name))


@pytest.mark.parametrize(("config", "field"), FIELDS, ids=[f"{c}.{f}" for c, f in FIELDS])
def test_config_key_kept(config, field):
    module, _, cls = config.rpartition(".")
    owner = getattr(importlib.import_module(module), cls, None)
    present = owner is not None and field in {f.name for f in dataclasses.fields(owner)}
    _check(f"{module}:{cls}.{field}", present)


@pytest.mark.parametrize(("command", "flag"), FLAGS, ids=[f"{c} {f}".strip() for c, f in FLAGS])
def test_cli_command_and_flag_kept(command, flag):
    if flag and command not in _commands() and f"cli:{command}" in MOVED:
        return  # the whole command moved; its entry says where
    present = command in _commands() and (not flag or flag in _flags(command))
    _check(f"cli:{command} {flag}".strip(), present)


def test_every_move_is_in_the_changelog():
    missing = [old for old in MOVED if old.split(":", 1)[1].split(".")[-1].split()[-1].lstrip("-") not in CHANGELOG]
    assert not missing, f"moves not described in CHANGELOG.md: {missing}"
