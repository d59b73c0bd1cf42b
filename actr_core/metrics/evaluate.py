"""Run a matcher over batches and score PCK@α: results as a labelled ``xarray.Dataset``.

Axis legend: b batch (pairs) · n keypoints · 2 (x, y) · alpha PCK tolerances · category ·
pair (every scored pair) · keypoint (keypoint slot, padded with NaN across batches) · coord (x, y) ·
predictor (the model and the reference predictors) · comparison (model − a reference) ·
bound (mean, low, high of a bootstrap interval).

Every evaluation scores the model and the reference predictors of
:mod:`actr_core.metrics.references` (``identity`` always, ``classical_peer`` unless switched off)
on the same pairs, under the same protocol, in one pass over the batches: the results carry a
``predictor`` dimension, and the model's difference to each reference at each α comes with a
paired bootstrap interval over pairs (:mod:`actr_core.metrics.bootstrap`).

Two averages are reported side by side, because papers use both:

- **per image** (``pck_image``): each pair's fraction of correct keypoints, then the mean over
  pairs. This is what the released ACTR/CATs code prints.
- **per keypoint** (``pck_keypoint``): all correct keypoints over all valid keypoints.

Pairs with no valid keypoint have no PCK and are skipped by both (they are still counted in
``n_pairs``; ``n_pairs_scored`` counts the others). Category-level results come with a micro
average over all pairs (``*_overall``) and a macro average over categories (``*_category_mean``).
"""

import dataclasses
import importlib.metadata
import itertools
from collections.abc import Iterable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from tqdm.auto import tqdm

from actr_core.batch import SPAIR_FLAGS, PairBatch
from actr_core.data.pipeline import prepare_batch
from actr_core.files import write_atomic
from actr_core.metrics.bootstrap import BOOTSTRAP_LEVEL, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, paired_bootstrap
from actr_core.metrics.pck import keypoint_distances, pck_per_keypoint
from actr_core.metrics.protocols import (
    ScoringProtocol,
    get_protocol,
    ground_truth_keypoints,
    pair_thresholds,
    predict_keypoints,
    scored_keypoints,
)
from actr_core.metrics.references import IDENTITY, REFERENCE_LABELS, REFERENCE_NAMES, reference_predictor

__all__ = [
    "DEFAULT_ALPHAS",
    "MODEL",
    "PER_PREDICTOR_VARIABLES",
    "SPAIR_FLAGS",
    "THRESHOLD_DEFINITIONS",
    "PCKDifference",
    "evaluate",
    "format_table",
    "keypoint_correctness",
    "load_results",
    "pck_curve",
    "pck_difference",
    "results_bytes",
    "save_results",
    "score_batch",
    "summarise",
]

# PCK tolerances reported by default: paper Table 1 (0.05, 0.1, 0.15) plus 0.01 (DenseMatching's list).
DEFAULT_ALPHAS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.15)
# SPAIR_FLAGS (actr_core.batch): SPair-71k pair-level difficulty annotations, reported as splits when present.
# A list of PCK tolerances: any sequence of floats or a 1-D numpy array.
Alphas = Sequence[float] | np.ndarray
THRESHOLD_DEFINITIONS: Mapping[str, str] = {
    "bbox": "max(x2 - x1, y2 - y1) of the {side} object box",
    "img": "max(height, width) of the {side} image",
    "bkp": "max side of the box around the valid {side} keypoints",
}
# The model's label on the predictor dimension (the references are labelled by their names).
MODEL = "model"
# Results variables that carry the predictor dimension (the SPair splits ``pck_*_by_<flag>`` too);
# everything else (ground truth, thresholds, counts of pairs and keypoints) is shared by all predictors.
PER_PREDICTOR_VARIABLES: tuple[str, ...] = (
    "pck_image",
    "pck_keypoint",
    "pck_image_overall",
    "pck_keypoint_overall",
    "pck_image_category_mean",
    "pck_keypoint_category_mean",
    "pair_pck",
    "n_correct",
    "pred_kps",
    "distance",
    "fallback",
    "fallback_reason",
    "n_fallbacks",
)
# Row labels of the SPair difficulty splits in printed tables.
FLAG_LABELS: Mapping[str, str] = {
    "viewpoint_variation": "viewpoint",
    "scale_variation": "scale",
    "truncation": "truncation",
    "occlusion": "occlusion",
}


@dataclasses.dataclass(frozen=True)
class BatchScores:
    """Per-pair scores of one batch (numpy, on the host), in the protocol's measurement frame."""

    pred: np.ndarray  # (b, n, 2) predicted target keypoints, NaN where invalid
    gt: np.ndarray  # (b, n, 2) ground-truth target keypoints, NaN where invalid
    valid: np.ndarray  # (b, n) bool
    distance: np.ndarray  # (b, n) pixels, NaN where invalid
    threshold: np.ndarray  # (b,) d
    threshold_kind: list[str]  # (b,) bbox / img / bkp
    n_correct: np.ndarray  # (alpha, b) int
    meta: dict[str, list[Any]]  # pair_id, category, dataset, SPair flags
    fallback: np.ndarray | None = None  # (b,) bool: the predictor fell back to identity (None: never)
    fallback_reason: list[str] | None = None  # (b,) why ("too_few_matches", "no_consensus"), "" where none


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _nan_where_invalid(x: Tensor, valid: Tensor) -> np.ndarray:
    out = torch.where(valid.unsqueeze(-1), x, torch.full_like(x, float("nan")))
    return out.detach().cpu().numpy()


def score_batch(
    model: nn.Module,
    batch: PairBatch,
    protocol: ScoringProtocol,
    alphas: Alphas,
    output: Any = None,
) -> BatchScores:
    """Run ``model`` on one batch (unless ``output`` is given) and score it under ``protocol``.

    ``model`` is a matcher or a reference predictor; an output with a ``fallback`` field (the
    reference predictors') has its fall-backs to identity recorded.
    """
    if output is None:
        output = model(batch.src_image, batch.trg_image)
    valid = scored_keypoints(protocol, batch)
    pred = predict_keypoints(protocol, model, output, batch)
    gt = ground_truth_keypoints(protocol, batch)
    threshold, kinds = pair_thresholds(protocol, batch)
    pred, gt = pred.to(gt.dtype), gt
    threshold = threshold.to(gt.dtype)
    n_correct = torch.stack([pck_per_keypoint(pred, gt, threshold, a, valid).correct.sum(dim=1) for a in alphas])
    b = valid.shape[0]
    meta: dict[str, list[Any]] = {
        "pair_id": list(batch.pair_id),
        "category": list(batch.category),
        "dataset": list(batch.dataset),
    }
    meta.update({flag: [int(v) for v in values.tolist()] for flag, values in batch.flags.items()})
    fallback = getattr(output, "fallback", None)
    fallback = np.zeros(b, dtype=bool) if fallback is None else torch.as_tensor(fallback).cpu().numpy().astype(bool)
    status = list(getattr(output, "status", None) or ["fallback"] * b)
    return BatchScores(
        pred=_nan_where_invalid(pred, valid),
        gt=_nan_where_invalid(gt, valid),
        valid=valid.cpu().numpy(),
        distance=keypoint_distances(pred, gt, valid).cpu().numpy(),
        threshold=threshold.detach().cpu().numpy(),
        threshold_kind=kinds,
        n_correct=n_correct.cpu().numpy(),
        meta=meta,
        fallback=fallback,
        fallback_reason=[reason if fell else "" for reason, fell in zip(status, fallback.tolist(), strict=True)],
    )


References = Sequence[str] | Mapping[str, nn.Module]


def _reference_modules(references: References) -> dict[str, nn.Module]:
    """Name → reference predictor, identity first (it is always scored)."""
    if isinstance(references, str):
        raise ValueError(f"references must be a list of names, got the string {references!r}")
    if isinstance(references, Mapping):
        given = dict(references)
    else:
        names = list(references)
        unknown = [n for n in names if n not in REFERENCE_NAMES]
        if unknown:
            raise ValueError(f"unknown reference predictors {unknown}; choose from {list(REFERENCE_NAMES)}")
        given = {name: reference_predictor(name) for name in names}
    if MODEL in given:
        raise ValueError(f"{MODEL!r} names the evaluated model; give the references other names")
    modules = {IDENTITY: given.pop(IDENTITY, None) or reference_predictor(IDENTITY)}
    modules.update(given)
    return modules


def _describe_reference(name: str, module: nn.Module) -> str:
    if name == IDENTITY:
        return "zero flow: each source keypoint predicted at its own input-frame position, rescaled by the protocol"
    describe = getattr(getattr(module, "settings", None), "describe", None)
    return describe() if callable(describe) else type(module).__name__


def evaluate(
    model: nn.Module,
    batches: Iterable[PairBatch],
    *,
    protocol: str | ScoringProtocol = "standard",
    alphas: Alphas = DEFAULT_ALPHAS,
    device: torch.device | str | None = None,
    progress: bool = True,
    total: int | None = None,
    model_name: str = "model",
    references: References = REFERENCE_NAMES,
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
    bootstrap_seed: int = BOOTSTRAP_SEED,
) -> xr.Dataset:
    """Score ``model`` (a Matcher) and the reference predictors on every batch, in one pass.

    Args:
        model: ``model(src, trg)`` returns an output with ``.flow``; ``model.transfer(output,
            src_kps, valid)`` returns target keypoints in input-frame pixels.
        batches: iterable of :class:`~actr_core.data.PairBatch` (from shards, or built by hand); read once.
        protocol: ``"standard"`` (default), ``"standard-input"`` or ``"released"``, or a
            :class:`ScoringProtocol`. Scoring only; choose models on the validation split.
        alphas: PCK tolerances.
        device: where the model runs (default: where its parameters are; CPU is fine).
        progress: show a tqdm bar.
        total: number of batches, for the bar when ``batches`` has no ``len``.
        model_name: written into the attributes.
        references: reference predictors scored beside the model on the same pairs: names from
            :data:`~actr_core.metrics.references.REFERENCE_NAMES` (default: ``("identity",
            "classical_peer")``; ``("identity",)`` skips the peer) or a mapping name → predictor.
            ``identity`` is always scored, whether named or not.
        bootstrap_resamples, bootstrap_seed: the paired bootstrap of the model − reference differences.

    Returns:
        See :func:`summarise`; predictors ``"model"``, ``"identity"`` and, when run,
        ``"classical_peer"``.
    """
    protocol = get_protocol(protocol)
    alphas = tuple(float(a) for a in alphas)
    if not alphas or any(not a > 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {alphas}")
    refs = _reference_modules(references)
    device = torch.device(device) if device is not None else _model_device(model)
    if total is None and isinstance(batches, Sized):
        total = len(batches)
    was_training = model.training
    model.eval()
    scores: dict[str, list[BatchScores]] = {MODEL: [], **{name: [] for name in refs}}
    n_pairs = 0
    input_size: tuple[int, int] | None = None
    try:
        with torch.no_grad():
            bar = tqdm(batches, total=total, disable=not progress, desc=f"PCK ({protocol.name})", unit="batch")
            for batch in bar:
                batch = prepare_batch(batch, device)
                input_size = batch.input_size
                scores[MODEL].append(score_batch(model, batch, protocol, alphas))
                for name, reference in refs.items():
                    scores[name].append(score_batch(reference, batch, protocol, alphas))
                n_pairs += len(scores[MODEL][-1].threshold)
                bar.set_postfix(pairs=n_pairs)
    finally:
        model.train(was_training)
    if not scores[MODEL]:
        raise ValueError("no batches to evaluate")
    results = summarise(
        scores,
        protocol,
        alphas,
        input_size=input_size,
        model_name=model_name,
        bootstrap_resamples=bootstrap_resamples,
        bootstrap_seed=bootstrap_seed,
    )
    for name in REFERENCE_NAMES:
        results.attrs[f"reference_{name}"] = _describe_reference(name, refs[name]) if name in refs else "not run"
    return results


# ---------------------------------------------------------------------------------------------
# Aggregation


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite ``values`` selected by ``mask``; NaN when none."""
    keep = mask & np.isfinite(values)
    count = keep.sum(axis=-1)
    total = np.where(keep, values, 0.0).sum(axis=-1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _ratio(num: np.ndarray | np.number, den: np.ndarray | np.number) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _group(pair_pck: np.ndarray, n_correct: np.ndarray, n_valid: np.ndarray, members: np.ndarray) -> tuple:
    """(per-image PCK (alpha,), per-keypoint PCK (alpha,), pairs, scored pairs, keypoints) of a group."""
    image = _masked_mean(pair_pck, np.broadcast_to(members, pair_pck.shape))
    keypoint = _ratio(n_correct[:, members].sum(axis=1), n_valid[members].sum())
    return image, keypoint, members.sum(), (members & (n_valid > 0)).sum(), n_valid[members].sum()


def _pad(arrays: list[np.ndarray], n: int, fill: Any) -> np.ndarray:
    out = []
    for a in arrays:
        width = [(0, 0)] * a.ndim
        width[1] = (0, n - a.shape[1])
        out.append(np.pad(a, width, constant_values=fill))
    return np.concatenate(out)


def _library_version() -> str:
    try:
        return importlib.metadata.version("actr_core")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _definition(kind: str, protocol: ScoringProtocol) -> str:
    text = f"{kind} = " + THRESHOLD_DEFINITIONS[kind].format(side=protocol.threshold_side)
    if kind == "bkp" and protocol.bkp_padding_value is not None:
        text += (
            f", padding value {protocol.bkp_padding_value:g} included when fewer than "
            f"{protocol.bkp_padded_length} rows (released)"
        )
    return text


def _difference(
    n_correct_a: np.ndarray,
    n_correct_b: np.ndarray,
    n_valid: np.ndarray,
    average: str,
    n_resamples: int,
    seed: int,
    level: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paired bootstrap of PCK(a) − PCK(b) per α over the scored pairs; counts are (alpha, pair)."""
    scored = n_valid > 0
    diff = (n_correct_a - n_correct_b)[:, scored].T.astype(np.float64)  # pair alpha
    valid = n_valid[scored].astype(np.float64)
    if average == "image":
        return paired_bootstrap(diff / valid[:, None], np.ones_like(valid), n_resamples=n_resamples, seed=seed, level=level)
    return paired_bootstrap(diff, valid, n_resamples=n_resamples, seed=seed, level=level)


def _check_same_pairs(name: str, scores: Sequence[BatchScores], first: Sequence[BatchScores]) -> None:
    ids = [pair for s in scores for pair in s.meta["pair_id"]]
    expected = [pair for s in first for pair in s.meta["pair_id"]]
    same_valid = len(scores) == len(first) and all(
        a.valid.shape == b.valid.shape and np.array_equal(a.valid, b.valid) for a, b in zip(scores, first, strict=True)
    )
    if ids != expected or not same_valid:
        raise ValueError(f"predictor {name!r} was scored on other pairs or keypoints than the first predictor")


def summarise(
    scores: Sequence[BatchScores] | Mapping[str, Sequence[BatchScores]],
    protocol: ScoringProtocol,
    alphas: Alphas,
    *,
    input_size: Sequence[int] | None = None,
    model_name: str = "model",
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
    bootstrap_seed: int = BOOTSTRAP_SEED,
) -> xr.Dataset:
    """Build the results dataset from per-batch scores of one or several predictors.

    ``scores``: predictor name → its per-batch scores, every predictor on the same batches (a
    plain sequence is the model's alone, named ``"model"``).

    Variables (dimensions); those listed in :data:`PER_PREDICTOR_VARIABLES` and the SPair
    splits ``pck_*_by_<flag>`` lead with ``predictor``:
        ``pck_image``, ``pck_keypoint`` (alpha, category); ``pck_image_overall``,
        ``pck_keypoint_overall``, ``pck_image_category_mean``, ``pck_keypoint_category_mean``
        (alpha); ``n_pairs``, ``n_pairs_scored``, ``n_keypoints`` (category) and ``*_total``
        scalars; per pair: ``pair_pck`` (alpha, pair), ``n_correct`` (alpha, pair), ``n_valid``,
        ``threshold``, ``threshold_kind``, ``dataset``, ``pair_category`` (pair), keypoints
        ``pred_kps``, ``gt_kps`` (pair, keypoint, coord), ``distance``, ``keypoint_valid``
        (pair, keypoint); fall-backs to identity ``fallback``, ``fallback_reason`` (pair) and
        ``n_fallbacks``; SPair splits ``pck_image_by_<flag>``, ``pck_keypoint_by_<flag>``
        (alpha, <flag>), ``n_pairs_by_<flag>``, ``n_keypoints_by_<flag>`` (<flag>) when the
        batches carried the flags. When ``"model"`` and other predictors are present:
        ``pck_image_difference``, ``pck_keypoint_difference`` (comparison, alpha, bound): the
        model's PCK minus each other predictor's, with the paired bootstrap interval over pairs
        (bound = mean, low, high; :func:`pck_difference`).
    PCK values are fractions in [0, 1]; attributes state protocol, threshold, frame and bootstrap.
    """
    by_predictor = {k: list(v) for k, v in scores.items()} if isinstance(scores, Mapping) else {MODEL: list(scores)}
    if not by_predictor or not all(by_predictor.values()):
        raise ValueError("no scores to summarise")
    names = list(by_predictor)
    first = by_predictor[names[0]]
    for name in names[1:]:
        _check_same_pairs(name, by_predictor[name], first)
    alphas = np.asarray(alphas, dtype=np.float64)
    n_max = max(s.valid.shape[1] for s in first)
    valid = _pad([s.valid for s in first], n_max, False)
    gt = _pad([s.gt for s in first], n_max, np.nan)
    threshold = np.concatenate([s.threshold for s in first]).astype(np.float64)
    kinds = np.array(list(itertools.chain.from_iterable(s.threshold_kind for s in first)), dtype=object)
    n_valid = valid.sum(axis=1).astype(np.int64)
    meta = {key: list(itertools.chain.from_iterable(s.meta[key] for s in first)) for key in first[0].meta}
    category = np.array(meta["category"], dtype=object)
    categories = sorted(set(meta["category"]))
    n_pair = len(threshold)

    def per_predictor(batch_scores: list[BatchScores]) -> dict[str, np.ndarray]:
        n_correct = np.concatenate([s.n_correct for s in batch_scores], axis=1).astype(np.int64)  # alpha pair
        pair_pck = _ratio(n_correct, n_valid[None])  # alpha pair, NaN for unscored pairs
        fallback = np.concatenate(
            [s.fallback if s.fallback is not None else np.zeros(len(s.threshold), dtype=bool) for s in batch_scores]
        )
        reasons = list(itertools.chain.from_iterable(s.fallback_reason or [""] * len(s.threshold) for s in batch_scores))
        per_category = [_group(pair_pck, n_correct, n_valid, category == c) for c in categories]
        everyone = _group(pair_pck, n_correct, n_valid, np.ones(n_pair, dtype=bool))
        pck_image = np.stack([g[0] for g in per_category], axis=1)  # alpha category
        pck_keypoint = np.stack([g[1] for g in per_category], axis=1)
        out = {
            "pck_image": pck_image,
            "pck_keypoint": pck_keypoint,
            "pck_image_overall": everyone[0],
            "pck_keypoint_overall": everyone[1],
            "pck_image_category_mean": _masked_mean(pck_image, np.ones_like(pck_image, dtype=bool)),
            "pck_keypoint_category_mean": _masked_mean(pck_keypoint, np.ones_like(pck_keypoint, dtype=bool)),
            "pair_pck": pair_pck,
            "n_correct": n_correct,
            "pred_kps": _pad([s.pred for s in batch_scores], n_max, np.nan),
            "distance": _pad([s.distance for s in batch_scores], n_max, np.nan),
            "fallback": fallback.astype(bool),
            "fallback_reason": np.array(reasons, dtype=str),
            "n_fallbacks": np.int64(fallback.sum()),
        }
        for flag in SPAIR_FLAGS:
            if flag in meta:
                levels = np.array(meta[flag], dtype=np.int64)
                groups = [_group(pair_pck, n_correct, n_valid, levels == v) for v in sorted(set(levels.tolist()))]
                out[f"pck_image_by_{flag}"] = np.stack([g[0] for g in groups], axis=1)
                out[f"pck_keypoint_by_{flag}"] = np.stack([g[1] for g in groups], axis=1)
        return out

    values = {name: per_predictor(by_predictor[name]) for name in names}
    dims = {
        "pck_image": ("alpha", "category"),
        "pck_keypoint": ("alpha", "category"),
        "pck_image_overall": ("alpha",),
        "pck_keypoint_overall": ("alpha",),
        "pck_image_category_mean": ("alpha",),
        "pck_keypoint_category_mean": ("alpha",),
        "pair_pck": ("alpha", "pair"),
        "n_correct": ("alpha", "pair"),
        "pred_kps": ("pair", "keypoint", "coord"),
        "distance": ("pair", "keypoint"),
        "fallback": ("pair",),
        "fallback_reason": ("pair",),
        "n_fallbacks": (),
    }
    for flag in SPAIR_FLAGS:
        if flag in meta:
            dims[f"pck_image_by_{flag}"] = dims[f"pck_keypoint_by_{flag}"] = ("alpha", flag)
    data: dict[str, Any] = {
        key: (("predictor", *dim), np.stack([values[name][key] for name in names])) for key, dim in dims.items()
    }
    everyone = _group(values[names[0]]["pair_pck"], values[names[0]]["n_correct"], n_valid, np.ones(n_pair, dtype=bool))
    per_category = [_group(values[names[0]]["pair_pck"], values[names[0]]["n_correct"], n_valid, category == c)
                    for c in categories]  # fmt: skip
    data.update({
        "n_pairs": (("category",), np.array([g[2] for g in per_category], dtype=np.int64)),
        "n_pairs_scored": (("category",), np.array([g[3] for g in per_category], dtype=np.int64)),
        "n_keypoints": (("category",), np.array([g[4] for g in per_category], dtype=np.int64)),
        "n_pairs_total": ((), np.int64(everyone[2])),
        "n_pairs_scored_total": ((), np.int64(everyone[3])),
        "n_keypoints_total": ((), np.int64(everyone[4])),
        "n_valid": (("pair",), n_valid),
        "threshold": (("pair",), threshold),
        "threshold_kind": (("pair",), kinds.astype(str)),
        "dataset": (("pair",), np.array(meta["dataset"], dtype=str)),
        "pair_category": (("pair",), category.astype(str)),
        "gt_kps": (("pair", "keypoint", "coord"), gt),
        "keypoint_valid": (("pair", "keypoint"), valid),
    })  # fmt: skip
    coords: dict[str, Any] = {
        "predictor": np.array(names, dtype=str),
        "alpha": alphas,
        "category": np.array(categories, dtype=str),
        "pair": np.array(meta["pair_id"], dtype=str),
        "keypoint": np.arange(n_max),
        "coord": np.array(["x", "y"]),
    }
    for flag in SPAIR_FLAGS:
        if flag not in meta:
            continue
        levels = np.array(meta[flag], dtype=np.int64)
        groups = [_group(values[names[0]]["pair_pck"], values[names[0]]["n_correct"], n_valid, levels == v)
                  for v in sorted(set(levels.tolist()))]  # fmt: skip
        coords[flag] = np.array(sorted(set(levels.tolist())), dtype=np.int64)
        data[f"n_pairs_by_{flag}"] = ((flag,), np.array([g[2] for g in groups], dtype=np.int64))
        data[f"n_keypoints_by_{flag}"] = ((flag,), np.array([g[4] for g in groups], dtype=np.int64))
        data[f"pair_{flag}"] = (("pair",), levels)
    others = [name for name in names if name != MODEL] if MODEL in names else []
    if others:
        coords["comparison"] = np.array([f"{MODEL} - {name}" for name in others], dtype=str)
        coords["bound"] = np.array(["mean", "low", "high"])
        for average in ("image", "keypoint"):
            rows = [
                np.stack(_difference(values[MODEL]["n_correct"], values[name]["n_correct"], n_valid, average,
                                     bootstrap_resamples, bootstrap_seed, BOOTSTRAP_LEVEL), axis=-1)
                for name in others
            ]  # fmt: skip
            data[f"pck_{average}_difference"] = (("comparison", "alpha", "bound"), np.stack(rows))

    used = sorted(set(kinds.tolist()))
    per_dataset = sorted({f"{d}: {k}" for d, k in zip(meta["dataset"], kinds.tolist(), strict=True)})
    attrs: dict[str, Any] = {
        **protocol.describe(input_size),
        "threshold_type": ", ".join(used),
        "threshold_type_per_dataset": "; ".join(per_dataset),
        "threshold_definition": "; ".join(_definition(k, protocol) for k in used),
        "average_image": "mean over pairs of each pair's fraction of correct keypoints",
        "average_keypoint": "correct keypoints over valid keypoints, pooled",
        "average_category_mean": "unweighted mean over categories",
        "unscored_pairs": "pairs without a valid keypoint are counted in n_pairs and skipped by every PCK",
        "model": model_name,
        "predictors": ", ".join(names),
        "actr_core_version": _library_version(),
    }
    if others:
        attrs["bootstrap"] = (
            f"paired bootstrap over the scored pairs: {bootstrap_resamples} resamples, seed {bootstrap_seed}, "
            f"{BOOTSTRAP_LEVEL:.0%} percentile interval; bound 'mean' is the observed difference"
        )
        attrs["bootstrap_resamples"] = int(bootstrap_resamples)
        attrs["bootstrap_seed"] = int(bootstrap_seed)
        attrs["bootstrap_level"] = float(BOOTSTRAP_LEVEL)
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _with_predictor(results: xr.Dataset) -> xr.Dataset:
    """Results written before the predictor dimension existed, read as the model's alone."""
    if "predictor" in results.dims:
        return results
    names = [
        n
        for n in map(str, results.data_vars)
        if n in PER_PREDICTOR_VARIABLES or n.startswith(("pck_image_by_", "pck_keypoint_by_"))
    ]
    out = results.copy()
    for name in names:
        out[name] = results[name].expand_dims(predictor=[MODEL])
    return out.assign_coords(predictor=np.array([MODEL], dtype=str))


def _predictors(results: xr.Dataset, predictor: str | None) -> list[str]:
    names = [str(p) for p in results["predictor"].values]
    if predictor is None:
        return names
    if predictor not in names:
        raise ValueError(f"predictor {predictor!r} is not in the results; they hold {names}")
    return [predictor]


# ---------------------------------------------------------------------------------------------
# Curves, differences, tables, files


def _stored(results: xr.Dataset, predictor: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    pred = torch.from_numpy(np.asarray(results["pred_kps"].sel(predictor=predictor).values, dtype=np.float64))
    gt = torch.from_numpy(np.asarray(results["gt_kps"].values, dtype=np.float64))
    valid = torch.from_numpy(np.asarray(results["keypoint_valid"].values, dtype=bool))
    threshold = torch.from_numpy(np.asarray(results["threshold"].values, dtype=np.float64))
    return pred, gt, threshold, valid


def keypoint_correctness(results: xr.Dataset, alpha: float, predictor: str | None = None) -> xr.DataArray:
    """Per-keypoint correctness at ``alpha`` from the stored keypoints (False where invalid).

    ``(predictor, pair, keypoint)``, or ``(pair, keypoint)`` for one ``predictor`` (e.g. ``"model"``).
    """
    results = _with_predictor(results)
    names = _predictors(results, predictor)
    rows = []
    for name in names:
        pred, gt, threshold, valid = _stored(results, name)
        rows.append(pck_per_keypoint(pred, gt, threshold, float(alpha), valid).correct.numpy())
    out = xr.DataArray(
        np.stack(rows),
        dims=("predictor", "pair", "keypoint"),
        coords={"predictor": names, "pair": results["pair"].values, "keypoint": results["keypoint"].values},
        name="correct",
        attrs={"alpha": float(alpha)},
    )
    return out.sel(predictor=predictor, drop=True) if predictor is not None else out


def pck_curve(results: xr.Dataset, alphas: Alphas, average: str = "image", predictor: str | None = None) -> xr.DataArray:
    """PCK over all pairs at any ``alphas``, recomputed from the stored keypoints with :func:`pck_per_keypoint`.

    ``average``: ``"image"`` (mean of per-pair fractions) or ``"keypoint"`` (pooled). Returns
    ``(predictor, alpha)``, or ``(alpha,)`` for one ``predictor``.
    """
    if average not in ("image", "keypoint"):
        raise ValueError(f"average must be 'image' or 'keypoint', got {average!r}")
    results = _with_predictor(results)
    names = _predictors(results, predictor)
    rows = []
    for name in names:
        pred, gt, threshold, valid = _stored(results, name)
        out = []
        for a in alphas:
            correct, _ = pck_per_keypoint(pred, gt, threshold, float(a), valid)
            n_correct, n_valid = correct.sum(1).numpy(), valid.sum(1).numpy()
            if average == "keypoint":
                out.append(_ratio(np.asarray(n_correct.sum()), np.asarray(n_valid.sum())))
            else:
                out.append(_masked_mean(_ratio(n_correct, n_valid), np.ones_like(n_valid, dtype=bool)))
        rows.append(np.asarray(out, dtype=np.float64))
    curve = xr.DataArray(
        np.stack(rows),
        dims=("predictor", "alpha"),
        coords={"predictor": names, "alpha": np.asarray(alphas, dtype=np.float64)},
        name=f"pck_{average}_overall",
        attrs=dict(results.attrs),
    )
    return curve.sel(predictor=predictor, drop=True) if predictor is not None else curve


class PCKDifference(NamedTuple):
    """PCK(a) − PCK(b) over the scored pairs (fractions) and its paired bootstrap interval."""

    mean: float  # the observed difference
    low: float
    high: float


def _correct_counts(results: xr.Dataset, predictor: str, alpha: float) -> np.ndarray:
    """Correct keypoints per pair at ``alpha``: stored when ``alpha`` was scored, else recomputed."""
    stored = np.asarray(results["alpha"].values, dtype=np.float64)
    match = np.flatnonzero(np.isclose(stored, alpha, rtol=0.0, atol=1e-12))
    if match.size:
        return np.asarray(results["n_correct"].sel(predictor=predictor).values[match[0]], dtype=np.int64)
    return keypoint_correctness(results, alpha, predictor).values.sum(axis=1).astype(np.int64)


def pck_difference(
    results: xr.Dataset,
    a: str = MODEL,
    b: str = IDENTITY,
    alpha: float = 0.1,
    *,
    average: str = "image",
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = BOOTSTRAP_LEVEL,
) -> PCKDifference:
    """PCK@α of predictor ``a`` minus predictor ``b`` on the same pairs, with a paired bootstrap interval.

    Pairs (those with a valid keypoint) are resampled with replacement, ``n_resamples`` times
    with ``numpy.random.default_rng(seed)``, the same draws for both predictors; the interval is
    the ``level`` percentile interval of the resampled differences. ``average="image"``
    compares per-image PCK (mean of per-pair fractions), ``"keypoint"`` pooled PCK. Fractions,
    like every PCK in the results (× 100 for points). ``alpha`` need not be one of the scored α:
    other values are recomputed from the stored keypoints.
    """
    if average not in ("image", "keypoint"):
        raise ValueError(f"average must be 'image' or 'keypoint', got {average!r}")
    results = _with_predictor(results)
    _predictors(results, a), _predictors(results, b)
    n_valid = np.asarray(results["n_valid"].values, dtype=np.int64)
    count_a, count_b = (_correct_counts(results, name, float(alpha))[None] for name in (a, b))
    mean, low, high = _difference(count_a, count_b, n_valid, average, n_resamples, seed, level)
    return PCKDifference(float(mean[0]), float(low[0]), float(high[0]))


def _cell(value: float, scale: float) -> str:
    return f"{value * scale:>9.1f}" if np.isfinite(value) else f"{'nan':>9}"


def _fallback_line(results: xr.Dataset, name: str) -> str:
    n = int(results["n_fallbacks"].sel(predictor=name))
    total = int(results["n_pairs_total"])
    if not n:
        return f"fitted on all {total} pairs"
    reasons = results["fallback_reason"].sel(predictor=name).values.tolist()
    counts = ", ".join(f"{r.replace('_', ' ')} {reasons.count(r)}" for r in sorted(set(reasons) - {""}))
    return f"fell back to identity on {n} of {total} pairs ({counts})"


def format_table(results: xr.Dataset, average: str = "image", percent: bool = True) -> str:
    """A plain-text table: per category (and pair / category means, SPair splits) a row per predictor,
    then the model's difference to each reference with its paired bootstrap interval.

    The predictors are the model and the references that were run; a reference that was not run
    is named as such ("classical peer: not run").
    """
    if average not in ("image", "keypoint"):
        raise ValueError(f"average must be 'image' or 'keypoint', got {average!r}")
    results = _with_predictor(results)
    scale = 100.0 if percent else 1.0
    names = [str(p) for p in results["predictor"].values]
    labels = {name: REFERENCE_LABELS.get(name, name) for name in names}
    alphas = [float(a) for a in results["alpha"].values]
    head = f"{'category':<20}{'predictor':<16}{'pairs':>7}{'kps':>8}" + "".join(f"{f'α={a:g}':>9}" for a in alphas)
    rule = "-" * len(head)
    lines = [
        f"PCK per {average} ({results.attrs.get(f'average_{average}', '')}){' in %' if percent else ''}",
        f"protocol: {results.attrs.get('protocol')} · threshold: {results.attrs.get('threshold_definition')}",
        f"frame: {results.attrs.get('coordinate_frame')} · {results.attrs.get('comparison')}",
        f"model: {results.attrs.get('model')}",
    ]
    if "data" in results.attrs:
        lines.append(f"data: {results.attrs['data']} · split {results.attrs.get('split', '?')} · "
                     f"allow_incomplete {results.attrs.get('allow_incomplete', 'false')}")  # fmt: skip
    if results.attrs.get("data_incomplete"):
        lines.append(f"INCOMPLETE DATA (read with allow_incomplete): {results.attrs['data_incomplete']}")
    for name in REFERENCE_NAMES:
        if name not in names:
            lines.append(f"{labels.get(name, REFERENCE_LABELS[name])}: not run")
        elif name == IDENTITY:
            lines.append(f"{REFERENCE_LABELS[name]}: zero motion, on the same pairs and protocol")
        else:
            lines.append(f"{REFERENCE_LABELS[name]}: ORB + RANSAC homography (geometric, not semantic), "
                         f"{_fallback_line(results, name)}")  # fmt: skip
    lines += [rule, head, rule]

    def block(group: str, pairs: Any, kps: Any, table: xr.DataArray) -> None:
        for i, name in enumerate(names):
            first = i == 0
            counts = f"{int(pairs):>7}{int(kps):>8}" if first else " " * 15
            cells = "".join(_cell(v, scale) for v in table.sel(predictor=name).values)
            lines.append(f"{(group if first else '')[:19]:<20}{labels[name][:15]:<16}{counts}{cells}")

    table = results[f"pck_{average}"]
    for c in results["category"].values:
        block(str(c), results["n_pairs"].sel(category=c), results["n_keypoints"].sel(category=c), table.sel(category=c))
    lines.append(rule)
    block("all pairs", results["n_pairs_total"], results["n_keypoints_total"], results[f"pck_{average}_overall"])
    block("mean of categories", results["n_pairs_total"], results["n_keypoints_total"],
          results[f"pck_{average}_category_mean"])  # fmt: skip
    for flag in SPAIR_FLAGS:
        if f"pck_{average}_by_{flag}" not in results:
            continue
        lines.append(rule)
        for level in results[flag].values:
            at = {flag: level}
            block(f"{FLAG_LABELS[flag]}={int(level)}", results[f"n_pairs_by_{flag}"].sel(at),
                  results[f"n_keypoints_by_{flag}"].sel(at), results[f"pck_{average}_by_{flag}"].sel(at))  # fmt: skip
    unscored = int(results["n_pairs_total"]) - int(results["n_pairs_scored_total"])
    if unscored:
        lines.append(f"({unscored} pair(s) without a valid keypoint skipped)")
    if MODEL in names:
        lines += _difference_lines(results, average, scale, alphas, rule)
    return "\n".join(lines)


def _difference_lines(results: xr.Dataset, average: str, scale: float, alphas: list[float], rule: str) -> list[str]:
    """The model − reference lines of :func:`format_table`, with their bootstrap intervals."""
    unit = "points" if scale == 100.0 else "PCK"
    stored = results.get(f"pck_{average}_difference")
    resamples = results.attrs.get("bootstrap_resamples", BOOTSTRAP_RESAMPLES)
    seed = results.attrs.get("bootstrap_seed", BOOTSTRAP_SEED)
    level = float(results.attrs.get("bootstrap_level", BOOTSTRAP_LEVEL))
    lines = [
        rule,
        f"model − reference in {unit}: observed [{level:.0%} interval], paired bootstrap over the "
        f"{int(results['n_pairs_scored_total'])} scored pairs ({resamples} resamples, seed {seed})",
        f"{'':<24}" + "".join(f"{f'α={a:g}':>22}" for a in alphas),
    ]
    for name in REFERENCE_NAMES:
        label = f"model − {REFERENCE_LABELS[name]}"
        comparison = f"{MODEL} - {name}"
        if name not in results["predictor"].values:
            lines.append(f"{label:<24}not run")
            continue
        if stored is not None and comparison in stored["comparison"].values:
            rows = stored.sel(comparison=comparison).values  # alpha bound
        else:
            rows = np.array([pck_difference(results, MODEL, name, a, average=average) for a in alphas])
        cells = "".join(
            f"{f'{m * scale:+.1f} [{lo * scale:+.1f}, {hi * scale:+.1f}]':>22}" if np.isfinite(m) else f"{'nan':>22}"
            for m, lo, hi in rows
        )
        lines.append(f"{label:<24}{cells}")
    return lines


def results_bytes(results: xr.Dataset) -> bytes:
    """The results as the bytes of a netCDF file (engine h5netcdf), built in memory: no HDF5 file is
    open on disk while it is written, so a failing disk cannot leave one half-written or unclosed."""
    return bytes(results.to_netcdf(engine="h5netcdf", invalid_netcdf=False))


def save_results(results: xr.Dataset, path: str | Path) -> Path:
    """Write the results as netCDF (engine h5netcdf) atomically (:func:`actr_core.files.write_atomic`:
    a crash or a full disk leaves the previous file whole); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, results_bytes(results))


def load_results(path: str | Path) -> xr.Dataset:
    """Read results written by :func:`save_results` (fully loaded, file closed)."""
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()
