"""Conversion between released checkpoints (ACTR, MMNet) and the models of actr_core.

Axis legend: c channels · w window size.

The released code (github YXSUNMADMAX/ACTR) names its state dict after its own modules
(``decoder.blocks.{i}.*``, ``refine_swin_decoder_{g}_{r}.*``, ...) and holds parameters its forward
pass never uses. Here: the key mapping both ways (:func:`official_key_to_ours`,
:func:`our_key_to_official`), the released state dict's names and shapes for a model's sizes
(:func:`official_state_dict_shapes`), its parameter count (:func:`official_parameter_count`), our
weights under the released names (:func:`to_official_state_dict`), and the strict, audited loading
of a released checkpoint (:func:`load_official_actr`). The model itself is
:func:`actr_core.models.released.actr_released`; docs/models.md lists every key. MMNet's released
state dicts are renamed by :func:`convert_released_mmnet_state_dict` (docs/mmnet.md).
"""

import os
import re
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor

from actr_core.blocks.released import ReleasedSoftArgmax
from actr_core.blocks.windows import relative_position_index
from actr_core.models.actr import ACTR
from actr_core.models.backbones import read_checkpoint
from actr_core.models.config import ACTR_RELEASED_CONFIG, ACTRReleasedConfig
from actr_core.models.released import actr_released

__all__ = [
    "DERIVED_OFFICIAL_KEYS",
    "OfficialCheckpointError",
    "UNUSED_OFFICIAL_KEYS",
    "convert_released_mmnet_state_dict",
    "load_official_actr",
    "official_key_to_ours",
    "official_parameter_count",
    "official_state_dict_shapes",
    "our_key_to_official",
    "to_official_state_dict",
]


class OfficialCheckpointError(ValueError):
    """A released checkpoint does not fit ACTR as released (names the offending keys)."""


def _released_config(model: ACTR) -> ACTRReleasedConfig:
    """The config of an as-released model (built by ``actr_released``); ``ValueError`` for another model."""
    if not isinstance(model.config, ACTRReleasedConfig):
        raise ValueError(
            f"the model's config is {type(model.config).__name__}, not ACTRReleasedConfig: only ACTR as released "
            "(actr_released, load_official_actr) has released key names"
        )
    return model.config


_TOP_RENAMES = (  # (released prefix or name, ours)
    ("feature_extraction.backbone.", "backbone."),
    ("refine_proj_query_feat.0.", "upsampler.guidance.proj."),
    ("refine2.", "upsampler.refiner.head."),
    ("x_normal", "soft_argmax.x_grid"),
    ("y_normal", "soft_argmax.y_grid"),
)
_BLOCK_RENAMES = (
    ("sattn.", "self_attn."),
    ("cattn.", "cross_attn."),
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
    ("mlp.", "mlp."),
    ("pos_embed", "source_pos"),
    ("spatial_attention.weight", "reweighting.weight"),
)
_SWIN_RENAMES = (
    ("0.transformer.layers.0.blocks.0.", "block."),
    ("0.transformer.norm.", "norm."),
    ("1.fc.0.", "channel_attention.reduce."),
    ("1.fc.2.", "channel_attention.expand."),
)
_RELEASED_BLOCK = re.compile(r"decoder\.(?:blocks\.(\d+)|last_block\.0)\.(.+)")
_RELEASED_SWIN = re.compile(r"refine_swin_decoder_(\d+)_(\d+)\.(.+)")
_OUR_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_OUR_SWIN = re.compile(r"upsampler\.refiner\.rounds\.(\d+)\.branches\.(\d+)\.(.+)")
_SWIN_INDEX_KEY = "0.transformer.layers.0.blocks.0.attn.relative_position_index"

#: released keys never used by its forward pass (accepted and dropped by load_official_actr)
UNUSED_OFFICIAL_KEYS = (
    r"decoder\.(blocks\.\d+|last_block\.0)\.(mlp2\.fc[12]|norm3|norm4)\.(weight|bias)",  # per block
    r"decoder\.last_block\.0\.spatial_attention\.weight",  # the last block never reweights
    r"decoder\.pos_embed_[xy]",
    r"decoder\.(proj|norm)\.(weight|bias)",
    r"learn_parm",
)
#: released buffers that are derived constants (checked against ours, then dropped)
DERIVED_OFFICIAL_KEYS = (r"refine_swin_decoder_\d+_\d+\.0\.transformer\.layers\.0\.blocks\.0\.attn\.relative_position_index",)


def _rename(key: str, renames: tuple[tuple[str, str], ...], *, reverse: bool = False) -> str | None:
    for theirs, ours in renames:
        old, new = (ours, theirs) if reverse else (theirs, ours)
        if old.endswith(".") and key.startswith(old):
            return new + key[len(old) :]
        if key == old:
            return new
    return None


def _window_group(window: int, config: ACTRReleasedConfig) -> int:
    """Released branch names number the windows from the smallest: ``_1_`` = 4, ``_2_`` = 8."""
    return sorted(config.sr_windows).index(window) + 1


def official_key_to_ours(key: str, config: ACTRReleasedConfig = ACTR_RELEASED_CONFIG) -> str | None:
    """Our name for a released state-dict key; ``None`` for a key that is dropped (unused or derived).

    Raises :class:`OfficialCheckpointError` for a key the released model does not have.
    """
    if any(re.fullmatch(p, key) for p in UNUSED_OFFICIAL_KEYS + DERIVED_OFFICIAL_KEYS):
        return None
    if (match := _RELEASED_BLOCK.fullmatch(key)) is not None:
        index = int(match.group(1)) if match.group(1) is not None else config.depth - 1
        sub = _rename(match.group(2), _BLOCK_RENAMES)
        if sub is not None and index < config.depth:
            return f"blocks.{index}.{sub}"
    elif (match := _RELEASED_SWIN.fullmatch(key)) is not None:
        group, round_, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        windows = sorted(config.sr_windows)
        sub = _rename(rest, _SWIN_RENAMES)
        if sub is not None and 1 <= group <= len(windows) and 1 <= round_ <= config.sr_rounds:
            branch = config.sr_windows.index(windows[group - 1])
            return f"upsampler.refiner.rounds.{round_ - 1}.branches.{branch}.{sub}"
    elif (ours := _rename(key, _TOP_RENAMES)) is not None:
        return ours
    raise OfficialCheckpointError(f"unexpected key {key!r}: not a key of the released ACTR")


def our_key_to_official(key: str, config: ACTRReleasedConfig = ACTR_RELEASED_CONFIG) -> str:
    """The released name of one of our state-dict keys (inverse of :func:`official_key_to_ours`)."""
    if (match := _OUR_BLOCK.fullmatch(key)) is not None:
        index = int(match.group(1))
        sub = _rename(match.group(2), _BLOCK_RENAMES, reverse=True)
        where = "last_block.0" if index == config.depth - 1 else f"blocks.{index}"
        if sub is not None:
            return f"decoder.{where}.{sub}"
    elif (match := _OUR_SWIN.fullmatch(key)) is not None:
        round_, branch, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        sub = _rename(rest, _SWIN_RENAMES, reverse=True)
        if sub is not None:
            group = _window_group(config.sr_windows[branch], config)
            return f"refine_swin_decoder_{group}_{round_ + 1}.{sub}"
    elif (theirs := _rename(key, _TOP_RENAMES, reverse=True)) is not None:
        return theirs
    raise ValueError(f"{key!r} has no released counterpart")


def _dropped_official_shapes(model: ACTR) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Released keys we do not hold, with (shape, is_parameter), derived from the model's sizes."""
    cfg = _released_config(model)
    dim = model.backbone.embed_dim
    hidden = int(dim * cfg.mlp_ratio)
    grid = cfg.image_size // model.patch_size
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    for i in range(cfg.depth):
        where = "last_block.0" if i == cfg.depth - 1 else f"blocks.{i}"
        for name, shape in (
            ("norm3.weight", (dim,)),
            ("norm3.bias", (dim,)),
            ("norm4.weight", (dim,)),
            ("norm4.bias", (dim,)),
            ("mlp2.fc1.weight", (hidden, dim)),
            ("mlp2.fc1.bias", (hidden,)),
            ("mlp2.fc2.weight", (dim, hidden)),
            ("mlp2.fc2.bias", (dim,)),
        ):
            out[f"decoder.{where}.{name}"] = (shape, True)
    out["decoder.last_block.0.spatial_attention.weight"] = ((1, 1, dim), True)
    out["decoder.pos_embed_x"] = ((1, dim // 2, 1, grid), True)
    out["decoder.pos_embed_y"] = ((1, dim // 2, grid, 1), True)
    out["decoder.proj.weight"] = ((grid * grid, dim), True)
    out["decoder.proj.bias"] = ((grid * grid,), True)
    out["decoder.norm.weight"] = ((dim,), True)
    out["decoder.norm.bias"] = ((dim,), True)
    out["learn_parm"] = ((), True)
    for window in cfg.sr_windows:
        for round_ in range(cfg.sr_rounds):
            key = f"refine_swin_decoder_{_window_group(window, cfg)}_{round_ + 1}.{_SWIN_INDEX_KEY}"
            out[key] = ((window * window, window * window), False)
    return out


def official_state_dict_shapes(model: ACTR) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict the released code would have for ``model``'s sizes."""
    cfg = _released_config(model)
    shapes = {our_key_to_official(k, cfg): tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update({k: shape for k, (shape, _) in _dropped_official_shapes(model).items()})
    return shapes


def official_parameter_count(model: ACTR) -> int:
    """Parameters of the released model of ``model``'s sizes, unused ones included (the released
    soft-argmax grids are parameters there, buffers here); 172,810,369 for the released ACTR."""
    ours = sum(p.numel() for p in model.parameters())
    soft_argmax = cast(ReleasedSoftArgmax, model.soft_argmax)  # the released model's soft-argmax
    grids = soft_argmax.x_grid.numel() + soft_argmax.y_grid.numel()
    dropped = sum(int(torch.Size(shape).numel()) for shape, is_param in _dropped_official_shapes(model).values() if is_param)
    return ours + grids + dropped


def to_official_state_dict(model: ACTR) -> dict[str, Tensor]:
    """``model``'s weights under the released names, with the unused released keys filled (zeros for
    the unused parameters, the derived Swin indices computed), loadable by the released code."""
    cfg = _released_config(model)
    state = {our_key_to_official(k, cfg): v.detach().clone() for k, v in model.state_dict().items()}
    ref = next(iter(model.parameters()))
    for key, (shape, is_param) in _dropped_official_shapes(model).items():
        if is_param:
            state[key] = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        else:
            window = round(shape[0] ** 0.5)
            state[key] = relative_position_index(window, device=ref.device)
    return state


_ACTR_CORE_FORMAT = "actr_core.training.checkpoint"  # actr_core.training.CHECKPOINT_FORMAT (not imported: layering)


def _unwrap_checkpoint(raw: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(raw, Mapping):
        raise OfficialCheckpointError(f"{where}: a {type(raw).__name__}, not a released checkpoint or a state dict")
    if raw.get("format") == _ACTR_CORE_FORMAT:
        raise OfficialCheckpointError(
            f"{where} is an actr_core training checkpoint (builder {raw.get('builder')!r}), not one of the released "
            f"code: load it with load_model_from_checkpoint (actr match --checkpoint)"
        )
    if isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    state = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise OfficialCheckpointError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    return state


def load_official_actr(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    config: ACTRReleasedConfig = ACTR_RELEASED_CONFIG,
    weights_only: bool = True,
) -> ACTR:
    """Build ACTR as released (:func:`~actr_core.models.released.actr_released`) and load a released
    checkpoint into it, strictly: ``model(src, trg).flow`` is then the released code's output.

    Accepts ``model_best.pth`` (a dict with a ``state_dict`` entry, as ``train_DP.py`` saves it), a
    bare state dict, or either already loaded; strips ``module.`` (DataParallel). Every released key
    must be known: it is renamed onto ours (:func:`official_key_to_ours`), or dropped when the
    released forward never uses it (``UNUSED_OFFICIAL_KEYS``: per-block ``mlp2``/``norm3``/``norm4``,
    the last block's ``spatial_attention``, ``decoder.pos_embed_x/y``, ``decoder.proj``,
    ``decoder.norm``, ``learn_parm``) or when it is a derived constant that must equal ours
    (``DERIVED_OFFICIAL_KEYS``: the Swin ``relative_position_index`` buffers). The released
    soft-argmax grids ``x_normal``/``y_normal`` are loaded into our grid buffers: they are trainable
    in the released code, so a trained checkpoint may hold values other than ``linspace(−1, 1)``.

    Raises :class:`OfficialCheckpointError` (a ``ValueError``) for unknown or missing keys, for
    derived buffers that differ, and for wrong shapes, listing the first offending keys. The model
    is created on the meta device and takes the checkpoint's tensors (device and dtype as loaded;
    an in-memory state dict is copied first).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        where = str(path_or_state_dict)
        state = _unwrap_checkpoint(read_checkpoint(path_or_state_dict, weights_only=weights_only), where)
    else:  # copies, so that the model never shares storage with the caller's tensors
        where = "the state dict"
        state = {k: v.clone() for k, v in _unwrap_checkpoint(path_or_state_dict, where).items()}
    with torch.device("meta"):
        model = actr_released(config, warn_random_init=False)
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unknown, derived_bad = [], []
    dropped = _dropped_official_shapes(model)
    for key, value in state.items():
        try:
            ours = official_key_to_ours(key, config)
        except OfficialCheckpointError:
            unknown.append(key)
            continue
        if ours is None:
            if key in dropped and not dropped[key][1]:
                window = round(dropped[key][0][0] ** 0.5)
                if value.is_meta:
                    continue
                if not torch.equal(value.cpu(), relative_position_index(window)):
                    derived_bad.append(key)
            continue
        mapped[ours] = value
    if unknown:
        raise OfficialCheckpointError(f"{where}: {len(unknown)} keys are not keys of the released ACTR, first: {unknown[:5]}")
    if derived_bad:
        raise OfficialCheckpointError(f"{where}: derived buffers differ from the released definition: {derived_bad[:5]}")
    missing = [our_key_to_official(k, config) for k in own if k not in mapped]
    if missing:
        raise OfficialCheckpointError(f"{where}: {len(missing)} released keys are missing, first: {missing[:5]}")
    wrong = [k for k in own if tuple(mapped[k].shape) != tuple(own[k].shape)]
    if wrong:
        listed = ", ".join(
            f"{our_key_to_official(k, config)}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
            for k in wrong[:5]
        )
        raise OfficialCheckpointError(f"{where}: {len(wrong)} keys have wrong shapes, first: {listed}")
    model.load_state_dict(mapped, strict=True, assign=True)
    leftover = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover and not all(v.is_meta for v in mapped.values()):
        raise OfficialCheckpointError(f"{where}: tensors left without values after loading: {leftover[:5]}")
    return model


# ----------------------------------------------------------------------------------------------
# MMNet (ICCV 2021): released state dicts


_MMNET_RELEASED_UNUSED = ("upsample_", "feature_upsample_", "msblock0.", "conv0_", "backbone.fc.")


def convert_released_mmnet_state_dict(state: Mapping[str, Tensor], num_levels: int = 4) -> dict[str, Tensor]:
    """Rename a released MMNet state dict (``models/Model.py``, ResNet backbones) to the names of
    :class:`~actr_core.models.mmnet.MMNet` (also importable from there as ``convert_released_state_dict``).

    ``backbone.layerK.*`` → ``backbone.stages.{K-1}.*``; ``msblockS_J.conv`` →
    ``multiscale.{S-1}.inputs.{J-1}``; ``msblockS_J.conv1..3`` stacked over ``J`` →
    ``multiscale.{S-1}.branches.0..2`` (grouped convolutions); ``convS_J_down`` weights
    concatenated over ``J`` and biases summed → ``multiscale.{S-1}.proj``;
    ``wa_S.conv_theta|phi|g`` → ``attention.{S-1}.qkv`` (stacked in that order), ``wa_S.conv_back``
    → ``attention.{S-1}.proj``; ``feat_upsample_S`` and ``conv{S-1}_scale`` → ``fusion.{L-S}.up`` and
    ``.fuse``. Modules the released forward never calls (``upsample_*``, ``feature_upsample_*``,
    ``conv*_kernel``, ``msblock0``, ``conv0_*``, ``fc``) are dropped. The released ``fcn-resnet101``
    backbone (gluoncv's dilated FCN) has another structure and is not supported.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    branches: dict[tuple[int, int, str], dict[int, Tensor]] = {}  # (stage, branch, param) -> {block: tensor}
    projections: dict[tuple[int, str], dict[int, Tensor]] = {}  # (stage, param) -> {block: tensor}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(_MMNET_RELEASED_UNUSED) or "_kernel." in key:
            continue
        head, _, rest = key.partition(".")
        if head == "backbone":
            if rest.startswith("layer"):
                stage, tail = rest[len("layer") :].split(".", 1)
                rest = f"stages.{int(stage) - 1}.{tail}"
            out[f"backbone.{rest}"] = value
        elif head.startswith("msblock"):
            s, j = (int(v) for v in head[len("msblock") :].split("_"))
            name, _, param = rest.partition(".")
            if name == "conv":
                out[f"multiscale.{s - 1}.inputs.{j - 1}.{param}"] = value
            else:
                branches.setdefault((s, int(name[len("conv") :]), param), {})[j] = value
        elif head.startswith("conv") and head.endswith("_down"):
            s, j = (int(v) for v in head[len("conv") : -len("_down")].split("_"))
            projections.setdefault((s, rest), {})[j] = value
        elif head.startswith("wa_"):
            s = int(head[len("wa_") :])
            name, _, param = rest.partition(".")
            if name == "conv_back":
                out[f"attention.{s - 1}.proj.{param}"] = value
            else:
                qkv.setdefault((s, param), {})[name] = value
        elif head.startswith("feat_upsample_"):
            s = int(head[len("feat_upsample_") :])
            out[f"fusion.{num_levels - s}.up.{rest}"] = value
        elif head.startswith("conv") and head.endswith("_scale"):
            s = int(head[len("conv") : -len("_scale")])
            out[f"fusion.{num_levels - 1 - s}.fuse.{rest}"] = value
        else:
            raise ValueError(f"unknown key {key!r} in the released MMNet state dict")
    for (s, param), parts in qkv.items():
        out[f"attention.{s - 1}.qkv.{param}"] = torch.cat([parts[n] for n in ("conv_theta", "conv_phi", "conv_g")])
    for (s, r, param), blocks in branches.items():  # grouped convolution: blocks stacked on the output axis
        out[f"multiscale.{s - 1}.branches.{r - 1}.{param}"] = torch.cat([blocks[j] for j in sorted(blocks)])
    for (s, param), blocks in projections.items():  # one 1x1 convolution over all blocks; biases add up
        ordered = [blocks[j] for j in sorted(blocks)]
        out[f"multiscale.{s - 1}.proj.{param}"] = (
            torch.cat(ordered, dim=1) if param == "weight" else torch.stack(ordered).sum(dim=0)
        )
    return out
