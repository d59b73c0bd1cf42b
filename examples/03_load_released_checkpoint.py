"""Load a checkpoint of the released ACTR code and match two photos (the stereo pair in scikit-image).

    python examples/03_load_released_checkpoint.py [--checkpoint path/to/model_best.pth]

With a real `model_best.pth` (from the ACTR authors) the matches are meaningful; by name,
`actr_core.hub.load_pretrained("actr-spair")` downloads it into the cache once (`actr download
actr-spair`; docs/hub.md). Without one, the example writes a randomly initialised checkpoint in the
released format (same key names and shapes) into a temporary folder that it removes afterwards, so
that the loading path is shown end to end offline; its matches are random.
Writes examples_out/03_matches.png.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from skimage import data

from actr_core import Matcher
from actr_core.models import actr_released, to_official_state_dict
from actr_core.viz import plot_matches

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", type=Path, help="the released model_best.pth")
args = parser.parse_args()

with tempfile.TemporaryDirectory() as scratch:  # removed at the end of the block, with the 691 MB file
    checkpoint = args.checkpoint
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = Path(scratch) / "model_best.pth"
        model = actr_released()  # ViT-B/16 + decoder, random weights (warns once)
        torch.save({"state_dict": to_official_state_dict(model)}, checkpoint)
        del model
        print(f"no --checkpoint: wrote a random one in the released format to {checkpoint} (removed afterwards)")
    matcher = Matcher.from_released(checkpoint)  # strict key mapping; 256×256 input as released
left, right, _ = data.stereo_motorcycle()
h, w = left.shape[:2]
query = torch.tensor([[x, y] for y in (0.3 * h, 0.5 * h, 0.7 * h) for x in (0.25 * w, 0.5 * w, 0.75 * w)])
result = matcher(left, right, query)
for (xs, ys), (xt, yt), c in zip(query.tolist(), result.keypoints.tolist(), result.confidence.tolist(), strict=True):
    print(f"({xs:6.1f}, {ys:6.1f}) -> ({xt:6.1f}, {yt:6.1f})  confidence {c:.2f}")
out = Path("examples_out")
out.mkdir(exist_ok=True)
good = result.confidence >= 0.5
plot_matches(left, right, query, result.keypoints, None, good, out / "03_matches.png", title="green: cycle-consistent")
print(f"wrote {out / '03_matches.png'}")
