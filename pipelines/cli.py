"""The ``actr`` command: match images, make shards, train, evaluate, benchmark, run the main job.

User errors (a missing or unreadable file, a bad argument, a foreign checkpoint) end in one line
on stderr naming the file and the problem, and exit status 2; no traceback (set ``ACTR_DEBUG=1``
to see one).
"""

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main", "match_main", "known_warp"]

EXIT_USER_ERROR = 2


def _delegate(module: str, entry: str) -> Callable[[list[str]], object]:
    """Run ``pipelines.<module>.<entry>(argv)``; ``entry="main(parse_args)"`` parses first."""

    def run(argv: list[str]) -> object:
        mod = importlib.import_module(f"pipelines.{module}")
        if entry == "main(parse_args)":
            return mod.main(mod.parse_args(argv))
        return getattr(mod, entry)(argv)

    return run


def _user_errors() -> tuple[type[BaseException], ...]:
    from actr_core.api import ImageError

    errors: list[type[BaseException]] = [ImageError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError]
    try:
        from actr_core.training.checkpoint import CheckpointError

        errors.append(CheckpointError)
    except ImportError:  # pragma: no cover - the training package ships with the library
        pass
    return tuple(errors)


# ---------------------------------------------------------------- actr match


def known_warp(image, seed: int = 0, strength: float = 0.15):
    """A photo and a random homography of it, with the exact matches of a grid of points.

    Returns ``(target, src_kps, trg_kps, valid)``: the target (float RGB ``(3, h, w)``), source
    keypoints on a 6×6 grid inside the image, their true positions in the target, and whether
    each stays inside the target. Sampling follows the library's pixel-centre convention.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from actr_core.flow import coords_grid, normalise_coords

    h, w = image.shape[-2:]
    rng = np.random.default_rng(seed)
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]])
    moved = corners + rng.uniform(-strength, strength, size=(4, 2)) * np.array([w, h])
    homography = _fit_homography(corners, moved)  # source pixels → target pixels
    inverse = np.linalg.inv(homography)
    grid = coords_grid(h, w, dtype=torch.float64).flatten(1).T.numpy()
    src_pos = _apply(inverse, grid)  # target pixel → source position
    sample_at = normalise_coords(torch.from_numpy(src_pos), (h, w)).view(1, h, w, 2).float()
    target = F.grid_sample(image[None].float(), sample_at, mode="bilinear", align_corners=False)[0]
    xs = np.linspace(0.15 * w, 0.85 * w, 6)
    ys = np.linspace(0.15 * h, 0.85 * h, 6)
    src_kps = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    trg_kps = _apply(homography, src_kps)
    valid = (trg_kps[:, 0] >= 0) & (trg_kps[:, 0] <= w - 1) & (trg_kps[:, 1] >= 0) & (trg_kps[:, 1] <= h - 1)
    return target, torch.from_numpy(src_kps).float(), torch.from_numpy(trg_kps).float(), torch.from_numpy(valid)


def _fit_homography(src, dst):
    import numpy as np

    rows = []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    _, _, vt = np.linalg.svd(np.asarray(rows, dtype=np.float64))
    return vt[-1].reshape(3, 3) / vt[-1, -1]


def _apply(homography, pts):
    import numpy as np

    p = np.concatenate([pts, np.ones((len(pts), 1))], 1) @ homography.T
    return p[:, :2] / p[:, 2:]


def _build_matcher(args: argparse.Namespace):
    from actr_core.api import Matcher

    if args.checkpoint:
        return Matcher.from_checkpoint(args.checkpoint, device=args.device)
    if args.released:
        return Matcher.from_released(args.released, device=args.device)
    from actr_core.models import build_model

    size = args.size
    return Matcher(build_model(args.model), (size, size), device=args.device)


def match_main(argv: Sequence[str] | None = None) -> dict:
    """``actr match``: match two images (or a photo and a known warp of it); PNG + JSON out."""
    import numpy as np
    import torch

    from actr_core.api import load_image
    from actr_core.metrics import pck
    from actr_core.viz.matches import plot_matches

    p = argparse.ArgumentParser(prog="actr match", description=match_main.__doc__)
    p.add_argument("source", type=Path, help="source image file")
    p.add_argument("target", type=Path, nargs="?", help="target image file (omit with --known-warp)")
    src_model = p.add_mutually_exclusive_group(required=True)
    src_model.add_argument("--checkpoint", type=Path, help="a checkpoint written by actr train")
    src_model.add_argument("--released", type=Path, help="a released ACTR checkpoint (model_best.pth)")
    src_model.add_argument("--model", help="a registered builder name (random weights; for trying the plumbing)")
    p.add_argument("--size", type=int, default=256, help="input side for --model (default 256)")
    p.add_argument("--keypoints", type=Path, help="JSON list of [x, y] source points (default: a 6×6 grid)")
    p.add_argument("--known-warp", action="store_true", help="target = a random homography of the source; prints PCK")
    p.add_argument("--seed", type=int, default=0, help="seed of the known warp")
    p.add_argument("--alpha", type=float, default=0.1, help="PCK threshold as a fraction of the target's longer side")
    p.add_argument("--out", type=Path, default=Path("match_out"), help="output folder")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.known_warp == (args.target is not None):
        raise ValueError("give either a target image or --known-warp, not both or neither")

    source = load_image(args.source)
    gt = valid = None
    if args.known_warp:
        target, grid_kps, gt, valid = known_warp(source, seed=args.seed)
    else:
        target = load_image(args.target)
        h, w = source.shape[-2:]
        xs, ys = np.linspace(0.1 * w, 0.9 * w, 6), np.linspace(0.1 * h, 0.9 * h, 6)
        grid_kps = torch.from_numpy(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)).float()
    if args.keypoints:
        if args.known_warp:
            raise ValueError("--keypoints cannot be combined with --known-warp (its matches come from the warp)")
        try:
            kps = torch.tensor(json.loads(args.keypoints.read_text()), dtype=torch.float32)
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{args.keypoints}: not a JSON list of [x, y] pairs ({err})") from None
    else:
        kps = grid_kps
    matcher = _build_matcher(args)
    result = matcher(source, target, kps)

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "source": str(args.source),
        "target": "known warp" if args.known_warp else str(args.target),
        "source_keypoints": kps.tolist(),
        "target_keypoints": result.keypoints.tolist(),
        "confidence": result.confidence.tolist(),
        "cycle_error_px": result.cycle_error.tolist(),
        "convention": "(x, y) pixels of each original image, pixel centres at integers",
    }
    if gt is not None:
        threshold = torch.tensor([float(max(target.shape[-2:]))])
        score = pck(result.keypoints[None], gt[None], threshold, args.alpha, valid[None])
        report.update(ground_truth=gt.tolist(), valid=valid.tolist(), alpha=args.alpha, pck=float(score[0]))
        correct = (result.keypoints - gt).norm(dim=-1) <= args.alpha * threshold
        title = f"PCK@{args.alpha:g} (image side) = {100 * float(score[0]):.1f}% on a known warp"
        from torchvision.utils import save_image

        save_image(target, args.out / "target.png")
    else:
        correct, title = result.confidence >= 0.5, "green: cycle-consistent (confidence ≥ 0.5), red: not"
    png = plot_matches(source, target, kps, result.keypoints, gt, correct, args.out / "matches.png", valid=valid, title=title)
    (args.out / "matches.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {png} and {args.out / 'matches.json'}")
    if gt is not None:
        print(f"PCK@{args.alpha:g} against the known warp: {100 * report['pck']:.1f}% ({int(valid.sum())} points)")
    return report


# ---------------------------------------------------------------- dispatch


COMMANDS: dict[str, tuple[str, Callable[[list[str]], object]]] = {
    "quickstart": ("the main job on the embedded default data: shards → train → evaluate → report", _delegate("quickstart", "cli")),
    "match": ("match two images (or a photo and a known warp of it); writes PNG and JSON", match_main),
    "make-shards": ("write WebDataset shards from a reader (synthetic, spair, pfpascal, pfwillow)", _delegate("make_shards", "main(parse_args)")),
    "train": ("train a model with Ray Train (local by default)", _delegate("train", "cli")),
    "evaluate": ("evaluate a checkpoint or builder on shards; netCDF, table and figures", _delegate("evaluate", "cli")),
    "bench": ("benchmark parameters, FLOPs, latency and memory of the models", _delegate("bench", "cli")),
    "params": ("parameter counts beside the paper's Table 3", _delegate("param_count", "main")),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: actr <command> [options]", "", "commands:"]
        lines += [f"  {name:<12} {text}" for name, (text, _) in COMMANDS.items()]
        lines += ["", "`actr <command> --help` describes each command's options."]
        print("\n".join(lines))
        return 0 if argv else EXIT_USER_ERROR
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"actr: error: unknown command {name!r} (one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        COMMANDS[name][1](rest)
    except _user_errors() as err:
        if os.environ.get("ACTR_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)) and err.filename:
            message = f"{err.filename}: {err.strerror or message}"
        print(f"actr {name}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
