"""ACTR (paper Sec. 3): one composition of injected stages, for ACTR as described, its Baseline and
ablations, and ACTR as released.

# b batch · H W input frame · hs ws source token grid · ht wt target token grid (equal: both images
# enter at one size) · h w flow grid (upscale · token grid) · ns nt tokens ([cls] + grid cells)
# c channels · g heads · m paths · 2 (x, y), channel 0 = x

Composition (:class:`ACTR`; the stage contracts are :mod:`actr_core.models.stages`)::

    tokens  = backbone([src; trg])                                   Sec. 3.1, [cls] + patches
    for each block ℓ = 1..M:                                         Sec. 3.2, CorrespondenceStage
        S, T, A_ℓ = block(S, T, grid)                                A_ℓ: per-head attention S → T
        C_ℓ    = correlation(A_ℓ, grid)    (ℓ in path_blocks)        Eq. 2 ([cls] dropped)
    Δc     = soft_argmax([C_ℓ]_ℓ)                                    Eq. 3, all paths in one call
    Δf     = upsampler(Δc, source feature map of S_M)                Sec. 3.4, all paths in one call
    flow   = mean_ℓ Δf_ℓ                                             multi-path mean

Path order: wherever the paths of one batch travel together (the soft-argmax, the upsampler), they
are concatenated along the batch **path-major**, ``(m b)`` (``torch.cat([path_1, ..., path_m])``);
outputs carry them as ``(b, m, ...)``.

As described (:mod:`actr_core.models.builders`), a block is a :class:`CorrespondenceBlock`::

        S      = source_pe(S)                                        learnable PE (source only)
        T      = target_branch(S, T)                                 Eq. 1 (self-attn, reweight, FFN)
        S      = source_block(S)                                     standard transformer block [43]
        S, T, A_ℓ = cross(S, T)                                      biased cross-attention

the correlation is Eq. 2 (:class:`~actr_core.blocks.CorrelationFromAttention`), the soft-argmax
Eq. 3 and the upsampler :class:`~actr_core.blocks.DualWindowFlowSR`. As released
(:func:`actr_core.models.released.actr_released`), the same class is composed with the blocks of
:mod:`actr_core.blocks.released` (the released asymmetric block, the head-summed correlation, the
released soft-argmax and flow upsampler, the released loss). Every variant is this same class with
other stages injected; ``forward`` has no branches on the variant.
"""

from collections.abc import Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from actr_core.batch import PairBatch
from actr_core.blocks import BiasedCrossAttention, ReweightedTargetBlock, attention_probs
from actr_core.blocks._checks import check_divisible
from actr_core.flow import resize_flow
from actr_core.models.backbones import PosEmbedResampler, resample_pos_embed_bicubic
from actr_core.models.base import CorrespondenceModel, MatchOutput, check_image_pair
from actr_core.models.config import ACTRConfig, ACTRReleasedConfig
from actr_core.models.stages import (
    Backbone,
    CorrelationReadout,
    CorrespondenceStage,
    FlowLoss,
    FlowUpsampler,
    SoftArgmaxReadout,
)

__all__ = [
    "ACTR",
    "AsymmetricCrossAttention",
    "BilinearFlowUpsampling",
    "CorrespondenceBlock",
    "CrossAttentionMap",
    "LearnedSourcePE",
    "NoSourcePE",
    "PlainTargetBranch",
    "SalientTargetBranch",
    "SymmetricCrossAttention",
    "TransformerBlock",
]

#: ViTBackbone returns exactly one prefix token ([cls]) before the patch tokens
NUM_PREFIX_TOKENS = 1


# --------------------------------------------------------------------------------------------------
# source branch: learnable positional encoding (Sec. 3.2) and the standard transformer block
# --------------------------------------------------------------------------------------------------


class LearnedSourcePE(nn.Module):
    """Learnable positional encoding added to the source tokens only (paper Sec. 3.2), one per block.

    The encoding ``pe`` ``(1, 1 + h0·w0, c)`` is learnt for the training frame's token grid
    ``(h0, w0)`` (its first entry is the ``[cls]`` token's). For another grid it is resampled
    like the backbone's position embedding (``resample``, bicubic by default; the ``[cls]`` entry
    is kept), so any input whose sides are multiples of the patch size works.
    """

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        *,
        init_std: float = 0.0,
        resample: PosEmbedResampler = resample_pos_embed_bicubic,
    ) -> None:
        super().__init__()
        if grid[0] <= 0 or grid[1] <= 0:
            raise ValueError(f"grid = {grid}: expected positive sides")
        self.grid = (int(grid[0]), int(grid[1]))
        self.resample = resample
        self.pe = nn.Parameter(torch.zeros(1, NUM_PREFIX_TOKENS + grid[0] * grid[1], dim))
        if init_std > 0:
            trunc_normal_(self.pe, std=init_std)

    def forward(self, tokens: Float[Tensor, "b n c"], grid: tuple[int, int]) -> Float[Tensor, "b n c"]:
        return tokens + self.resample(self.pe, grid, self.grid, NUM_PREFIX_TOKENS)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"


class NoSourcePE(nn.Module):
    """No source positional encoding (Table 4 ablation, the Baseline): returns the tokens unchanged."""

    def forward(self, tokens: Float[Tensor, "b n c"], grid: tuple[int, int]) -> Float[Tensor, "b n c"]:
        del grid  # the interface of a source PE; nothing to place here
        return tokens


class TransformerBlock(nn.Module):
    """Standard pre-norm transformer block [43]: ``x + SA(LN(x))``, then ``x + FFN(LN(x))``.

    Built from injected modules so that the source branch can share them with the target block of
    Eq. 1 (:class:`ReweightedTargetBlock` has the same four parts): pass that block's ``norm1``,
    ``attn``, ``norm2`` and ``mlp`` to tie the weights.
    """

    def __init__(self, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.mlp = mlp

    def forward(self, tokens: Float[Tensor, "b n c"]) -> Float[Tensor, "b n c"]:
        tokens = tokens + self.attn(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


# --------------------------------------------------------------------------------------------------
# target branch: Eq. 1 (salient target reweighting) or a plain transformer block
# --------------------------------------------------------------------------------------------------


class _CrossAttention(Protocol):
    """A cross-attention stage's attention map alone (``attention(src, trg)``), as a target branch reads it."""

    def attention(self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"]) -> Float[Tensor, "b g ns nt"]: ...


class SalientTargetBranch(nn.Module):
    """Target branch of paper Eq. 1: self-attention, reweighting by the source's attention, FFN.

    The weights ``v`` come from the attention of all source queries on the target keys, computed
    by the block's cross-attention projections (``cross.attention``) on the block's input tokens
    (source with its PE), as :class:`ReweightedTargetBlock` expects. Not detached: Eq. 1 has no
    stop-gradient (the released code detaches).
    """

    def __init__(self, block: ReweightedTargetBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"], cross: nn.Module) -> Float[Tensor, "b nt c"]:
        return self.block(trg, cast(_CrossAttention, cross).attention(src, trg))


class PlainTargetBranch(nn.Module):
    """Target branch without reweighting (Table 4 ablation, the Baseline): a transformer block."""

    def __init__(self, block: TransformerBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"], cross: nn.Module) -> Float[Tensor, "b nt c"]:
        del src, cross  # the interface of a target branch; a plain block looks at the target only
        return self.block(trg)


# --------------------------------------------------------------------------------------------------
# cross-attention stages: forward(src, trg) -> (src, trg, attention of source queries on target keys)
# --------------------------------------------------------------------------------------------------


class AsymmetricCrossAttention(nn.Module):
    """Biased cross-attention (paper Sec. 3.2): ``S ← S + Attn(Q = LN(S), K = V = LN(T))``.

    Only the source is updated. Returns the per-head attention ``(b, g, ns, nt)`` of the source
    queries on all target tokens: Eq. 2's correlation is read from it (one path per block).
    """

    def __init__(self, attn: BiasedCrossAttention, norm_src: nn.Module, norm_trg: nn.Module) -> None:
        super().__init__()
        self.norm_src = norm_src
        self.norm_trg = norm_trg
        self.attn = attn

    def attention(self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"]) -> Float[Tensor, "b g ns nt"]:
        """Per-head attention of the source queries on the target keys (no values, no update)."""
        return self.attn.attention(self.norm_src(src), self.norm_trg(trg))

    def forward(
        self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"]
    ) -> tuple[Float[Tensor, "b ns c"], Float[Tensor, "b nt c"], Float[Tensor, "b g ns nt"]]:
        update, attn = self.attn(self.norm_src(src), self.norm_trg(trg), need_weights=True)
        return src + update, trg, attn


class SymmetricCrossAttention(nn.Module):
    """Symmetric cross-attention of the Baseline (paper Sec. 4, [23, 46]): both streams attend to
    each other with shared weights, ``S ← S + Attn(S, T)`` and ``T ← T + Attn(T, S)`` from the same
    inputs. Returns the source-to-target attention (the correlation of Eq. 2).
    """

    def __init__(self, attn: BiasedCrossAttention, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.attn = attn

    def attention(self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"]) -> Float[Tensor, "b g ns nt"]:
        """Per-head attention of the source queries on the target keys."""
        return self.attn.attention(self.norm(src), self.norm(trg))

    def forward(
        self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"]
    ) -> tuple[Float[Tensor, "b ns c"], Float[Tensor, "b nt c"], Float[Tensor, "b g ns nt"]]:
        s, t = self.norm(src), self.norm(trg)
        update_src, attn = self.attn(s, t, need_weights=True)
        update_trg, _ = self.attn(t, s, need_weights=False)
        return src + update_src, trg + update_trg, attn


class CrossAttentionMap(nn.Module):
    """The attention map of a cross-attention stage without its update (queries and keys only).

    Used as the last block of compositions whose final tokens nothing reads (no flow
    super-resolution: the Baseline, the ``no_flow_sr`` ablation): the values and output projection
    of a full stage would be parameters without gradient. ``qk``: ``Linear(dim, 2 dim)``, rows
    ``[W^Q; W^K]``; the result equals :class:`AsymmetricCrossAttention` ``.attention`` with the same
    ``W^Q``, ``W^K`` (tested). Streams are returned unchanged.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        norm_src: nn.Module,
        norm_trg: nn.Module,
        *,
        qkv_bias: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        check_divisible("dim", dim, "num_heads", num_heads)
        self.num_heads = num_heads
        self.scale = scale
        self.norm_src = norm_src
        self.norm_trg = norm_trg
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def attention(self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"]) -> Float[Tensor, "b g ns nt"]:
        """Per-head ``softmax(q kᵀ · scale)`` of the source queries on all target keys."""
        c = src.shape[-1]
        bias = self.qk.bias
        q = F.linear(self.norm_src(src), self.qk.weight[:c], None if bias is None else bias[:c])
        k = F.linear(self.norm_trg(trg), self.qk.weight[c:], None if bias is None else bias[c:])
        q = rearrange(q, "b ns (g d) -> b g ns d", g=self.num_heads)
        k = rearrange(k, "b nt (g d) -> b g nt d", g=self.num_heads)
        return attention_probs(q, k, scale=self.scale)

    def forward(
        self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"]
    ) -> tuple[Float[Tensor, "b ns c"], Float[Tensor, "b nt c"], Float[Tensor, "b g ns nt"]]:
        return src, trg, self.attention(src, trg)


# --------------------------------------------------------------------------------------------------
# one feature-learning block
# --------------------------------------------------------------------------------------------------


class CorrespondenceBlock(nn.Module):
    """One feature-learning block of paper Sec. 3.2, assembled from injected parts.

    ACTR: ``LearnedSourcePE``, a ``TransformerBlock`` (source), ``SalientTargetBranch`` (Eq. 1),
    ``AsymmetricCrossAttention``. The Baseline's block: ``NoSourcePE``, a transformer block on each
    stream (``PlainTargetBranch``) and ``SymmetricCrossAttention``. Order::

        S = source_pe(S); T = target_branch(S, T); S = source_block(S); S, T, A = cross(S, T)

    The target branch reads the block's input tokens (the reweighting attention of Eq. 1 is taken
    before either stream is updated); the cross-attention reads both updated streams.
    """

    def __init__(self, *, source_pe: nn.Module, source_block: nn.Module, target_branch: nn.Module, cross: nn.Module) -> None:
        super().__init__()
        self.source_pe = source_pe
        self.target_branch = target_branch
        self.source_block = source_block
        self.cross = cross

    def forward(
        self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"], grid: tuple[int, int]
    ) -> tuple[Float[Tensor, "b ns c"], Float[Tensor, "b nt c"], Float[Tensor, "b g ns nt"]]:
        src = self.source_pe(src, grid)
        trg = self.target_branch(src, trg, self.cross)
        src = self.source_block(src)
        return self.cross(src, trg)


# --------------------------------------------------------------------------------------------------
# flow upsamplers: forward(coarse flows of all paths (m·b, 2, hs, ws), source features (b, c, hs, ws))
# --------------------------------------------------------------------------------------------------


class BilinearFlowUpsampling(nn.Module):
    """Bilinear ×``upscale`` upsampling of the coarse flows (the Baseline; ``no_flow_sr`` ablation).

    Same interface as :class:`~actr_core.blocks.DualWindowFlowSR`; the source features, which
    only super-resolution reads, are not used. Values are rescaled into pixels of the fine grid
    (:func:`actr_core.flow.resize_flow`, pixel-centre convention).
    """

    def __init__(self, upscale: int) -> None:
        super().__init__()
        if upscale < 1:
            raise ValueError(f"upscale = {upscale}: expected a positive integer")
        self.upscale = upscale

    def forward(self, flow: Float[Tensor, "b 2 h w"], features: Float[Tensor, "bf c h w"]) -> Float[Tensor, "b 2 H W"]:
        del features  # the interface of a flow upsampler; bilinear upsampling needs no guidance
        return resize_flow(flow, (self.upscale * flow.shape[-2], self.upscale * flow.shape[-1]))

    def extra_repr(self) -> str:
        return f"upscale={self.upscale}"


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------


class ACTR(CorrespondenceModel):
    """ACTR as one composition of injected stages (module docstring): as described (paper Sec. 3),
    the Baseline and the Table 4 ablations (:mod:`~actr_core.models.builders`), and ACTR as
    released (:func:`~actr_core.models.released.actr_released`).

    Args (each stage's contract is a protocol of :mod:`actr_core.models.stages`):
        backbone: returns ``[cls]`` + patch tokens for any input whose sides are multiples of its
            patch size (:class:`~actr_core.models.backbones.ViTBackbone`, the paper's; or
            :class:`~actr_core.models.conv_backbone.ConvBackbone`, a CNN stage whose stride is
            the patch size).
        blocks: the M correspondence blocks, ``(S, T, grid) -> (S, T, per-head attention)``
            (:class:`CorrespondenceBlock`; as released, ``ReleasedAsymmetricBlock``).
        correlation: a block's attention → its correlation ``(b, hs, ws, ht, wt)`` (Eq. 2:
            :class:`~actr_core.blocks.CorrelationFromAttention`; as released, the head sum).
        soft_argmax: correlation → coarse flow in token-grid cells (Eq. 3 with its temperature).
        upsampler: coarse flows ``(m·b, 2, hs, ws)`` (paths concatenated along the batch,
            path-major) and the final source feature map ``(b, c, hs, ws)`` → fine flows
            ``(m·b, 2, upscale·hs, upscale·ws)`` in fine-grid pixels:
            :class:`~actr_core.blocks.DualWindowFlowSR`, :class:`BilinearFlowUpsampling` or
            ``ReleasedFlowUpsampler``.
        path_blocks: indices of the blocks whose cross-attention gives a path (Sec. 3.4
            multi-path: all blocks; ``no_multi_path`` and the Baseline: the last only).
        flow_loss: the loss of ``output.flow`` (Eq. 4, :class:`~actr_core.blocks.MaskedFlowLoss`;
            as released, the end-point error pooled over the batch).
        upscale: fine grid / token grid (4, Sec. 3.4); the flow grid is the input / (patch / upscale).
        correlation_loss: an added loss term on the per-path correlations against the
            ground-truth flow (:class:`~actr_core.blocks.CorrelationCrossEntropy`; not in the paper,
            ``None`` there), or None.
        grad_checkpointing: in training (with gradients on), recompute each block's activations in
            the backward pass instead of keeping them (``torch.utils.checkpoint``, non-reentrant),
            and ask the backbone to do the same (timm's ``set_grad_checkpointing``, when it has it).
            Execution only: values and gradients are unchanged (tested). See :meth:`set_grad_checkpointing`.
        config: the configuration the builder used (kept for the record: ``model.config``).
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        blocks: Sequence[CorrespondenceStage],
        correlation: CorrelationReadout,
        soft_argmax: SoftArgmaxReadout,
        upsampler: FlowUpsampler,
        path_blocks: Sequence[int],
        flow_loss: FlowLoss,
        upscale: int,
        correlation_loss: nn.Module | None = None,
        grad_checkpointing: bool = False,
        config: ACTRConfig | ACTRReleasedConfig | None = None,
    ) -> None:
        super().__init__()
        paths = tuple(int(i) for i in path_blocks)
        if not paths or any(not 0 <= i < len(blocks) for i in paths) or len(set(paths)) != len(paths):
            raise ValueError(f"path_blocks = {path_blocks}: expected distinct indices into {len(blocks)} blocks")
        check_divisible("patch size", backbone.patch_size, "upscale", upscale)
        self.backbone = backbone
        self.blocks = nn.ModuleList(cast(Sequence[nn.Module], blocks))  # the stages are modules
        self.correlation = correlation
        self.soft_argmax = soft_argmax
        self.upsampler = upsampler
        self.flow_loss = flow_loss
        self.correlation_loss = correlation_loss
        self.path_blocks = paths
        self.upscale = upscale
        self.patch_size = backbone.patch_size
        self.flow_stride = backbone.patch_size // upscale
        self.config = config
        self.grad_checkpointing = False
        self.set_grad_checkpointing(grad_checkpointing)

    @property
    def num_paths(self) -> int:
        """Number of paths ``m`` (flows averaged into the output)."""
        return len(self.path_blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each correspondence block in training (timm's method name), and the backbone's
        blocks when the backbone has ``set_grad_checkpointing`` (a backbone without it runs as is)."""
        self.grad_checkpointing = bool(enable)
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(self.grad_checkpointing)

    def _block(self, block: nn.Module, s: Tensor, t: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """One block, its activations recomputed in the backward pass when checkpointing in training."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, s, t, grid, use_reentrant=False)
        return block(s, t, grid)

    def forward(self, src: Float[Tensor, "b 3 H W"], trg: Float[Tensor, "b 3 H W"]) -> MatchOutput:
        """Match ``src`` to ``trg``: ImageNet-normalised ``(b, 3, H, W)``, H and W multiples of the
        token stride ``P`` (``patch_size``: 16 for the ViT/16 builders, 8 for ``actr_conv_tiny``;
        ACTR as released takes its training frame only, 256 × 256).

        Returns :class:`MatchOutput` with ``flow`` ``(b, 2, H/4, W/4)`` (the multi-path mean),
        ``flows_per_path`` ``(b, m, 2, H/4, W/4)``, ``coarse_flows`` ``(b, m, 2, H/P, W/P)`` (token
        grid cells) and ``correlations`` ``(b, m, hs, ws, ht, wt)`` (``hs = H/P``; Eq. 2 as
        described, the head sum as released).
        """
        height, width = check_image_pair(src, trg, multiple=self.patch_size)
        grid = (height // self.patch_size, width // self.patch_size)
        tokens = self.backbone(torch.cat((src, trg)))  # one backbone call for both images
        s, t = tokens.chunk(2)
        per_path = {}
        for index, block in enumerate(self.blocks):
            s, t, attn = self._block(block, s, t, grid)
            if index in self.path_blocks:  # the correlation at once: the per-head map (g times larger) is not kept
                per_path[index] = self.correlation(attn, grid)
        corr = torch.stack([per_path[i] for i in self.path_blocks], dim=1)  # b m hs ws ht wt
        coarse = self.soft_argmax(rearrange(corr, "b m hs ws ht wt -> (m b) hs ws ht wt"))
        features = rearrange(s[:, NUM_PREFIX_TOKENS:], "b (hs ws) c -> b c hs ws", hs=grid[0], ws=grid[1])
        fine = self.upsampler(coarse, features)  # all paths in one call; features shared by the paths
        m = self.num_paths
        flows_per_path = rearrange(fine, "(m b) two h w -> b m two h w", m=m)
        return MatchOutput(
            flow=flows_per_path.mean(dim=1),
            flows_per_path=flows_per_path,
            coarse_flows=rearrange(coarse, "(m b) two hs ws -> b m two hs ws", m=m),
            correlations=corr,
        )

    def loss(self, output: MatchOutput, batch: PairBatch) -> Float[Tensor, ""]:
        """The injected flow loss of ``output.flow`` against ``batch.flow`` over
        ``batch.valid_flow`` (as described, paper Eq. 4: per-sample mean over valid cells, then
        mean over samples; as released, all valid cells of the batch pooled), plus the correlation
        term when the model has one (not in the paper)."""
        loss = self.flow_loss(output.flow, batch.flow, batch.valid_flow)
        if self.correlation_loss is not None:
            if output.correlations is None:
                raise ValueError("the correlation loss needs output.correlations, which this output does not carry")
            loss = loss + self.correlation_loss(output.correlations, batch.flow, batch.valid_flow)
        return loss

    def extra_repr(self) -> str:
        variant = None if self.config is None else self.config.variant
        return (
            f"variant={variant!r}, path_blocks={self.path_blocks}, upscale={self.upscale}, "
            f"grad_checkpointing={self.grad_checkpointing}"
        )
