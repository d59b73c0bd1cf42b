"""The CPU recipe learns to match, not the mean flow: a short training from random weights beats the
best constant flow and identity on held-out pairs of other photos.

It catches any change that leaves a model able only to predict the data set's mean flow (a wrong
target convention, a detached gradient, a broken loss mask, a correlation that never sharpens):
such a model cannot beat the best constant flow on pairs whose flows differ. Fixed seeds, one
thread, about a minute; no timing assertion. The run-time shape checks are off here (every other
test exercises them) so that it fits the minute.
"""

import pytest
import torch

from actr_core.blocks import masked_flow_loss
from actr_core.data import PairBatch, collate
from actr_core.data.samples import build_sample
from actr_core.data.synthetic import SyntheticConfig, SyntheticPairs
from actr_core.metrics import IdentityPredictor, best_constant_flow, get_protocol, score_batch
from actr_core.models import actr_conv_tiny
from actr_core.training import StepSettings, build_optimizer, build_scheduler, train_step

SIZE = 64  # frame: an 8 × 8 token grid at stride 8, a 16 × 16 flow grid
TRAIN_PAIRS, VAL_PAIRS = 128, 48  # train photos vs the validation photos (held out)
STEPS, BATCH = 200, 8
LR = 2e-3  # measured: at 64 px, 2e-3 learns within 200 steps for seeds 0, 1, 2 (1e-3 does not)
ALPHA = 0.1


def _pairs(split: str, n: int) -> PairBatch:
    reader = SyntheticPairs(split, n, config=SyntheticConfig(size=(SIZE, SIZE)), seed=0)
    return collate([build_sample(reader.load(i), SIZE) for i in range(n)])


def _pck(matcher, output, batch) -> float:
    scores = score_batch(matcher, batch, get_protocol("standard"), (ALPHA,), output=output)
    n_valid = scores.valid.sum(axis=1)
    scored = n_valid > 0
    return float((scores.n_correct[0][scored] / n_valid[scored]).mean())


@pytest.mark.slow
@pytest.mark.usefixtures("no_typecheck")
def test_short_training_beats_the_best_constant_flow_and_identity_on_held_out_photos():
    torch.manual_seed(0)
    train, val = _pairs("train", TRAIN_PAIRS), _pairs("val", VAL_PAIRS)
    model = actr_conv_tiny(image_size=(SIZE, SIZE), warn_random_init=False)
    optimizer = build_optimizer(model, backbone_lr=LR, head_lr=LR, weight_decay=0.05)
    scheduler = build_scheduler(optimizer, total_steps=STEPS, warmup_steps=10, schedule="cosine", min_ratio=0.1)
    order = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        pick = torch.randint(TRAIN_PAIRS, (BATCH,), generator=order)
        picked = PairBatch.build(
            train.src_image[pick], train.trg_image[pick], flow=train.flow[pick], valid_flow=train.valid_flow[pick]
        )
        result = train_step(model, picked, optimizer, settings=StepSettings())
        scheduler.step()
        losses.append(result.loss)
    assert sum(losses[-20:]) < 0.8 * sum(losses[:20])  # the training loss fell

    model.eval()
    with torch.no_grad():
        output = model(val.src_image, val.trg_image)
        identity = IdentityPredictor()
        identity_output = identity(val.src_image, val.trg_image)
    flow, valid = val.flow, val.valid_flow
    model_loss = float(masked_flow_loss(output.flow, flow, valid))
    constant = best_constant_flow(flow, valid).view(1, 2, 1, 1).expand_as(flow).contiguous()
    constant_loss = float(masked_flow_loss(constant, flow, valid))
    zero_loss = float(masked_flow_loss(torch.zeros_like(flow), flow, valid))
    assert constant_loss <= zero_loss  # the constant is the best one: no worse than zero motion
    # measured (seeds 0, 1, 2): model 2.21-2.35 px against 2.57 px for the best constant flow
    assert model_loss < 0.97 * constant_loss, (model_loss, constant_loss)
    # measured (seeds 0, 1, 2): 34.8-39.6 % against identity's 22.8 %
    model_pck, identity_pck = _pck(model, output, val), _pck(identity, identity_output, val)
    assert model_pck > identity_pck + 0.05, (model_pck, identity_pck)
