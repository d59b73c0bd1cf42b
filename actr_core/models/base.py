"""The one interface every correspondence model implements, its output, and the input checks.

Axis legend: b batch · H W input frame · h w flow grid (H/4, W/4) · m paths · hs ws source grid ·
ht wt target grid · n keypoints · 2 (x, y), channel 0 = x.

Every model (ACTR as described, ACTR as released, the Baseline, MMNet) is a
:class:`CorrespondenceModel`:

* ``forward(src, trg) -> MatchOutput`` with at least ``flow`` ``(b, 2, H/4, W/4)``: defined on the
  source grid, pointing into the target, in pixels of that H/4 × W/4 grid;
* ``loss(output, batch) -> scalar``: the model's own training objective on a batch of the shard
  schema (``"flow"``, ``"valid_flow"``, ``"src_kps"``, ...);
* ``transfer(output, src_kps, valid=None) -> trg_kps``: keypoints in input-frame pixels.

Training, evaluation and the user-facing matcher only call these three, so they never
special-case a model.
"""

import abc
import dataclasses
from typing import Any

from jaxtyping import Bool, Float
from torch import Tensor, nn

from actr_core.batch import PairBatch
from actr_core.flow import FLOW_STRIDE, rescale_keypoints, transfer_keypoints

__all__ = ["MatchOutput", "CorrespondenceModel", "check_image", "check_image_pair", "parameter_count"]

IMAGE_CHANNELS = 3  # RGB, ImageNet-normalised (docs/conventions.md)


@dataclasses.dataclass(frozen=True)
class MatchOutput:
    """What a :class:`CorrespondenceModel` returns. Only ``flow`` is mandatory.

    Attributes:
        flow: final flow ``(b, 2, h, w)`` on the source grid at a quarter of the input size, in
            pixels of that grid, pointing into the target.
        flows_per_path: the flow of every path before the multi-path mean, ``(b, m, 2, h, w)``.
        coarse_flows: the per-path flows before super-resolution, ``(b, m, 2, hs, ws)``, in cells
            of the token grid.
        correlations: per-path correlation ``(b, m, hs, ws, ht, wt)`` (what the soft-argmax reads).
    """

    flow: Float[Tensor, "b 2 h w"]
    flows_per_path: Float[Tensor, "b m 2 h w"] | None = None
    coarse_flows: Float[Tensor, "b m 2 hs ws"] | None = None
    correlations: Float[Tensor, "b m hs ws ht wt"] | None = None


def check_image(image: Any, *, multiple: int = 16, name: str = "image") -> tuple[int, int]:
    """Check one model input: a float ``(b, 3, H, W)`` tensor with H and W multiples of ``multiple``.

    Returns ``(H, W)``; raises ``ValueError`` naming the offending values.
    """
    if not isinstance(image, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.ndim != 4:
        raise ValueError(f"{name} has shape {tuple(image.shape)}: expected (b, 3, H, W)")
    if not image.is_floating_point():
        raise ValueError(
            f"{name} has dtype {image.dtype}: expected a floating-point, ImageNet-normalised image "
            "(convert integer images with .float() and normalise them first)"
        )
    b, c, h, w = image.shape
    if c != IMAGE_CHANNELS:
        raise ValueError(f"{name} has shape {tuple(image.shape)}: expected {IMAGE_CHANNELS} channels, got {c}")
    if b == 0:
        raise ValueError(f"{name} has shape {tuple(image.shape)}: the batch is empty")
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise ValueError(f"{name} has shape {tuple(image.shape)}: H and W must be positive multiples of {multiple}")
    return int(h), int(w)


def check_image_pair(src: Any, trg: Any, multiple: int = 16) -> tuple[int, int]:
    """Check a source/target pair of model inputs and return their common ``(H, W)``.

    Both must be float ``(b, 3, H, W)`` tensors of the same batch size and frame size, with H and W
    multiples of ``multiple`` (the patch size of ViT models). Raises ``ValueError`` naming the values.
    """
    src_size = check_image(src, multiple=multiple, name="src")
    trg_size = check_image(trg, multiple=multiple, name="trg")
    if src.shape[0] != trg.shape[0]:
        raise ValueError(
            f"src has batch size {src.shape[0]} but trg has batch size {trg.shape[0]} "
            f"(shapes {tuple(src.shape)} and {tuple(trg.shape)})"
        )
    if src_size != trg_size:
        raise ValueError(
            f"src is {src_size[0]}x{src_size[1]} but trg is {trg_size[0]}x{trg_size[1]}: "
            "source and target enter a model at the same size (resize them first)"
        )
    if src.dtype != trg.dtype or src.device != trg.device:
        raise ValueError(f"src ({src.dtype}, {src.device}) and trg ({trg.dtype}, {trg.device}) must share dtype and device")
    return src_size


class CorrespondenceModel(nn.Module, abc.ABC):
    """Base class of every model: ``forward``, ``loss`` and ``transfer`` (see the module docstring).

    (``actr_core.Matcher``, the one-call matcher of image files, wraps any of these models.)

    Subclasses implement ``forward`` and ``loss``; ``transfer`` works for any model whose flow grid
    is the input frame divided by :attr:`flow_stride`.
    """

    #: the flow grid is the input frame divided by this (the paper's 4h × 4w output for 16-px patches)
    flow_stride: int = FLOW_STRIDE

    @abc.abstractmethod
    def forward(self, src: Float[Tensor, "b 3 H W"], trg: Float[Tensor, "b 3 H W"]) -> MatchOutput:
        """Match ``src`` to ``trg`` (ImageNet-normalised images of the same size)."""

    @abc.abstractmethod
    def loss(self, output: MatchOutput, batch: PairBatch) -> Float[Tensor, ""]:
        """The model's own training objective on ``output = self(batch.src_image, batch.trg_image)``."""

    def transfer(
        self,
        output: MatchOutput,
        src_kps: Float[Tensor, "b n 2"],
        valid: Bool[Tensor, "b n"] | None = None,
    ) -> Float[Tensor, "b n 2"]:
        """Move source keypoints into the target with ``output.flow``.

        Keypoints enter and leave in pixels of the input frame (``flow_stride`` times the flow
        grid). Invalid keypoints come out as NaN.

        Convention:
            Pixel centres sit at integer coordinates. A keypoint x in the input frame of width W sits
            at x_g = (x + 0.5) · w/W − 0.5 on the flow grid of width w; it moves to
            x_g + flow(x_g) (bilinear, sub-pixel), which goes back to the frame as
            (x_g' + 0.5) · W/w − 0.5.
        """
        grid = tuple(output.flow.shape[-2:])
        frame = (grid[0] * self.flow_stride, grid[1] * self.flow_stride)
        on_grid = rescale_keypoints(src_kps, frame, grid)
        moved = transfer_keypoints(output.flow, on_grid, valid)
        return rescale_keypoints(moved, grid, frame)


def parameter_count(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        seen[id(p)] = p.numel()
    return sum(seen.values())
