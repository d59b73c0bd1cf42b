"""The ``actr`` command: match images, make shards, train, evaluate, count parameters, run the main job.

    actr <command> [options]      (the same as python pipelines/<command's script>.py [options])

Every command reads its options from a config dataclass (``--help`` lists each option's type,
default and meaning) and follows one exit-status policy (:mod:`pipelines.entry`): 0 success,
1 a failed check, 2 a user error, reported in one line on stderr without a traceback
(``--verbose`` or ``ACTR_DEBUG=1`` shows it). ``actr`` returns its command's status.
"""

import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "known_warp", "COMMANDS"]


# ---------------------------------------------------------------- the known warp of actr match


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


# ---------------------------------------------------------------- dispatch


def _delegate(module: str):
    """``pipelines.<module>.cli(argv, prog)``, imported only when the command runs (``--help`` stays fast)."""

    def run(argv: list[str], prog: str) -> int | None:
        return importlib.import_module(f"pipelines.{module}").cli(argv, prog)

    return run


COMMANDS = {
    "quickstart": ("the main job on the embedded default data: shards → train → evaluate → report", _delegate("quickstart")),
    "match": ("match two images (or a photo and a known warp of it); writes PNG and JSON", _delegate("match")),
    "make-shards": ("write or --verify WebDataset shards (synthetic, spair, pfpascal, pfwillow)", _delegate("make_shards")),
    "train": ("train a model with Ray Train (local by default)", _delegate("train")),
    "evaluate": ("evaluate a checkpoint or builder on shards; netCDF, table and figures", _delegate("evaluate")),
    "calibrate": ("fit a checkpoint's match confidence on the val split, score it on test", _delegate("calibrate")),
    "params": ("parameter counts beside the paper's Table 3", _delegate("param_count")),
    "download": ("download weights and data sets by name (cached, checked, resumable)", _delegate("download")),
    "reproduce": ("evaluate a released checkpoint beside the paper's Table 1", _delegate("reproduce")),
}


def main(argv: Sequence[str] | None = None) -> int:
    """``actr <command> [options]``: runs the command and returns its exit status (see the module docstring)."""
    from pipelines.entry import COMMON_OPTIONS, EXIT_USER_ERROR, run

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        import actr_core  # light: imports neither torch nor Ray

        print(f"actr {actr_core.__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: actr [-h] [--version] <command> [options]", "", "commands:"]
        lines += [f"  {name:<12} {text}" for name, (text, _) in COMMANDS.items()]
        lines += ["", "`actr <command> --help` describes each command's options.", COMMON_OPTIONS]
        lines += ["Exit status: 0 success, 1 a failed check (make-shards --verify), 2 a user error."]
        print("\n".join(lines))
        return 0 if argv else EXIT_USER_ERROR
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"actr: error: unknown command {name!r} (one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return EXIT_USER_ERROR
    return run(COMMANDS[name][1], rest, prog=f"actr {name}")


if __name__ == "__main__":
    raise SystemExit(main())
