"""MMNet: multi-scale matching network (Zhao et al., "Multi-scale Matching Networks for Semantic
Correspondence", ICCV 2021), composed from ``actr_core.blocks`` behind the :class:`CorrespondenceModel` interface.

# b batch · H W input frame · c channels · l pyramid level (0 = coarsest) · hs ws source grid ·
# ht wt target grid · n keypoints · 2 (x, y), channel 0 = x

Pipeline (shapes at a 224 × 320 input, ResNet-101, 21 descriptor channels):

1. ResNet (timm's, built here, never downloaded): the output of **every** bottleneck
   (3 + 4 + 23 + 3 maps; 256/512/1024/2048 channels at strides 4/8/16/32). Source and target run
   as one batch.
2. Per bottleneck, a multi-scale block (3×3 conv to 32, dilated 3×3 convs at 4/8/12, summed,
   1×1 to 21), summed over the stage's bottlenecks — one
   :class:`~actr_core.blocks.multiscale.MultiScaleStage` per stage, which fuses a stage's blocks
   into grouped convolutions (equal to the per-bottleneck
   :class:`~actr_core.blocks.multiscale.MultiScaleDilatedBlock` sum) — then
   :class:`~actr_core.blocks.multiscale.LocalSelfAttention` (3×3, cosine, softmax, residual):
   descriptors ``(2b, 21, h_l, w_l)`` at 7×10, 14×20, 28×40, 56×80.
3. Top-down :class:`~actr_core.blocks.multiscale.TopDownFusion` (transposed conv ×2, concatenation,
   3×3 conv) from the coarsest level to the finest.
4. Per level, ``C_l = ⟨F^src_l, F^trg_l⟩ + up(C_{l-1}).detach()``, ``(b, h_l, w_l, h_l, w_l)``,
   computed by :func:`~actr_core.blocks.coarse_to_fine.correlation_pyramid` as one product of
   stacked (detached, upsampled) features per level. The target → source correlations are
   permuted views of these (the dot product is symmetric).
5. ``flow`` ``(b, 2, H/4, W/4)`` from the finest correlation (argmax, or soft-argmax), in pixels of
   that grid.

Only the modules this forward uses exist: no classifier, no unused up-samplers (the released model
holds 295.8 M parameters, most of them in modules its forward never calls; this one 52.85 M with
ResNet-101).
"""

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any, Literal, cast

import torch
from jaxtyping import Bool, Float
from timm.models.resnet import Bottleneck, ResNet
from torch import Tensor, nn

from actr_core.batch import PairBatch
from actr_core.blocks.coarse_to_fine import correlation_pyramid, reverse_correlation
from actr_core.blocks.correlation_keypoints import (
    CorrelationKeypointLoss,
    argmax_flow,
    argmax_transfer,
    soft_argmax_transfer,
)
from actr_core.blocks.multiscale import LocalSelfAttention, MultiScaleStage, TopDownFusion
from actr_core.blocks.soft_argmax import soft_argmax
from actr_core.flow import rescale_keypoints, resize_flow
from actr_core.models.backbones import WeightsReport, read_checkpoint
from actr_core.models.base import CorrespondenceModel, MatchOutput, check_image_pair
from actr_core.models.convert import convert_released_mmnet_state_dict as convert_released_state_dict
from actr_core.models.registry import register_model

__all__ = [
    "MMNet",
    "MMNetConfig",
    "MMNetOutput",
    "ResNetBottlenecks",
    "convert_released_state_dict",
    "load_resnet_weights",
    "mmnet_resnet101",
    "mmnet_resnet50",
    "mmnet_tiny",
]

_log = logging.getLogger(__name__)

Readout = Literal["argmax", "soft_argmax"]


@dataclasses.dataclass(frozen=True)
class MMNetConfig:
    """Every number of an MMNet. Builders (:func:`mmnet_resnet101`, ...) fill it."""

    # -- backbone (released models/Model.py: torchvision ResNet, bottleneck counts `nbottlenecks`)
    layers: tuple[int, ...] = (3, 4, 23, 3)  # bottlenecks per stage: ResNet-101 (released default backbone)
    widths: tuple[int, ...] = (64, 128, 256, 512)  # bottleneck widths; outputs are 4x (256..2048), torchvision/timm ResNet
    backbone_weights: str | None = None  # local torchvision/timm ResNet state dict (ImageNet); None = random init
    # -- multi-scale blocks (released MSBlock + conv*_down)
    feature_channels: int = 21  # descriptor channels (released option feature_channel=21)
    hidden_channels: int = 32  # MSBlock width (released MSBlock: Conv2d(c_in, 32, 3))
    dilation_rate: int = 4  # released option ms_rate=4; branch dilations are rate·(1, 2, 3)
    num_dilated_branches: int = 3  # released MSBlock: conv1, conv2, conv3
    kernel_size: int = 3  # MSBlock convolutions are 3x3 (released)
    init_std: float = 0.01  # MSBlock init N(0, 0.01²), zero bias (released MSBlock._initialize_weights)
    # -- intra-scale local self-attention (released WeightAverage)
    attention_window: int = 3  # neighbourhood side R=3 (released WeightAverage(c_in, R=3))
    attention_reduction: int = 2  # theta/phi/g have c_in // 2 channels (released: c_out = c_in // 2)
    attention_eps: float = 1e-8  # floor of the norms in the cosine similarity (nn.CosineSimilarity default)
    # -- cross-scale top-down enhancement (released feat_upsample_* and conv*_scale)
    up_kernel: int = 4  # ConvTranspose2d(21, 21, 4, stride=2, padding=1, bias=False) (released)
    up_stride: int = 2  # ResNet stages halve the grid (released)
    up_padding: int = 1  # (released)
    fuse_kernel: int = 3  # Conv2d(42, 21, 3, padding=1) (released conv*_scale)
    # -- loss (released train.py cross_entropy_loss2d, utils/geometry.py getBlurredGT)
    blur_side: int = 3  # gaussian2d(3) (released)
    blur_sigma: float | None = None  # None = side/2/2.354 ≈ 0.637 (released gaussian2d)
    target_weighting: Literal["inverse_distance", "bilinear"] = "inverse_distance"  # released: inverse distance
    # -- read-outs
    transfer_level: int = 2  # pyramid index (0 = coarsest) used by transfer (released --resolution 2: the 1/8 grid)
    transfer_readout: Readout = "argmax"  # released geometry.predict_kps takes the argmax
    flow_readout: Readout = "argmax"  # how `flow` is read from the finest correlation (ours; released has no flow)
    soft_argmax_tau: float = 1.0  # temperature of the soft read-outs (ours; divides the raw dot products)
    # -- execution
    input_multiple: int = 32  # H, W multiples of the ResNet's total stride, so that levels nest exactly
    channels_last: bool = True  # NHWC convolutions (oneDNN on CPU); no effect on values

    def __post_init__(self) -> None:
        for name in ("layers", "widths"):  # YAML/JSON overrides arrive as lists
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.layers) != len(self.widths) or len(self.layers) < 2:
            raise ValueError(f"layers {self.layers} and widths {self.widths} must have the same length >= 2")
        if not 0 <= self.transfer_level < len(self.layers) and not -len(self.layers) <= self.transfer_level < 0:
            raise ValueError(f"transfer_level = {self.transfer_level}: the pyramid has {len(self.layers)} levels")
        for name in ("transfer_readout", "flow_readout"):
            if getattr(self, name) not in ("argmax", "soft_argmax"):
                raise ValueError(f"{name} = {getattr(self, name)!r}: expected 'argmax' or 'soft_argmax'")

    @property
    def dilations(self) -> tuple[int, ...]:
        """Dilations of the branches: ``rate · (1, 2, ..., num_dilated_branches)``."""
        return tuple(self.dilation_rate * (i + 1) for i in range(self.num_dilated_branches))

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Output channels of the stages (bottleneck expansion 4)."""
        return tuple(Bottleneck.expansion * w for w in self.widths)


@dataclasses.dataclass(frozen=True)
class MMNetOutput(MatchOutput):
    """What :class:`MMNet` returns.

    Attributes:
        flow: ``(b, 2, H/4, W/4)`` from the finest correlation, in pixels of that grid, pointing
            into the target.
        correlations: the finest correlation as one path, ``(b, 1, H/4, W/4, H/4, W/4)``.
        pyramid: source → target correlation per level, coarsest first,
            ``(b, H/2^(l_max-l+2)..)``: at 224 × 320, 7×10, 14×20, 28×40, 56×80 on both grids.
        image_size: the input frame ``(H, W)``.

    ``reverse(l)`` is the target → source correlation of level ``l`` (a permuted view).
    """

    pyramid: tuple[Tensor, ...] = ()
    image_size: tuple[int, int] = (0, 0)

    def reverse(self, level: int) -> Float[Tensor, "b ht wt hs ws"]:
        return reverse_correlation(self.pyramid[level])


class ResNetBottlenecks(nn.Module):
    """A timm ResNet without its head, yielding the output of every bottleneck, stage by stage.

    Same modules and parameter names as ``timm.create_model("resnet101")`` (and torchvision's
    ResNet) minus ``fc``, so ImageNet state dicts load directly (:func:`load_resnet_weights`).
    """

    def __init__(self, layers: tuple[int, ...], widths: tuple[int, ...]) -> None:
        super().__init__()
        # zero_init_last=False: every residual branch starts alive, as in torchvision's ResNet (released)
        net = ResNet(
            block=Bottleneck,  # type: ignore[arg-type]  # timm annotates block as an instance; it takes the class
            layers=layers,
            channels=widths,
            num_classes=0,
            global_pool="",
            zero_init_last=False,
        )
        self.conv1, self.bn1, self.act1, self.maxpool = net.conv1, net.bn1, net.act1, net.maxpool
        self.stages = nn.ModuleList(getattr(net, f"layer{i + 1}") for i in range(len(layers)))

    def stem(self, x: Float[Tensor, "b 3 H W"]) -> Float[Tensor, "b c h w"]:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))


def load_resnet_weights(backbone: ResNetBottlenecks, path: str | os.PathLike) -> WeightsReport:
    """Load a local ImageNet ResNet state dict (torchvision or timm names) into ``backbone``.

    ``layerK.`` keys map to ``stages.{K-1}.``; the classifier (``fc.*``) is ignored. Strict on
    everything else: raises ``ValueError`` listing missing keys or wrong shapes.
    """
    raw = read_checkpoint(path)
    raw = raw.get("state_dict", raw.get("model", raw))
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")
        if key.startswith("layer"):
            stage, rest = key[len("layer") :].split(".", 1)
            key = f"stages.{int(stage) - 1}.{rest}"
        state[key] = value
    own = backbone.state_dict()
    missing = tuple(k for k in own if k not in state)
    unexpected = tuple(k for k in state if k not in own)
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        raise ValueError(
            f"{path} does not fit the ResNet backbone: missing {list(missing[:5])} ({len(missing)}), "
            f"wrong shapes {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in bad[:5]]}"
        )
    backbone.load_state_dict({k: state[k] for k in own})
    report = WeightsReport(source=str(path), matched=tuple(own), missing=(), unexpected=unexpected)
    _log.info("ResNet weights: %s", report)
    return report


class MMNet(CorrespondenceModel):
    """MMNet behind the :class:`CorrespondenceModel` interface. Build it with :func:`mmnet_resnet101` & co.

    ``forward(src, trg)`` takes ImageNet-normalised ``(b, 3, H, W)`` images, H and W multiples of
    32, and returns an :class:`MMNetOutput`.
    """

    def __init__(self, config: MMNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.backbone = ResNetBottlenecks(cfg.layers, cfg.widths)
        if cfg.backbone_weights is not None:
            load_resnet_weights(self.backbone, cfg.backbone_weights)
        self.multiscale = nn.ModuleList(
            MultiScaleStage(
                channels,
                cfg.feature_channels,
                depth,
                hidden_channels=cfg.hidden_channels,
                dilations=cfg.dilations,
                kernel_size=cfg.kernel_size,
                init_std=cfg.init_std,
            )
            for depth, channels in zip(cfg.layers, cfg.stage_channels, strict=True)
        )
        self.attention = nn.ModuleList(
            LocalSelfAttention(
                cfg.feature_channels,
                reduced_channels=cfg.feature_channels // cfg.attention_reduction,
                kernel_size=cfg.attention_window,
                eps=cfg.attention_eps,
            )
            for _ in cfg.layers
        )
        # fusion[i] brings level i (0 = coarsest) into level i + 1
        self.fusion = nn.ModuleList(
            TopDownFusion(
                cfg.feature_channels,
                up_kernel=cfg.up_kernel,
                up_stride=cfg.up_stride,
                up_padding=cfg.up_padding,
                fuse_kernel=cfg.fuse_kernel,
            )
            for _ in cfg.layers[1:]
        )
        self.criterion = CorrelationKeypointLoss(
            blur_side=cfg.blur_side, blur_sigma=cfg.blur_sigma, weighting=cfg.target_weighting
        )
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def descriptors(self, images: Float[Tensor, "b 3 H W"]) -> list[Tensor]:
        """Per-level descriptors ``(b, c, h_l, w_l)``, coarsest first, after the top-down fusion."""
        x = images.contiguous(memory_format=torch.channels_last) if self.config.channels_last else images
        per_stage = []
        x = self.backbone.stem(x)
        for stage, head, attend in zip(self.backbone.stages, self.multiscale, self.attention, strict=True):
            maps = []
            for bottleneck in cast(nn.Sequential, stage):
                x = bottleneck(x)
                maps.append(x)
            per_stage.append(attend(head(maps)))
        fused = [per_stage[-1]]
        for fusion, finer in zip(self.fusion, reversed(per_stage[:-1]), strict=True):
            fused.append(fusion(finer, fused[-1]))
        return fused

    def forward(self, src: Float[Tensor, "b 3 H W"], trg: Float[Tensor, "b 3 H W"]) -> MMNetOutput:
        size = check_image_pair(src, trg, multiple=self.config.input_multiple)
        b = src.shape[0]
        feats = self.descriptors(torch.cat((src, trg), dim=0))
        pyramid = correlation_pyramid([f[:b] for f in feats], [f[b:] for f in feats])
        finest = pyramid[-1]
        if self.config.flow_readout == "argmax":
            flow = argmax_flow(finest.detach())
        else:
            flow = soft_argmax(finest, self.config.soft_argmax_tau)
        grid = (size[0] // self.flow_stride, size[1] // self.flow_stride)
        if tuple(flow.shape[-2:]) != grid:
            flow = resize_flow(flow, grid)
        return MMNetOutput(flow=flow, correlations=finest.unsqueeze(1), pyramid=tuple(pyramid), image_size=size)

    def loss(self, output: MatchOutput, batch: PairBatch) -> Float[Tensor, ""]:
        """MMNet's objective: per level and direction, BCE of the softmaxed correlation row at every
        valid keypoint against its blurred target (released ``cross_entropy_loss2d``), each term
        summed over keypoints and divided by the batch size, then summed over levels and directions.

        Uses ``batch.src_kps``, ``batch.trg_kps`` (input-frame pixels) and ``batch.valid_kps``.
        """
        out = _as_mmnet_output(output)
        src_kps, trg_kps, valid = batch.src_kps, batch.trg_kps, batch.valid_kps
        total = out.pyramid[0].new_zeros(())
        for level, corr in enumerate(out.pyramid):
            grid = tuple(corr.shape[1:3])
            src = rescale_keypoints(src_kps, out.image_size, grid)
            trg = rescale_keypoints(trg_kps, out.image_size, grid)
            total = total + self.criterion(corr, src, trg, valid) + self.criterion(out.reverse(level), trg, src, valid)
        return total

    def transfer(
        self,
        output: MatchOutput,
        src_kps: Float[Tensor, "b n 2"],
        valid: Bool[Tensor, "b n"] | None = None,
    ) -> Float[Tensor, "b n 2"]:
        """Keypoints through the correlation of level ``config.transfer_level`` (argmax or soft-argmax).

        Convention:
            Input and output in input-frame pixels, pixel centres at integers. A source keypoint
            goes onto the level's grid by ``(x + 0.5) · w / W − 0.5``, reads its correlation row
            bilinearly, picks the best target cell (or the expected position) and returns that
            cell's **centre** in the frame, ``(i + 0.5) · W / w − 0.5``. The released code uses
            ``x · w / W`` and returns the cell's top-left corner ``i · W / w``, half a cell
            (4 px at the 1/8 level) up and left of ours. Invalid keypoints come out as NaN.
        """
        out = _as_mmnet_output(output)
        if valid is None:
            valid = torch.ones(src_kps.shape[:2], dtype=torch.bool, device=src_kps.device)
        keep = valid[..., None]
        corr = out.pyramid[self.config.transfer_level]
        grid = tuple(corr.shape[1:3])
        on_grid = rescale_keypoints(torch.where(keep, src_kps, torch.zeros_like(src_kps)), out.image_size, grid)
        if self.config.transfer_readout == "argmax":
            moved = argmax_transfer(corr, on_grid)
        else:
            moved = soft_argmax_transfer(corr, on_grid, self.config.soft_argmax_tau)
        in_frame = rescale_keypoints(moved, tuple(corr.shape[3:5]), out.image_size)
        return torch.where(keep, in_frame, torch.full_like(in_frame, float("nan")))


def _as_mmnet_output(output: MatchOutput) -> MMNetOutput:
    if not isinstance(output, MMNetOutput) or not output.pyramid:
        raise ValueError(f"expected the MMNetOutput of an MMNet forward pass, got {type(output).__name__}")
    return output


#: builder keywords of earlier versions, accepted and ignored so that their checkpoints and configs
#: still build: ``onednn_inference`` (0.1.0) switched a private oneDNN inference path, since removed
#: (``torch.compile`` is the fast path; docs/mmnet.md)
RETIRED_KEYWORDS = ("onednn_inference",)


def _config(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> MMNetConfig:
    """``MMNetConfig(**defaults, **overrides)`` without the :data:`RETIRED_KEYWORDS`."""
    kept = {k: v for k, v in overrides.items() if k not in RETIRED_KEYWORDS}
    return MMNetConfig(**{**defaults, **kept})


@register_model(
    "mmnet_resnet101",
    description="MMNet, ResNet-101 (released default); the paper's row uses gluoncv's FCN-ResNet-101 backbone",
    paper_row="MMNet-FCN",
    paper_params_m=64.7,
)
def mmnet_resnet101(**overrides: Any) -> MMNet:
    """MMNet with ResNet-101 (the released default): 52.85 M parameters, 10.35 M of them outside the backbone.

    ``overrides`` are :class:`MMNetConfig` fields; a retired keyword (``onednn_inference``, deprecated
    since 0.2.0) is accepted and ignored, as in the other builders.
    """
    return MMNet(_config({}, overrides))


@register_model("mmnet_resnet50")
def mmnet_resnet50(**overrides: Any) -> MMNet:
    """MMNet with ResNet-50 (the released ``backbone_name='resnet50'`` option)."""
    return MMNet(_config({"layers": (3, 4, 6, 3)}, overrides))


@register_model("mmnet_tiny")
def mmnet_tiny(**overrides: Any) -> MMNet:
    """A tiny MMNet for tests and examples: one narrow bottleneck per stage, 4 descriptor channels."""
    defaults = {
        "layers": (1, 1, 1, 1),
        "widths": (4, 8, 8, 16),
        "feature_channels": 4,
        "hidden_channels": 4,
        "dilation_rate": 1,
    }
    return MMNet(_config(defaults, overrides))
