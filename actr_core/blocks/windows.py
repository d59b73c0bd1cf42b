"""Windowed self-attention with relative position bias and shifted windows (Swin [31]), for Sec. 3.4.

# b batch · h w map rows, columns · c channels · g heads · d channels per head
# nw windows · n tokens per window (window_size²) · m relative offsets ((2 window_size − 1)²)

Convention: maps are channels-last ``(b, h, w, c)`` here. Windows tile the map row-major from the
top-left corner; a map whose sides are not multiples of the window is padded at the bottom and
right, the padded tokens are never attended to (they are masked as keys) and are cropped from the
output, so the result at real positions does not depend on the padding. A shift ``s`` rolls the
map by ``(−s, −s)`` before partitioning (and back after); tokens that the roll wrapped from the
top/left border into the bottom/right windows never attend across that seam (the Swin mask).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from actr_core.blocks._checks import check_divisible, check_rank
from actr_core.blocks.device_table import DEVICE_CHOICES, device_choices

__all__ = [
    "FUSED_MIN_WINDOW_TOKENS",
    "WindowAttention",
    "WindowTransformerBlock",
    "relative_position_index",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
    "window_self_attention",
]


def window_partition(x: Float[Tensor, "b h w c"], window_size: int) -> Float[Tensor, "b nw n c"]:
    """Cut a channels-last map into non-overlapping ``window_size²`` windows, row-major."""
    check_rank("x", x, 4, "b h w c")
    check_divisible("height", x.shape[1], "window_size", window_size)
    check_divisible("width", x.shape[2], "window_size", window_size)
    return rearrange(x, "b (nh wh) (nw ww) c -> b (nh nw) (wh ww) c", wh=window_size, ww=window_size)


def window_reverse(windows: Float[Tensor, "b nw n c"], window_size: int, size: tuple[int, int]) -> Float[Tensor, "b h w c"]:
    """Inverse of :func:`window_partition` for a map of ``size = (h, w)``."""
    check_rank("windows", windows, 4, "b nw n c")
    h, w = size
    check_divisible("height", h, "window_size", window_size)
    check_divisible("width", w, "window_size", window_size)
    if windows.shape[1:3] != ((h // window_size) * (w // window_size), window_size**2):
        raise ValueError(
            f"windows has shape {tuple(windows.shape)}: does not tile a map of size {size} with window_size = {window_size}"
        )
    return rearrange(
        windows,
        "b (nh nw) (wh ww) c -> b (nh wh) (nw ww) c",
        nh=h // window_size,
        wh=window_size,
        ww=window_size,
    )


def relative_position_index(window_size: int, *, device: torch.device | str | None = None) -> Int[Tensor, "n n"]:
    """Index into a ``((2 window_size − 1)², g)`` bias table for every (query, key) pair of a window.

    ``index[i, j] = (dy + window_size − 1) · (2 window_size − 1) + (dx + window_size − 1)`` with
    ``(dx, dy)`` the offset of query ``i`` from key ``j`` (tokens numbered row-major).
    """
    if window_size <= 0:
        raise ValueError(f"window_size = {window_size}: expected a positive integer")
    ys, xs = torch.meshgrid(torch.arange(window_size, device=device), torch.arange(window_size, device=device), indexing="ij")
    coords = torch.stack((ys.flatten(), xs.flatten()))
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)
    return rel[0] * (2 * window_size - 1) + rel[1]


def shifted_window_mask(
    size: tuple[int, int], window_size: int, shift: int, *, device: torch.device | str | None = None
) -> Bool[Tensor, "nw n n"]:
    """Which (query, key) pairs of each window may attend after a roll by ``(−shift, −shift)`` (Swin).

    ``size`` is the (padded) map size, multiples of ``window_size``. Rows (columns) that the roll
    wrapped from the top (left) border, the last ``shift`` rows (columns) of the rolled map, form a
    separate region; ``True`` where query and key lie in the same region. ``shift = 0``: all True.
    """
    h, w = size
    check_divisible("height", h, "window_size", window_size)
    check_divisible("width", w, "window_size", window_size)
    if not 0 <= shift < window_size:
        raise ValueError(f"shift = {shift}: expected 0 <= shift < window_size = {window_size}")
    rows = torch.arange(h, device=device) >= h - shift
    cols = torch.arange(w, device=device) >= w - shift
    region = (2 * rows[:, None].long() + cols[None, :].long()).view(1, h, w, 1)
    labels = window_partition(region.float(), window_size)[0, :, :, 0]
    return labels[:, :, None] == labels[:, None, :]


#: on CPU, windows of at least this many tokens use the fused kernel when ``fused=None``: there the
#: fused kernel is ~4× faster than an explicit softmax for 8×8 windows (64 tokens) and ~1.5× slower
#: for 4×4 windows (16 tokens), whose 16×16 score tiles an explicit softmax handles well (measured
#: with 8 heads of 12 channels on 64×64 maps, docs/benchmarks.md). Other devices: the device table
#: (:mod:`actr_core.blocks.device_table`), whose CPU column holds this value.
FUSED_MIN_WINDOW_TOKENS = DEVICE_CHOICES["cpu"].fused_min_window_tokens


def window_self_attention(
    x: Float[Tensor, "b h w c"],
    qkv_weight: Float[Tensor, "c3 c"],
    qkv_bias: Float[Tensor, " c3"] | None,
    proj_weight: Float[Tensor, "c c"],
    proj_bias: Float[Tensor, " c"] | None,
    bias_table: Float[Tensor, "m g"],
    *,
    window_size: int,
    shift: int = 0,
    scale: float | None = None,
    fused: bool | None = None,
) -> Float[Tensor, "b h w c"]:
    """(Shifted-)window multi-head self-attention with a learned relative position bias (Swin [31]).

    Per window: ``softmax(q kᵀ · scale + B) v``, ``B[g, i, j] = bias_table[index[i, j], g]``
    (:func:`relative_position_index`), heads ``g = bias_table.shape[1]``, then ``proj``. Works for
    any ``h, w``: padding, shift and mask as in the module's Convention. The bias and the masks go
    in as one additive float mask (``finfo.min`` where masked) to ``F.scaled_dot_product_attention``
    (``fused=True``) or to an explicit softmax (``fused=False``, the reference path; the two are
    tested equal); ``fused=None`` decides by the device table
    (:func:`~actr_core.blocks.device_table.device_choices` of ``x.device``): the fused kernel for
    windows of at least ``fused_min_window_tokens`` tokens (:data:`FUSED_MIN_WINDOW_TOKENS` on CPU,
    every window on CUDA), unless the bias needs a gradient and the device's fused kernel has none
    for its mask (CPU: torch's fallback is then slower than the explicit path).

    Without shift and padding the mask is the bias alone, ``(g, n, n)``, broadcast to every window
    without being copied (windows then form the batch of the attention); with them, each window
    has its own mask ``(nw, g, n, n)``. Queries, keys and values are cut into windows by one copy.
    """
    check_rank("x", x, 4, "b h w c")
    check_rank("bias_table", bias_table, 2, "m g")
    b, h, w, c = x.shape
    num_heads = bias_table.shape[1]
    check_divisible("channels", c, "heads (bias_table.shape[1])", num_heads)
    if bias_table.shape[0] != (2 * window_size - 1) ** 2:
        raise ValueError(
            f"bias_table has shape {tuple(bias_table.shape)}: expected {(2 * window_size - 1) ** 2} rows "
            f"for window_size = {window_size}"
        )
    if not 0 <= shift < window_size:
        raise ValueError(f"shift = {shift}: expected 0 <= shift < window_size = {window_size}")
    pad_h, pad_w = (-h) % window_size, (-w) % window_size
    hp, wp = h + pad_h, w + pad_w
    nh, nw = hp // window_size, wp // window_size
    qkv = F.linear(F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x, qkv_weight, qkv_bias)
    bias = rearrange(bias_table[relative_position_index(window_size, device=x.device)].to(qkv.dtype), "n1 n2 g -> g n1 n2")
    per_window = bool(shift or pad_h or pad_w)
    if per_window:  # every window has its own mask: windows and heads share the attention's head axis
        valid_key = torch.zeros(1, hp, wp, 1, dtype=torch.bool, device=x.device)
        valid_key[:, :h, :w] = True
        if shift:
            qkv = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2))
            valid_key = torch.roll(valid_key, shifts=(-shift, -shift), dims=(1, 2))
        valid_pair = shifted_window_mask((hp, wp), window_size, shift, device=x.device)
        valid_pair = valid_pair & window_partition(valid_key.float(), window_size)[0, :, None, :, 0].bool()
        # A padded query may be left with no valid key; letting every token see itself keeps all rows
        # finite (padded queries are cropped; real queries never see padded keys).
        valid_pair = valid_pair | torch.eye(window_size**2, dtype=torch.bool, device=x.device)
        mask = torch.where(valid_pair[:, None], bias[None], torch.finfo(qkv.dtype).min)
        mask = rearrange(mask, "nw g n1 n2 -> 1 (nw g) n1 n2")
        layout = "b (nh wh) (nw ww) (three g d) -> three b (nh nw g) (wh ww) d"
        inverse = "b (nh nw g) (wh ww) d -> b (nh wh) (nw ww) (g d)"
    else:  # the bias alone: one (g, n, n) mask broadcast (stride 0) over all windows
        mask = bias[None].expand(b * nh * nw, -1, -1, -1)
        layout = "b (nh wh) (nw ww) (three g d) -> three (b nh nw) g (wh ww) d"
        inverse = "(b nh nw) g (wh ww) d -> b (nh wh) (nw ww) (g d)"
    q, k, v = rearrange(qkv, layout, three=3, g=num_heads, wh=window_size, ww=window_size)
    scale = (c // num_heads) ** -0.5 if scale is None else scale
    if fused is None:  # where the fused kernel has no gradient for the mask (CPU), torch would fall back to
        #   a slower unfused path, so training the bias table takes the explicit softmax instead
        choices = device_choices(x.device)
        mask_grad = torch.is_grad_enabled() and mask.requires_grad
        fused = window_size**2 >= choices.fused_min_window_tokens and (choices.fused_mask_grad or not mask_grad)
    if fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale + mask, dim=-1)
        out = torch.matmul(attn, v)
    out = rearrange(out, inverse, b=b, nh=nh, nw=nw, g=num_heads, wh=window_size, ww=window_size)
    out = F.linear(out, proj_weight, proj_bias)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out[:, :h, :w] if pad_h or pad_w else out


class WindowAttention(nn.Module):
    """Module form of :func:`window_self_attention`; parameters ``qkv``, ``proj`` and the bias table."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        *,
        shift: int = 0,
        qkv_bias: bool = True,
        bias_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        check_divisible("dim", dim, "num_heads", num_heads)
        if not 0 <= shift < window_size:
            raise ValueError(f"shift = {shift}: expected 0 <= shift < window_size = {window_size}")
        self.window_size = window_size
        self.shift = shift
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=bias_init_std)
        self.fused: bool | None = None  # None: by window size and device (the device table); True/False forces a path

    def forward(self, x: Float[Tensor, "b h w c"]) -> Float[Tensor, "b h w c"]:
        return window_self_attention(
            x,
            self.qkv.weight,
            self.qkv.bias,
            self.proj.weight,
            self.proj.bias,
            self.relative_position_bias_table,
            window_size=self.window_size,
            shift=self.shift,
            fused=self.fused,
        )

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift={self.shift}"


class WindowTransformerBlock(nn.Module):
    """Pre-norm transformer block on windows: ``x + WA(LN(x))``, then ``x + MLP(LN(x))`` (Swin [31])."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        *,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        bias_init_std: float = 0.02,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, shift=shift, qkv_bias=qkv_bias, bias_init_std=bias_init_std)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: Float[Tensor, "b h w c"]) -> Float[Tensor, "b h w c"]:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
