"""Side-by-side CPU benchmark: our MMNet against the released MMNet code, random weights, same input.

Usage (the released code is a checkout you provide; it is never bundled)::

    python pipelines/bench_mmnet.py --reference /path/to/MMNet --height 224 --width 320 --threads 2

What it does, in one process:

1. builds the released ``MMNet`` (``models/Model.py``; its module-level ``import gluoncvth`` is
   satisfied by an empty stand-in module, and its ImageNet download is turned off) with random
   weights, and ours (:func:`actr_core.models.mmnet_resnet101`) twice: as built ("ours": in eval
   mode without autograd its convolutions run fused through oneDNN) and with
   ``onednn_inference=False`` ("ours_modules": every layer through its ``nn.Module``);
2. copies the released weights into ours (:func:`convert_released_state_dict`) and checks that
   all give the same correlation pyramid, both directions (the same network, up to float
   rounding);
3. times ``forward`` of both under ``torch.inference_mode`` in alternating order (so that load
   from other processes hits both alike), after warm-up, and prints min / median / mean seconds
   per pair (wall clock) and the median process CPU seconds, parameters and FLOPs
   (``torch.utils.flop_counter``), and the ratios: of medians, of minima, the median of the
   per-round ratios (both models timed back to back), and of CPU seconds.

``--only ours|ours_modules|released`` runs one model alone and also reports its peak resident
memory.
"""

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from actr_core.models.base import parameter_count
from actr_core.models.mmnet import MMNet, convert_released_state_dict, mmnet_resnet50, mmnet_resnet101

_BUILDERS = {"resnet101": mmnet_resnet101, "resnet50": mmnet_resnet50}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    reference: str | None  # path of a released MMNet checkout (github wintersun661/MMNet); None = ours only
    backbone: str = "resnet101"  # released default backbone_name
    height: int = 224  # released default resize "224,320" (H, W)
    width: int = 320
    batch: int = 1
    threads: int = 2
    warmup: int = 2
    repeats: int = 10
    only: str | None = None  # "ours", "ours_modules" or "released": one model alone, with its peak RSS
    json_path: str | None = None


def load_released(path: str, backbone: str) -> nn.Module:
    """The released MMNet with random weights: gluoncvth stubbed, ImageNet download disabled."""
    sys.path.insert(0, path)
    sys.modules.setdefault("gluoncvth", types.ModuleType("gluoncvth"))
    from models import resnet  # type: ignore[import-not-found]  # the released checkout's package

    build = resnet._resnet
    resnet._resnet = lambda arch, block, layers, pretrained, progress, **kw: build(
        arch, block, layers, False, progress, **kw
    )
    from models.Model import MMNet as ReleasedMMNet  # type: ignore[import-not-found]

    opt = types.SimpleNamespace(backbone_name=backbone, ms_rate=4, feature_channel=21)
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


def _time(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def _flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _summary(times: list[float]) -> dict[str, float]:
    return {"min_s": min(times), "median_s": statistics.median(times), "mean_s": statistics.fmean(times)}


def main(cfg: BenchConfig) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    src = torch.randn(cfg.batch, 3, cfg.height, cfg.width)
    trg = torch.randn(cfg.batch, 3, cfg.height, cfg.width)
    runs: dict[str, Callable[[], Any]] = {}
    result: dict[str, Any] = {"config": dataclasses.asdict(cfg), "torch": torch.__version__}
    if cfg.only in (None, "ours"):
        ours = _BUILDERS[cfg.backbone]().eval()
        runs["ours"] = lambda: ours(src, trg)
        result["ours_params"] = parameter_count(ours)
    if cfg.only in (None, "ours_modules"):
        # the same network through its nn.Modules (no fused oneDNN path): the reference path
        modules = _BUILDERS[cfg.backbone](onednn_inference=False).eval()
        if "ours" in runs:
            modules.load_state_dict(ours.state_dict())
        runs["ours_modules"] = lambda: modules(src, trg)
    if cfg.reference is not None and cfg.only in (None, "released"):
        released = load_released(cfg.reference, cfg.backbone)
        runs["released"] = lambda: released({"src_img": src, "trg_img": trg})
        result["released_params"] = parameter_count(released)
        if "ours" in runs:
            result["relative_error_per_level"] = check_equal(ours, released, src, trg)
        if "ours_modules" in runs:
            result["relative_error_per_level_modules"] = check_equal(modules, released, src, trg)
    with torch.inference_mode():
        for name, fn in runs.items():
            # FlopCounterMode does not see oneDNN's fused operators: count the module path
            if name == "ours" and "ours_modules" not in runs:
                continue
            counted = runs["ours_modules"] if name == "ours" else fn
            result[f"{name}_gflop"] = _flops(counted) / 1e9
        for _ in range(cfg.warmup):
            for fn in runs.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(cfg.repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                wall, used = _time(runs[name])
                times[name].append(wall)
                cpu[name].append(used)
    for name, ts in times.items():
        result[name] = {**_summary(ts), "times_s": ts, "cpu_median_s": statistics.median(cpu[name])}
    for name in ("ours", "ours_modules"):
        if name not in runs or "released" not in runs:
            continue
        mine, ref = result[name], result["released"]
        # each round times all models back to back, so the ratio within a round shares that round's load
        paired = [a / b for a, b in zip(times[name], times["released"], strict=True)]
        result[f"{name}_vs_released"] = {
            "ratio_median": mine["median_s"] / ref["median_s"],
            "ratio_min": mine["min_s"] / ref["min_s"],
            "ratio_paired_median": statistics.median(paired),
            "ratio_cpu_median": mine["cpu_median_s"] / ref["cpu_median_s"],
        }
    if cfg.only is not None:
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def _parse(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", help="path of a released MMNet checkout (github wintersun661/MMNet)")
    parser.add_argument("--backbone", default="resnet101", choices=sorted(_BUILDERS))
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", choices=("ours", "ours_modules", "released"))
    parser.add_argument("--json", dest="json_path", help="also write the result here")
    args = parser.parse_args(argv)
    return BenchConfig(**vars(args))


if __name__ == "__main__":
    config = _parse()
    out = main(config)
    text = json.dumps(out, indent=2)
    print(text)
    if config.json_path:
        with open(config.json_path, "w") as fh:
            fh.write(text + "\n")
