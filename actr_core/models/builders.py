"""Builders of ACTR as described, ACTR-S, the 512 variants, a tiny test model, the Baseline and the
Table 4 ablations. The builders hold the numbers (:data:`ACTR_BASE_CONFIG`, ...); a variant is a
:class:`Composition`, a set of part factories, and every ablation replaces exactly the parts it
removes (``dataclasses.replace``), so no forward pass branches on the variant.

# c channels (the backbone width, kept by the decoder) · M blocks
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

from timm.layers import Attention, Mlp, trunc_normal_
from torch import nn

from actr_core.blocks import (
    BiasedCrossAttention,
    CorrelationCrossEntropy,
    CorrelationFromAttention,
    DualWindowFlowSR,
    FlowSRConfig,
    MaskedFlowLoss,
    ReweightedTargetBlock,
    SoftArgmax,
)
from actr_core.models.actr import (
    ACTR,
    NUM_PREFIX_TOKENS,
    AsymmetricCrossAttention,
    BilinearFlowUpsampling,
    CorrespondenceBlock,
    CrossAttentionMap,
    LearnedSourcePE,
    NoSourcePE,
    PlainTargetBranch,
    SalientTargetBranch,
    SymmetricCrossAttention,
    TransformerBlock,
)
from actr_core.models.backbones import TIMM_PREFIX, VIT_BASE_16, VIT_SMALL_16, ViTBackbone, create_vit
from actr_core.models.config import ABLATIONS, ACTRConfig
from actr_core.models.conv_backbone import ConvBackbone, ConvBackboneConfig, create_conv_backbone
from actr_core.models.registry import register_model
from actr_core.models.stages import Backbone, FlowUpsampler

__all__ = [
    "ACTR_BASE_CONFIG",
    "ACTR_BASE_512_CONFIG",
    "ACTR_SMALL_CONFIG",
    "ACTR_SMALL_512_CONFIG",
    "ACTR_TINY_CONFIG",
    "ACTR_CONV_TINY_CONFIG",
    "COMPOSITIONS",
    "Composition",
    "actr_base",
    "actr_base_512",
    "actr_small",
    "actr_small_512",
    "actr_tiny",
    "actr_conv_tiny",
    "baseline",
    "baseline_512",
    "build_actr",
    "config_overrides",
]

VIT_TINY_16 = "vit_tiny_patch16_224"  # ViT-Ti/16 (192 channels, 3 heads): the test model's backbone

#: ACTR (paper Sec. 4, Table 3): ViT-B/16 at 256 × 256; every other field is ACTRConfig's default
ACTR_BASE_CONFIG = ACTRConfig(backbone=VIT_BASE_16, image_size=(256, 256))
#: ACTR-S (Table 3): ViT-S/16 at 256 × 256
ACTR_SMALL_CONFIG = dataclasses.replace(ACTR_BASE_CONFIG, backbone=VIT_SMALL_16)
#: ACTR_h (Table 1, Table 3): 512 × 512
ACTR_BASE_512_CONFIG = dataclasses.replace(ACTR_BASE_CONFIG, image_size=(512, 512))
#: ACTR_h-S (Table 3): ViT-S/16 at 512 × 512
ACTR_SMALL_512_CONFIG = dataclasses.replace(ACTR_SMALL_CONFIG, image_size=(512, 512))
#: a tiny model for tests and CPU training (our choice; every part of ACTR, small): ViT-Ti/16 cut to
#: 4 blocks, 2 decoder blocks with 4 heads, super-resolution 16 wide with 2 heads and a 16-wide head
ACTR_TINY_CONFIG = dataclasses.replace(
    ACTR_BASE_CONFIG,
    backbone=VIT_TINY_16,
    backbone_depth=4,
    num_blocks=2,
    decoder_heads=4,
    flow_sr=FlowSRConfig(dim=16, num_heads=2, head_hidden=16),
)

#: the CPU recipe's model (our choice, not in the paper; docs/training.md measures why): ACTR_TINY's
#: decoder on a stride-8 token grid from ResNet-18's layer2 (128 channels) instead of a ViT/16, at
#: 128 × 128 (a 16 × 16 token grid, the flow at 32 × 32 from a ×2 super-resolution), trained with
#: Eq. 4 plus the cross-entropy of every path's correlation against the ground-truth match
ACTR_CONV_TINY_CONFIG = dataclasses.replace(
    ACTR_TINY_CONFIG,
    backbone="resnet18",
    backbone_depth=None,
    conv_backbone=ConvBackboneConfig(stage=2, embed_dim=128),
    patch_size=8,
    image_size=(128, 128),
    upscale=2,
    flow_sr=dataclasses.replace(ACTR_TINY_CONFIG.flow_sr, upscale=2),
    correlation_loss_weight=1.0,
)

# --------------------------------------------------------------------------------------------------
# part factories: (config, c) -> module(s)
# --------------------------------------------------------------------------------------------------


def _norm(config: ACTRConfig, dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=config.norm_eps)


def _transformer_block(config: ACTRConfig, dim: int) -> TransformerBlock:
    return TransformerBlock(
        _norm(config, dim),
        Attention(dim, num_heads=config.decoder_heads, qkv_bias=config.qkv_bias),
        _norm(config, dim),
        Mlp(dim, hidden_features=int(dim * config.mlp_ratio)),
    )


def learned_source_pe(config: ACTRConfig, dim: int) -> nn.Module:
    """Sec. 3.2: a learnable source PE for the training frame's token grid."""
    return LearnedSourcePE(dim, config.token_grid, init_std=config.source_pe_init_std)


def no_source_pe(config: ACTRConfig, dim: int) -> nn.Module:
    """Table 4 "w/o source branch positional encoding"; the Baseline."""
    del config, dim
    return NoSourcePE()


def salient_branches(config: ACTRConfig, dim: int) -> tuple[nn.Module, nn.Module]:
    """(source block, target branch) of Sec. 3.2: a transformer block and Eq. 1, tied when
    ``config.share_branch_weights``."""
    target = ReweightedTargetBlock(
        dim,
        config.decoder_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        norm_layer=functools.partial(nn.LayerNorm, eps=config.norm_eps),
    )
    if config.share_branch_weights:
        source = TransformerBlock(target.norm1, target.attn, target.norm2, target.mlp)
    else:
        source = _transformer_block(config, dim)
    return source, SalientTargetBranch(target)


def plain_branches(config: ACTRConfig, dim: int) -> tuple[nn.Module, nn.Module]:
    """(source block, target branch) without reweighting: Table 4 "w/o target branch token
    reweighting", the Baseline. One block for both streams when ``config.share_branch_weights``."""
    source = _transformer_block(config, dim)
    target = source if config.share_branch_weights else _transformer_block(config, dim)
    return source, PlainTargetBranch(target)


def asymmetric_cross(config: ACTRConfig, dim: int) -> nn.Module:
    """Sec. 3.2: biased cross-attention (source queries, target keys and values)."""
    attn = BiasedCrossAttention(dim, config.decoder_heads, qkv_bias=config.qkv_bias, scale=config.attn_scale)
    return AsymmetricCrossAttention(attn, _norm(config, dim), _norm(config, dim))


def symmetric_cross(config: ACTRConfig, dim: int) -> nn.Module:
    """Sec. 4 Baseline: symmetric cross-attention with shared weights."""
    attn = BiasedCrossAttention(dim, config.decoder_heads, qkv_bias=config.qkv_bias, scale=config.attn_scale)
    return SymmetricCrossAttention(attn, _norm(config, dim))


def cross_attention_map(config: ACTRConfig, dim: int) -> nn.Module:
    """The last block's cross-attention when nothing reads the final tokens: the map only."""
    norms = (_norm(config, dim), _norm(config, dim))
    return CrossAttentionMap(dim, config.decoder_heads, *norms, qkv_bias=config.qkv_bias, scale=config.attn_scale)


def dual_window_sr(config: ACTRConfig, dim: int) -> nn.Module:
    """Sec. 3.4: dual-window matching-flow super-resolution."""
    return DualWindowFlowSR(dim, config.flow_sr)


def single_window_sr(config: ACTRConfig, dim: int) -> nn.Module:
    """Table 4 "w/o dual window flow refinement": one window branch per round."""
    return DualWindowFlowSR(dim, dataclasses.replace(config.flow_sr, window_sizes=(config.single_window_size,)))


def bilinear_upsampling(config: ACTRConfig, dim: int) -> nn.Module:
    """Table 4 "w/o flow super-resolution module"; the Baseline (Sec. 4: bilinear upsampling)."""
    del dim
    return BilinearFlowUpsampling(config.upscale)


def all_paths(num_blocks: int) -> tuple[int, ...]:
    """Sec. 3.4 multi-path: a flow from every block's cross-attention."""
    return tuple(range(num_blocks))


def last_path(num_blocks: int) -> tuple[int, ...]:
    """One path, from the last block (Table 4 "w/o multi-path"; the Baseline)."""
    return (num_blocks - 1,)


@dataclasses.dataclass(frozen=True)
class Composition:
    """The parts of one variant, as factories ``(config, c) -> module``."""

    source_pe: Callable[[ACTRConfig, int], nn.Module]
    branches: Callable[[ACTRConfig, int], tuple[nn.Module, nn.Module]]  # (source block, target branch)
    cross: Callable[[ACTRConfig, int], nn.Module]
    upsampler: Callable[[ACTRConfig, int], nn.Module]
    upsampler_reads_features: bool  # False: nothing reads the final tokens, so the last block
    #   computes only its attention map (cross_attention_map) and has no parameter without gradient
    paths: Callable[[int], tuple[int, ...]]


#: ACTR as described (paper Sec. 3)
ACTR_COMPOSITION = Composition(
    source_pe=learned_source_pe,
    branches=salient_branches,
    cross=asymmetric_cross,
    upsampler=dual_window_sr,
    upsampler_reads_features=True,
    paths=all_paths,
)
#: the Baseline's feature-learning blocks (Sec. 4): symmetric cross-attention, no PE, no reweighting
_BASELINE_BLOCKS: dict[str, Any] = {"source_pe": no_source_pe, "branches": plain_branches, "cross": symmetric_cross}
_BILINEAR: dict[str, Any] = {"upsampler": bilinear_upsampling, "upsampler_reads_features": False}

#: every variant by name (ACTRConfig.variant): ACTR, the Baseline, and Table 4's ablations
COMPOSITIONS: Mapping[str, Composition] = {
    "actr": ACTR_COMPOSITION,
    "baseline": dataclasses.replace(ACTR_COMPOSITION, **_BASELINE_BLOCKS, **_BILINEAR, paths=last_path),
    "no_source_pe": dataclasses.replace(ACTR_COMPOSITION, source_pe=no_source_pe),
    "no_target_reweighting": dataclasses.replace(ACTR_COMPOSITION, branches=plain_branches),
    # Sec. 4.2: the asymmetric blocks "replaced with the baseline transformer blocks"
    "no_asymmetric_cross_attention": dataclasses.replace(ACTR_COMPOSITION, **_BASELINE_BLOCKS),
    "no_multi_path": dataclasses.replace(ACTR_COMPOSITION, paths=last_path),
    "single_window": dataclasses.replace(ACTR_COMPOSITION, upsampler=single_window_sr),
    "no_flow_sr": dataclasses.replace(ACTR_COMPOSITION, **_BILINEAR),
}


def _init_linear(module: nn.Module, *, std: float) -> None:
    """ViT/timm init of the blocks: trunc-normal Linear weights, zero biases, LayerNorm 1 and 0."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_actr(
    config: ACTRConfig,
    *,
    backbone: Backbone | None = None,
    upsampler: FlowUpsampler | None = None,
    backbone_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    checkpoint_key: str | None = None,
    warn_random_init: bool = True,
) -> ACTR:
    """Build the variant ``config.variant`` of ACTR as described from ``config``.

    Args:
        config: the numbers (see :class:`ACTRConfig`).
        backbone: a backbone instance to inject (any :class:`~actr_core.models.stages.Backbone`
            whose patch size is ``config.patch_size``); ``None``: the one ``config`` names.
        upsampler: a flow upsampler instance to inject (:class:`~actr_core.models.stages.FlowUpsampler`);
            ``None``: the variant's (the dual-window SR or bilinear upsampling).
        backbone_weights: the backbone's weights: a local timm/iBOT/DINO checkpoint, an artefact
            name of :mod:`actr_core.hub` (``"ibot-vitb16"``, fetched into the cache once) or
            ``"timm:<name>.<tag>"`` (timm's pretrained weights; see
            :func:`~actr_core.models.backbones.create_vit`); ``None``: random initialisation (with a one-line warning unless ``warn_random_init``
            is false). Only without an injected ``backbone``.
        checkpoint_key: the checkpoint entry holding the backbone (default: see
            :func:`actr_core.models.backbones.convert_vit_state_dict`).
    """
    parts = COMPOSITIONS[config.variant]
    if backbone is None:
        backbone = _backbone(config, backbone_weights, checkpoint_key, warn_random_init)
    elif backbone_weights is not None or checkpoint_key is not None:
        raise ValueError("pass either a backbone instance or backbone_weights/checkpoint_key, not both")
    if backbone.patch_size != config.patch_size:
        raise ValueError(
            f"backbone {config.backbone!r} has patch size {backbone.patch_size} but config.patch_size = {config.patch_size}"
        )
    dim = backbone.embed_dim
    blocks = []
    for index in range(config.num_blocks):
        last = index == config.num_blocks - 1
        cross = cross_attention_map if last and not parts.upsampler_reads_features else parts.cross
        source_block, target_branch = parts.branches(config, dim)
        block = CorrespondenceBlock(
            source_pe=parts.source_pe(config, dim),
            source_block=source_block,
            target_branch=target_branch,
            cross=cross(config, dim),
        )
        block.apply(functools.partial(_init_linear, std=config.init_std))
        blocks.append(block)
    if config.freeze_backbone:  # a backbone's pretrained part (a CNN's new token layers stay trainable)
        cast(nn.Module, getattr(backbone, "pretrained_part", backbone)).requires_grad_(False)
    return ACTR(
        backbone=backbone,
        blocks=blocks,
        correlation=CorrelationFromAttention(num_prefix_tokens=NUM_PREFIX_TOKENS),
        soft_argmax=SoftArgmax(config.soft_argmax_tau),
        upsampler=parts.upsampler(config, dim) if upsampler is None else upsampler,
        path_blocks=parts.paths(config.num_blocks),
        flow_loss=MaskedFlowLoss(squared=config.loss_squared),
        upscale=config.upscale,
        correlation_loss=CorrelationCrossEntropy(config.correlation_loss_weight) if config.correlation_loss_weight else None,
        grad_checkpointing=config.grad_checkpointing,
        config=config,
    )


def _backbone(
    config: ACTRConfig,
    weights: str | os.PathLike | Mapping[str, Any] | None,
    checkpoint_key: str | None,
    warn_random_init: bool,
) -> ViTBackbone | ConvBackbone:
    """The ViT named by ``config.backbone`` (paper Sec. 3.1), or a stage of that timm CNN when
    ``config.conv_backbone`` is set."""
    if config.conv_backbone is not None:
        if checkpoint_key is not None:
            raise ValueError(f"checkpoint_key = {checkpoint_key!r} applies to ViT checkpoints only, not to a CNN backbone")
        return create_conv_backbone(
            config.backbone,
            config=config.conv_backbone,
            image_size=config.image_size,
            weights=weights,
            warn_random_init=warn_random_init,
        )
    timm_kwargs: dict[str, Any] = {"img_size": config.image_size}
    if config.backbone_depth is not None:
        timm_kwargs["depth"] = config.backbone_depth
    return create_vit(
        config.backbone, weights=weights, checkpoint_key=checkpoint_key, warn_random_init=warn_random_init, **timm_kwargs
    )


def config_overrides(overrides: Mapping[str, Any], base: ACTRConfig | None = None) -> dict[str, Any]:
    """Keyword overrides as :class:`ACTRConfig` declares them: configs read from YAML/JSON give
    lists and mappings (``image_size: [128, 128]``, ``flow_sr: {dim: 16}``,
    ``conv_backbone: {embed_dim: 64}``); a single ``image_size`` side means a square frame. A
    mapping for a nested config updates ``base``'s (when given) field by field, else the defaults."""
    out = dict(overrides)
    size = out.get("image_size")
    if isinstance(size, int):
        out["image_size"] = (size, size)
    elif isinstance(size, list):
        out["image_size"] = tuple(int(v) for v in size)
    for key, cls in (("flow_sr", FlowSRConfig), ("conv_backbone", ConvBackboneConfig)):
        value = out.get(key)
        if isinstance(value, Mapping):
            fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
            inner = getattr(base, key, None) if base is not None else None
            out[key] = dataclasses.replace(inner, **fields) if inner is not None else cls(**fields)
    return out


def _build(
    base: ACTRConfig,
    ablation: str | None,
    *,
    backbone_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    checkpoint_key: str | None = None,
    warn_random_init: bool = True,
    **overrides: Any,
) -> ACTR:
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"ablation = {ablation!r}: expected None or one of {ABLATIONS}")
    if overrides.pop("pretrained", False):  # timm's default weights of the backbone, as create_vit(pretrained=True)
        if backbone_weights is not None:
            raise ValueError(f"pass either pretrained=True or backbone_weights={backbone_weights!r}, not both")
        backbone_weights = f"{TIMM_PREFIX}{overrides.get('backbone', base.backbone)}"
    if "variant" in overrides:
        raise ValueError("choose the variant with ablation=... (or baseline()), not variant=...")
    config = dataclasses.replace(base, variant=ablation or "actr", **config_overrides(overrides, base))
    return build_actr(config, backbone_weights=backbone_weights, checkpoint_key=checkpoint_key, warn_random_init=warn_random_init)


_BUILDER_ARGS = """

    Args:
        ablation: ``None`` (the full model) or a Table 4 ablation, one of :data:`ABLATIONS`
            (``no_source_pe``, ``no_target_reweighting``, ``no_asymmetric_cross_attention``,
            ``no_multi_path``, ``single_window``, ``no_flow_sr``).
        kwargs: ``backbone_weights``, ``checkpoint_key``, ``warn_random_init`` (see
            :func:`build_actr`); ``pretrained=True``: timm's default weights of the backbone
            (``backbone_weights="timm:<backbone>"``); any other keyword overrides an :class:`ACTRConfig` field.
"""


@register_model("actr_base", paper_row="ACTR", paper_params_m=172.8)
def actr_base(*, ablation: str | None = None, **kwargs: Any) -> ACTR:
    """ACTR (paper Sec. 3-4, Table 3): ViT-B/16, 256 × 256 training frame."""
    return _build(ACTR_BASE_CONFIG, ablation, **kwargs)


@register_model("actr_small", paper_row="ACTR-S", paper_params_m=44.2)
def actr_small(*, ablation: str | None = None, **kwargs: Any) -> ACTR:
    """ACTR-S (paper Table 3): ViT-S/16, 256 × 256."""
    return _build(ACTR_SMALL_CONFIG, ablation, **kwargs)


@register_model("actr_base_512", paper_row="ACTR_h", paper_params_m=176.9)
def actr_base_512(*, ablation: str | None = None, **kwargs: Any) -> ACTR:
    """ACTR_h (paper Tables 1 and 3): ViT-B/16, 512 × 512."""
    return _build(ACTR_BASE_512_CONFIG, ablation, **kwargs)


@register_model("actr_small_512", paper_row="ACTR_h-S", paper_params_m=46.2)
def actr_small_512(*, ablation: str | None = None, **kwargs: Any) -> ACTR:
    """ACTR_h-S (paper Table 3): ViT-S/16, 512 × 512."""
    return _build(ACTR_SMALL_512_CONFIG, ablation, **kwargs)


@register_model("actr_tiny")
def actr_tiny(*, ablation: str | None = None, **kwargs: Any) -> ACTR:
    """A tiny ACTR for tests and CPU training: ViT-Ti/16 cut to 4 blocks, 2 decoder blocks."""
    return _build(ACTR_TINY_CONFIG, ablation, **kwargs)


@register_model("actr_conv_tiny")
def actr_conv_tiny(*, ablation: str | None = None, **kwargs: Any) -> ACTR:
    """The CPU recipe: a tiny ACTR on ResNet-18's stride-8 grid with the correlation cross-entropy
    (:data:`ACTR_CONV_TINY_CONFIG`); learns to match from random weights on 2 CPU cores in minutes."""
    return _build(ACTR_CONV_TINY_CONFIG, ablation, **kwargs)


for _builder in (actr_base, actr_small, actr_base_512, actr_small_512, actr_tiny, actr_conv_tiny):
    _builder.__doc__ = (_builder.__doc__ or "") + _BUILDER_ARGS
del _builder


@register_model("baseline", paper_row="Baseline", paper_params_m=171.13)
def baseline(
    config: ACTRConfig = ACTR_BASE_CONFIG,
    *,
    backbone_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    checkpoint_key: str | None = None,
    warn_random_init: bool = True,
    **overrides: Any,
) -> ACTR:
    """The paper's Baseline (Sec. 4): symmetric cross-attention blocks, bilinear upsampling.

    M blocks with symmetric cross-attention, multi-head correlation from the last block, bilinear
    flow upsampling (Sec. 4, Tables 1 and 4). ``config`` gives the sizes (default ViT-B/16 at 256;
    ``ACTR_TINY_CONFIG`` for tests); other keyword arguments override its fields.
    """
    if "variant" in overrides:
        raise ValueError("baseline() builds variant 'baseline'; do not pass variant=...")
    if overrides.pop("pretrained", False):
        if backbone_weights is not None:
            raise ValueError(f"pass either pretrained=True or backbone_weights={backbone_weights!r}, not both")
        backbone_weights = f"{TIMM_PREFIX}{overrides.get('backbone', config.backbone)}"
    return build_actr(
        dataclasses.replace(config, variant="baseline", **config_overrides(overrides, config)),
        backbone_weights=backbone_weights,
        checkpoint_key=checkpoint_key,
        warn_random_init=warn_random_init,
    )


@register_model("baseline_512", paper_row="Baseline_h")
def baseline_512(**kwargs: Any) -> ACTR:
    """Baseline_h (paper Table 1): the Baseline at 512 × 512."""
    return baseline(ACTR_BASE_512_CONFIG, **kwargs)
