"""Attention probabilities and biased (asymmetric) cross-attention (paper Sec. 3.2).

# b batch · ns source tokens · nt target tokens · nq nk query and key tokens · c channels · g heads
# d channels per head

:func:`attention_probs` is the one weight-free ``softmax(q kᵀ · scale)`` of the library: every
attention whose probabilities are read (the cross-attention maps that ACTR's correlation, Eq. 2,
and its target reweighting, Eq. 1, consume; the multi-head correlation) computes them with it.
Where only the attention's output is needed, the fused ``F.scaled_dot_product_attention`` kernel
is used instead (tested equal).
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from actr_core.blocks._checks import check_divisible, check_rank

__all__ = ["BiasedCrossAttention", "attention_probs", "biased_cross_attention", "cross_attention_probs"]


def attention_probs(
    q: Float[Tensor, "b g nq d"], k: Float[Tensor, "b g nk d"], *, scale: float | None = None
) -> Float[Tensor, "b g nq nk"]:
    """Per-head attention probabilities ``softmax(q kᵀ · scale)`` over the keys (no weights, no values).

    ``scale`` defaults to ``d ** -0.5`` (``d`` channels per head). Each row (one head, one query) is
    a distribution over the ``nk`` keys.
    """
    check_rank("q", q, 4, "b g nq d")
    check_rank("k", k, 4, "b g nk d")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(torch.einsum("bgqd,bgkd->bgqk", q, k) * scale, dim=-1)


def _check_tokens(src: Tensor, trg: Tensor, num_heads: int) -> None:
    check_rank("src", src, 3, "b ns c")
    check_rank("trg", trg, 3, "b nt c")
    if src.shape[0] != trg.shape[0] or src.shape[2] != trg.shape[2]:
        raise ValueError(
            f"src has shape {tuple(src.shape)} and trg has shape {tuple(trg.shape)}: batch and channel sizes must match"
        )
    check_divisible("channels", src.shape[2], "num_heads", num_heads)


def _project_qkv(
    src: Tensor, trg: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Queries from the source rows of a fused ``qkv`` projection, keys and values from the target rows."""
    c = src.shape[-1]
    if qkv_weight.shape != (3 * c, c):
        raise ValueError(f"qkv_weight has shape {tuple(qkv_weight.shape)}: expected ({3 * c}, {c})")
    q_bias = None if qkv_bias is None else qkv_bias[:c]
    kv_bias = None if qkv_bias is None else qkv_bias[c:]
    q = F.linear(src, qkv_weight[:c], q_bias)
    kv = F.linear(trg, qkv_weight[c:], kv_bias)
    q = rearrange(q, "b ns (g d) -> b g ns d", g=num_heads)
    k, v = rearrange(kv, "b nt (two g d) -> two b g nt d", two=2, g=num_heads)
    return q, k, v


def cross_attention_probs(
    src: Float[Tensor, "b ns c"],
    trg: Float[Tensor, "b nt c"],
    qkv_weight: Float[Tensor, "c3 c"],
    qkv_bias: Float[Tensor, " c3"] | None,
    *,
    num_heads: int,
    scale: float | None = None,
) -> Float[Tensor, "b g ns nt"]:
    """Per-head attention of the source queries on the target keys, ``softmax(q kᵀ · scale)``.

    The attention map ``A`` of paper Sec. 3.2 (the quantity Eq. 1 sums). Each row (one head, one
    source token) is a distribution over all ``nt`` target tokens, prefix tokens such as ``[cls]``
    included. ``scale`` defaults to ``d ** -0.5`` with ``d = c / num_heads``.
    """
    _check_tokens(src, trg, num_heads)
    q, k, _ = _project_qkv(src, trg, qkv_weight, qkv_bias, num_heads)
    return attention_probs(q, k, scale=scale)


def biased_cross_attention(
    src: Float[Tensor, "b ns c"],
    trg: Float[Tensor, "b nt c"],
    qkv_weight: Float[Tensor, "c3 c"],
    qkv_bias: Float[Tensor, " c3"] | None,
    proj_weight: Float[Tensor, "c c"],
    proj_bias: Float[Tensor, " c"] | None,
    *,
    num_heads: int,
    scale: float | None = None,
    need_weights: bool = True,
) -> tuple[Float[Tensor, "b ns c"], Float[Tensor, "b g ns nt"] | None]:
    """Asymmetric cross-attention of paper Sec. 3.2: source tokens are rebuilt from target tokens.

    ``q = src W_q``, ``k = trg W_k``, ``v = trg W_v`` (the three row blocks of ``qkv_weight``, laid
    out ``[q; k; v]`` like a standard fused ``qkv`` projection), per head
    ``A_h = softmax(q_h k_hᵀ · scale)`` over the target tokens, output ``proj(concat_h A_h v_h)``.
    Only the source is updated; the target never attends to the source.

    Returns ``(update, attn)``: ``update`` is the attention output (the caller adds it to the source
    stream: ``src = src + update``); ``attn`` the per-head probabilities ``(b, g, ns, nt)`` when
    ``need_weights`` (explicit softmax, the reference path), else ``None`` and the output comes from
    the fused ``F.scaled_dot_product_attention`` (the two paths are tested equal).
    """
    _check_tokens(src, trg, num_heads)
    q, k, v = _project_qkv(src, trg, qkv_weight, qkv_bias, num_heads)
    if need_weights:
        attn = attention_probs(q, k, scale=scale)
        out = torch.einsum("bgst,bgtd->bgsd", attn, v)
    else:
        attn = None
        out = F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5 if scale is None else scale)
    out = rearrange(out, "b g ns d -> b ns (g d)")
    return F.linear(out, proj_weight, proj_bias), attn


class BiasedCrossAttention(nn.Module):
    """Module form of :func:`biased_cross_attention` (paper Sec. 3.2).

    Parameters are named like a standard self-attention (``qkv``: ``Linear(dim, 3 dim)``, ``proj``:
    ``Linear(dim, dim)``), so weights of a self-attention layer load unchanged; the source uses the
    ``q`` rows, the target the ``k`` and ``v`` rows.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_divisible("dim", dim, "num_heads", num_heads)
        self.num_heads = num_heads
        self.scale = scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)

    def attention(self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"]) -> Float[Tensor, "b g ns nt"]:
        """The per-head attention only (no values, no projection): :func:`cross_attention_probs`."""
        return cross_attention_probs(src, trg, self.qkv.weight, self.qkv.bias, num_heads=self.num_heads, scale=self.scale)

    def forward(
        self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"], *, need_weights: bool = True
    ) -> tuple[Float[Tensor, "b ns c"], Float[Tensor, "b g ns nt"] | None]:
        return biased_cross_attention(
            src,
            trg,
            self.qkv.weight,
            self.qkv.bias,
            self.proj.weight,
            self.proj.bias,
            num_heads=self.num_heads,
            scale=self.scale,
            need_weights=need_weights,
        )
