"""Convolutional token backbones: one stage of a timm CNN as ``[cls]`` + grid tokens.

Axis legend: b batch · H W input frame · h w token grid (H/s, W/s) · s stride · k CNN channels ·
c token channels · n tokens (1 + h·w).

ACTR's correspondence blocks read ``[cls]`` + patch tokens from a ViT (paper Sec. 3.1). Trained from
random weights on a small data set, a ViT/16 learns to match slowly: 16-pixel patches embedded by
one linear map carry little local structure, and a 128-pixel input gives only an 8 × 8 grid. A
CNN cut after an early stage gives a finer grid (stride 8) of features built from local,
translation-equivariant filters, which learn to match from scratch within minutes
(docs/training.md). :class:`ConvBackbone` puts such a stage behind the ViT backbone's interface:

* ``forward(image)`` → ``(b, 1 + h·w, c)``: a learnt ``[cls]`` token, then the feature map's cells
  in row-major order, each projected to ``c`` channels, plus a learnt absolute position embedding
  (resampled bicubically for other grids, as the ViT's), after a LayerNorm;
* ``patch_size`` is the stage's stride (the blocks and the flow grid use it as the ViT's patch
  size), ``embed_dim`` is ``c``;
* ``set_grad_checkpointing(True)`` (timm's name for the switch) recomputes each module of the CNN
  in the backward pass instead of keeping its activations, in training mode.

The ``[cls]`` token only keeps the token layout of the ViT (the correspondence blocks attend to it;
Eq. 2 drops it); it carries no image content at the input.
"""

import contextlib
import dataclasses
import functools
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, cast

import timm
import torch
from einops import rearrange
from jaxtyping import Float
from timm.layers import trunc_normal_
from timm.models import FeatureDictNet
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from actr_core.models.backbones import WeightsReport, read_checkpoint, resample_pos_embed_bicubic
from actr_core.models.base import check_image

__all__ = ["ConvBackbone", "ConvBackboneConfig", "create_conv_backbone", "load_conv_weights"]

_log = logging.getLogger(__name__)

# BatchNorm buffers a training-mode forward updates (torch.nn.modules.batchnorm._NormBase)
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclasses.dataclass(frozen=True)
class ConvBackboneConfig:
    """Which CNN stage becomes the token grid, and how wide the tokens are (our choices, docs/training.md)."""

    stage: int = 2  # timm feature stage (``out_indices``) whose output is the token grid; for timm
    #   ResNets 2 = ``layer2``, stride 8 (1 = ``layer1``, stride 4; 3 = ``layer3``, stride 16)
    embed_dim: int = 128  # token width c after the linear projection (ResNet-18 layer2 has 128 channels)
    init_std: float = 0.02  # trunc-normal std of [cls], the position embedding and the projection (ViT init)
    layer_norm_eps: float = 1e-6  # as the ViT backbones' final LayerNorm

    def __post_init__(self) -> None:
        if self.stage < 0 or self.embed_dim < 1 or not self.init_std >= 0:
            raise ValueError(
                f"stage = {self.stage}, embed_dim = {self.embed_dim}, init_std = {self.init_std}: expected "
                "stage >= 0, embed_dim >= 1, init_std >= 0"
            )


class ConvBackbone(nn.Module):
    """One stage of a CNN as ``[cls]`` + grid tokens, with the interface of :class:`~actr_core.models.backbones.ViTBackbone`.

    Args:
        cnn: a timm ``features_only`` model returning one feature map (``out_indices=(stage,)``).
        embed_dim: token width ``c``.
        grid: the token grid the position embedding is learnt for (the training frame / stride);
            other grids resample it bicubically.
        init_std: trunc-normal std of ``[cls]``, the position embedding and the projection weights.
        layer_norm_eps: epsilon of the LayerNorm applied to the grid tokens.
        grad_checkpointing: recompute the CNN's activations in the backward pass (see
            :meth:`set_grad_checkpointing`).
    """

    def __init__(
        self,
        cnn: nn.Module,
        *,
        embed_dim: int,
        grid: tuple[int, int],
        init_std: float = 0.02,
        layer_norm_eps: float = 1e-6,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        info: Any = getattr(cnn, "feature_info", None)  # timm's FeatureInfo
        if not hasattr(info, "channels") or len(info.channels()) != 1:
            raise ValueError(
                f"{type(cnn).__name__} must be a timm features_only model with exactly one output stage "
                "(timm.create_model(name, features_only=True, out_indices=(stage,)))"
            )
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(f"grid = {grid}: expected a positive token grid")
        self.cnn = cnn.to(memory_format=torch.channels_last)  # faster oneDNN convolutions on CPU; see forward
        self.patch_size: int = int(info.reduction()[-1])
        self.embed_dim: int = int(embed_dim)
        self.native_grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.proj = nn.Linear(int(info.channels()[-1]), embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        for tensor in (self.cls_token, self.pos_embed, self.proj.weight):
            trunc_normal_(tensor, std=init_std)
        nn.init.zeros_(self.proj.bias)
        self.grad_checkpointing = False
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def pretrained_part(self) -> nn.Module:
        """The part a weight file fills, which ``freeze_backbone`` freezes: ``cnn`` only (the
        projection, ``[cls]``, position embedding and norm are new, so they stay trainable)."""
        return self.cnn

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` of an ``height × width`` input."""
        return height // self.patch_size, width // self.patch_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the CNN's activations in the backward pass instead of keeping them (training
        mode only): each module of the timm feature network (stem layers, residual stages) runs
        under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, keeping only its input.
        The recomputation leaves BatchNorm running statistics alone, so a training step updates
        them once, as without checkpointing. Raises ``ValueError`` for a CNN that is not a timm
        ``FeatureDictNet``/``FeatureListNet`` (whose modules run one after the other)."""
        if enable and not isinstance(self.cnn, FeatureDictNet):
            raise ValueError(
                f"gradient checkpointing runs the modules of a timm FeatureDictNet/FeatureListNet one by one; "
                f"the CNN is a {type(self.cnn).__name__}"
            )
        self.grad_checkpointing = bool(enable)

    def _cnn_features(self, image: Float[Tensor, "b 3 H W"]) -> Float[Tensor, "b k h w"]:
        """The kept stage's feature map (channels-last), checkpointed module by module when
        gradient checkpointing is on and the backbone is training."""
        # channels-last: oneDNN's convolutions and pooling run faster on CPU (and cuDNN's under AMP),
        # and the (h w) k token layout in forward is then a view, not a copy
        x = image.contiguous(memory_format=torch.channels_last)
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return self.cnn(x)[-1]
        for module in cast(FeatureDictNet, self.cnn).values():  # the network ends with the kept stage
            if getattr(module, "inplace", False):  # e.g. the stem's ReLU: it would overwrite a kept input
                x = module(x)
            else:
                recompute = functools.partial(_recompute_keeping_running_stats, module)
                x = checkpoint(module, x, use_reentrant=False, context_fn=recompute)
        return x

    def position_embedding(self, grid: tuple[int, int]) -> Float[Tensor, "1 hw c"]:
        """The position embedding for a token grid ``(h, w)`` (the learnt one, resampled if ``grid`` differs)."""
        return resample_pos_embed_bicubic(self.pos_embed, grid, self.native_grid, 0)

    def forward(self, image: Float[Tensor, "b 3 H W"]) -> Float[Tensor, "b n c"]:
        """Tokens ``(b, 1 + h·w, c)``: [cls], then the stage's cells in row-major order."""
        check_image(image, multiple=self.patch_size, name="image")
        features = self._cnn_features(image)  # b k h w
        grid = (int(features.shape[-2]), int(features.shape[-1]))
        tokens = self.proj(rearrange(features, "b k h w -> b (h w) k")) + self.position_embedding(grid)
        tokens = self.norm(tokens)
        return torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)

    def extra_repr(self) -> str:
        return f"stride={self.patch_size}, embed_dim={self.embed_dim}, native_grid={self.native_grid}"


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Whatever runs inside leaves the running statistics of ``module``'s BatchNorm layers (and
    their batch counters) as they were: they are copied on entry and put back on exit."""
    kept = [(b, b.clone()) for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] in _RUNNING_STATS]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)


def _recompute_keeping_running_stats(
    module: nn.Module,
) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    """``context_fn`` of ``torch.utils.checkpoint.checkpoint``: a plain forward, and a recomputation
    that does not update BatchNorm running statistics a second time."""
    return contextlib.nullcontext(), _running_stats_kept(module)


def load_conv_weights(backbone: ConvBackbone, weights: str | os.PathLike | Mapping[str, Any]) -> WeightsReport:
    """Load a local timm/torchvision CNN state dict into ``backbone.cnn`` (the layers it keeps) and report.

    Keys of layers after the kept stage and of the classifier are ignored (``unexpected``); the
    projection, ``[cls]`` and position embedding stay as initialised. Raises ``ValueError`` when
    no key matches or a shape disagrees.
    """
    source = str(weights) if isinstance(weights, (str, os.PathLike)) else "state dict"
    raw = read_checkpoint(weights) if isinstance(weights, (str, os.PathLike)) else dict(weights)
    for key in ("state_dict", "model"):
        if isinstance(raw.get(key), Mapping):
            raw = raw[key]
    state = {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, Tensor)}
    own = backbone.cnn.state_dict()
    matched = [k for k in own if k in state]
    if not matched:
        raise ValueError(f"no key of {source} matches the CNN (first keys: {list(state)[:5]} vs {list(own)[:5]})")
    bad = [k for k in matched if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        listed = ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:5])
        raise ValueError(f"{source} does not fit the CNN: {len(bad)} keys with wrong shapes, first: {listed}")
    backbone.cnn.load_state_dict({k: state[k] for k in matched}, strict=False)
    report = WeightsReport(
        source=source,
        matched=tuple(matched),
        missing=tuple(k for k in own if k not in state),
        unexpected=tuple(k for k in state if k not in own),
    )
    _log.info("CNN weights: %s", report)
    if report.missing:
        warnings.warn(f"CNN weights left keys at their initial values: {report}", stacklevel=2)
    return report


def create_conv_backbone(
    name: str = "resnet18",
    *,
    config: ConvBackboneConfig = ConvBackboneConfig(),
    image_size: tuple[int, int] = (128, 128),
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    grad_checkpointing: bool = False,
    warn_random_init: bool = True,
) -> ConvBackbone:
    """A timm CNN by ``name`` cut after ``config.stage``, as a :class:`ConvBackbone` (never downloads).

    Args:
        name: any timm model that supports ``features_only`` (``resnet18``, ``resnet34``, ...).
        config: stage, token width and initialisation.
        image_size: the training frame; the position embedding is learnt for its token grid.
        weights: a local timm/torchvision state dict for the CNN; ``None`` keeps the random
            initialisation (with a one-line warning unless ``warn_random_init`` is false).
        grad_checkpointing: recompute the CNN's activations in the backward pass
            (:meth:`ConvBackbone.set_grad_checkpointing`).
    """
    try:
        cnn = timm.create_model(name, pretrained=False, features_only=True, out_indices=(config.stage,))
    except (RuntimeError, IndexError, AssertionError) as err:
        raise ValueError(f"timm cannot build {name!r} with features_only, out_indices=({config.stage},): {err}") from err
    info: Any = cnn.feature_info  # timm's FeatureInfo
    stride = int(info.reduction()[-1])
    h, w = image_size
    if h % stride or w % stride or h <= 0 or w <= 0:
        raise ValueError(f"image_size = {image_size}: sides must be positive multiples of the stride {stride}")
    backbone = ConvBackbone(
        cnn,
        embed_dim=config.embed_dim,
        grid=(h // stride, w // stride),
        init_std=config.init_std,
        layer_norm_eps=config.layer_norm_eps,
        grad_checkpointing=grad_checkpointing,
    )
    if weights is not None:
        load_conv_weights(backbone, weights)
    elif warn_random_init:
        warnings.warn(f"CNN backbone {name!r} is randomly initialised (no weights file given)", stacklevel=2)
    return backbone
