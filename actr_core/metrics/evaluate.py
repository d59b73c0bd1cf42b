"""Run a matcher over batches and score PCK@α: results as a labelled ``xarray.Dataset``.

Axis legend: b batch (pairs) · n keypoints · 2 (x, y) · alpha PCK tolerances · category ·
pair (every scored pair) · keypoint (keypoint slot, padded with NaN across batches) · coord (x, y).

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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from tqdm.auto import tqdm

from actr_core.data.pipeline import prepare_batch
from actr_core.metrics.pck import keypoint_distances, pck_per_keypoint
from actr_core.metrics.protocols import (
    ScoringProtocol,
    get_protocol,
    ground_truth_keypoints,
    pair_thresholds,
    predict_keypoints,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "SPAIR_FLAGS",
    "THRESHOLD_DEFINITIONS",
    "evaluate",
    "format_table",
    "keypoint_correctness",
    "load_results",
    "pck_curve",
    "save_results",
    "score_batch",
    "summarise",
]

# PCK tolerances reported by default: paper Table 1 (0.05, 0.1, 0.15) plus 0.01 (DenseMatching's list).
DEFAULT_ALPHAS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.15)
# SPair-71k pair-level difficulty annotations (PairAnnotation JSON), reported as splits when present.
SPAIR_FLAGS: tuple[str, ...] = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")
# A list of PCK tolerances: any sequence of floats or a 1-D numpy array.
Alphas = Sequence[float] | np.ndarray
THRESHOLD_DEFINITIONS: Mapping[str, str] = {
    "bbox": "max(x2 - x1, y2 - y1) of the {side} object box",
    "img": "max(height, width) of the {side} image",
    "bkp": "max side of the box around the valid {side} keypoints",
}
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


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_batch(batch: Mapping[str, Any], protocol: ScoringProtocol) -> None:
    required = ["src_image", "trg_image", "src_kps", "trg_kps", "valid_kps", "src_size", "trg_size"]
    if protocol.frame != "input":
        required += ["src_kps_orig", "trg_kps_orig"]
    missing = [k for k in required if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; it must follow the batch schema of actr_core.data")
    b, n = batch["valid_kps"].shape
    if tuple(batch["src_kps"].shape) != (b, n, 2) or tuple(batch["trg_kps"].shape) != (b, n, 2):
        raise ValueError(
            f"src_kps {tuple(batch['src_kps'].shape)} and trg_kps {tuple(batch['trg_kps'].shape)} "
            f"must be (b, n, 2) = ({b}, {n}, 2) like valid_kps"
        )


def _nan_where_invalid(x: Tensor, valid: Tensor) -> np.ndarray:
    out = torch.where(valid.unsqueeze(-1), x, torch.full_like(x, float("nan")))
    return out.detach().cpu().numpy()


def score_batch(
    model: nn.Module,
    batch: Mapping[str, Any],
    protocol: ScoringProtocol,
    alphas: Alphas,
    output: Any = None,
) -> BatchScores:
    """Run ``model`` on one batch (unless ``output`` is given) and score it under ``protocol``."""
    _check_batch(batch, protocol)
    if output is None:
        output = model(batch["src_image"], batch["trg_image"])
    valid = batch["valid_kps"]
    pred = predict_keypoints(protocol, model, output, batch)
    gt = ground_truth_keypoints(protocol, batch)
    threshold, kinds = pair_thresholds(protocol, batch)
    pred, gt = pred.to(gt.dtype), gt
    threshold = threshold.to(gt.dtype)
    n_correct = torch.stack([pck_per_keypoint(pred, gt, threshold, a, valid).correct.sum(dim=1) for a in alphas])
    b = valid.shape[0]
    meta: dict[str, list[Any]] = {
        "pair_id": list(batch.get("pair_id") or [f"pair{i}" for i in range(b)]),
        "category": list(batch.get("category") or ["all"] * b),
        "dataset": list(batch.get("dataset") or ["unknown"] * b),
    }
    for flag in SPAIR_FLAGS:
        if flag in batch:
            meta[flag] = [int(v) for v in torch.as_tensor(batch[flag]).tolist()]
    return BatchScores(
        pred=_nan_where_invalid(pred, valid),
        gt=_nan_where_invalid(gt, valid),
        valid=valid.cpu().numpy(),
        distance=keypoint_distances(pred, gt, valid).cpu().numpy(),
        threshold=threshold.detach().cpu().numpy(),
        threshold_kind=kinds,
        n_correct=n_correct.cpu().numpy(),
        meta=meta,
    )


def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    protocol: str | ScoringProtocol = "standard",
    alphas: Alphas = DEFAULT_ALPHAS,
    device: torch.device | str | None = None,
    progress: bool = True,
    total: int | None = None,
    model_name: str = "model",
) -> xr.Dataset:
    """Score ``model`` (a Matcher) on every batch and summarise PCK as an ``xarray.Dataset``.

    Args:
        model: ``model(src, trg)`` returns an output with ``.flow``; ``model.transfer(output,
            src_kps, valid)`` returns target keypoints in input-frame pixels.
        batches: iterable of batches in the schema of ``actr_core.data`` (reader or shards).
        protocol: ``"standard"`` (default), ``"standard-input"``, ``"released"`` or a
            :class:`ScoringProtocol`. Scoring only; choose models on the validation split.
        alphas: PCK tolerances.
        device: where the model runs (default: where its parameters are; CPU is fine).
        progress: show a tqdm bar.
        total: number of batches, for the bar when ``batches`` has no ``len``.
        model_name: written into the attributes.

    Returns:
        See :func:`summarise`.
    """
    protocol = get_protocol(protocol)
    alphas = tuple(float(a) for a in alphas)
    if not alphas or any(not a > 0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {alphas}")
    device = torch.device(device) if device is not None else _model_device(model)
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    scores: list[BatchScores] = []
    n_pairs = 0
    input_size: tuple[int, int] | None = None
    try:
        with torch.no_grad():
            bar = tqdm(batches, total=total, disable=not progress, desc=f"PCK ({protocol.name})", unit="batch")
            for batch in bar:
                batch = prepare_batch(batch, device)
                input_size = tuple(batch["src_image"].shape[-2:])  # type: ignore[assignment]
                scores.append(score_batch(model, batch, protocol, alphas))
                n_pairs += len(scores[-1].threshold)
                bar.set_postfix(pairs=n_pairs)
    finally:
        model.train(was_training)
    if not scores:
        raise ValueError("no batches to evaluate")
    return summarise(scores, protocol, alphas, input_size=input_size, model_name=model_name)


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


def summarise(
    scores: Sequence[BatchScores],
    protocol: ScoringProtocol,
    alphas: Alphas,
    *,
    input_size: Sequence[int] | None = None,
    model_name: str = "model",
) -> xr.Dataset:
    """Build the results dataset from per-batch scores.

    Variables (dimensions):
        ``pck_image``, ``pck_keypoint`` (alpha, category); ``pck_image_overall``,
        ``pck_keypoint_overall``, ``pck_image_category_mean``, ``pck_keypoint_category_mean``
        (alpha); ``n_pairs``, ``n_pairs_scored``, ``n_keypoints`` (category) and ``*_total``
        scalars; per pair: ``pair_pck`` (alpha, pair), ``n_correct`` (alpha, pair), ``n_valid``,
        ``threshold``, ``threshold_kind``, ``dataset``, ``pair_category`` (pair), keypoints
        ``pred_kps``, ``gt_kps`` (pair, keypoint, coord), ``distance``, ``keypoint_valid``
        (pair, keypoint); SPair splits ``pck_image_by_<flag>``, ``pck_keypoint_by_<flag>``
        (alpha, <flag>), ``n_pairs_by_<flag>``, ``n_keypoints_by_<flag>`` (<flag>) when the batches carried the flags.
    PCK values are fractions in [0, 1]; attributes state protocol, threshold and frame.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    n_max = max(s.valid.shape[1] for s in scores)
    valid = _pad([s.valid for s in scores], n_max, False)
    distance = _pad([s.distance for s in scores], n_max, np.nan)
    pred = _pad([s.pred for s in scores], n_max, np.nan)
    gt = _pad([s.gt for s in scores], n_max, np.nan)
    threshold = np.concatenate([s.threshold for s in scores]).astype(np.float64)
    kinds = np.array(sum((s.threshold_kind for s in scores), []), dtype=object)
    n_correct = np.concatenate([s.n_correct for s in scores], axis=1).astype(np.int64)  # alpha pair
    n_valid = valid.sum(axis=1).astype(np.int64)
    pair_pck = _ratio(n_correct, n_valid[None])  # alpha pair, NaN for unscored pairs
    meta = {key: sum((s.meta[key] for s in scores), []) for key in scores[0].meta}
    category = np.array(meta["category"], dtype=object)
    categories = sorted(set(meta["category"]))

    per_category = [_group(pair_pck, n_correct, n_valid, category == c) for c in categories]
    everyone = _group(pair_pck, n_correct, n_valid, np.ones_like(n_valid, dtype=bool))
    pck_image = np.stack([g[0] for g in per_category], axis=1)  # alpha category
    pck_keypoint = np.stack([g[1] for g in per_category], axis=1)

    data: dict[str, Any] = {
        "pck_image": (("alpha", "category"), pck_image),
        "pck_keypoint": (("alpha", "category"), pck_keypoint),
        "pck_image_overall": (("alpha",), everyone[0]),
        "pck_keypoint_overall": (("alpha",), everyone[1]),
        "pck_image_category_mean": (("alpha",), _masked_mean(pck_image, np.ones_like(pck_image, dtype=bool))),
        "pck_keypoint_category_mean": (("alpha",), _masked_mean(pck_keypoint, np.ones_like(pck_keypoint, dtype=bool))),
        "n_pairs": (("category",), np.array([g[2] for g in per_category], dtype=np.int64)),
        "n_pairs_scored": (("category",), np.array([g[3] for g in per_category], dtype=np.int64)),
        "n_keypoints": (("category",), np.array([g[4] for g in per_category], dtype=np.int64)),
        "n_pairs_total": ((), np.int64(everyone[2])),
        "n_pairs_scored_total": ((), np.int64(everyone[3])),
        "n_keypoints_total": ((), np.int64(everyone[4])),
        "pair_pck": (("alpha", "pair"), pair_pck),
        "n_correct": (("alpha", "pair"), n_correct),
        "n_valid": (("pair",), n_valid),
        "threshold": (("pair",), threshold),
        "threshold_kind": (("pair",), kinds.astype(str)),
        "dataset": (("pair",), np.array(meta["dataset"], dtype=str)),
        "pair_category": (("pair",), category.astype(str)),
        "pred_kps": (("pair", "keypoint", "coord"), pred),
        "gt_kps": (("pair", "keypoint", "coord"), gt),
        "distance": (("pair", "keypoint"), distance),
        "keypoint_valid": (("pair", "keypoint"), valid),
    }
    coords: dict[str, Any] = {
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
        values = sorted(set(levels.tolist()))
        groups = [_group(pair_pck, n_correct, n_valid, levels == v) for v in values]
        coords[flag] = np.array(values, dtype=np.int64)
        data[f"pck_image_by_{flag}"] = (("alpha", flag), np.stack([g[0] for g in groups], axis=1))
        data[f"pck_keypoint_by_{flag}"] = (("alpha", flag), np.stack([g[1] for g in groups], axis=1))
        data[f"n_pairs_by_{flag}"] = ((flag,), np.array([g[2] for g in groups], dtype=np.int64))
        data[f"n_keypoints_by_{flag}"] = ((flag,), np.array([g[4] for g in groups], dtype=np.int64))
        data[f"pair_{flag}"] = (("pair",), levels)

    used = sorted(set(kinds.tolist()))
    per_dataset = sorted({f"{d}: {k}" for d, k in zip(meta["dataset"], kinds.tolist(), strict=True)})
    attrs = {
        **protocol.describe(input_size),
        "threshold_type": ", ".join(used),
        "threshold_type_per_dataset": "; ".join(per_dataset),
        "threshold_definition": "; ".join(_definition(k, protocol) for k in used),
        "average_image": "mean over pairs of each pair's fraction of correct keypoints",
        "average_keypoint": "correct keypoints over valid keypoints, pooled",
        "average_category_mean": "unweighted mean over categories",
        "unscored_pairs": "pairs without a valid keypoint are counted in n_pairs and skipped by every PCK",
        "model": model_name,
        "actr_core_version": _library_version(),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


# ---------------------------------------------------------------------------------------------
# Curves, tables, files


def _stored(results: xr.Dataset) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    pred = torch.from_numpy(np.asarray(results["pred_kps"].values, dtype=np.float64))
    gt = torch.from_numpy(np.asarray(results["gt_kps"].values, dtype=np.float64))
    valid = torch.from_numpy(np.asarray(results["keypoint_valid"].values, dtype=bool))
    threshold = torch.from_numpy(np.asarray(results["threshold"].values, dtype=np.float64))
    return pred, gt, threshold, valid


def keypoint_correctness(results: xr.Dataset, alpha: float) -> xr.DataArray:
    """Per-keypoint correctness (pair, keypoint) at ``alpha``, from the stored keypoints (False where invalid)."""
    pred, gt, threshold, valid = _stored(results)
    correct, _ = pck_per_keypoint(pred, gt, threshold, float(alpha), valid)
    return xr.DataArray(
        correct.numpy(),
        dims=("pair", "keypoint"),
        coords={"pair": results["pair"].values, "keypoint": results["keypoint"].values},
        name="correct",
        attrs={"alpha": float(alpha)},
    )


def pck_curve(results: xr.Dataset, alphas: Alphas, average: str = "image") -> xr.DataArray:
    """PCK over all pairs at any ``alphas``, recomputed from the stored keypoints with :func:`pck_per_keypoint`.

    ``average``: ``"image"`` (mean of per-pair fractions) or ``"keypoint"`` (pooled).
    """
    if average not in ("image", "keypoint"):
        raise ValueError(f"average must be 'image' or 'keypoint', got {average!r}")
    pred, gt, threshold, valid = _stored(results)
    out = []
    for a in alphas:
        correct, _ = pck_per_keypoint(pred, gt, threshold, float(a), valid)
        n_correct, n_valid = correct.sum(1).numpy(), valid.sum(1).numpy()
        if average == "keypoint":
            out.append(_ratio(np.asarray(n_correct.sum()), np.asarray(n_valid.sum())))
        else:
            out.append(_masked_mean(_ratio(n_correct, n_valid), np.ones_like(n_valid, dtype=bool)))
    return xr.DataArray(
        np.asarray(out, dtype=np.float64),
        dims=("alpha",),
        coords={"alpha": np.asarray(alphas, dtype=np.float64)},
        name=f"pck_{average}_overall",
        attrs=dict(results.attrs),
    )


def format_table(results: xr.Dataset, average: str = "image", percent: bool = True) -> str:
    """A plain-text table: one row per category plus the pair (micro) and category (macro) means."""
    if average not in ("image", "keypoint"):
        raise ValueError(f"average must be 'image' or 'keypoint', got {average!r}")
    scale, unit = (100.0, "%") if percent else (1.0, "")
    table = results[f"pck_{average}"]
    alphas = [float(a) for a in results["alpha"].values]
    head = f"{'category':<20}{'pairs':>7}{'kps':>8}" + "".join(f"{f'α={a:g}':>9}" for a in alphas)
    rule = "-" * len(head)
    lines = [
        f"PCK per {average} ({results.attrs.get(f'average_{average}', '')}){' in %' if percent else ''}",
        f"protocol: {results.attrs.get('protocol')} · threshold: {results.attrs.get('threshold_definition')}",
        f"frame: {results.attrs.get('coordinate_frame')} · {results.attrs.get('comparison')}",
        f"model: {results.attrs.get('model')}",
        rule,
        head,
        rule,
    ]

    def row(name: str, pairs: Any, kps: Any, values: np.ndarray) -> str:
        cells = "".join(f"{v * scale:>9.1f}" if np.isfinite(v) else f"{'nan':>9}" for v in values)
        return f"{name[:19]:<20}{int(pairs):>7}{int(kps):>8}{cells}"

    for c in results["category"].values:
        lines.append(
            row(str(c), results["n_pairs"].sel(category=c), results["n_keypoints"].sel(category=c),
                table.sel(category=c).values)
        )
    lines.append(rule)
    lines.append(row("all pairs", results["n_pairs_total"], results["n_keypoints_total"],
                     results[f"pck_{average}_overall"].values))
    lines.append(row("mean of categories", results["n_pairs_total"], results["n_keypoints_total"],
                     results[f"pck_{average}_category_mean"].values))
    for flag in SPAIR_FLAGS:
        if f"pck_{average}_by_{flag}" not in results:
            continue
        lines.append(rule)
        for level in results[flag].values:
            at = {flag: level}
            lines.append(row(f"{FLAG_LABELS[flag]}={int(level)}", results[f"n_pairs_by_{flag}"].sel(at),
                             results[f"n_keypoints_by_{flag}"].sel(at), results[f"pck_{average}_by_{flag}"].sel(at).values))
    unscored = int(results["n_pairs_total"]) - int(results["n_pairs_scored_total"])
    if unscored:
        lines.append(f"({unscored} pair(s) without a valid keypoint skipped)")
    return "\n".join(lines)


def save_results(results: xr.Dataset, path: str | Path) -> Path:
    """Write the results as netCDF (engine h5netcdf); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results.to_netcdf(path, engine="h5netcdf", invalid_netcdf=False)
    return path


def load_results(path: str | Path) -> xr.Dataset:
    """Read results written by :func:`save_results` (fully loaded, file closed)."""
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()
