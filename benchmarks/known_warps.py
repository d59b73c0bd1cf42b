"""Does a trained matcher generalise? PCK on random homographies of a photo it never saw.

    python benchmarks/known_warps.py runs/quickstart/model_best.pt
    python benchmarks/known_warps.py runs/quickstart/model_best.pt --image my_photo.jpg --seeds 50

The warps are those of ``actr match --known-warp`` (``pipelines.cli.known_warp``): each frame
corner moved by up to ``strength`` × the image size, a 6 × 6 grid of source points inside the
image, PCK@α of the image's longer side over the points that stay in the target. Pure
homographies are one part of the training family (which adds rotations, zooms and spline warps),
so this measures a new photo more than a new kind of motion. Every strength is scored for the
model, identity (each point predicted where it was) and the classical peer (ORB + RANSAC
homography at the image's own size, ``actr_core.metrics.ClassicalPeer``) on the same warps.

When the checkpoint has a ``calibration.json`` beside it, each strength also gets the calibrated
confidence's scores on the model's matches (correct at the same α): precision and recall of
confidence > 0.5, and AUC (:func:`actr_core.calibration.calibration_scores`).

The default photo is matplotlib's ``grace_hopper.jpg`` (bundled in matplotlib's wheel, never used
by the project's data). Prints a table and writes ``known_warps.csv`` beside the checkpoint.
"""

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from actr_core.api import ImageError, Matcher, load_image
from actr_core.calibration import calibration_scores
from actr_core.imaging import normalise_image
from actr_core.metrics import ClassicalPeer, pck
from actr_core.training.checkpoint import CheckpointError
from pipelines.cli import known_warp


def default_photo() -> Path:
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def score_warps(matcher: Matcher, image: torch.Tensor, strength: float, seeds: Sequence[int], alpha: float) -> dict[str, float]:
    """Mean PCK@alpha (%) over the warps of ``seeds`` for the model, identity and the classical peer,
    plus the calibrated confidence's precision, recall and AUC when ``matcher`` is calibrated."""
    peer = ClassicalPeer()
    threshold = torch.tensor([float(max(image.shape[-2:]))])
    totals = {"model": 0.0, "identity": 0.0, "classical peer": 0.0}
    fallbacks = 0
    confidences, correct = [], []
    for seed in tqdm(seeds, desc=f"strength {strength:g}", leave=False):
        target, src_kps, trg_kps, valid = known_warp(image, seed=seed, strength=strength)
        result = matcher(image, target, src_kps)
        fit = peer(normalise_image(image)[None], normalise_image(target)[None])
        fallbacks += int(fit.fallback.sum())
        by_peer = peer.transfer(fit, src_kps[None], valid[None])[0]
        for name, guess in (("model", result.keypoints), ("identity", src_kps), ("classical peer", by_peer)):
            totals[name] += 100.0 * float(pck(guess[None], trg_kps[None], threshold, alpha, valid[None])[0])
        confidences.append(result.confidence[valid].numpy())
        correct.append(((result.keypoints - trg_kps).norm(dim=-1) <= alpha * threshold)[valid].numpy())
    row = {name: total / len(seeds) for name, total in totals.items()}
    row["peer fall-backs"] = fallbacks
    if matcher.calibration is not None:
        scores = calibration_scores(np.concatenate(confidences), np.concatenate(correct))
        row.update({f"confidence {key}": scores[key] for key in ("precision", "recall", "auc")})
    return row


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="a model written by actr train (model_best.pt)")
    p.add_argument("--image", type=Path, default=None, help="photo to warp (default: matplotlib's grace_hopper.jpg)")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.15, 0.25], help="corner displacement bounds (fractions)")
    p.add_argument("--seeds", type=int, default=20, help="warps per strength (seeds 0..N-1)")
    p.add_argument("--alpha", type=float, default=0.1, help="PCK threshold as a fraction of the image's longer side")
    args = p.parse_args(argv)
    if args.seeds < 1 or not all(0 < s < 0.5 for s in args.strengths):
        p.error("need --seeds >= 1 and every strength in (0, 0.5)")  # one line, exit status 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    image_path = args.image or default_photo()
    try:
        image = load_image(image_path)
        matcher = Matcher.from_checkpoint(args.checkpoint)
    except (ImageError, CheckpointError, FileNotFoundError, ValueError) as err:
        p.error(str(err).splitlines()[0])
    rows = []
    for strength in args.strengths:
        row = {"strength": strength, **score_warps(matcher, image, strength, range(args.seeds), args.alpha)}
        rows.append(row)
    print(f"{image_path.name}, {args.seeds} warps per strength, PCK@{args.alpha:g} of the longer side (%):")
    print("| strength | model | identity | classical peer | peer fall-backs |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['strength']:g} | {r['model']:.1f} | {r['identity']:.1f} | {r['classical peer']:.1f} | {r['peer fall-backs']} |"
        )
    if matcher.calibration is not None:
        print(f"calibrated confidence on the model's matches (correct at α = {args.alpha:g}; confidence > 0.5):")
        print("| strength | precision | recall | AUC |\n|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['strength']:g} | {r['confidence precision']:.3f} | {r['confidence recall']:.3f} | {r['confidence auc']:.3f} |"
            )
    out = args.checkpoint.parent / "known_warps.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
