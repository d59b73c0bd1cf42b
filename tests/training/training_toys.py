"""A tiny stand-in matcher and PairBatch batches, for the training tests.

Axis legend: b batch · H W input frame · h w flow grid (H/4, W/4) · n keypoints · c channels.
"""

import torch
from jaxtyping import Float
from torch import Tensor, nn

from actr_core.batch import PairBatch
from actr_core.blocks import masked_flow_loss
from actr_core.models import CorrespondenceModel, MatchOutput, model_entries, register_model

STRIDE = 4  # the matcher interface's flow stride


class ToyMatcher(CorrespondenceModel):
    """``backbone``: a stride-4 patch conv; head: a 1x1 conv from both feature maps to a flow."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.backbone = nn.Conv2d(3, channels, kernel_size=STRIDE, stride=STRIDE)
        self.head = nn.Conv2d(2 * channels, 2, kernel_size=1)

    def forward(self, src: Float[Tensor, "b 3 H W"], trg: Float[Tensor, "b 3 H W"]) -> MatchOutput:
        features = torch.cat([self.backbone(src), self.backbone(trg)], dim=1)
        return MatchOutput(flow=self.head(features))

    def loss(self, output: MatchOutput, batch: PairBatch) -> Float[Tensor, ""]:
        return masked_flow_loss(output.flow, batch.flow, batch.valid_flow)


TOY_NAME = "training_toy"  # registered in actr_core.models' registry for the checkpoint tests


def toy_matcher(channels: int = 8) -> ToyMatcher:
    """Builder of the stand-in, registered as :data:`TOY_NAME`."""
    return ToyMatcher(channels)


if TOY_NAME not in {entry.name for entry in model_entries()}:
    register_model(TOY_NAME)(toy_matcher)


def make_batch(b: int = 2, size: tuple[int, int] = (32, 48), n: int = 5, seed: int = 0) -> PairBatch:
    """A batch whose ground-truth flow is a constant shift per pair (H != W by default)."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    h, w = H // STRIDE, W // STRIDE
    shift = torch.randn(b, 2, generator=g) * 2
    src_kps = torch.rand(b, n, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])
    trg_kps = src_kps + shift[:, None] * STRIDE
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[-1, -1] = False
    src_kps[~valid] = 0
    trg_kps[~valid] = 0
    orig = torch.tensor([[H * 2, W * 2]] * b)
    to_orig = torch.tensor([2.0, 2.0])
    return PairBatch.build(
        torch.randn(b, 3, H, W, generator=g),
        torch.randn(b, 3, H, W, generator=g),
        src_kps,
        trg_kps,
        valid,
        flow=shift[:, :, None, None].expand(b, 2, h, w).clone(),
        src_kps_orig=(src_kps + 0.5) * to_orig - 0.5,
        trg_kps_orig=(trg_kps + 0.5) * to_orig - 0.5,
        src_size=orig,
        trg_size=orig.clone(),
        src_bbox=torch.tensor([[0.0, 0.0, W * 2 - 1.0, H * 2 - 1.0]] * b),
        trg_bbox=torch.tensor([[0.0, 0.0, W * 2 - 1.0, H * 2 - 1.0]] * b),
        category=["toy"] * b,
        pair_id=[f"p{seed}_{i}" for i in range(b)],
        dataset=["synthetic"] * b,
    )
