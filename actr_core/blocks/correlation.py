"""Multi-head correlation (paper Eq. 2): per-head softmax scores averaged over the heads.

# b batch · hs ws source grid · ht wt target grid · ns nt tokens · c channels · g heads · d per head

Convention: the prefix tokens (``[cls]``) are removed *before* the softmax, on both sides; each
head's softmax runs over the ``ht · wt`` target cells only, so every source cell's correlation
``C[b, i, j]`` is a distribution over the target grid (it sums to 1). The paper removes ``[cls]``
"for the subsequent flow estimation" before defining Eq. 2 on the ``hs × ws × ht × wt`` grids; the
released code instead removes it after a softmax that included ``[cls]`` (and sums the heads).
:func:`correlation_from_attention` gives our definition from an attention map whose softmax
included ``[cls]`` (it renormalises), so both entry points agree exactly.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from actr_core.blocks._checks import check_divisible, check_rank
from actr_core.blocks.attention import attention_probs

__all__ = ["CorrelationFromAttention", "MultiHeadCorrelation", "correlation_from_attention", "multihead_correlation"]


def _check_grid(name: str, num_tokens: int, size: tuple[int, int], num_prefix_tokens: int) -> None:
    h, w = size
    if h <= 0 or w <= 0 or num_tokens != h * w + num_prefix_tokens:
        raise ValueError(
            f"{name} has {num_tokens} tokens but its grid is {size} with {num_prefix_tokens} prefix "
            f"tokens: expected {h * w + num_prefix_tokens}"
        )


def _to_grid(per_head: Tensor, src_size: tuple[int, int], trg_size: tuple[int, int]) -> Tensor:
    """Average over heads, then lay source and target cells out on their grids."""
    return rearrange(
        per_head.mean(dim=1),
        "b (hs ws) (ht wt) -> b hs ws ht wt",
        hs=src_size[0],
        ws=src_size[1],
        ht=trg_size[0],
        wt=trg_size[1],
    )


def multihead_correlation(
    src: Float[Tensor, "b ns c"],
    trg: Float[Tensor, "b nt c"],
    qk_weight: Float[Tensor, "c2 c"],
    qk_bias: Float[Tensor, " c2"] | None,
    *,
    num_heads: int,
    src_size: tuple[int, int],
    trg_size: tuple[int, int],
    num_prefix_tokens: int = 1,
    scale: float | None = None,
) -> Float[Tensor, "b hs ws ht wt"]:
    """Paper Eq. 2: ``C_st = (1/H) Σ_h softmax((F_s W_h^Q)(F_t W_h^K)ᵀ · scale)``.

    ``src`` and ``trg`` are token sequences whose first ``num_prefix_tokens`` tokens (``[cls]``)
    are dropped before anything else (see the module's Convention); the rest are the row-major
    ``src_size = (hs, ws)`` and ``trg_size = (ht, wt)`` grids. ``qk_weight`` stacks ``W^Q`` (first
    ``c`` rows) and ``W^K`` (next ``c`` rows). The softmax runs over the target cells; the result is
    averaged over the ``num_heads`` heads, so ``C.sum((-2, -1)) == 1`` for every source cell.

    ``scale`` defaults to ``d ** -0.5`` with ``d = c / num_heads`` channels per head: the paper
    writes ``1/√c``; we read ``c`` as the per-head width, as in standard multi-head attention and
    the released code. Pass ``scale=c ** -0.5`` for the literal reading.
    """
    check_rank("src", src, 3, "b ns c")
    check_rank("trg", trg, 3, "b nt c")
    if src.shape[0] != trg.shape[0] or src.shape[2] != trg.shape[2]:
        raise ValueError(
            f"src has shape {tuple(src.shape)} and trg has shape {tuple(trg.shape)}: batch and channel sizes must match"
        )
    c = src.shape[2]
    check_divisible("channels", c, "num_heads", num_heads)
    if qk_weight.shape != (2 * c, c):
        raise ValueError(f"qk_weight has shape {tuple(qk_weight.shape)}: expected ({2 * c}, {c})")
    _check_grid("src", src.shape[1], src_size, num_prefix_tokens)
    _check_grid("trg", trg.shape[1], trg_size, num_prefix_tokens)
    q = F.linear(src[:, num_prefix_tokens:], qk_weight[:c], None if qk_bias is None else qk_bias[:c])
    k = F.linear(trg[:, num_prefix_tokens:], qk_weight[c:], None if qk_bias is None else qk_bias[c:])
    q = rearrange(q, "b ns (g d) -> b g ns d", g=num_heads)
    k = rearrange(k, "b nt (g d) -> b g nt d", g=num_heads)
    return _to_grid(attention_probs(q, k, scale=scale), src_size, trg_size)


def correlation_from_attention(
    attn: Float[Tensor, "b g ns nt"],
    *,
    src_size: tuple[int, int],
    trg_size: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> Float[Tensor, "b hs ws ht wt"]:
    """Paper Eq. 2 from an existing per-head attention map (e.g. the biased cross-attention's).

    ``attn`` is softmax-normalised over *all* target tokens, prefix tokens included. Dropping the
    prefix rows and columns and renormalising each head's row over the target cells equals a
    softmax over the target cells only (the restriction of a softmax to a subset, divided by its
    mass), so the result is the same as :func:`multihead_correlation` with the same ``W^Q``,
    ``W^K`` (tested). Rows whose target-cell mass underflows to 0 stay 0.
    """
    check_rank("attn", attn, 4, "b g ns nt")
    _check_grid("attn (source axis)", attn.shape[2], src_size, num_prefix_tokens)
    _check_grid("attn (target axis)", attn.shape[3], trg_size, num_prefix_tokens)
    cells = attn[:, :, num_prefix_tokens:, num_prefix_tokens:]
    mass = cells.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(cells.dtype).tiny)
    return _to_grid(cells / mass, src_size, trg_size)


class CorrelationFromAttention(nn.Module):
    """Module form of :func:`correlation_from_attention` on equal source and target grids: the
    correlation readout of ACTR as described (paper Eq. 2 from each block's cross-attention map).

    ``forward(attn, grid)``: the per-head attention ``(b, g, ns, nt)`` of a correspondence block and
    the token grid ``(h, w)`` of both images → ``(b, h, w, h, w)``. No parameters.
    """

    def __init__(self, *, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, attn: Float[Tensor, "b g ns nt"], grid: tuple[int, int]) -> Float[Tensor, "b hs ws ht wt"]:
        return correlation_from_attention(attn, src_size=grid, trg_size=grid, num_prefix_tokens=self.num_prefix_tokens)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"


class MultiHeadCorrelation(nn.Module):
    """Module form of :func:`multihead_correlation` (paper Eq. 2) with its own ``W^Q``, ``W^K``.

    Parameter ``qk``: ``Linear(dim, 2 dim)``, rows ``[W^Q; W^K]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        num_prefix_tokens: int = 1,
        scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_divisible("dim", dim, "num_heads", num_heads)
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = scale
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias, device=device, dtype=dtype)

    def forward(
        self,
        src: Float[Tensor, "b ns c"],
        trg: Float[Tensor, "b nt c"],
        *,
        src_size: tuple[int, int],
        trg_size: tuple[int, int],
    ) -> Float[Tensor, "b hs ws ht wt"]:
        return multihead_correlation(
            src,
            trg,
            self.qk.weight,
            self.qk.bias,
            num_heads=self.num_heads,
            src_size=src_size,
            trg_size=trg_size,
            num_prefix_tokens=self.num_prefix_tokens,
            scale=self.scale,
        )
