"""The blocks that ACTR *as released* composes differently from the paper's description.

Axis legend: b batch · n tokens (1 + hs·ws, [cls] first) · c channels · g heads · d channels per
head · hs ws source token grid · ht wt target token grid · h w flow grid (×4) · k guidance channels ·
m paths.

The released code (github YXSUNMADMAX/ACTR, ``models/ACTR.py`` and ``models/base/swin.py``) differs
from the paper in the places below; each difference is one function here (plus a thin module), and
ACTR as released is :class:`actr_core.models.actr.ACTR`, the composition of ACTR as described, with
these blocks injected by :func:`actr_core.models.released.actr_released`. The arithmetic is the
released code's, including where it mixes conventions (each docstring's ``Convention:`` says how).
Differences, in forward order:

1. :func:`dino_pos_embed_interpolation`: DINO's position-embedding interpolation (bicubic with a
   ``scale_factor`` of (grid + 0.1) / native grid, not a target size).
2. Head-summed cross-attention: the cross-attention is :class:`~actr_core.blocks.BiasedCrossAttention`
   (the released ``cattn``: one ``qkv`` for both streams, q from the source, k and v from the
   target), but its map is read as the *sum* over heads (each row sums to g), not the mean of Eq. 2:
   :func:`head_summed_correlation` (the correlation) and :func:`released_target_reweighting`.
3. :class:`ReleasedAsymmetricBlock`: the feed-forward network is applied to the attention output,
   ``x + a + MLP(LN2(a))``, not to the updated stream; self- and cross-attention stages, source and
   target, share ``norm1``, ``norm2`` and ``mlp``.
4. :func:`arf`: a clipped tanh-like activation on the cross-attention output, computed here in a
   form that cannot overflow.
5. :func:`released_target_reweighting`: ``T + T·w·σ(h)`` with ``h`` the stop-gradient mean over
   source rows of the head-summed attention (paper Eq. 1 scales T by the weights).
6. :func:`released_soft_argmax`: SFNet/CATs soft-argmax on ``linspace(−1, 1)`` grids (buffers)
   unnormalised with ``(W − 1)/2`` (``align_corners=True``).
7. :func:`nearest_upsample_flow`: nearest ×4 upsampling of the coarse flow.
8. :class:`ReleasedGuidance`: a 1×1 projection 768→94 of the last block's source feature map,
   bilinear ×4 with ``align_corners=True``, ``Dropout2d(0.5)`` while training.
9. :class:`ReleasedSwinBranch`: an *unshifted* Swin block wrapped as ``x + LN(block(x))`` and
   followed by channel attention (:func:`channel_attention`); two such branches (windows 8 and 4)
   are summed per round (:class:`ReleasedSRRound`), rounds and a conv head in
   :class:`ReleasedFlowRefiner`; with 7 and 8, :class:`ReleasedFlowUpsampler` is the model's flow
   upsampling stage.
10. :func:`released_epe_loss`: the end-point error averaged over all valid cells of the batch.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from timm.layers import Attention, Mlp, trunc_normal_
from torch import Tensor, nn

from actr_core.blocks.attention import BiasedCrossAttention
from actr_core.blocks.device_table import device_choices
from actr_core.blocks.flow_sr import refine_paths
from actr_core.blocks.loss import check_flow_pair
from actr_core.blocks.windows import WindowTransformerBlock

__all__ = [
    "dino_pos_embed_interpolation",
    "head_summed_correlation",
    "HeadSummedCorrelation",
    "arf",
    "ARF",
    "released_target_reweighting",
    "ReleasedTargetReweighting",
    "NoTargetReweighting",
    "ReleasedAsymmetricBlock",
    "released_soft_argmax",
    "ReleasedSoftArgmax",
    "nearest_upsample_flow",
    "ReleasedGuidance",
    "channel_attention",
    "ReleasedChannelAttention",
    "ReleasedSwinBranch",
    "ReleasedSRRound",
    "ReleasedFlowRefiner",
    "ReleasedFlowUpsampler",
    "released_epe_loss",
    "ReleasedEPELoss",
]

DINO_POS_OFFSET = 0.1  # DINO's interpolate_pos_encoding adds 0.1 to the grid "to avoid floating point error"
ARF_SHIFT = 4.0  # released `arf`: the e^{-x-4} in its denominator
INIT_STD = 0.02  # released `_init_weights`: trunc_normal_(std=.02) for Linear weights


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ----------------------------------------------------------------------------------------------
# 1. position embedding


def dino_pos_embed_interpolation(
    pos_embed: Float[Tensor, "1 n c"],
    grid: tuple[int, int],
    native_grid: tuple[int, int],
    num_prefix_tokens: int,
    *,
    offset: float = DINO_POS_OFFSET,
) -> Float[Tensor, "1 m c"]:
    """DINO's ``interpolate_pos_encoding``: bicubic resampling by a *scale factor*.

    The patch embeddings, an ``h0 × w0`` map, are resampled with
    ``F.interpolate(scale_factor=((h + offset)/h0, (w + offset)/w0), mode="bicubic",
    align_corners=False)``, which gives an ``h × w`` map; the prefix ([cls]) embeddings are kept.
    Returns ``pos_embed`` itself when ``grid == native_grid``. Follows the
    :data:`actr_core.models.backbones.PosEmbedResampler` signature.

    Convention:
        Because the scale factor, not the size, is passed, the sampling positions are
        ``x0 = (x + 0.5)·w0/(w + offset) − 0.5``, slightly off timm's size-based
        ``(x + 0.5)·w0/w − 0.5`` (the two differ by about 1e-3 of a cell at 16 × 16 from 14 × 14).
    """
    grid = (int(grid[0]), int(grid[1]))
    native_grid = (int(native_grid[0]), int(native_grid[1]))
    if grid == native_grid:
        return pos_embed
    h0, w0 = native_grid
    _check(
        pos_embed.shape[1] == num_prefix_tokens + h0 * w0,
        f"pos_embed has shape {tuple(pos_embed.shape)}: expected {num_prefix_tokens} + {h0}*{w0} tokens",
    )
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    patches = rearrange(patches, "1 (h w) c -> 1 c h w", h=h0, w=w0)
    patches = F.interpolate(
        patches,
        scale_factor=((grid[0] + offset) / h0, (grid[1] + offset) / w0),
        mode="bicubic",
        align_corners=False,
    )
    _check(
        tuple(patches.shape[-2:]) == grid,
        f"DINO interpolation gave a {tuple(patches.shape[-2:])} grid instead of {grid}",
    )
    return torch.cat((prefix, rearrange(patches, "1 c h w -> 1 (h w) c")), dim=1)


# ----------------------------------------------------------------------------------------------
# 2. head-summed cross-attention: the correlation


def head_summed_correlation(
    attn: Float[Tensor, "b g ns nt"],
    *,
    src_size: tuple[int, int],
    trg_size: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> Float[Tensor, "b hs ws ht wt"]:
    """The released correlation: the cross-attention probabilities **summed** over the heads, then
    the prefix ([cls]) rows and columns dropped, laid out on the source and target grids.

    ``attn`` is the per-head attention of the source queries on the target keys, each row a
    softmax over *all* target tokens ([cls] included). The released code sums the heads (each row
    of the sum totals g) and drops [cls] *after* the softmax, without renormalising, so each
    source cell's row sums to a little less than g; Eq. 2 (:func:`~actr_core.blocks.correlation_from_attention`)
    averages the heads and renormalises over the target cells.
    """
    ns, nt = attn.shape[-2:]
    (hs, ws), (ht, wt) = src_size, trg_size
    _check(
        ns == num_prefix_tokens + hs * ws and nt == num_prefix_tokens + ht * wt,
        f"attn has shape {tuple(attn.shape)}: expected {num_prefix_tokens} prefix tokens and grids "
        f"{src_size} (source) and {trg_size} (target)",
    )
    cells = attn.sum(dim=1)[:, num_prefix_tokens:, num_prefix_tokens:]
    return rearrange(cells, "b (hs ws) (ht wt) -> b hs ws ht wt", hs=hs, ws=ws, ht=ht, wt=wt)


class HeadSummedCorrelation(nn.Module):
    """Module form of :func:`head_summed_correlation` on equal source and target grids: the
    correlation readout of ACTR as released, ``forward(attn, grid)``. No parameters."""

    def __init__(self, *, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, attn: Float[Tensor, "b g ns nt"], grid: tuple[int, int]) -> Float[Tensor, "b hs ws ht wt"]:
        return head_summed_correlation(attn, src_size=grid, trg_size=grid, num_prefix_tokens=self.num_prefix_tokens)


# ----------------------------------------------------------------------------------------------
# 4. the rectifying activation


def arf(x: Float[Tensor, "*shape"], *, shift: float = ARF_SHIFT) -> Float[Tensor, "*shape"]:
    """The released activation on the cross-attention output, in a form that cannot overflow.

    Released form: ``max(0, (eᶻ − e⁻ᶻ) / (eᶻ + e^{−z−shift}))``, which is 0 for z ≤ 0, rises with
    slope 2/(1 + e^{−shift}) ≈ 1.96 at 0⁺ and tends to 1; with raw exponentials it gives NaN for
    |z| ≳ 88 in float32 (inf/inf). Multiplying numerator and denominator by e⁻ᶻ gives, for z > 0,
    ``(1 − e^{−2z}) / (1 + e^{−2z−shift})``: every exponential is ≤ 1. We evaluate that at
    ``max(z, 0)`` (``−expm1`` for the numerator), which is exactly 0 for z ≤ 0, with zero gradient
    there, as in the released code.
    """
    z = torch.clamp(x, min=0.0)
    return -torch.expm1(-2.0 * z) / (1.0 + torch.exp(-2.0 * z) * math.exp(-shift))


class ARF(nn.Module):
    """Module form of :func:`arf`."""

    def __init__(self, shift: float = ARF_SHIFT) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
        return arf(x, shift=self.shift)


# ----------------------------------------------------------------------------------------------
# 5. target reweighting


def released_target_reweighting(
    target: Float[Tensor, "b n c"], attention: Float[Tensor, "b g nq n"], weight: Float[Tensor, "1 1 c"]
) -> Float[Tensor, "b n c"]:
    """``T + T · w · σ(h)``, ``h_j`` = mean over the query rows (the [cls] row included) of the
    head-summed cross-attention on target token ``j``, under stop-gradient. ``attention`` is the
    per-head map ``(b, g, nq, n)``; its heads are summed here, as the released code does.

    The paper's Eq. 1 multiplies T by the weights; the released code adds the weighted T to T, with a
    learnable per-channel ``w`` (initialised to ones). Since each head-summed row sums to g, the
    mean over n query rows is g/n on average, so σ(h) ≈ 0.5 and T is first scaled by ≈ 1.5.
    """
    heat = attention.detach().sum(dim=1).mean(dim=1).unsqueeze(-1)  # b n 1
    return target + target * weight * torch.sigmoid(heat)


class ReleasedTargetReweighting(nn.Module):
    """Module form of :func:`released_target_reweighting`; parameter ``weight`` ``(1, 1, c)`` (ones)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, target: Float[Tensor, "b n c"], attention: Float[Tensor, "b g nq n"]) -> Float[Tensor, "b n c"]:
        return released_target_reweighting(target, attention, self.weight)


class NoTargetReweighting(nn.Module):
    """The target stream unchanged (the released last block, whose target output is never used)."""

    def forward(self, target: Float[Tensor, "b n c"], attention: Float[Tensor, "b g nq n"]) -> Float[Tensor, "b n c"]:
        del attention  # the interface of a reweighting; the target passes unchanged
        return target


# ----------------------------------------------------------------------------------------------
# 3. the asymmetric block as released


class ReleasedAsymmetricBlock(nn.Module):
    """One decoder block of the released code (``MultiscaleBlock``), exact order of operations.

    With ``S``, ``T`` the source and target tokens ``(b, n, c)`` ([cls] first), ``P`` a learnt
    source positional encoding (zeros at init), ``SA`` a standard multi-head self-attention shared
    by S and T, ``CA`` the cross-attention (:class:`~actr_core.blocks.BiasedCrossAttention`, the
    released ``cattn``), one ``norm1``/``norm2``/``mlp`` for all::

        S ← S + P
        Ŝ, T̂ = SA(LN1(S)), SA(LN1(T))
        S ← S + Ŝ + MLP(LN2(Ŝ));   T ← T + T̂ + MLP(LN2(T̂))      (MLP on the attention output)
        Ĉ, A = CA(LN1(S), LN1(T));   Ĉ ← ARF(Ĉ)
        S ← S + Ĉ + MLP(LN2(Ĉ))
        T ← reweighting(T, A)                                      (identity in the last block)

    Returns ``(S, T, A)`` with ``A`` the per-head attention ``(b, g, n, n)`` ([cls] row/column
    included; the reweighting and :func:`head_summed_correlation` sum its heads). The target never
    attends to the source. S and T go through the shared self-attention stage as one batch of
    ``2b`` sequences (per-sequence operations: the same values as two calls). ``P`` has the
    training frame's ``num_tokens`` (``1 + hs·ws``), so the block takes that one token grid only, as
    released; ``forward`` raises ``ValueError`` naming the grids for any other.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_tokens: int,
        *,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        reweighting: nn.Module | None = None,
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.source_pos = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.self_attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.cross_attn = BiasedCrossAttention(dim, num_heads, qkv_bias=True)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.activation = ARF() if activation is None else activation
        self.reweighting = NoTargetReweighting() if reweighting is None else reweighting
        self.apply(_init_linear_and_norm)

    def forward(
        self, source: Float[Tensor, "b n c"], target: Float[Tensor, "b n c"], grid: tuple[int, int]
    ) -> tuple[Float[Tensor, "b n c"], Float[Tensor, "b n c"], Float[Tensor, "b g n n"]]:
        _check(
            1 + grid[0] * grid[1] == self.source_pos.shape[1] == source.shape[1],
            f"a {grid[0]}x{grid[1]} token grid ({source.shape[1]} tokens): the block's source positional "
            f"encoding has {self.source_pos.shape[1]} tokens, and ACTR as released takes the input size "
            "it was built for only (resize the images first)",
        )
        s = source + self.source_pos
        b = s.shape[0]
        # S and T share norm1, the self-attention, norm2 and the MLP: one batched call for both
        both = torch.cat((s, target))
        both_att = self.self_attn(self.norm1(both))
        both = both + both_att + self.mlp(self.norm2(both_att))
        s, t = both[:b], both[b:]
        c_att, attention = self.cross_attn(self.norm1(s), self.norm1(t))
        c_att = self.activation(c_att)
        s = s + c_att + self.mlp(self.norm2(c_att))
        return s, self.reweighting(t, attention), attention


def _init_linear_and_norm(m: nn.Module) -> None:
    """The released ``_init_weights``: Linear weights trunc-normal(0.02), biases 0; LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=INIT_STD)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# 6. soft-argmax as released


def released_soft_argmax(
    corr: Float[Tensor, "b hs ws ht wt"],
    x_grid: Float[Tensor, " wt"],
    y_grid: Float[Tensor, " ht"],
    *,
    beta: float,
) -> Float[Tensor, "b 2 hs ws"]:
    """The released (SFNet/CATs) soft-argmax: correlation → coarse flow in target-grid cells.

    ``p = softmax(corr / beta)`` over the target positions (the released code subtracts the
    maximum, then ``exp(·/beta)``); expected normalised position ``x̄ = Σ p · x_grid[wt]``,
    ``ȳ = Σ p · y_grid[ht]``; then ``(x̄ + 1)(wt − 1)/2 − x_s`` and ``(ȳ + 1)(ht − 1)/2 − y_s``.

    Convention:
        The grids are ``linspace(−1, 1)`` and the unnormalisation is ``(x + 1)(W − 1)/2``: the
        ``align_corners=True`` pairing, under which target cell ``i`` sits at ``i``. With the
        untrained grids this is ``E[x_t] − x_s`` in cells, equal to the pixel-centre convention when
        the source and target grids have the same size (as in ACTR); the released code's source
        position is its integer index on the source grid whatever the sizes. The released code
        makes the grids trainable ``nn.Parameter``s; here they are inputs (buffers of
        :class:`ReleasedSoftArgmax`), loaded from a checkpoint when it carries them.
    """
    _, hs, ws, ht, wt = corr.shape
    _check(x_grid.shape == (wt,), f"x_grid has shape {tuple(x_grid.shape)}: expected ({wt},) for wt = {wt}")
    _check(y_grid.shape == (ht,), f"y_grid has shape {tuple(y_grid.shape)}: expected ({ht},) for ht = {ht}")
    p = torch.softmax(rearrange(corr, "b hs ws ht wt -> b hs ws (ht wt)") / beta, dim=-1)
    p = rearrange(p, "b hs ws (ht wt) -> b hs ws ht wt", ht=ht)
    x_mean = torch.einsum("bijkl,l->bij", p, x_grid.to(p.dtype))
    y_mean = torch.einsum("bijkl,k->bij", p, y_grid.to(p.dtype))
    xs = torch.arange(ws, device=corr.device, dtype=p.dtype)
    ys = torch.arange(hs, device=corr.device, dtype=p.dtype)
    flow_x = (x_mean + 1) * (wt - 1) / 2 - xs[None, None, :]
    flow_y = (y_mean + 1) * (ht - 1) / 2 - ys[None, :, None]
    return torch.stack((flow_x, flow_y), dim=1)


class ReleasedSoftArgmax(nn.Module):
    """Module form of :func:`released_soft_argmax`; the grids are persistent buffers ``x_grid``,
    ``y_grid`` (``linspace(−1, 1)``; never parameters)."""

    x_grid: Tensor
    y_grid: Tensor

    def __init__(self, grid_size: tuple[int, int], *, beta: float) -> None:
        super().__init__()
        ht, wt = grid_size
        self.beta = beta
        self.register_buffer("x_grid", torch.linspace(-1.0, 1.0, wt))
        self.register_buffer("y_grid", torch.linspace(-1.0, 1.0, ht))

    def forward(self, corr: Float[Tensor, "b hs ws ht wt"]) -> Float[Tensor, "b 2 hs ws"]:
        return released_soft_argmax(corr, self.x_grid, self.y_grid, beta=self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


# ----------------------------------------------------------------------------------------------
# 7. nearest upsampling of the coarse flow


def nearest_upsample_flow(flow: Float[Tensor, "b 2 hs ws"], factor: int) -> Float[Tensor, "b 2 h w"]:
    """Nearest-neighbour ×``factor`` upsampling, values × ``factor`` (released ``flow_up``).

    Convention:
        Each coarse cell becomes a ``factor × factor`` block with the same displacement, rescaled to
        fine-grid pixels. Displacements scale by the size ratio under any alignment convention, so
        the units agree with the pixel-centre convention; the values are piecewise constant where a
        bilinear upsampling would interpolate.
    """
    return F.interpolate(flow, size=(flow.shape[-2] * factor, flow.shape[-1] * factor), mode="nearest") * factor


# ----------------------------------------------------------------------------------------------
# 8. guidance features


class ReleasedGuidance(nn.Module):
    """Guidance for the flow refiner from the last block's source patch tokens as a feature map
    ``(b, c, hs, ws)`` (released ``refine_proj_query_feat`` + upsampling + ``Dropout2d``).

    ``ReLU(conv1×1(features))`` → ``(b, k, hs, ws)``, bilinear to ``factor`` × the grid with
    ``align_corners=True`` (the released choice; corner cells are aligned, not pixel centres),
    then ``Dropout2d(dropout)`` (active in training only).
    """

    def __init__(self, in_dim: int, out_dim: int, *, factor: int, dropout: float) -> None:
        super().__init__()
        self.factor = factor
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.dropout = nn.Dropout2d(p=dropout)

    def forward(self, features: Float[Tensor, "b c hs ws"]) -> Float[Tensor, "b k h w"]:
        hs, ws = features.shape[-2:]
        x = F.relu(self.proj(features))
        x = F.interpolate(x, size=(hs * self.factor, ws * self.factor), mode="bilinear", align_corners=True)
        return self.dropout(x)


# ----------------------------------------------------------------------------------------------
# 9. flow refiner: unshifted Swin branches with channel attention


def channel_attention(
    x: Float[Tensor, "b c h w"], reduce_weight: Float[Tensor, "r c 1 1"], expand_weight: Float[Tensor, "c r 1 1"]
) -> Float[Tensor, "b c h w"]:
    """CBAM-style channel attention as released: ``x + x · σ(M(avgpool x) + M(maxpool x))``,
    ``M`` = 1×1 conv c→r, ReLU, 1×1 conv r→c, no biases."""

    def mlp(v: Tensor) -> Tensor:
        return F.conv2d(F.relu(F.conv2d(v, reduce_weight)), expand_weight)

    gate = torch.sigmoid(mlp(F.adaptive_avg_pool2d(x, 1)) + mlp(F.adaptive_max_pool2d(x, 1)))
    return x + x * gate


class ReleasedChannelAttention(nn.Module):
    """Module form of :func:`channel_attention`; ``reduce`` c→c/reduction, ``expand`` back."""

    def __init__(self, dim: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = dim // reduction
        _check(hidden > 0, f"dim = {dim} is smaller than reduction = {reduction}")
        self.reduce = nn.Conv2d(dim, hidden, kernel_size=1, bias=False)
        self.expand = nn.Conv2d(hidden, dim, kernel_size=1, bias=False)

    def forward(self, x: Float[Tensor, "b c h w"]) -> Float[Tensor, "b c h w"]:
        return channel_attention(x, self.reduce.weight, self.expand.weight)


class ReleasedSwinBranch(nn.Module):
    """One branch of a released refinement round: ``CA(x + LN(SwinBlock(x)))``.

    ``SwinBlock`` is :class:`actr_core.blocks.windows.WindowTransformerBlock` with **no shift** (the
    released Swin stages have depth 1, and Swin shifts only odd blocks), LayerNorm eps 1e-5
    (PyTorch's default, as released); ``LN`` is the Swin stage's final norm; ``CA`` is
    :class:`ReleasedChannelAttention`.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, *, mlp_ratio: float = 4.0, reduction: int = 16) -> None:
        super().__init__()
        self.block = WindowTransformerBlock(dim, num_heads, window_size, shift=0, mlp_ratio=mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.channel_attention = ReleasedChannelAttention(dim, reduction=reduction)
        for m in (self.block, self.norm):
            m.apply(_init_linear_and_norm)

    def forward(self, x: Float[Tensor, "b c h w"]) -> Float[Tensor, "b c h w"]:
        y = rearrange(x, "b c h w -> b h w c")
        y = y + self.norm(self.block(y))
        return self.channel_attention(rearrange(y, "b h w c -> b c h w"))


class ReleasedSRRound(nn.Module):
    """One refinement round: the sum of one :class:`ReleasedSwinBranch` per window size."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        windows: Sequence[int],
        *,
        mlp_ratio: float = 4.0,
        reduction: int = 16,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            ReleasedSwinBranch(dim, num_heads, w, mlp_ratio=mlp_ratio, reduction=reduction) for w in windows
        )

    def forward(self, x: Float[Tensor, "b c h w"]) -> Float[Tensor, "b c h w"]:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class ReleasedFlowRefiner(nn.Module):
    """The released flow super-resolution after upsampling: rounds of summed Swin branches on
    ``[flow_up, guidance]``, then conv3×3 → ReLU → conv3×3 to a residual flow.

    ``forward(flow_up, guidance) = flow_up + head(rounds(cat(flow_up, guidance)))``, sample by sample
    (:func:`~actr_core.blocks.flow_sr.refine_paths`, shared with the dual-window SR). ``guidance``
    may have fewer samples than ``flow_up``: with ``bf`` guidance maps and ``b = m·bf`` flows, flow
    ``i`` is refined with guidance ``i mod bf`` (the paths concatenated path-major, ``(m b)``, the
    order of every multi-path output of the library; the released code computes the guidance once
    and reuses it for every path).

    Execution (no effect on values): the maps are kept channels-last, the layout the Swin branches
    read, so that no branch copies between layouts; ``chunk`` flows are refined per call (0: all at
    once; None: the device table's ``sr_chunk`` for the flow's device, 1 on CPU, all at once on
    CUDA; :mod:`~actr_core.blocks.device_table`). Every operation is per sample, so chunks give the
    outputs of one batched call; small chunks keep the working set small (the released code refines
    one path at a time) and inside the CPU caches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        windows: Sequence[int],
        *,
        rounds: int = 2,
        hidden: int = 32,
        mlp_ratio: float = 4.0,
        reduction: int = 16,
        kernel_size: int = 3,
        chunk: int | None = None,
    ) -> None:
        super().__init__()
        _check(chunk is None or chunk >= 0, f"chunk = {chunk}: expected 0 (all at once) or a positive number of flows")
        self.chunk = chunk
        self.rounds = nn.Sequential(
            *(ReleasedSRRound(dim, num_heads, windows, mlp_ratio=mlp_ratio, reduction=reduction) for _ in range(rounds))
        )
        pad = kernel_size // 2
        self.head = nn.Sequential(
            nn.Conv2d(dim, hidden, kernel_size, padding=pad),
            nn.ReLU(),
            nn.Conv2d(hidden, 2, kernel_size, padding=pad),
        )

    def _refine(self, x: Tensor) -> Tensor:
        return self.head(self.rounds(x))

    def forward(self, flow_up: Float[Tensor, "b 2 h w"], guidance: Float[Tensor, "bf k h w"]) -> Float[Tensor, "b 2 h w"]:
        chunk = device_choices(flow_up.device).sr_chunk if self.chunk is None else self.chunk
        return refine_paths(flow_up, guidance, self._refine, chunk=chunk)

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}"


class ReleasedFlowUpsampler(nn.Module):
    """The flow upsampling stage of ACTR as released: coarse flows of all paths ``(m·b, 2, hs, ws)``
    (path-major) and the last block's source feature map ``(b, c, hs, ws)`` → ``(m·b, 2, h, w)``.

    :func:`nearest_upsample_flow` ×``guidance.factor``, :class:`ReleasedGuidance` from the features
    (computed once, shared by the paths), then :class:`ReleasedFlowRefiner`. Same interface as
    :class:`~actr_core.blocks.DualWindowFlowSR` (the paper's).
    """

    def __init__(self, guidance: ReleasedGuidance, refiner: ReleasedFlowRefiner) -> None:
        super().__init__()
        self.guidance = guidance
        self.refiner = refiner

    def forward(self, flow: Float[Tensor, "b 2 hs ws"], features: Float[Tensor, "bf c hs ws"]) -> Float[Tensor, "b 2 h w"]:
        return self.refiner(nearest_upsample_flow(flow, self.guidance.factor), self.guidance(features))


# ----------------------------------------------------------------------------------------------
# 10. loss


def released_epe_loss(
    pred: Float[Tensor, "b 2 h w"], target: Float[Tensor, "b 2 h w"], valid: Bool[Tensor, "b h w"]
) -> Float[Tensor, ""]:
    """End-point error ``‖target − pred‖₂`` averaged over all valid cells of the whole batch.

    The released training loss (GLU-Net ``EPE(sparse=True)``) pools every valid cell of the batch,
    so pairs with many keypoints weigh more; it marks cells valid where the target is not (0, 0),
    here the boolean ``valid`` mask decides. Invalid cells (NaN included) are masked before any
    arithmetic; a batch without valid cells gives 0.
    """
    check_flow_pair(pred, target, valid)
    mask = valid.unsqueeze(1)
    diff = torch.where(mask, target, torch.zeros_like(target)) - torch.where(mask, pred, torch.zeros_like(pred))
    epe = torch.linalg.vector_norm(diff, dim=1)  # 0 with zero gradient in invalid cells
    return epe.sum() / valid.sum().clamp(min=1)


class ReleasedEPELoss(nn.Module):
    """Module form of :func:`released_epe_loss` (the flow loss of ACTR as released); no parameters."""

    def forward(
        self, pred: Float[Tensor, "b 2 h w"], target: Float[Tensor, "b 2 h w"], valid: Bool[Tensor, "b h w"]
    ) -> Float[Tensor, ""]:
        return released_epe_loss(pred, target, valid)
