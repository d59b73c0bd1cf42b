"""MMNet's multi-scale feature blocks (Zhao et al., ICCV 2021, Sec. 3).

# b batch · c channels in · m hidden channels · d reduced channels · h w grid · hc wc coarser grid
# k cells of the local window (k = r·r)

Three blocks, each a pure function plus a thin ``nn.Module`` holding its weights:

- :func:`multiscale_dilated_conv` / :class:`MultiScaleDilatedBlock`: a 3×3 convolution to a few
  hidden channels, parallel dilated 3×3 convolutions on its output, all summed, then a 1×1
  projection (the released code's ``MSBlock`` followed by its ``conv*_down``).
  :func:`multiscale_stage` / :class:`MultiScaleStage`: the sum of such blocks over the feature
  maps of one stage, fused into grouped convolutions (tested equal).
- :func:`local_self_attention` / :class:`LocalSelfAttention`: intra-scale attention of every cell
  on its ``r × r`` neighbourhood, cosine similarity, softmax, weighted sum, residual (the released
  ``WeightAverage``).
- :func:`top_down_fusion` / :class:`TopDownFusion`: cross-scale enhancement: the coarser level
  upsampled by a transposed convolution, concatenated with the finer one, fused by a 3×3
  convolution.
"""

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from actr_core.blocks._checks import check_positive, check_rank

__all__ = [
    "LocalSelfAttention",
    "MultiScaleDilatedBlock",
    "MultiScaleStage",
    "TopDownFusion",
    "local_self_attention",
    "multiscale_dilated_conv",
    "multiscale_stage",
    "top_down_fusion",
]


def _checked_dilations(kernel_size: int, dilations: Sequence[int]) -> tuple[int, ...]:
    """The dilation rates as a tuple, after checking them and the kernel (odd: same-size convolutions)."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size = {kernel_size}: expected an odd kernel (same-size convolutions)")
    if any(r < 1 for r in dilations):
        raise ValueError(f"dilations = {tuple(dilations)}: expected integers >= 1")
    return tuple(int(r) for r in dilations)


def multiscale_dilated_conv(
    x: Float[Tensor, "b c h w"],
    weight: Float[Tensor, "m c kh kw"],
    bias: Float[Tensor, " m"] | None,
    branch_weights: Sequence[Float[Tensor, "m m kh2 kw2"]],
    branch_biases: Sequence[Float[Tensor, " m"] | None],
    dilations: Sequence[int],
) -> Float[Tensor, "b m h w"]:
    """Multi-scale dilated convolution: ``o = relu(conv(x))``, ``out = o + Σ_r relu(conv_r(o))``.

    ``conv`` is a "same" convolution with ``weight`` (odd kernel); ``conv_r`` are "same" 3×3
    convolutions with dilation ``dilations[r]`` (padding = dilation · (k − 1) / 2, zeros), so every
    branch keeps the grid and sees a wider context. The released ``MSBlock`` uses 32 hidden
    channels and dilations 4, 8, 12 (``rate · (1, 2, 3)`` with ``rate = 4``).
    """
    check_rank("x", x, 4, "b c h w")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if not (len(branch_weights) == len(branch_biases) == len(dilations)):
        raise ValueError(
            f"got {len(branch_weights)} branch weights, {len(branch_biases)} branch biases and "
            f"{len(dilations)} dilations: expected one of each per branch"
        )
    o = F.relu(F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2))
    out = o
    for w_r, b_r, rate in zip(branch_weights, branch_biases, dilations, strict=True):
        out = out + F.relu(F.conv2d(o, w_r, b_r, padding=rate * (w_r.shape[-1] // 2), dilation=rate))
    return out


def _convs(modules: nn.ModuleList) -> list[nn.Conv2d]:
    """The convolutions held in ``modules`` (a ``ModuleList`` is typed as holding plain modules)."""
    return [cast(nn.Conv2d, m) for m in modules]


def _bias(conv: nn.Conv2d) -> Tensor:
    """The bias of ``conv``; every convolution of these blocks is built with one."""
    if conv.bias is None:
        raise ValueError(f"{conv} has no bias")
    return conv.bias


class MultiScaleDilatedBlock(nn.Module):
    """Multi-scale descriptor of one feature map: :func:`multiscale_dilated_conv`, then a 1×1 projection.

    Args:
        in_channels: channels of the backbone feature map (256, 512, 1024, 2048 for a ResNet).
        out_channels: channels of the descriptor (21 in the released code).
        hidden_channels: width of the dilated branches (32 in the released code).
        dilations: one dilated 3×3 branch per entry ((4, 8, 12) in the released code).
        kernel_size: kernel of the input and branch convolutions (3).
        init_std: the input and branch convolutions are initialised N(0, init_std²) with zero
            biases (0.01 in the released code); the projection keeps PyTorch's default init.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        hidden_channels: int = 32,
        dilations: Sequence[int] = (4, 8, 12),
        kernel_size: int = 3,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.dilations = _checked_dilations(kernel_size, dilations)
        self.conv = nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=kernel_size // 2)
        self.branches = nn.ModuleList(
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size, padding=r * (kernel_size // 2), dilation=r)
            for r in self.dilations
        )
        self.proj = nn.Conv2d(hidden_channels, out_channels, 1)
        for conv in (self.conv, *self.branches):
            nn.init.normal_(conv.weight, 0.0, init_std)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Float[Tensor, "b c h w"]) -> Float[Tensor, "b o h w"]:
        hidden = multiscale_dilated_conv(
            x,
            self.conv.weight,
            self.conv.bias,
            [conv.weight for conv in _convs(self.branches)],
            [conv.bias for conv in _convs(self.branches)],
            self.dilations,
        )
        return self.proj(hidden)

    def extra_repr(self) -> str:
        return f"dilations={self.dilations}"


def multiscale_stage(
    features: Sequence[Float[Tensor, "b c h w"]],
    in_weights: Sequence[Float[Tensor, "m c kh kw"]],
    in_biases: Sequence[Float[Tensor, " m"] | None],
    branch_weights: Sequence[Float[Tensor, "nm m kh2 kw2"]],
    branch_biases: Sequence[Float[Tensor, " nm"] | None],
    dilations: Sequence[int],
    proj_weight: Float[Tensor, "o nm 1 1"],
    proj_bias: Float[Tensor, " o"] | None,
) -> Float[Tensor, "b o h w"]:
    """``Σ_j proj_j(multiscale_dilated_conv(x_j))`` over the ``n`` feature maps of one stage, fused.

    Equal to running :class:`MultiScaleDilatedBlock` on every map and summing, with the per-map
    weights stacked: the input convolutions stay one per map (each reads its own ``x_j``); the
    hidden maps are concatenated and each dilated branch is **one grouped convolution** (``n``
    groups; ``branch_weights[r]`` stacks the maps' ``(m, m, 3, 3)`` kernels); the projections and
    the sum over maps are **one 1×1 convolution** over the ``n · m`` channels (``proj_weight``
    concatenates the maps' ``(o, m)`` matrices along its input axis, ``proj_bias`` is the sum of
    their biases, the only thing the forward pass sees of them). A stage of ResNet-101's third
    stage thus runs 23 + 9 operations instead of about 23 · 12.
    """
    n = len(features)
    if n == 0 or len(in_weights) != n or len(in_biases) != n:
        raise ValueError(
            f"got {n} feature maps, {len(in_weights)} input weights, {len(in_biases)} input biases: expected one each (>= 1)"
        )
    if not (len(branch_weights) == len(branch_biases) == len(dilations)):
        raise ValueError(
            f"got {len(branch_weights)} branch weights, {len(branch_biases)} branch biases and "
            f"{len(dilations)} dilations: expected one of each per branch"
        )
    for j, (x, w) in enumerate(zip(features, in_weights, strict=True)):
        check_rank(f"features[{j}]", x, 4, "b c h w")
        if x.shape[1] != w.shape[1] or x.shape[-2:] != features[0].shape[-2:] or x.shape[0] != features[0].shape[0]:
            raise ValueError(
                f"features[{j}] {tuple(x.shape)} must match features[0] {tuple(features[0].shape)} in batch and "
                f"grid and have the {w.shape[1]} channels of its input weight"
            )
    hidden = torch.cat(
        [F.conv2d(x, w, b, padding=w.shape[-1] // 2) for x, w, b in zip(features, in_weights, in_biases, strict=True)],
        dim=1,
    ).relu_()
    total = hidden
    for w_r, b_r, rate in zip(branch_weights, branch_biases, dilations, strict=True):
        branch = F.conv2d(hidden, w_r, b_r, padding=rate * (w_r.shape[-1] // 2), dilation=rate, groups=n)
        total = total + branch.relu_()
    return F.conv2d(total, proj_weight, proj_bias)


class MultiScaleStage(nn.Module):
    """The multi-scale descriptors of a whole stage: :func:`multiscale_stage` with its weights.

    Holds the same numbers as ``num_maps`` :class:`MultiScaleDilatedBlock` (see
    :meth:`from_blocks`), stacked for grouped convolutions, except that the ``num_maps``
    projection biases are one (their sum: the only thing the forward pass uses).

    Args:
        in_channels: channels of each feature map.
        out_channels: channels of the stage descriptor (21 in the released code).
        num_maps: feature maps summed by the stage (bottlenecks per ResNet stage).
        hidden_channels, dilations, kernel_size, init_std: as :class:`MultiScaleDilatedBlock`;
            initialisation is also the same, per map (the projection uniform in ±1/√hidden, as
            PyTorch's default for a per-map 1×1 convolution, its bias a sum of ``num_maps`` such).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_maps: int,
        *,
        hidden_channels: int = 32,
        dilations: Sequence[int] = (4, 8, 12),
        kernel_size: int = 3,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.dilations = _checked_dilations(kernel_size, dilations)
        if num_maps < 1:
            raise ValueError(f"num_maps = {num_maps}: expected >= 1")
        self.num_maps = num_maps
        width = num_maps * hidden_channels
        self.inputs = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=kernel_size // 2) for _ in range(num_maps)
        )
        self.branches = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size, padding=r * (kernel_size // 2), dilation=r, groups=num_maps)
            for r in self.dilations
        )
        self.proj = nn.Conv2d(width, out_channels, 1)
        for conv in (*self.inputs, *self.branches):
            nn.init.normal_(conv.weight, 0.0, init_std)
            nn.init.zeros_(conv.bias)
        bound = 1.0 / hidden_channels**0.5
        with torch.no_grad():
            self.proj.weight.uniform_(-bound, bound)
            _bias(self.proj).copy_(torch.empty(num_maps, out_channels).uniform_(-bound, bound).sum(dim=0))

    @classmethod
    def from_blocks(cls, blocks: Sequence[MultiScaleDilatedBlock]) -> "MultiScaleStage":
        """The stage holding the weights of ``blocks`` (all alike), so that it equals their sum."""
        first = blocks[0]
        stage = cls(
            first.conv.in_channels,
            first.proj.out_channels,
            len(blocks),
            hidden_channels=first.conv.out_channels,
            dilations=first.dilations,
            kernel_size=first.conv.kernel_size[0],
        )
        with torch.no_grad():
            for conv, block in zip(_convs(stage.inputs), blocks, strict=True):
                conv.weight.copy_(block.conv.weight)
                _bias(conv).copy_(_bias(block.conv))
            for r, branch in enumerate(_convs(stage.branches)):
                branch.weight.copy_(torch.cat([_convs(b.branches)[r].weight for b in blocks]))
                _bias(branch).copy_(torch.cat([_bias(_convs(b.branches)[r]) for b in blocks]))
            stage.proj.weight.copy_(torch.cat([b.proj.weight for b in blocks], dim=1))
            _bias(stage.proj).copy_(torch.stack([_bias(b.proj) for b in blocks]).sum(dim=0))
        return stage

    def forward(self, features: Sequence[Float[Tensor, "b c h w"]]) -> Float[Tensor, "b o h w"]:
        return multiscale_stage(
            features,
            [conv.weight for conv in _convs(self.inputs)],
            [conv.bias for conv in _convs(self.inputs)],
            [conv.weight for conv in _convs(self.branches)],
            [conv.bias for conv in _convs(self.branches)],
            self.dilations,
            self.proj.weight,
            self.proj.bias,
        )

    def extra_repr(self) -> str:
        return f"num_maps={self.num_maps}, dilations={self.dilations}"


def local_self_attention(
    query: Float[Tensor, "b d h w"],
    key: Float[Tensor, "b d h w"],
    value: Float[Tensor, "b d h w"],
    *,
    kernel_size: int = 3,
    eps: float = 1e-8,
) -> Float[Tensor, "b d h w"]:
    """Intra-scale local self-attention: every cell attends to its ``r × r`` neighbourhood.

    ``a_k = softmax_k(cos(q_centre, k_k))`` over the ``r·r`` neighbours ``k`` of a cell (the cell
    itself included), and the output is ``Σ_k a_k · v_k``. The cosine similarity normalises each
    vector by ``max(‖·‖, eps)``; the border is replicate-padded (a border cell sees copies of
    itself and its neighbours), as in the released ``WeightAverage``.

    Projections and the residual are the module's business (:class:`LocalSelfAttention`); this
    function is parameter-free. Keys and values are projected before the neighbourhood is gathered,
    which equals the released order (gather, then 1×1 convolutions) because a 1×1 convolution
    commutes with replicate padding and shifts, at ``r·r`` times less work.
    """
    check_rank("query", query, 4, "b d h w")
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape"
        )
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f"kernel_size = {kernel_size}: expected an odd window side >= 1")
    check_positive("eps", eps)
    b, d, h, w = query.shape
    pad = kernel_size // 2
    q = F.normalize(query, dim=1, eps=eps)
    kv = torch.cat((F.normalize(key, dim=1, eps=eps), value), dim=1)
    kv = F.pad(kv, (pad, pad, pad, pad), mode="replicate")
    neighbours = F.unfold(kv, kernel_size).view(b, 2, d, kernel_size * kernel_size, h * w)  # b 2 d k (h w)
    sim = torch.einsum("bdl,bdkl->bkl", q.reshape(b, d, h * w), neighbours[:, 0])
    attn = torch.softmax(sim, dim=1)
    out = torch.einsum("bkl,bdkl->bdl", attn, neighbours[:, 1])
    return out.view(b, d, h, w)


class LocalSelfAttention(nn.Module):
    """Residual intra-scale attention: ``x + proj(local_self_attention(θ(x), φ(x), g(x)))``.

    Args:
        channels: channels of the feature map (21 in the released code).
        reduced_channels: channels of θ, φ, g (``channels // 2`` = 10 in the released code).
        kernel_size: side of the neighbourhood (3).
        eps: floor of the norms in the cosine similarity (1e-8, ``nn.CosineSimilarity``'s default).

    θ, φ, g are one 1×1 convolution with ``3 · reduced_channels`` outputs (one matrix product
    instead of three; equal to three separate convolutions).
    """

    def __init__(self, channels: int, *, reduced_channels: int | None = None, kernel_size: int = 3, eps: float = 1e-8) -> None:
        super().__init__()
        reduced = channels // 2 if reduced_channels is None else reduced_channels
        if reduced < 1:
            raise ValueError(f"reduced_channels = {reduced}: expected >= 1 (channels = {channels})")
        self.reduced_channels = reduced
        self.kernel_size = kernel_size
        self.eps = eps
        self.qkv = nn.Conv2d(channels, 3 * reduced, 1)
        self.proj = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Float[Tensor, "b c h w"]) -> Float[Tensor, "b c h w"]:
        q, k, v = self.qkv(x).chunk(3, dim=1)
        return x + self.proj(local_self_attention(q, k, v, kernel_size=self.kernel_size, eps=self.eps))

    def extra_repr(self) -> str:
        return f"reduced_channels={self.reduced_channels}, kernel_size={self.kernel_size}"


def top_down_fusion(
    fine: Float[Tensor, "b c h w"],
    coarse: Float[Tensor, "b c2 hc wc"],
    up_weight: Float[Tensor, "c2 c3 ku kv"],
    fuse_weight: Float[Tensor, "o cc kh kw"],
    fuse_bias: Float[Tensor, " o"] | None,
    *,
    stride: int = 2,
    padding: int = 1,
) -> Float[Tensor, "b o h w"]:
    """Cross-scale enhancement: ``fuse([fine, up(coarse)])``.

    ``up`` is a transposed convolution (no bias) with the given ``stride`` and ``padding``; its
    output must have the fine grid's size (kernel 4, stride 2, padding 1 doubles the grid, as in
    the released code). ``fuse`` is a "same" convolution over the channel concatenation
    ``[fine, up(coarse)]`` (fine first).
    """
    check_rank("fine", fine, 4, "b c h w")
    check_rank("coarse", coarse, 4, "b c h w")
    up = F.conv_transpose2d(coarse, up_weight, stride=stride, padding=padding)
    if up.shape[0] != fine.shape[0] or up.shape[-2:] != fine.shape[-2:]:
        raise ValueError(
            f"coarse {tuple(coarse.shape)} upsamples to {tuple(up.shape)}, which does not match fine {tuple(fine.shape)}"
        )
    return F.conv2d(torch.cat((fine, up), dim=1), fuse_weight, fuse_bias, padding=fuse_weight.shape[-1] // 2)


class TopDownFusion(nn.Module):
    """Module form of :func:`top_down_fusion`.

    Args:
        channels: channels of both levels and of the output (21 in the released code).
        up_kernel, up_stride, up_padding: the transposed convolution (4, 2, 1: the grid doubles).
        fuse_kernel: kernel of the fusing convolution (3).
    """

    def __init__(
        self, channels: int, *, up_kernel: int = 4, up_stride: int = 2, up_padding: int = 1, fuse_kernel: int = 3
    ) -> None:
        super().__init__()
        self.up_stride = up_stride
        self.up_padding = up_padding
        self.up = nn.ConvTranspose2d(channels, channels, up_kernel, stride=up_stride, padding=up_padding, bias=False)
        self.fuse = nn.Conv2d(2 * channels, channels, fuse_kernel, padding=fuse_kernel // 2)

    def forward(self, fine: Float[Tensor, "b c h w"], coarse: Float[Tensor, "b c hc wc"]) -> Float[Tensor, "b c h w"]:
        return top_down_fusion(
            fine,
            coarse,
            self.up.weight,
            self.fuse.weight,
            self.fuse.bias,
            stride=self.up_stride,
            padding=self.up_padding,
        )
