"""Soft-argmax and flow geometry, by picture.

A one-hot correlation gives an exact integer flow; a temperature spreads it; the flow is resized
(positions by the pixel-centre rule, values by the grid ratio) and used to warp and to move
keypoints. Writes examples_out/02_soft_argmax.png. `python examples/02_soft_argmax_and_flow_geometry.py`
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from actr_core.blocks import soft_argmax
from actr_core.flow import resize_flow, transfer_keypoints, warp
from actr_core.viz import flow_to_colour

out_dir = Path("examples_out")
out_dir.mkdir(exist_ok=True)
hs, ws, ht, wt = 6, 8, 6, 8

# 1. every source cell matches the target cell two columns right and one row down (clamped)
corr = torch.zeros(1, hs, ws, ht, wt)
for y in range(hs):
    for x in range(ws):
        corr[0, y, x, min(y + 1, ht - 1), min(x + 2, wt - 1)] = 1.0
sharp = soft_argmax(corr, 0.01)  # tau divides: small tau ≈ argmax → integer flow
soft = soft_argmax(corr, 0.5)  # large tau pulls every match towards the target's centre
print("sharp flow at (0, 0):", sharp[0, :, 0, 0].tolist(), "(x, y) cells")
print("soft  flow at (0, 0):", [round(v, 2) for v in soft[0, :, 0, 0].tolist()])

# 2. resize to a 4x finer grid: values become pixels of the new grid
fine = resize_flow(sharp, (4 * hs, 4 * ws))
print("fine flow at the centre:", fine[0, :, 12, 16].tolist(), "(x 4 the coarse value)")

# 3. warp a target image into the source frame, and move a keypoint
target = torch.zeros(1, 3, 4 * ht, 4 * wt)
target[:, :, 8:16, 12:24] = torch.tensor([1.0, 0.6, 0.1]).view(1, 3, 1, 1)
warped = warp(target, fine)
kp = torch.tensor([[[4.0, 4.0]]])
print("keypoint (4, 4) moves to", transfer_keypoints(fine, kp)[0, 0].tolist())

fig, axes = plt.subplots(1, 4, figsize=(13, 3))
for ax, img, title in zip(
    axes,
    [flow_to_colour(sharp[0]), flow_to_colour(soft[0]), target[0].permute(1, 2, 0), warped[0].permute(1, 2, 0)],
    ["soft-argmax, tau=0.01", "soft-argmax, tau=0.5", "target", "target warped into the source frame"],
    strict=True,
):
    ax.imshow(img)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.tight_layout()
fig.savefig(out_dir / "02_soft_argmax.png", dpi=100)
print(f"wrote {out_dir / '02_soft_argmax.png'}")
