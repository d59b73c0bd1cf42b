"""Parameter groups (backbone vs heads), backbone freeze, warm-up + cosine / constant schedules."""

import itertools
import math

import pytest
import torch
from torch import nn
from training_toys import ToyMatcher

from actr_core.training import build_optimizer, build_scheduler, lr_multiplier, parameter_groups


def test_groups_split_backbone_from_heads():
    model = ToyMatcher()
    groups = parameter_groups(model, backbone_lr=6e-6, head_lr=6e-5, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["backbone", "heads"]
    backbone, heads = groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in heads["params"]} == {id(p) for p in model.head.parameters()}
    assert (backbone["lr"], heads["lr"], heads["weight_decay"]) == (6e-6, 6e-5, 0.05)


def test_freeze_leaves_backbone_out_and_stops_its_gradient():
    model = ToyMatcher()
    opt = build_optimizer(model, backbone_lr=1e-3, head_lr=1e-3, weight_decay=0.0, freeze_backbone=True)
    assert [g["name"] for g in opt.param_groups] == ["heads"]
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_model_without_backbone_raises():
    with pytest.raises(ValueError, match="backbone"):
        parameter_groups(nn.Linear(2, 2), backbone_lr=1.0, head_lr=1.0, weight_decay=0.0)


def test_nothing_to_train_raises():
    class OnlyBackbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no trainable"):
        parameter_groups(OnlyBackbone(), backbone_lr=1.0, head_lr=1.0, weight_decay=0.0, freeze_backbone=True)


def test_ddp_like_wrapper_is_unwrapped():
    model = nn.DataParallel(ToyMatcher())
    assert len(parameter_groups(model, backbone_lr=1.0, head_lr=1.0, weight_decay=0.0)) == 2


def test_warmup_is_linear_then_constant():
    values = [lr_multiplier(s, total_steps=10, warmup_steps=4, schedule="constant") for s in range(10)]
    assert values == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_cosine_known_values():
    kw = dict(total_steps=12, warmup_steps=2, schedule="cosine", min_ratio=0.1)
    assert lr_multiplier(2, **kw) == pytest.approx(1.0)
    assert lr_multiplier(7, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_multiplier(12, **kw) == pytest.approx(0.1)
    assert lr_multiplier(50, **kw) == pytest.approx(0.1)  # past the end it stays at the floor
    decay = [lr_multiplier(s, **kw) for s in range(2, 13)]
    assert all(a >= b for a, b in itertools.pairwise(decay))


def test_scheduler_scales_each_group_and_restores():
    model = ToyMatcher()
    opt = build_optimizer(model, backbone_lr=1e-5, head_lr=1e-4, weight_decay=0.05)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, schedule="cosine")
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5e-5, 0.5e-4])
    for _ in range(6):
        opt.step()
        sched.step()
    expected = 0.5 * (1 + math.cos(math.pi * 4 / 8))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5 * expected, 1e-4 * expected])
    opt2 = build_optimizer(ToyMatcher(), backbone_lr=1e-5, head_lr=1e-4, weight_decay=0.05)
    sched2 = build_scheduler(opt2, total_steps=10, warmup_steps=2, schedule="cosine")
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])


@pytest.mark.parametrize("kwargs", [dict(step=-1), dict(schedule="step", step=5)])
def test_schedule_errors(kwargs):
    args = dict(total_steps=10, warmup_steps=2, schedule="cosine") | kwargs
    step = args.pop("step")
    with pytest.raises(ValueError):
        lr_multiplier(step, **args)


def test_scheduler_needs_steps():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(opt, total_steps=0, warmup_steps=0, schedule="constant")
