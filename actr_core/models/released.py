"""ACTR as released: the :class:`~actr_core.models.actr.ACTR` composition with the released blocks.

Axis legend: b batch · H W input frame (256 × 256) · hs ws source token grid (16 × 16) · ht wt
target token grid · h w flow grid (64 × 64) · m paths (= blocks) · n tokens (1 + hs·ws) ·
c channels · k guidance channels.

:func:`actr_released` builds the model that reproduces the released ``ACTR.forward`` (github
YXSUNMADMAX/ACTR, ``models/ACTR.py``): the same numbers, with only the parameters its forward pass
uses. It is :class:`~actr_core.models.actr.ACTR`, the composition of ACTR as described, with the
stages of :mod:`actr_core.blocks.released` injected (one forward pass for every variant):

========================  =====================================================================
stage                     ACTR as released
========================  =====================================================================
backbone                  ViT with DINO's position-embedding interpolation, frozen
blocks                    ``ReleasedAsymmetricBlock`` × depth (the last one does not reweight)
correlation               ``HeadSummedCorrelation`` (heads summed, [cls] dropped after the softmax)
soft-argmax               ``ReleasedSoftArgmax`` (β = 0.02, ``linspace(−1, 1)`` grid buffers)
upsampler                 ``ReleasedFlowUpsampler``: nearest ×4, guidance, ``ReleasedFlowRefiner``
flow loss                 ``ReleasedEPELoss`` (end-point error pooled over the batch's valid cells)
========================  =====================================================================

:func:`~actr_core.models.convert.load_official_actr` reads a released checkpoint into it
(:mod:`actr_core.models.convert` maps the key names). State dicts of as-released models saved by
actr_core 0.1.0 (where the model was a class of its own, ``ACTRReleased``, with ``decoder.*``,
``guidance.*`` and ``refiner.*`` keys) load into this composition unchanged: the builder registers
:func:`upgrade_released_state_dict` as a load-state-dict pre-hook (tested).

Convention:
    ``output.flow`` is ``(b, 2, 64, 64)`` for a 256 × 256 pair, on the source grid, pointing into
    the target, in cells of the 64 × 64 grid, exactly the released output. These units are pixels
    of the H/4 grid of the library convention. The arithmetic inside follows the released code,
    which mixes conventions (``align_corners=True`` soft-argmax grid and guidance upsampling,
    nearest flow upsampling); see :mod:`actr_core.blocks.released` and docs/models.md.
"""

import os
from collections.abc import Mapping, MutableMapping
from typing import Any, cast

from torch import Tensor, nn

from actr_core.blocks.released import (
    HeadSummedCorrelation,
    NoTargetReweighting,
    ReleasedAsymmetricBlock,
    ReleasedEPELoss,
    ReleasedFlowRefiner,
    ReleasedFlowUpsampler,
    ReleasedGuidance,
    ReleasedSoftArgmax,
    ReleasedTargetReweighting,
    dino_pos_embed_interpolation,
)
from actr_core.models.actr import ACTR, NUM_PREFIX_TOKENS
from actr_core.models.backbones import create_vit
from actr_core.models.config import ACTR_RELEASED_CONFIG, ACTRReleasedConfig
from actr_core.models.registry import register_model
from actr_core.models.stages import Backbone

__all__ = ["ACTRReleasedConfig", "actr_released", "compose_released", "upgrade_released_state_dict"]

#: our state-dict prefixes of the as-released model in actr_core 0.1.0 (class ``ACTRReleased``) → now
RENAMED_SINCE_0_1_0 = (
    ("decoder.", "blocks."),
    ("guidance.", "upsampler.guidance."),
    ("refiner.", "upsampler.refiner."),
)


def compose_released(config: ACTRReleasedConfig, backbone: Backbone) -> ACTR:
    """ACTR as released on ``backbone`` (a ViT whose patch size divides ``config.image_size``):
    :class:`~actr_core.models.actr.ACTR` with the released stages (module docstring), initialised
    as the released code initialises them, the backbone frozen when ``config.freeze_backbone``."""
    patch = backbone.patch_size
    if config.image_size % patch:
        raise ValueError(f"image_size = {config.image_size} is not a multiple of the patch size {patch}")
    if config.freeze_backbone:
        cast(nn.Module, backbone).requires_grad_(False)  # every backbone here is a module
    side = config.image_size // patch
    dim = backbone.embed_dim
    blocks = [
        ReleasedAsymmetricBlock(
            dim,
            config.num_heads,
            NUM_PREFIX_TOKENS + side * side,
            mlp_ratio=config.mlp_ratio,
            norm_eps=config.norm_eps,
            # the released last block returns before reweighting the target
            reweighting=ReleasedTargetReweighting(dim) if i < config.depth - 1 else NoTargetReweighting(),
        )
        for i in range(config.depth)
    ]
    upsampler = ReleasedFlowUpsampler(
        ReleasedGuidance(dim, config.guidance_dim, factor=config.flow_upsample, dropout=config.guidance_dropout),
        ReleasedFlowRefiner(
            config.sr_dim,
            config.sr_heads,
            config.sr_windows,
            rounds=config.sr_rounds,
            hidden=config.sr_hidden,
            mlp_ratio=config.sr_mlp_ratio,
            reduction=config.channel_reduction,
            chunk=config.refine_chunk,
        ),
    )
    model = ACTR(
        backbone=backbone,
        blocks=blocks,
        correlation=HeadSummedCorrelation(num_prefix_tokens=NUM_PREFIX_TOKENS),
        soft_argmax=ReleasedSoftArgmax((side, side), beta=config.beta),
        upsampler=upsampler,
        path_blocks=range(config.depth),  # every block gives a path (the released multi-path mean)
        flow_loss=ReleasedEPELoss(),
        upscale=config.flow_upsample,
        config=config,
    )
    model.register_load_state_dict_pre_hook(_upgrade_on_load)
    return model


@register_model(
    "actr_released",
    description="ACTR as released (ViT-B/16, 256x256), used parameters only",
    paper_row="ACTR",
    paper_params_m=172.8,
)
def actr_released(
    config: ACTRReleasedConfig = ACTR_RELEASED_CONFIG,
    *,
    backbone: Backbone | None = None,
    backbone_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    checkpoint_key: str | None = None,
    warn_random_init: bool = True,
) -> ACTR:
    """ACTR as released (:func:`compose_released`), with an optional local backbone checkpoint (e.g.
    iBOT ViT-B/16, which the released training starts from); the decoder and refiner are randomly
    initialised as released. ``backbone`` injects a backbone instance instead of building
    ``config.backbone`` (then ``backbone_weights`` and ``checkpoint_key`` must be None)."""
    if backbone is not None:
        if backbone_weights is not None or checkpoint_key is not None:
            raise ValueError("pass either a backbone instance or backbone_weights/checkpoint_key, not both")
    else:
        backbone = create_vit(
            config.backbone,
            weights=backbone_weights,
            checkpoint_key=checkpoint_key,
            resample_pos_embed=dino_pos_embed_interpolation,
            warn_random_init=warn_random_init,
            **dict(config.backbone_kwargs),
        )
    return compose_released(config, backbone)


def upgrade_released_state_dict(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """A state dict of an as-released model saved by actr_core 0.1.0 under today's names
    (:data:`RENAMED_SINCE_0_1_0`: ``decoder.*`` → ``blocks.*``, ``guidance.*`` →
    ``upsampler.guidance.*``, ``refiner.*`` → ``upsampler.refiner.*``; the rest is unchanged).
    Keys under another ``prefix`` than the model's are left as they are; today's keys pass through."""
    out = {}
    for key, value in state.items():
        new = key
        for old, now in RENAMED_SINCE_0_1_0:
            if key.startswith(prefix + old):
                new = prefix + now + key[len(prefix + old) :]
                break
        out[new] = value
    return out


def _upgrade_on_load(module: nn.Module, state_dict: MutableMapping[str, Tensor], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: rename 0.1.0 keys in place (see :func:`upgrade_released_state_dict`)."""
    del module, args  # the interface of a load-state-dict pre-hook
    if not any(key.startswith(prefix + old) for key in state_dict for old, _ in RENAMED_SINCE_0_1_0):
        return
    upgraded = upgrade_released_state_dict(state_dict, prefix)
    state_dict.clear()
    state_dict.update(upgraded)
