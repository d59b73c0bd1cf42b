"""Side-by-side CPU benchmark: our MMNet against the released MMNet code, random weights, same input.

Usage (the released code is a checkout you provide; it is never bundled)::

    python benchmarks/mmnet_vs_released.py --reference /path/to/MMNet --height 224 --width 320 --threads 2

What it does, in one process:

1. builds the released ``MMNet`` (``models/Model.py``; its module-level ``import gluoncvth`` is
   satisfied by an empty stand-in module, and its ImageNet download is turned off) with random
   weights, and ours (``actr_core.models.mmnet_resnet101``);
2. copies the released weights into ours (``convert_released_state_dict``) and checks that both
   give the same correlation pyramid, both directions (the same network, up to float rounding);
3. times ``forward`` of both under ``torch.inference_mode`` in alternating order (so that load
   from other processes hits both alike) with ``torch.utils.benchmark.Timer`` (two untimed warm-up
   calls before each timed one), and prints min / median / mean seconds per pair (wall clock), the
   median process CPU seconds, parameters and FLOPs (``torch.utils.flop_counter``), and the
   ratios: of medians, of minima, the median of the per-round ratios (both models timed back to
   back), and of CPU seconds.

``--only ours|released`` runs one model alone and also reports the process's peak resident memory.
Without ``--reference`` only ours runs (``--backbone tiny``: a dry run of the script).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from harness import count_flops, peak_rss_mb, time_call
from torch import nn

from actr_core.models import MMNet, mmnet_resnet50, mmnet_resnet101, mmnet_tiny, parameter_count
from actr_core.models.mmnet import convert_released_state_dict

BUILDERS = {"resnet101": mmnet_resnet101, "resnet50": mmnet_resnet50, "tiny": mmnet_tiny}
RELEASED_MS_RATE = 4  # released option ms_rate
RELEASED_FEATURE_CHANNEL = 21  # released option feature_channel


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One run (the command line's options)."""

    reference: str | None  # path of a released MMNet checkout (github wintersun661/MMNet); None = ours only
    backbone: str = "resnet101"  # released default backbone_name ("tiny": ours only, a dry run)
    height: int = 224  # released default resize "224,320" (H, W)
    width: int = 320
    batch: int = 1  # pairs per call
    threads: int = 2  # torch threads
    repeats: int = 10  # timed rounds
    only: str | None = None  # "ours" or "released": one model alone, with its peak RSS
    json_path: str | None = None  # also write the result here


def load_released(path: str, backbone: str) -> nn.Module:
    """The released MMNet with random weights: gluoncvth stubbed, ImageNet download disabled."""
    sys.path.insert(0, path)
    sys.modules.setdefault("gluoncvth", types.ModuleType("gluoncvth"))
    from models import resnet  # type: ignore[import-not-found]  # the released checkout's package

    build = resnet._resnet
    resnet._resnet = lambda arch, block, layers, pretrained, progress, **kw: build(arch, block, layers, False, progress, **kw)
    from models.Model import MMNet as ReleasedMMNet  # type: ignore[import-not-found]

    opt = types.SimpleNamespace(backbone_name=backbone, ms_rate=RELEASED_MS_RATE, feature_channel=RELEASED_FEATURE_CHANNEL)
    return ReleasedMMNet(opt, device="cpu").eval()


def check_equal(ours: MMNet, released: nn.Module, src: torch.Tensor, trg: torch.Tensor) -> list[float]:
    """Copy the released weights into ours; return the max |difference| / max |value| per level (both directions)."""
    ours.load_state_dict(convert_released_state_dict(released.state_dict()), strict=True)
    with torch.inference_mode():
        out = ours(src, trg)
        theirs = released({"src_img": src, "trg_img": trg})
    errors = []
    for level, (ab, ba) in enumerate(theirs):
        for mine, ref in ((out.pyramid[level], ab), (out.reverse(level), ba)):
            errors.append(float((mine - ref).abs().max() / ref.abs().max()))
    return errors


def _summary(times: list[float], cpu: list[float]) -> dict[str, Any]:
    return {
        "min_s": min(times),
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "times_s": times,
        "cpu_median_s": statistics.median(cpu),
    }


def main(cfg: BenchConfig) -> dict[str, Any]:
    """Build, check, count and time; returns every figure."""
    if cfg.backbone not in BUILDERS:
        raise ValueError(f"backbone = {cfg.backbone!r}: expected one of {sorted(BUILDERS)}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    src, trg = torch.randn(cfg.batch, 3, cfg.height, cfg.width), torch.randn(cfg.batch, 3, cfg.height, cfg.width)
    runs: dict[str, Callable[[], Any]] = {}
    result: dict[str, Any] = {"config": dataclasses.asdict(cfg), "torch": torch.__version__}
    if cfg.only in (None, "ours"):
        ours = BUILDERS[cfg.backbone]().eval()
        runs["ours"] = lambda: ours(src, trg)
        result["ours_params"] = parameter_count(ours)
    if cfg.reference is not None and cfg.only in (None, "released"):
        released = load_released(cfg.reference, cfg.backbone)
        runs["released"] = lambda: released({"src_img": src, "trg_img": trg})
        result["released_params"] = parameter_count(released)
        if "ours" in runs:
            result["relative_error_per_level"] = check_equal(ours, released, src, trg)
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for name, fn in runs.items():
            result[f"{name}_gflop"] = count_flops(fn)[0] / 1e9
        for r in range(cfg.repeats):
            for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
                wall, used = time_call(runs[name])
                times[name].append(wall)
                cpu[name].append(used)
    for name in runs:
        result[name] = _summary(times[name], cpu[name])
    if "ours" in runs and "released" in runs:
        mine, ref = result["ours"], result["released"]
        # each round times both models back to back, so the ratio within a round shares that round's load
        paired = [a / b for a, b in zip(times["ours"], times["released"], strict=True)]
        result["ours_vs_released"] = {
            "ratio_median": mine["median_s"] / ref["median_s"],
            "ratio_min": mine["min_s"] / ref["min_s"],
            "ratio_paired_median": statistics.median(paired),
            "ratio_cpu_median": mine["cpu_median_s"] / ref["cpu_median_s"],
        }
    if cfg.only is not None:
        result["peak_rss_gb"] = peak_rss_mb() / 1024
    return result


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    """Command line → :class:`BenchConfig`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", help="path of a released MMNet checkout (github wintersun661/MMNet)")
    parser.add_argument("--backbone", default="resnet101", choices=sorted(BUILDERS))
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", choices=("ours", "released"))
    parser.add_argument("--json", dest="json_path", help="also write the result here")
    return BenchConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    config = parse_args()
    text = json.dumps(main(config), indent=2)
    print(text)
    if config.json_path:
        with open(config.json_path, "w") as fh:
            fh.write(text + "\n")
