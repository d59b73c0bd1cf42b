"""The contracts of ACTR's stages: what :class:`~actr_core.models.actr.ACTR` calls, as ``typing.Protocol`` s.

# b batch · H W input frame · hs ws token grid (source and target equal) · ns nt tokens ([cls] +
# grid cells) · c channels · g heads · m paths · h w flow grid (upscale · token grid) · 2 (x, y)

:class:`~actr_core.models.actr.ACTR` takes every stage as an injected instance (torchvision RAFT's
pattern); builder functions choose the instances and hold the numbers. Any module that honours
one of these contracts can be injected (``build_actr(config, backbone=...)``, ``actr_released(...,
backbone=...)``). Which library modules implement each contract:

================================  ==================================================  ==============================================
stage                             ACTR as described (and the Baseline, ablations)     ACTR as released
================================  ==================================================  ==============================================
:class:`Backbone`                 ``ViTBackbone``, ``ConvBackbone``                   ``ViTBackbone`` with DINO's interpolation
:class:`SourcePositionalEncoding` ``LearnedSourcePE``, ``NoSourcePE``                 (inside its block: a fixed-length PE)
:class:`CorrespondenceStage`      ``CorrespondenceBlock``                             ``ReleasedAsymmetricBlock``
:class:`CorrelationReadout`       ``CorrelationFromAttention`` (Eq. 2, head mean)     ``HeadSummedCorrelation``
:class:`SoftArgmaxReadout`        ``SoftArgmax`` (Eq. 3)                              ``ReleasedSoftArgmax``
:class:`FlowUpsampler`            ``DualWindowFlowSR``, ``BilinearFlowUpsampling``    ``ReleasedFlowUpsampler``
:class:`FlowLoss`                 ``MaskedFlowLoss`` (Eq. 4)                          ``ReleasedEPELoss``
================================  ==================================================  ==============================================

The protocols are ``runtime_checkable`` (``isinstance`` checks that the methods and attributes
exist, not their shapes; the jaxtyping annotations of the implementations check those in the
test suite).
"""

from typing import Protocol, runtime_checkable

from jaxtyping import Bool, Float
from torch import Tensor

__all__ = [
    "Backbone",
    "CorrelationReadout",
    "CorrespondenceStage",
    "FlowLoss",
    "FlowUpsampler",
    "SoftArgmaxReadout",
    "SourcePositionalEncoding",
]


@runtime_checkable
class Backbone(Protocol):
    """Images → ``[cls]`` + patch tokens, for any input whose sides are multiples of ``patch_size``.

    ``forward(image (b, 3, H, W)) -> tokens (b, 1 + (H/p)·(W/p), embed_dim)``, the grid cells
    row-major after the one prefix token. A backbone that supports activation checkpointing has
    timm's ``set_grad_checkpointing(enable: bool)``; ACTR calls it when asked to checkpoint.
    """

    patch_size: int
    embed_dim: int

    def __call__(self, image: Float[Tensor, "b 3 H W"]) -> Float[Tensor, "b n c"]: ...


@runtime_checkable
class SourcePositionalEncoding(Protocol):
    """Source tokens → source tokens with a positional encoding added (paper Sec. 3.2), for the
    token grid ``grid = (hs, ws)`` of the input."""

    def __call__(self, tokens: Float[Tensor, "b n c"], grid: tuple[int, int]) -> Float[Tensor, "b n c"]: ...


@runtime_checkable
class CorrespondenceStage(Protocol):
    """One correspondence (feature-learning) block: ``(S, T, grid) -> (S', T', A)``.

    ``S``, ``T`` are the source and target tokens ``(b, 1 + hs·ws, c)``; ``A`` is the per-head
    attention ``(b, g, ns, nt)`` of the source queries on the target keys, each row a softmax over
    all target tokens ([cls] included), from which a :class:`CorrelationReadout` reads the block's
    correlation. A block may accept only some grids (the released one: its training frame's).
    """

    def __call__(
        self, src: Float[Tensor, "b ns c"], trg: Float[Tensor, "b nt c"], grid: tuple[int, int]
    ) -> tuple[Float[Tensor, "b ns c"], Float[Tensor, "b nt c"], Float[Tensor, "b g ns nt"]]: ...


@runtime_checkable
class CorrelationReadout(Protocol):
    """A block's per-head attention ``(b, g, ns, nt)`` and the token grid → its correlation
    ``(b, hs, ws, ht, wt)`` ([cls] removed), what the soft-argmax reads."""

    def __call__(self, attn: Float[Tensor, "b g ns nt"], grid: tuple[int, int]) -> Float[Tensor, "b hs ws ht wt"]: ...


@runtime_checkable
class SoftArgmaxReadout(Protocol):
    """Correlation ``(b, hs, ws, ht, wt)`` → coarse flow ``(b, 2, hs, ws)`` on the source grid,
    pointing into the target, in target-grid cells, channel 0 = x (paper Eq. 3)."""

    def __call__(self, corr: Float[Tensor, "b hs ws ht wt"]) -> Float[Tensor, "b 2 hs ws"]: ...


@runtime_checkable
class FlowUpsampler(Protocol):
    """Coarse flows of all paths and the last block's source feature map → fine flows.

    ``flow`` ``(m·b, 2, hs, ws)`` holds the m paths concatenated along the batch, **path-major**
    (``(m b)``: flow ``i`` is sample ``i mod b`` of path ``i // b``); ``features`` ``(b, c, hs, ws)``
    serves every path. Returns ``(m·b, 2, upscale·hs, upscale·ws)`` in pixels of the fine grid, in
    the same order.
    """

    def __call__(self, flow: Float[Tensor, "mb 2 hs ws"], features: Float[Tensor, "b c hs ws"]) -> Float[Tensor, "mb 2 h w"]: ...


@runtime_checkable
class FlowLoss(Protocol):
    """``(pred, target, valid) -> scalar``: a flow loss over the ``valid`` cells (``(b, h, w)``, bool);
    raises ``ValueError`` naming the shapes when ``pred`` and ``target`` differ."""

    def __call__(
        self, pred: Float[Tensor, "b 2 h w"], target: Float[Tensor, "b 2 h w"], valid: Bool[Tensor, "b h w"]
    ) -> Float[Tensor, ""]: ...
