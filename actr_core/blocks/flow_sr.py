"""Matching-flow super-resolution with dual-window attention (paper Sec. 3.4, Fig. 2b).

# b batch (paths concatenated) · bf feature batch · h w coarse grid · H W fine grid (upscale·h, upscale·w)
# c feature channels · k working width (FlowSRConfig.dim) · 2 (x, y), channel 0 = x
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from actr_core.blocks._checks import check_divisible, check_rank
from actr_core.blocks.device_table import device_choices
from actr_core.blocks.windows import WindowTransformerBlock
from actr_core.flow import resize_flow

__all__ = ["DualWindowFlowSR", "DualWindowRound", "FlowSRConfig", "flow_sr_input", "refine_paths"]


@dataclass(frozen=True)
class FlowSRConfig:
    """Hyper-parameters of :class:`DualWindowFlowSR`; the defaults are the paper's."""

    dim: int = 96  # working width: paper Sec. 4 ("feature dimension ... 96")
    num_heads: int = 8  # paper Sec. 4 ("number of the attention head ... 8")
    window_sizes: tuple[int, ...] = (4, 8)  # paper Sec. 3.4: two branches, 4×4 and 8×8 windows
    shift: int = 2  # paper Sec. 3.4: "shift the window by stride 2" (both branches)
    num_rounds: int = 2  # paper Sec. 3.4: an unshifted round, then a shifted one; "several rounds"
    upscale: int = 4  # paper Sec. 3.4: "upscale the spatial resolution ... by 4 times"
    head_hidden: int = 32  # paper Sec. 4: fusion "3×3 convolution with 32 and 2 kernels"
    mlp_ratio: float = 4.0  # Swin [31] block default (paper silent; released code also uses 4)
    qkv_bias: bool = True  # Swin [31] default (paper silent; released code also uses it)
    bias_init_std: float = 0.02  # Swin [31] trunc-normal init of the relative position bias table

    def __post_init__(self) -> None:
        check_divisible("dim", self.dim, "num_heads", self.num_heads)
        if self.dim <= 2:
            raise ValueError(f"dim = {self.dim}: must exceed the 2 flow channels it includes")
        if not self.window_sizes or min(self.window_sizes) <= 0:
            raise ValueError(f"window_sizes = {self.window_sizes}: expected positive sizes")
        if not 0 <= self.shift < min(self.window_sizes):
            raise ValueError(f"shift = {self.shift}: expected 0 <= shift < smallest window = {min(self.window_sizes)}")
        if self.num_rounds < 1 or self.upscale < 1 or self.head_hidden < 1:
            raise ValueError(
                f"num_rounds = {self.num_rounds}, upscale = {self.upscale}, head_hidden = {self.head_hidden}: "
                "expected positive integers"
            )


def _check_sr_input(flow: Tensor, features: Tensor) -> None:
    check_rank("flow", flow, 4, "b 2 h w")
    check_rank("features", features, 4, "bf k h w")
    b, two, _h, _w = flow.shape
    if two != 2 or features.shape[2:] != flow.shape[2:] or features.shape[0] == 0 or b % features.shape[0]:
        raise ValueError(
            f"flow has shape {tuple(flow.shape)} and features has shape {tuple(features.shape)}: expected "
            "flow (b, 2, h, w) and features (bf, k, h, w) on the same grid with b a multiple of bf"
        )


def _upsample(flow: Tensor, features: Tensor, upscale: int) -> tuple[Tensor, Tensor]:
    """Flow and features bilinearly ×``upscale`` (flow values rescaled); features not repeated."""
    size = (upscale * flow.shape[2], upscale * flow.shape[3])
    return resize_flow(flow, size), F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def _path_features(features: Tensor, start: int, stop: int) -> Tensor:
    """Features of flows ``start..stop-1`` of a path-major batch: flow ``i`` reads feature ``i mod bf``."""
    bf = features.shape[0]
    if bf == 1:
        return features.expand(stop - start, -1, -1, -1)
    index = torch.arange(start, stop, device=features.device) % bf
    return features.index_select(0, index)


def refine_paths(
    up_flow: Float[Tensor, "b 2 H W"],
    up_features: Float[Tensor, "bf k H W"],
    refine: Callable[[Tensor], Tensor],
    *,
    chunk: int = 0,
) -> Float[Tensor, "b 2 H W"]:
    """``up_flow + refine(concat(up_flow, features of its path))``, ``chunk`` flows per call (0: all).

    The residual refinement both super-resolution modules share (Sec. 3.4 and the released
    refiner). ``up_flow`` holds the paths concatenated along the batch, path-major (``(m b)``: flow
    ``i`` reads feature ``i mod bf``); the features are never repeated in memory beyond one chunk.
    The concatenation is laid out channels-last, the layout the window branches read. Every
    operation of ``refine`` must be per sample, so that chunks give the values of one batched call.
    """
    _check_sr_input(up_flow, up_features)
    if chunk < 0:
        raise ValueError(f"chunk = {chunk}: expected 0 (all flows at once) or a positive number of flows")
    b = up_flow.shape[0]
    step = b if chunk == 0 else chunk
    outs = []
    for start in range(0, b, step):
        stop = min(start + step, b)
        x = torch.cat((up_flow[start:stop], _path_features(up_features, start, stop)), dim=1)
        outs.append(up_flow[start:stop] + refine(x.contiguous(memory_format=torch.channels_last)))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def flow_sr_input(
    flow: Float[Tensor, "b 2 h w"], features: Float[Tensor, "bf k h w"], upscale: int
) -> tuple[Float[Tensor, "b 2 H W"], Float[Tensor, "b k2 H W"]]:
    """The super-resolution input ``F`` of Sec. 3.4: ``(upsampled flow, concat(upsampled flow, features))``.

    Both are upsampled bilinearly (``align_corners=False``) to ``(upscale·h, upscale·w)``; the flow
    values are multiplied by ``upscale`` so they are in pixels of the fine grid (``resize_flow``).
    ``features`` of batch ``bf`` serve a flow batch ``b = p · bf``: several paths concatenated along
    the batch, path-major (``torch.cat([flow_path_1, flow_path_2, ...])``); the features are repeated
    per path after upsampling, so they are upsampled once.
    """
    _check_sr_input(flow, features)
    up_flow, up_features = _upsample(flow, features, upscale)
    return up_flow, torch.cat((up_flow, _path_features(up_features, 0, flow.shape[0])), dim=1)


class DualWindowRound(nn.Module):
    """One round of Sec. 3.4: parallel window-attention branches, concatenated, fused by a 3×3 conv."""

    def __init__(self, config: FlowSRConfig, *, shift: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            WindowTransformerBlock(
                config.dim,
                config.num_heads,
                window,
                shift=shift,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                bias_init_std=config.bias_init_std,
            )
            for window in config.window_sizes
        )
        self.fuse = nn.Conv2d(len(config.window_sizes) * config.dim, config.dim, kernel_size=3, padding=1)

    def forward(self, x: Float[Tensor, "b k h w"]) -> Float[Tensor, "b k h w"]:
        tokens = rearrange(x, "b k h w -> b h w k")
        outs = [rearrange(branch(tokens), "b h w k -> b k h w") for branch in self.branches]
        return self.fuse(torch.cat(outs, dim=1))


class DualWindowFlowSR(nn.Module):
    """Matching-flow super-resolution of paper Sec. 3.4: coarse flow ``(b, 2, h, w)`` → fine flow.

    1. The source features are projected by a 1×1 conv to ``dim − 2`` channels (at the coarse
       resolution; a 1×1 conv commutes with bilinear upsampling, so this equals projecting after
       upsampling at 1/upscale² of the cost), so that with the 2 flow channels the input ``F`` of
       Sec. 3.4 has the working width ``dim`` (96 = 2 + 94 in the paper).
    2. :func:`flow_sr_input`: both upsampled ×``upscale`` (bilinear), the flow values ×``upscale``,
       concatenated (flow channels first).
    3. ``num_rounds`` :class:`DualWindowRound` s: even rounds (0, 2, ...) with unshifted windows, odd
       rounds with windows shifted by ``shift``.
    4. Head: 3×3 conv to ``head_hidden``, ReLU, 3×3 conv to 2 channels: the residual flow, added to
       the upsampled coarse flow.

    Output ``(b, 2, upscale·h, upscale·w)`` in pixels of that fine grid (channel 0 = x, source grid,
    pointing into the target). Any ``h, w`` works (windows pad and crop). Batch-generic: paths may
    be concatenated along the batch of ``flow`` (path-major) while ``features`` keeps the batch of
    one path; see :func:`flow_sr_input`.

    Execution (no effect on values): the features are projected and upsampled once for all paths
    and never repeated; the maps stay channels-last, the layout the window branches read, so no
    branch copies between layouts; ``chunk`` flows go through the rounds per call (0: all at once;
    None: the device table's ``sr_chunk`` for the flow's device, 1 on CPU, all at once on CUDA;
    :mod:`~actr_core.blocks.device_table`). Every operation is per sample, so chunks give the
    outputs of one batched call (tested); small chunks keep the working set small and inside the
    CPU caches.
    """

    def __init__(self, feature_dim: int, config: FlowSRConfig = FlowSRConfig(), *, chunk: int | None = None) -> None:
        super().__init__()
        if chunk is not None and chunk < 0:
            raise ValueError(f"chunk = {chunk}: expected 0 (all flows at once) or a positive number of flows")
        self.config = config
        self.chunk = chunk
        self.feature_dim = feature_dim
        self.feature_proj = nn.Conv2d(feature_dim, config.dim - 2, kernel_size=1)
        self.rounds = nn.ModuleList(
            DualWindowRound(config, shift=config.shift if index % 2 else 0) for index in range(config.num_rounds)
        )
        self.head = nn.Sequential(
            nn.Conv2d(config.dim, config.head_hidden, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(config.head_hidden, 2, kernel_size=3, padding=1),
        )

    def forward(self, flow: Float[Tensor, "b 2 h w"], features: Float[Tensor, "bf c h w"]) -> Float[Tensor, "b 2 H W"]:
        check_rank("features", features, 4, "bf c h w")
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"features has shape {tuple(features.shape)}: expected {self.feature_dim} channels")
        projected = self.feature_proj(features)
        _check_sr_input(flow, projected)
        up_flow, up_features = _upsample(flow, projected, self.config.upscale)  # once for all paths
        chunk = device_choices(flow.device).sr_chunk if self.chunk is None else self.chunk
        return refine_paths(up_flow, up_features, self._refine, chunk=chunk)

    def _refine(self, x: Tensor) -> Tensor:
        """The rounds and the head on ``concat(flow, features)``: the residual flow."""
        for round_ in self.rounds:
            x = round_(x)
        return self.head(x)

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, config={self.config}, chunk={self.chunk}"
