"""Salient target reweighting (paper Eq. 1) and the target-branch block that applies it.

# b batch · ns source tokens · nt target tokens · c channels · g heads
"""

from collections.abc import Callable

from jaxtyping import Float
from timm.layers import Attention, Mlp
from torch import Tensor, nn

from actr_core.blocks._checks import check_rank

__all__ = ["ReweightedTargetBlock", "TargetReweighting", "target_reweighting", "target_token_weights"]


def target_token_weights(attn: Float[Tensor, "b g ns nt"]) -> Float[Tensor, "b nt"]:
    """One weight per target token, ``v`` of paper Eq. 1, normalised to mean 1 per sample.

    ``attn`` is the attention of the source queries on the target keys (each row a softmax over the
    target tokens, e.g. :func:`cross_attention_probs`). The paper sums it over the heads and over
    the source tokens: ``v_raw[t] = Σ_g Σ_s attn[g, s, t]``. Because every row sums to 1, the raw
    weights total ``g · ns`` and average ``g · ns / nt`` (``= H`` for equal token counts), so a
    stream multiplied by ``v_raw`` grows about H-fold per block. The paper states no normalisation;
    we divide by the per-sample mean, ``v = v_raw / mean_t v_raw``, so the weights average exactly 1
    over the target tokens of each sample and only their *relative* saliency rescales the tokens.
    """
    check_rank("attn", attn, 4, "b g ns nt")
    raw = attn.sum(dim=(1, 2))
    return raw / raw.mean(dim=-1, keepdim=True)


def target_reweighting(tokens: Float[Tensor, "b nt c"], attn: Float[Tensor, "b g ns nt"]) -> Float[Tensor, "b nt c"]:
    """``z* = z'' ⊗ v`` of paper Eq. 1: scale each target token by its weight from :func:`target_token_weights`.

    ``tokens`` is the target stream after self-attention and its residual (``z''``); ``attn`` the
    attention of the source queries on the target keys of the block's *input* tokens.
    """
    check_rank("tokens", tokens, 3, "b nt c")
    check_rank("attn", attn, 4, "b g ns nt")
    if attn.shape[0] != tokens.shape[0] or attn.shape[3] != tokens.shape[1]:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)} and attn has shape {tuple(attn.shape)}: "
            "expected attn (b, g, ns, nt) with b and nt as in tokens (b, nt, c)"
        )
    return tokens * target_token_weights(attn).unsqueeze(-1)


class TargetReweighting(nn.Module):
    """Module form of :func:`target_reweighting` (paper Eq. 1); no parameters."""

    def forward(self, tokens: Float[Tensor, "b nt c"], attn: Float[Tensor, "b g ns nt"]) -> Float[Tensor, "b nt c"]:
        return target_reweighting(tokens, attn)


class ReweightedTargetBlock(nn.Module):
    """The target branch of an asymmetric block, paper Eq. 1 in full::

        z'  = MultiHead(LN(z), LN(z), LN(z))
        z'' = z' + z
        z*  = z'' ⊗ v            # v from `attn` by target_token_weights
        out = FFN(LN(z*)) + z*

    ``attn`` is the attention of the source queries on the target keys of this block's input tokens
    (for instance ``BiasedCrossAttention.attention(LN(src), LN(trg))`` on the block inputs). The
    block does not detach it; pass ``attn.detach()`` to stop gradients through the weights.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.reweight = TargetReweighting()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, tokens: Float[Tensor, "b nt c"], attn: Float[Tensor, "b g ns nt"]) -> Float[Tensor, "b nt c"]:
        z = tokens + self.attn(self.norm1(tokens))
        z = self.reweight(z, attn)
        return z + self.mlp(self.norm2(z))
