"""Why a matcher trained from random weights learns only the mean flow, measured.

    python benchmarks/learning_signal.py --shards shards/synthetic --untrained           # at initialisation
    python benchmarks/learning_signal.py --shards shards/synthetic --runs runs/levers/*  # trained runs too

1. At initialisation, on one batch of training pairs: how strongly each loss term reaches the
   correlation (Eq. 2) that the soft-argmax reads, and the parameters that shape it (the blocks'
   cross-attention projections), against how strongly Eq. 4 reaches the super-resolution module,
   which can lower Eq. 4 by predicting the mean flow whatever the correlation says.
2. On the validation pairs, for each recipe's untrained model (seed 0) and each trained run
   (``model_best.pt`` of each run folder): PCK@0.1 of the final flow and of the coarse flow
   alone, how peaked the correlation is (mean normalised entropy; 1 = uniform), how often its
   argmax lands within one token cell of the true match (a cell is 16 px of a 128 px input for a
   ViT/16, 8 px for the stride-8 CNN), and the Eq. 4 loss against the best constant flow's.

Prints tables (docs/training.md, "Why the paper's parts, trained from random weights, learn only
the mean flow") and writes ``learning_signal.csv`` in the working folder (or ``--out``).
"""

import argparse
import csv
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from actr_core.blocks import CorrelationCrossEntropy, masked_flow_loss
from actr_core.data import PairBatch, Resize, ShardDataset, prepare_batch
from actr_core.flow import pool_flow, resize_flow
from actr_core.metrics import IdentityPredictor, best_constant_flow, get_protocol, score_batch
from actr_core.models import build_model

ALPHA = 0.1
RECIPES: Mapping[str, tuple[str, dict[str, Any]]] = {
    "paper recipe: actr_tiny (ViT-Ti/16), Eq. 4 alone": ("actr_tiny", {}),
    "CPU recipe: actr_conv_tiny (ResNet-18 stride 8), Eq. 4 + cross-entropy": ("actr_conv_tiny", {}),
}


def _batches(shards: str, split: str, size: int, batch_size: int, limit: int | None = None) -> list[PairBatch]:
    data = ShardDataset(shards, split, batch_size=batch_size, transforms=[Resize(size)], rank=0, world_size=1, max_batches=limit)
    return [prepare_batch(b) for b in data.loader(num_workers=0)]


def _norm(grads: Sequence[Tensor | None]) -> float:
    return math.sqrt(sum(float(g.square().sum()) for g in grads if g is not None))


def _fresh_model(builder: str, kwargs: Mapping[str, Any], size: int, seed: int) -> torch.nn.Module:
    """A recipe's model at initialisation, the same weights for the same seed."""
    torch.manual_seed(seed)
    return build_model(builder, image_size=(size, size), warn_random_init=False, **kwargs)


def signal_at_init(batch: PairBatch, size: int, seed: int = 0) -> list[dict[str, Any]]:
    """Gradient norms of Eq. 4 and of the correlation cross-entropy at initialisation."""
    rows = []
    for label, (builder, kwargs) in RECIPES.items():
        model = _fresh_model(builder, kwargs, size, seed).train()
        corr_params = [p for n, p in model.named_parameters() if ".cross." in n]
        sr_params = list(model.upsampler.parameters())
        output = model(batch.src_image, batch.trg_image)
        corr = output.correlations
        eq4 = masked_flow_loss(output.flow, batch.flow, batch.valid_flow)
        ce = CorrelationCrossEntropy(1.0)(corr, batch.flow, batch.valid_flow)
        g_eq4 = torch.autograd.grad(eq4, [corr, *corr_params, *sr_params], retain_graph=True, allow_unused=True)
        g_ce = torch.autograd.grad(ce, [corr, *corr_params], allow_unused=True)
        n_corr = len(corr_params)
        tokens = corr.shape[-1] * corr.shape[-2]
        rows.append(
            {
                "recipe": label,
                "target cells N": tokens,
                "max correlation / (1/N)": float(corr.detach().max()) * tokens,
                "Eq. 4 → correlation": _norm(g_eq4[:1]),
                "cross-entropy → correlation": _norm(g_ce[:1]),
                "Eq. 4 → cross-attention weights": _norm(g_eq4[1 : 1 + n_corr]),
                "cross-entropy → cross-attention weights": _norm(g_ce[1:]),
                "Eq. 4 → super-resolution weights": _norm(g_eq4[1 + n_corr :]),
            }
        )
    return rows


def _coarse_pck(model: torch.nn.Module, output: Any, batch: PairBatch) -> tuple[float, int]:
    """PCK of the paths' mean coarse flow, upsampled to the flow grid (what the correlation alone gives)."""
    coarse = output.coarse_flows.mean(dim=1)
    fine = resize_flow(coarse, output.flow.shape[-2:])
    return _pck(model, type(output)(flow=fine), batch)


def _pck(model: torch.nn.Module, output: Any, batch: PairBatch) -> tuple[float, int]:
    """Sum of the per-pair PCK@0.1 over the pairs with a valid keypoint, and how many those are."""
    scores = score_batch(model, batch, get_protocol("standard"), (ALPHA,), output=output)
    n_valid = scores.valid.sum(axis=1)
    scored = n_valid > 0
    return float((scores.n_correct[0][scored] / n_valid[scored]).sum()), int(scored.sum())


def trained_run(run: Path, batches: Sequence[PairBatch]) -> dict[str, Any]:
    """The trained model's flow and correlation on the validation pairs."""
    from actr_core.training.checkpoint import load_model_from_checkpoint

    model, info = load_model_from_checkpoint(run / "model_best.pt")
    return {"run": run.name, "model": info["builder"], "epoch": info["epoch"], **correlation_stats(model.eval(), batches)}


def untrained(batches: Sequence[PairBatch], size: int, seed: int = 0) -> list[dict[str, Any]]:
    """The same statistics for each recipe's model at initialisation."""
    rows = []
    for label, (builder, kwargs) in RECIPES.items():
        model = _fresh_model(builder, kwargs, size, seed).eval()
        rows.append({"run": f"untrained ({label})", "model": builder, "epoch": 0, **correlation_stats(model, batches)})
    return rows


def correlation_stats(model: torch.nn.Module, batches: Sequence[PairBatch]) -> dict[str, Any]:
    """PCK, correlation entropy, argmax hits and Eq. 4 of ``model`` on ``batches``."""
    sums = {"final": 0.0, "coarse": 0.0, "identity": 0.0, "pairs": 0, "entropy": 0.0, "hits": 0.0, "cells": 0.0}
    flows, valids, preds = [], [], []
    identity = IdentityPredictor()
    with torch.no_grad():
        for batch in batches:
            output = model(batch.src_image, batch.trg_image)
            final, pairs = _pck(model, output, batch)
            sums["final"] += final
            sums["coarse"] += _coarse_pck(model, output, batch)[0]
            sums["identity"] += _pck(identity, identity(batch.src_image, batch.trg_image), batch)[0]
            sums["pairs"] += pairs
            corr = output.correlations  # b m hs ws ht wt
            n = corr.shape[-1] * corr.shape[-2]
            factor = batch.flow.shape[-1] // corr.shape[3]
            target, valid = pool_flow(batch.flow, batch.valid_flow, factor)
            probs = corr.flatten(-2)  # b m hs ws n
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / math.log(n)  # b m hs ws
            hs, ws = corr.shape[2:4]
            ys, xs = torch.meshgrid(torch.arange(hs), torch.arange(ws), indexing="ij")
            best = probs.argmax(-1)  # b m hs ws
            bx, by = best % corr.shape[-1], best // corr.shape[-1]
            tx, ty = xs + target[:, 0], ys + target[:, 1]
            hit = ((bx - tx[:, None]).abs() <= 1) & ((by - ty[:, None]).abs() <= 1)
            mask = valid[:, None].expand_as(hit)
            sums["entropy"] += float(entropy[mask].sum())
            sums["hits"] += float(hit[mask].sum())
            sums["cells"] += float(mask.sum())
            flows.append(batch.flow)
            valids.append(batch.valid_flow)
            preds.append(output.flow)
    flow, valid, pred = torch.cat(flows), torch.cat(valids), torch.cat(preds)
    constant = best_constant_flow(flow, valid).view(1, 2, 1, 1).expand_as(flow).contiguous()
    return {
        "cell (px)": batches[0]["src_image"].shape[-1] // corr.shape[-1],
        "PCK@0.1 final flow": sums["final"] / sums["pairs"],
        "PCK@0.1 coarse flow": sums["coarse"] / sums["pairs"],
        "PCK@0.1 identity": sums["identity"] / sums["pairs"],
        "correlation entropy (1 = uniform)": sums["entropy"] / sums["cells"],
        "argmax within 1 cell": sums["hits"] / sums["cells"],
        "Eq. 4 model": float(masked_flow_loss(pred, flow, valid)),
        "Eq. 4 best constant flow": float(masked_flow_loss(constant, flow, valid)),
    }


def _print(rows: Sequence[Mapping[str, Any]]) -> None:
    for row in rows:
        print("  " + " · ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default="shards/synthetic")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--runs", nargs="*", default=[], help="training run folders holding model_best.pt")
    p.add_argument("--untrained", action="store_true", help="also measure each recipe's model at initialisation")
    p.add_argument("--out", default=None, help="CSV path (default: learning_signal.csv here)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    train = _batches(a.shards, "train", a.size, batch_size=16, limit=1)[0]
    init = signal_at_init(train, a.size)
    print("at initialisation (one batch of 16 training pairs; gradient L2 norms):")
    _print(init)
    trained = []
    if a.runs or a.untrained:
        val = _batches(a.shards, "val", a.size, batch_size=20)
    if a.untrained:
        print("untrained models (validation pairs):")
        trained.extend(untrained(val, a.size))
        _print(trained)
    if a.runs:
        print("trained runs (validation pairs):")
        for run in a.runs:
            trained.append(trained_run(Path(run), val))
            _print(trained[-1:])
    out = Path(a.out or "learning_signal.csv")
    with open(out, "w", newline="") as f:
        for rows in (init, trained):
            if rows:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
