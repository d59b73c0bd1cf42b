"""ViT backbones (timm models by name) returning ``[cls]`` + patch tokens for any input size.

Axis legend: b batch · H W input frame · h w token grid (H/p, W/p) · p patch size · n tokens
(1 + h·w) · c channels · k prefix tokens ([cls], registers, distillation).

* Any timm ``VisionTransformer`` by name (``vit_small_patch16_224`` = ViT-S/16,
  ``vit_base_patch16_224`` = ViT-B/16, ...). Nothing downloads unless asked by name: weights are
  random unless ``weights`` or ``pretrained=True`` say otherwise (see :func:`create_vit`). The backbone is that timm model itself, as the ``VisionTransformer`` subclass
  :class:`ViTBackbone`, without its classifier head: its token path (``forward_features`` in the
  ``dynamic_img_size`` mode) and its state-dict keys are timm's.
* Gradient checkpointing is timm's: ``set_grad_checkpointing(True)`` (or
  ``create_vit(..., grad_checkpointing=True)``) recomputes the blocks in the backward pass.
* Inputs of any size whose sides are multiples of the patch size: the absolute position embedding
  (learnt for the model's native grid, e.g. 14 × 14 at 224) is resampled to the input's token grid
  on every call by an injected ``resample_pos_embed`` function. The default,
  :func:`resample_pos_embed_bicubic`, is timm's own (``timm.layers.resample_abs_pos_embed``:
  bicubic, ``align_corners=False``, the output *size* given, anti-aliased when shrinking; the
  prefix tokens' embeddings are kept as they are) and equals timm's ``dynamic_img_size=True``
  forward. ACTR as released uses DINO's variant instead
  (:func:`actr_core.blocks.released.dino_pos_embed_interpolation`).
* Weights from a local file, an artefact name of :mod:`actr_core.hub` (``"ibot-vitb16"``, fetched
  into the cache once and checked) or timm's own pretrained weights (``"timm:<name>.<tag>"`` or
  ``pretrained=True``, through timm's Hugging Face cache; ``HF_HUB_OFFLINE=1`` uses that cache
  only). Files (:func:`load_vit_weights`): a timm ``.safetensors``/``.pth`` state
  dict, or an iBOT/DINO checkpoint (``teacher``/``student`` dicts, keys prefixed ``module.`` and
  ``backbone.``), converted on load, with a report of missing/unexpected keys; an error if no key
  matched or shapes disagree. Without weights the backbone is randomly initialised and says so in
  a one-line warning.
"""

import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import timm
import torch
from einops import rearrange
from jaxtyping import Float
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from actr_core.models.base import check_image

__all__ = [
    "PosEmbedResampler",
    "ViTBackbone",
    "WeightsReport",
    "create_vit",
    "vit_small16",
    "vit_base16",
    "convert_vit_state_dict",
    "read_checkpoint",
    "load_vit_weights",
    "resample_pos_embed_bicubic",
    "VIT_SMALL_16",
    "VIT_BASE_16",
    "TIMM_PREFIX",
]

_log = logging.getLogger(__name__)

#: (pos_embed (1, k + h0·w0, c) or (1, h0·w0, c), new grid (h, w), native grid (h0, w0),
#: number of prefix tokens the embedding covers) -> embedding for the new grid
PosEmbedResampler = Callable[[Tensor, tuple[int, int], tuple[int, int], int], Tensor]

VIT_SMALL_16 = "vit_small_patch16_224"  # ViT-S/16 (DINO/iBOT ViT-S; ACTR-S backbone, paper Sec. 4)
VIT_BASE_16 = "vit_base_patch16_224"  # ViT-B/16 (iBOT ViT-B/16; ACTR backbone, paper Sec. 4)
TIMM_PREFIX = "timm:"  # weights="timm:<name>.<tag>": timm's own pretrained weights (its Hugging Face cache)

# checkpoint keys holding the network, tried in this order when none is named
_CHECKPOINT_KEYS = ("teacher", "state_dict", "model", "student")
# wrappers added by DistributedDataParallel and DINO/iBOT's MultiCropWrapper
_WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.")


def resample_pos_embed_bicubic(
    pos_embed: Tensor, grid: tuple[int, int], native_grid: tuple[int, int], num_prefix_tokens: int
) -> Tensor:
    """timm's resampling: bicubic to the new grid *size*, ``align_corners=False``, anti-aliased.

    The first ``num_prefix_tokens`` embeddings ([cls], ...) are kept unchanged; returns
    ``pos_embed`` itself when the grid is the native one.
    """
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=list(native_grid), num_prefix_tokens=num_prefix_tokens)


@dataclasses.dataclass(frozen=True)
class WeightsReport:
    """What :func:`load_vit_weights` did: which model keys were filled, which were not."""

    source: str
    matched: tuple[str, ...]
    missing: tuple[str, ...]  # model keys the checkpoint did not fill (left at their initial values)
    unexpected: tuple[str, ...]  # checkpoint keys the model has no place for (ignored)
    resized: tuple[str, ...] = ()  # keys resampled to the model's shape (position embeddings)

    def __str__(self) -> str:
        def head(keys: tuple[str, ...]) -> str:
            shown = ", ".join(keys[:5])
            return f"{shown}, ... (+{len(keys) - 5})" if len(keys) > 5 else shown

        parts = [f"{self.source}: {len(self.matched)} keys loaded"]
        if self.resized:
            parts.append(f"resampled: {head(self.resized)}")
        parts.append(f"missing {len(self.missing)}" + (f" [{head(self.missing)}]" if self.missing else ""))
        parts.append(f"unexpected {len(self.unexpected)}" + (f" [{head(self.unexpected)}]" if self.unexpected else ""))
        return "; ".join(parts)


class ViTBackbone(VisionTransformer):
    """timm's ``VisionTransformer`` returning ``[cls]`` + patch tokens ``(b, 1 + h·w, c)`` for any
    input size, with an injected position-embedding resampler.

    The token path is timm's own ``forward_features`` (patch embedding, prefix tokens, position
    embedding, blocks, final norm) in its ``dynamic_img_size`` mode; only ``_pos_embed``, where timm
    resamples the position embedding to the input's grid, calls ``resample_pos_embed`` instead.
    Gradient checkpointing is timm's: :meth:`set_grad_checkpointing` recomputes each block in the
    backward pass instead of keeping its activations.

    State-dict keys are timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``,
    ``blocks.0.attn.qkv.weight``, ``norm.weight``, ...), which are also DINO's and iBOT's; there is
    no classifier head. Register and distillation tokens, where a model has them, take part in
    attention and are dropped from the output.

    Args:
        resample_pos_embed: how the position embedding follows the input size.
        grad_checkpointing: recompute the blocks in the backward pass (less memory, one more
            forward pass of the blocks).
        vit_kwargs: timm ``VisionTransformer`` arguments (``patch_size=16, embed_dim=384, ...``);
            :meth:`from_timm` turns a model built by name instead.
    """

    cls_token: nn.Parameter  # never None here (checked at construction), unlike timm's
    pos_embed: nn.Parameter

    def __init__(
        self,
        *,
        resample_pos_embed: PosEmbedResampler = resample_pos_embed_bicubic,
        grad_checkpointing: bool = False,
        **vit_kwargs: Any,
    ) -> None:
        super().__init__(**{"num_classes": 0, **vit_kwargs, "dynamic_img_size": True})
        _check_vit(self)
        self._init_backbone(resample_pos_embed, grad_checkpointing)

    @classmethod
    def from_timm(
        cls,
        vit: nn.Module,
        *,
        resample_pos_embed: PosEmbedResampler = resample_pos_embed_bicubic,
        grad_checkpointing: bool = False,
    ) -> "ViTBackbone":
        """Turn ``vit`` (e.g. from ``timm.create_model(name, dynamic_img_size=True)``) into a
        backbone, in place: its class becomes :class:`ViTBackbone`, its classifier head is removed;
        its modules, parameters and state-dict keys stay timm's."""
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
        _check_vit(vit)
        vit.reset_classifier(0)
        vit.__class__ = cls
        backbone = cast("ViTBackbone", vit)
        backbone._init_backbone(resample_pos_embed, grad_checkpointing)
        return backbone

    def _init_backbone(self, resample_pos_embed: PosEmbedResampler, grad_checkpointing: bool) -> None:
        self.patch_size: int = int(self.patch_embed.patch_size[0])
        self.native_grid: tuple[int, int] = (int(self.patch_embed.grid_size[0]), int(self.patch_embed.grid_size[1]))
        self.resample_pos_embed = resample_pos_embed
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def pretrained_part(self) -> nn.Module:
        """The part a weight file fills, which ``freeze_backbone`` freezes: the whole ViT."""
        return self

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` of an ``height × width`` input."""
        return height // self.patch_size, width // self.patch_size

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """The position embedding for a token grid ``(h, w)`` (prefix entries first, if the model has them)."""
        covered = 0 if self.no_embed_class else self.num_prefix_tokens
        return self.resample_pos_embed(self.pos_embed, grid, self.native_grid, covered)

    def _pos_embed(self, x: Float[Tensor, "b h w c"]) -> Float[Tensor, "b n c"]:
        """timm's ``_pos_embed`` (prefix tokens, position embedding, dropout) with the injected resampler."""
        pos = self.position_embedding((int(x.shape[1]), int(x.shape[2])))
        x = rearrange(x, "b h w c -> b (h w) c")
        prefix = [token.expand(x.shape[0], -1, -1) for token in (self.cls_token, self.reg_token) if token is not None]
        if self.no_embed_class:  # the embedding covers the patches only (DeiT-3): add, then prepend
            x = torch.cat(prefix + [x + pos], dim=1)
        else:  # it covers the prefix too (timm, DINO, iBOT): prepend, then add
            x = torch.cat(prefix + [x], dim=1) + pos
        return self.pos_drop(x)

    def forward(self, image: Float[Tensor, "b 3 H W"]) -> Float[Tensor, "b n c"]:  # type: ignore[override]  # tokens, not logits
        """Tokens ``(b, 1 + h·w, c)``: [cls] then the patches in row-major order (after the final norm)."""
        check_image(image, multiple=self.patch_size, name="image")
        x = self.forward_features(image)
        return torch.cat((x[:, :1], x[:, self.num_prefix_tokens :]), dim=1)


def _check_vit(vit: VisionTransformer) -> None:
    """The timm models a :class:`ViTBackbone` can be: [cls], absolute position embedding, square
    patches, built with ``dynamic_img_size=True``."""
    if vit.cls_token is None or vit.pos_embed is None:
        raise ValueError(
            f"{type(vit).__name__} has no [cls] token or no absolute position embedding: "
            "the backbone returns [cls] + patch tokens and resamples an absolute embedding"
        )
    patch = tuple(vit.patch_embed.patch_size)
    if patch[0] != patch[1]:
        raise ValueError(f"non-square patches {patch} are not supported")
    if not vit.dynamic_img_size:
        raise ValueError("the VisionTransformer must be built with dynamic_img_size=True (any input size)")


def _strip_prefixes(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):  # each prefix ends at the key's first dot
        key = key.split(".", 1)[1]
    return key


def read_checkpoint(path: str | os.PathLike, *, weights_only: bool = True) -> dict[str, Any]:
    """Read a local checkpoint: ``.safetensors`` with safetensors, anything else with ``torch.load``.

    ``weights_only=True`` (the default) refuses arbitrary pickled objects; pass ``False`` only for
    files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        if weights_only:
            raise ValueError(
                f"{path} could not be read with torch.load(weights_only=True) ({err}); if you trust "
                "the file, pass weights_only=False"
            ) from err
        raise


def convert_vit_state_dict(raw: Mapping[str, Any], *, checkpoint_key: str | None = None) -> dict[str, Tensor]:
    """A ViT state dict in timm's key names from a raw checkpoint.

    Picks ``raw[checkpoint_key]`` if given, else the first of ``teacher``, ``state_dict``, ``model``,
    ``student`` present (DINO and iBOT evaluate the teacher), else ``raw`` itself; strips the
    leading ``module.``, ``backbone.`` and ``encoder.`` wrappers; drops non-tensor entries.
    """
    if checkpoint_key is not None:
        if checkpoint_key not in raw:
            raise ValueError(f"checkpoint has no key {checkpoint_key!r}; top-level keys: {sorted(raw)[:10]}")
        raw = raw[checkpoint_key]
    else:
        for key in _CHECKPOINT_KEYS:
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    return {_strip_prefixes(k): v for k, v in raw.items() if isinstance(v, Tensor)}


def load_vit_weights(
    backbone: ViTBackbone,
    weights: str | os.PathLike | Mapping[str, Any],
    *,
    checkpoint_key: str | None = None,
    weights_only: bool = True,
) -> WeightsReport:
    """Load weights into ``backbone`` (non-strict on names, strict on shapes) and report.

    ``weights``: a local file, a state dict, or an artefact name of :mod:`actr_core.hub`
    (``"ibot-vitb16"``, ``"ibot-vits16"``; a local path of the same name wins).

    A position embedding learnt for another grid is resampled to the backbone's native grid with
    :func:`resample_pos_embed_bicubic`. Raises ``ValueError`` when no key matched, or listing the
    first keys whose shapes disagree.
    """
    from actr_core.hub import resolve_weights

    weights = resolve_weights(weights)  # an artefact name -> its cached file
    source = str(weights) if isinstance(weights, (str, os.PathLike)) else "state dict"
    raw = read_checkpoint(weights, weights_only=weights_only) if isinstance(weights, (str, os.PathLike)) else weights
    state = convert_vit_state_dict(raw, checkpoint_key=checkpoint_key)
    own = backbone.state_dict()
    resized = []
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape != own["pos_embed"].shape and pos.shape[-1] == own["pos_embed"].shape[-1]:
        covered = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
        side = round((pos.shape[1] - covered) ** 0.5)
        if side * side + covered == pos.shape[1]:
            state["pos_embed"] = resample_pos_embed_bicubic(pos.float(), backbone.native_grid, (side, side), covered)
            resized.append("pos_embed")
    matched = [k for k in state if k in own]
    if not matched:
        raise ValueError(
            f"no key of {source} matches the ViT backbone (first checkpoint keys: {list(state)[:5]}; "
            f"first backbone keys: {list(own)[:5]})"
        )
    bad = [k for k in matched if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        listed = ", ".join(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in bad[:5])
        raise ValueError(f"{source} does not fit the backbone: {len(bad)} keys with wrong shapes, first: {listed}")
    backbone.load_state_dict({k: state[k] for k in matched}, strict=False)
    report = WeightsReport(
        source=source,
        matched=tuple(matched),
        missing=tuple(k for k in own if k not in state),
        unexpected=tuple(k for k in state if k not in own),
        resized=tuple(resized),
    )
    _log.info("ViT weights: %s", report)
    if report.missing:
        warnings.warn(f"ViT weights left keys at their initial values: {report}", stacklevel=2)
    return report


def create_vit(
    name: str = VIT_BASE_16,
    *,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    pretrained: bool = False,
    checkpoint_key: str | None = None,
    resample_pos_embed: PosEmbedResampler = resample_pos_embed_bicubic,
    grad_checkpointing: bool = False,
    warn_random_init: bool = True,
    **timm_kwargs: Any,
) -> ViTBackbone:
    """Build a timm ViT by ``name`` as a :class:`ViTBackbone`.

    Args:
        name: any timm ``VisionTransformer`` with a [cls] token, e.g. ``vit_base_patch16_224``.
        weights: a local file (timm safetensors/pth, iBOT/DINO checkpoint), a state dict, an
            artefact name of :mod:`actr_core.hub` (``"ibot-vitb16"``: downloaded into the cache
            once, checked), or ``"timm:<name>.<tag>"`` (e.g. ``"timm:vit_base_patch16_224.dino"``:
            timm's own pretrained weights through its Hugging Face cache, the architecture must be
            ``name``'s); ``None`` keeps the random initialisation (with a one-line warning unless
            ``warn_random_init`` is false, e.g. because the caller loads a full checkpoint afterwards).
        pretrained: ``True``: timm's default pretrained weights of ``name`` (the same as
            ``weights="timm:<name>"``). Loaded by timm or an error, never silently random.
        checkpoint_key: the entry of the checkpoint holding the network (default: see
            :func:`convert_vit_state_dict`).
        resample_pos_embed: how the position embedding follows the input size.
        grad_checkpointing: recompute the blocks in the backward pass (timm's gradient checkpointing).
        timm_kwargs: passed to ``timm.create_model`` (e.g. ``depth=2, embed_dim=64`` for tests).

    timm weights follow timm's rules: ``HF_HUB_OFFLINE=1`` reads its Hugging Face cache only;
    a failure to get them raises ``ValueError`` naming the weights.
    """
    spec = weights[len(TIMM_PREFIX) :] if isinstance(weights, str) and weights.startswith(TIMM_PREFIX) else None
    if pretrained:
        if weights is not None:
            raise ValueError(f"pass either pretrained=True or weights={weights!r}, not both")
        spec = name
    if spec is not None:
        if spec.split(".")[0] != name.split(".")[0]:
            raise ValueError(f"timm weights {spec!r} are for another architecture than the backbone {name!r}")
        if checkpoint_key is not None:
            raise ValueError(f"checkpoint_key = {checkpoint_key!r} applies to checkpoint files, not to timm weights {spec!r}")
    kwargs = {"num_classes": 0, **timm_kwargs, "pretrained": spec is not None, "dynamic_img_size": True}
    try:
        vit = timm.create_model(spec or name, **kwargs)
    except TypeError as err:  # a CNN takes neither dynamic_img_size nor depth
        raise ValueError(
            f"timm model {name!r} is not a VisionTransformer ({err}); a CNN backbone needs "
            "ACTRConfig.conv_backbone (create_conv_backbone)"
        ) from err
    except Exception as err:  # an unknown name (RuntimeError), or timm / huggingface_hub failing to get weights
        if spec is None:
            raise ValueError(f"timm has no model {name!r}: {err}") from err
        offline = " (HF_HUB_OFFLINE=1: Hugging Face cache only)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"timm could not load pretrained weights {spec!r}{offline}: {type(err).__name__}: {first}") from err
    backbone = ViTBackbone.from_timm(vit, resample_pos_embed=resample_pos_embed, grad_checkpointing=grad_checkpointing)
    if spec is not None:
        _log.info("ViT weights: timm %s", spec)
    elif weights is not None:
        load_vit_weights(backbone, weights, checkpoint_key=checkpoint_key)
    elif warn_random_init:
        warnings.warn(f"ViT backbone {name!r} is randomly initialised (no weights given)", stacklevel=2)
    return backbone


def vit_small16(**kwargs: Any) -> ViTBackbone:
    """ViT-S/16 (384 channels, 12 blocks, 6 heads); see :func:`create_vit` for the arguments."""
    return create_vit(VIT_SMALL_16, **kwargs)


def vit_base16(**kwargs: Any) -> ViTBackbone:
    """ViT-B/16 (768 channels, 12 blocks, 12 heads); see :func:`create_vit` for the arguments."""
    return create_vit(VIT_BASE_16, **kwargs)
