"""A custom matcher from actr_core's blocks in under 40 lines (CPU, seconds): ViT → Eq. 2 → Eq. 3."""

import torch

from actr_core.batch import PairBatch
from actr_core.blocks import MultiHeadCorrelation, masked_flow_loss, soft_argmax
from actr_core.flow import resize_flow
from actr_core.models import CorrespondenceModel, MatchOutput, create_vit


class CorrelationMatcher(CorrespondenceModel):
    """A shared ViT, one multi-head correlation (Eq. 2), soft-argmax (Eq. 3), bilinear ×4 flow."""

    def __init__(self, tau: float = 0.02):
        super().__init__()
        self.backbone = create_vit("vit_tiny_patch16_224", depth=2, warn_random_init=False)
        self.correlation = MultiHeadCorrelation(self.backbone.embed_dim, num_heads=3)
        self.tau = tau

    def forward(self, src, trg):
        grid = self.backbone.grid_size(*src.shape[-2:])
        corr = self.correlation(self.backbone(src), self.backbone(trg), src_size=grid, trg_size=grid)
        coarse = soft_argmax(corr, self.tau)  # (b, 2, h, w) in token-grid cells
        return MatchOutput(flow=resize_flow(coarse, (4 * grid[0], 4 * grid[1])))

    def loss(self, output, batch):
        return masked_flow_loss(output.flow, batch.flow, batch.valid_flow)  # Eq. 4


model = CorrelationMatcher()
src, trg = torch.randn(2, 3, 64, 96), torch.randn(2, 3, 64, 96)  # any multiple of 16, H ≠ W
out = model(src, trg)
batch = PairBatch.build(src, trg, flow=torch.zeros(2, 2, 16, 24), valid_flow=torch.rand(2, 16, 24) > 0.5)
model.loss(out, batch).backward()
kps = model.transfer(out, torch.tensor([[[10.0, 20.0]], [[40.0, 8.0]]]))
print(f"flow {tuple(out.flow.shape)}, transferred keypoints {kps.tolist()}")
print(f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
