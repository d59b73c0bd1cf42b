"""Self-describing, atomically written training checkpoints.

A checkpoint is one ``torch.save`` file holding only plain containers, numbers, strings and
tensors, so it loads with ``torch.load(weights_only=True)`` (no pickled code runs). Its keys:

``format``             :data:`CHECKPOINT_FORMAT`, so a foreign file is rejected with a clear error
``schema_version``     :data:`SCHEMA_VERSION` of this layout
``library_version``    ``actr_core.__version__`` that wrote it
``data_schema_version`` the batch schema version the model was trained on (None if unknown)
``builder``            the model builder's registered name (:func:`actr_core.models.build_model`)
``builder_kwargs``     the builder's keyword overrides
``model_config``       the model's own config as a plain dict (``dataclasses.asdict(model.config)``;
                       None for models without a dataclass ``config``): on reload the rebuilt
                       model's config must equal it, so a builder whose numbers changed since
                       the checkpoint was written is refused instead of silently differing
``config``             the full training configuration (a plain dict)
``model``              the model's ``state_dict`` (never a DDP-prefixed one)
``optimizer`` / ``scheduler`` / ``scaler``  their ``state_dict`` (or None)
``epoch`` / ``step``   completed epochs and optimiser steps
``rng``                RNG states per rank: ``{rank: {"torch", "cuda", "numpy", "python"}}``
``history``            per-epoch metric rows so far (list of dicts)

Content errors (a file that is not a checkpoint, a missing entry, weights that do not fit the
builder's model, an image size the model cannot take) raise :class:`CheckpointError` with one line
naming the file and what is wrong.

Writes are atomic: the file is written to a temporary name in the destination folder, flushed
to disk, then renamed over the destination (``os.replace``), so a reader sees the old file or the
new one, never half of one, whatever kills the writer.
"""

import dataclasses
import os
import random
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

import actr_core

__all__ = [
    "CHECKPOINT_FORMAT",
    "SCHEMA_VERSION",
    "CHECKPOINT_NAME",
    "CheckpointError",
    "TrainingCheckpoint",
    "atomic_save",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_from_checkpoint",
    "check_weights",
    "build_meta_model",
    "input_size_problem",
    "export_model",
    "resolve_checkpoint_path",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "actr_core.training.checkpoint"
SCHEMA_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"  # file name inside a checkpoint folder (Ray Train checkpoints)
# the entries every checkpoint of this schema holds (data_schema_version and model_config are optional)
_ENTRIES = (
    "builder",
    "builder_kwargs",
    "config",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "epoch",
    "step",
    "rng",
    "history",
    "library_version",
)


class CheckpointError(ValueError):
    """A file that is not a readable actr_core training checkpoint (foreign, truncated, too new)."""


@dataclasses.dataclass(frozen=True)
class TrainingCheckpoint:
    """The loaded content of a checkpoint file (see the module docstring for each field)."""

    builder: str
    builder_kwargs: dict[str, Any]
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    scaler: dict[str, Any] | None
    epoch: int
    step: int
    rng: dict[int, dict[str, Any]]
    history: list[dict[str, Any]]
    library_version: str
    schema_version: int
    data_schema_version: int | None
    model_config: dict[str, Any] | None = None
    path: str = ""  # the file it was read from ("" when not read from a file)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA when present, NumPy global, Python ``random``), checkpoint-safe."""
    # the legacy (default) form: a tuple; NumPy's stubs also allow the dict form of legacy=False
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    version, mt_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only when as many devices are visible)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a half-written ``path``.

    Writes ``.<name>.<random>.tmp`` in the same folder (same file system, so the rename is atomic),
    flushes and fsyncs it, renames it over ``path`` and fsyncs the folder. On any error the
    temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


_FILE_MODE = 0o666  # what open() would create, before the umask


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    builder: str,
    builder_kwargs: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    epoch: int = 0,
    step: int = 0,
    rng: Mapping[int, Mapping[str, Any]] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    data_schema_version: int | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically (see the module docstring); returns the path.

    ``model`` may be DDP-wrapped: the inner model's ``state_dict`` is stored. ``rng`` defaults to
    this process's state as rank 0.
    """
    from actr_core.training.optim import unwrap_model

    payload = {
        "format": CHECKPOINT_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "library_version": actr_core.__version__,
        "data_schema_version": data_schema_version,
        "builder": builder,
        "builder_kwargs": dict(builder_kwargs or {}),
        "model_config": _model_config(unwrap_model(model)),
        "config": dict(config or {}),
        "model": unwrap_model(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "rng": {int(k): dict(v) for k, v in (rng if rng is not None else {0: rng_state()}).items()},
        "history": [dict(row) for row in (history or [])],
    }
    return atomic_save(payload, path)


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a folder holding :data:`CHECKPOINT_NAME` (a Ray Train checkpoint folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> TrainingCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` (a ``ValueError``) for a missing, truncated or foreign file
    (another program's ``.pt``/``.pth``, a bare ``state_dict``) or one from a newer schema.
    """
    path = resolve_checkpoint_path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or pickled-code files
        raise CheckpointError(
            f"{path} is not a readable actr_core training checkpoint ({type(error).__name__}: {error})"
        ) from error
    if isinstance(payload, Mapping) and payload.get("format") != CHECKPOINT_FORMAT and _is_state_dict(payload):
        raise CheckpointError(
            f"{path} is a bare state dict or a checkpoint of the released code, not an actr_core training "
            f"checkpoint: load a released ACTR checkpoint with load_official_actr (actr match --released)"
        )
    if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
        keys = sorted(payload)[:8] if isinstance(payload, Mapping) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not an actr_core training checkpoint: expected format {CHECKPOINT_FORMAT!r}, "
            f"found {payload.get('format') if isinstance(payload, Mapping) else None!r} (content: {keys})"
        )
    version = payload.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint schema version {version!r}; this actr_core "
            f"({actr_core.__version__}) reads versions up to {SCHEMA_VERSION}"
        )
    missing = [key for key in _ENTRIES if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint has no {', '.join(map(repr, missing))} entry (a damaged or edited file)")
    weights = payload["model"]
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: the 'model' entry is not a state dict of tensors")
    return TrainingCheckpoint(
        builder=payload["builder"],
        builder_kwargs=dict(payload["builder_kwargs"]),
        config=dict(payload["config"]),
        model=payload["model"],
        optimizer=payload["optimizer"],
        scheduler=payload["scheduler"],
        scaler=payload["scaler"],
        epoch=int(payload["epoch"]),
        step=int(payload["step"]),
        rng={int(k): v for k, v in payload["rng"].items()},
        history=list(payload["history"]),
        library_version=str(payload["library_version"]),
        schema_version=version,
        data_schema_version=payload.get("data_schema_version"),
        model_config=payload.get("model_config"),
        path=str(path),
    )


def _is_state_dict(payload: Mapping[str, Any]) -> bool:
    """A bare state dict (every value a tensor) or a released-code checkpoint (a ``state_dict`` entry)."""
    return isinstance(payload.get("state_dict"), Mapping) or (
        bool(payload) and all(isinstance(v, torch.Tensor) for v in payload.values())
    )


def check_weights(ckpt: TrainingCheckpoint, model: nn.Module, builder: str) -> None:
    """Raise :class:`CheckpointError` naming the file when ``ckpt.model`` does not fit ``model`` (built by
    ``builder``): the tensors it lacks, those the model has no place for, and those of another shape."""
    own, saved = model.state_dict(), ckpt.model
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [
        f"{k} {tuple(saved[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in own
        if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{len(keys)} {what}, first: {', '.join(keys[:3])}"
        for what, keys in (("missing tensors", missing), ("tensors the model lacks", unexpected), ("other shapes", shapes))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{ckpt.path or 'checkpoint'}: its weights do not fit the model of builder {builder!r} "
            f"(saved by builder {ckpt.builder!r}): {'; '.join(problems)}"
        )


def build_meta_model(builder: str, builder_kwargs: Mapping[str, Any]) -> nn.Module:
    """The model of ``builder`` on the meta device: its structure without memory or initialisation
    (seconds even for the large models), for checking weights and input sizes before building it."""
    from actr_core.models import build_model

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the random-initialisation warning, given again when it is built
        return build_model(builder, **builder_kwargs)


def input_size_problem(model: nn.Module, side: int) -> str | None:
    """Why ``model`` cannot take ``side × side`` images (its own error, one line), or None when it can.

    Runs the forward pass of ``model`` (put in eval mode) on a meta-device input, so every check the
    model makes on its input runs; give it a model built by :func:`build_meta_model`, whose forward
    pass then computes shapes only (no memory, no arithmetic).
    """
    image = torch.zeros(1, 3, side, side, device="meta")
    try:
        with torch.no_grad():
            model.eval()(image, image)
    except Exception as error:  # the model's own input checks raise ValueError; meta kernels may raise others
        lines = str(error).strip().splitlines()
        return lines[0] if lines else type(error).__name__
    return None


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    """``dataclasses.asdict(model.config)`` when the model carries a dataclass config, else None."""
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config) or isinstance(config, type):
        return None
    return dataclasses.asdict(config)


def _with_added_defaults(saved: dict[str, Any] | None, model: nn.Module) -> dict[str, Any] | None:
    """``saved`` (a model config as an older version wrote it) plus the fields its config class has
    gained since, at their defaults (e.g. ``ACTRConfig.grad_checkpointing``, added in 0.2.0), so that
    a checkpoint compares equal to a model built as it was then."""
    config = getattr(model, "config", None)
    if saved is None or config is None or not dataclasses.is_dataclass(config):
        return saved
    added = {
        f.name: f.default for f in dataclasses.fields(config) if f.name not in saved and f.default is not dataclasses.MISSING
    }
    return {**saved, **added}


def export_model(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a copy of checkpoint ``path`` without optimiser, scheduler, scaler and RNG states (atomically).

    The copy is still a self-describing checkpoint (builder, config, versions, history), so
    :func:`load_model_from_checkpoint` rebuilds the model from it; it is only smaller.
    """
    source = resolve_checkpoint_path(path)
    load_checkpoint(source)  # rejects foreign files with the usual error
    payload = torch.load(source, map_location="cpu", weights_only=True)
    payload.update(optimizer=None, scheduler=None, scaler=None, rng={})
    return atomic_save(payload, out)


def load_model_from_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as, with its weights, in eval mode.

    Returns ``(model, info)``; ``info`` holds ``builder``, ``builder_kwargs``, ``config``,
    ``epoch``, ``step``, ``library_version`` and ``input_size`` = ``(image_size, image_size)``.
    Raises :class:`CheckpointError` naming the file when the builder is unknown or refuses the
    saved arguments, now makes a model whose config differs from the saved one (its numbers changed
    since the checkpoint was written; the fields are named), when the weights do not fit its model
    (:func:`check_weights`), or when the model cannot take the saved ``image_size``
    (:func:`input_size_problem`). These checks run on a meta-device copy before the model is built.
    """
    from actr_core.models import build_model, model_entries

    ckpt = load_checkpoint(path, map_location=map_location)
    path = ckpt.path
    if ckpt.builder not in {entry.name for entry in model_entries()}:
        raise CheckpointError(f"{path}: builder {ckpt.builder!r} is not a registered model of this actr_core")
    try:
        meta = build_meta_model(ckpt.builder, ckpt.builder_kwargs)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: builder {ckpt.builder!r} refuses the saved arguments: {error}") from error
    rebuilt = _model_config(meta)
    saved = _with_added_defaults(ckpt.model_config, meta)
    if saved is not None and rebuilt is not None and rebuilt != saved:
        changed = sorted(k for k in set(rebuilt) | set(saved) if rebuilt.get(k) != saved.get(k))
        raise CheckpointError(
            f"{path}: builder {ckpt.builder!r} now gives another model than the one saved "
            f"(fields {changed}: saved {[saved.get(k) for k in changed]}, "
            f"now {[rebuilt.get(k) for k in changed]}); rebuild it with those values as builder arguments"
        )
    check_weights(ckpt, meta, ckpt.builder)
    side = int(ckpt.config.get("image_size", 256))
    problem = input_size_problem(meta, side)
    if problem is not None:
        raise CheckpointError(f"{path}: the model cannot take its image_size {side} (config): {problem}")
    model = build_model(ckpt.builder, **ckpt.builder_kwargs)
    model.load_state_dict(ckpt.model)
    model.to(map_location).eval()
    info = {
        "builder": ckpt.builder,
        "builder_kwargs": ckpt.builder_kwargs,
        "config": ckpt.config,
        "epoch": ckpt.epoch,
        "step": ckpt.step,
        "library_version": ckpt.library_version,
        "input_size": (side, side),
    }
    return model, info
