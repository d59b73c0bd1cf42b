"""train_step / train_epoch / validate on a stand-in matcher: learning, clipping, freeze, errors, DDP."""

import dataclasses
import math

import pytest
import torch
from tolerances import float32_tolerance
from training_toys import ToyMatcher, make_batch

from actr_core.training import (
    StepSettings,
    ValidationReferences,
    all_reduce_sum,
    build_optimizer,
    build_scheduler,
    precision_settings,
    train_epoch,
    train_step,
    validate,
)

CPU = torch.device("cpu")


def _optimizer(model, **kw):
    args = dict(backbone_lr=1e-2, head_lr=5e-2, weight_decay=0.0) | kw
    return build_optimizer(model, **args)


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = ToyMatcher()
    opt = _optimizer(model)
    batch = make_batch(b=3, size=(32, 48))
    batch.flow[:] = batch.flow[:1].clone()  # one shift for the whole batch: learnable by the bias
    losses = [train_step(model, batch, opt).loss for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]
    assert model.training


def test_clipping_reports_the_norm_and_bounds_the_update():
    torch.manual_seed(0)
    model = ToyMatcher()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    result = train_step(model, make_batch(), opt, settings=StepSettings(clip_grad_norm=1e-3))
    assert result.grad_norm is not None and result.grad_norm > 1e-3
    change = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    # lr 1 x clipped norm: torch scales by max_norm / (norm + 1e-6); each of the n parameters rounds its
    # update at its own magnitude, so the update's norm errs by at most √n such roundings
    expected = 1e-3 * result.grad_norm / (result.grad_norm + 1e-6)
    n = sum(p.numel() for p in model.parameters())
    magnitude = max(b.abs().max() for b in before)
    assert change.item() == pytest.approx(expected, abs=float32_tolerance(magnitude, terms=math.ceil(n**0.5)))
    assert train_step(model, make_batch(), opt).grad_norm is None


def test_frozen_backbone_does_not_move():
    model = ToyMatcher()
    opt = _optimizer(model, freeze_backbone=True)
    backbone = [p.detach().clone() for p in model.backbone.parameters()]
    head = [p.detach().clone() for p in model.head.parameters()]
    train_step(model, make_batch(), opt)
    assert all(torch.equal(a, b) for a, b in zip(backbone, model.backbone.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(head, model.head.parameters()))


def test_non_finite_loss_raises_and_leaves_parameters():
    model = ToyMatcher()
    opt = _optimizer(model)
    model.loss = lambda output, batch: output.flow.mean() * float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="not taken"):
        train_step(model, make_batch(), opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_grad_scaler_path_runs_and_skips_on_inf():
    model = ToyMatcher()
    opt = _optimizer(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    assert not train_step(model, make_batch(), opt, scaler=scaler).skipped
    model.loss = lambda output, batch: output.flow.mean() * float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    assert train_step(model, make_batch(), opt, scaler=scaler).skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_precision_settings():
    assert precision_settings("bf16", CPU) == (None, False)  # CPU always runs float32
    assert precision_settings("fp16", torch.device("cuda")) == (torch.float16, True)
    assert precision_settings("bf16", torch.device("cuda")) == (torch.bfloat16, False)
    with pytest.raises(ValueError, match="precision"):
        precision_settings("fp8", CPU)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        StepSettings(clip_grad_norm=-1.0)


def test_train_epoch_takes_exactly_the_steps_and_steps_the_schedule():
    model = ToyMatcher()
    opt = _optimizer(model)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=5, schedule="constant")
    batches = (make_batch(seed=i) for i in range(100))
    seen = []
    losses = train_epoch(model, batches, opt, sched, steps=4, device=CPU, on_step=lambda i, r: seen.append(i))
    assert len(losses) == 4 and seen == [0, 1, 2, 3] and sched.last_epoch == 4
    assert all(math.isfinite(x) for x in losses)


def test_train_epoch_fails_clearly_when_data_runs_out():
    model = ToyMatcher()
    with pytest.raises(RuntimeError, match="after 2 of 3 batches"):
        train_epoch(model, [make_batch(), make_batch()], _optimizer(model), None, steps=3, device=CPU)


def test_validate_perfect_model_scores_one_and_loss_zero():
    model = ToyMatcher()
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    batch = make_batch(b=3)
    batch.flow.zero_()
    batch = dataclasses.replace(batch, trg_kps=batch.src_kps.clone(), trg_kps_orig=batch.src_kps_orig.clone())
    model.train()
    result = validate(model, [batch, batch], device=CPU, alpha=0.1)
    assert result.pck == 1.0 and result.loss == 0.0  # exact: every keypoint correct, every error 0
    assert (result.batches, result.pairs) == (2, 6)
    assert model.training  # mode restored


def test_validate_max_batches_and_untrained_model():
    model = ToyMatcher()
    result = validate(model, [make_batch(seed=i) for i in range(5)], device=CPU, alpha=0.1, max_batches=2)
    assert result.batches == 2 and 0.0 <= result.pck <= 1.0 and math.isfinite(result.loss)


def test_validate_reports_eq4_beside_the_objective():
    """flow_epe is Eq. 4 of the model's flow whatever the model's own loss adds (here: 3 × Eq. 4)."""
    from actr_core.blocks import masked_flow_loss

    class Tripled(ToyMatcher):
        def loss(self, output, batch):
            return 3.0 * super().loss(output, batch)

    torch.manual_seed(0)
    model = Tripled()
    batches = [make_batch(seed=i) for i in range(3)]
    result = validate(model, batches, device=CPU, alpha=0.1)
    with torch.no_grad():
        per_batch = [float(masked_flow_loss(model(b.src_image, b.trg_image).flow, b.flow, b.valid_flow)) for b in batches]
    expected = sum(per_batch) / 3
    assert result.flow_epe == pytest.approx(expected, abs=float32_tolerance(expected, terms=len(per_batch)))
    assert result.loss == pytest.approx(3 * expected, abs=float32_tolerance(3 * expected, terms=len(per_batch)))


def test_validate_skips_pairs_without_keypoints():
    batch = make_batch(b=2)
    batch.valid_kps[1] = False
    result = validate(ToyMatcher(), [batch], device=CPU, alpha=0.1)
    assert result.pairs == 1


def test_single_process_ddp(tmp_path):
    """train_step and validate through a DistributedDataParallel wrapper (gloo, world size 1)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(ToyMatcher())
        opt = _optimizer(model)
        assert math.isfinite(train_step(model, make_batch(), opt).loss)
        result = validate(model, [make_batch()], device=CPU, alpha=0.1)
        expected = _identity_pck_by_hand([make_batch()])
        # per-pair scores of 0 or 1 summed over 2 pairs, one division
        assert result.pairs == 2
        assert result.references["identity"] == pytest.approx(expected, abs=float32_tolerance(expected, terms=3))
        # exact: one rank
        torch.testing.assert_close(all_reduce_sum(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]), atol=0, rtol=0)
    finally:
        torch.distributed.destroy_process_group()


def _identity_pck_by_hand(batches, alpha=0.1):
    """Each toy pair moves all its keypoints by one shift s (grid cells = 4 input px = 8 original px);
    the target box side is 2W - 1 = 95 original px, so identity is right on a pair when 8|s| <= 95 alpha."""
    per_pair = []
    for batch in batches:
        shift = batch.flow[:, :, 0, 0].norm(dim=1)
        for i in range(shift.shape[0]):
            if batch.valid_kps[i].any():
                per_pair.append(float(8 * shift[i] <= 95 * alpha))
    return sum(per_pair) / len(per_pair)


def test_validate_scores_identity_on_the_same_pairs():
    batches = [make_batch(b=3, seed=i) for i in range(4)]
    result = validate(ToyMatcher(), batches, device=CPU, alpha=0.1)
    assert list(result.references) == ["identity"] and result.reference_fallbacks == {"identity": 0}
    expected = _identity_pck_by_hand(batches)
    assert 0.0 < expected < 1.0  # the toy shifts put pairs on both sides of the radius
    # per-pair scores of 0 or 1 summed over 12 pairs, one division
    assert result.references["identity"] == pytest.approx(expected, abs=float32_tolerance(expected, terms=13))
    assert validate(ToyMatcher(), batches, device=CPU, alpha=0.1, references=None).references == {}


def test_validation_references_are_computed_once_per_pair():
    batches = [make_batch(seed=i) for i in range(3)]
    references = ValidationReferences(("identity",))
    first = validate(ToyMatcher(), batches, device=CPU, alpha=0.1, references=references)
    assert references.batches_run == 3
    second = validate(ToyMatcher(), batches[::-1], device=CPU, alpha=0.1, references=references)  # any order
    assert references.batches_run == 3  # nothing recomputed
    assert second.references == first.references and second.pairs == first.pairs
    validate(ToyMatcher(), batches, device=CPU, alpha=0.2, references=references)  # another alpha: new scores
    assert references.batches_run == 6
    unnamed = [dataclasses.replace(batches[0], pair_id=("", ""))]
    validate(ToyMatcher(), unnamed, device=CPU, alpha=0.1, references=references)
    validate(ToyMatcher(), unnamed, device=CPU, alpha=0.1, references=references)
    assert references.batches_run == 8  # unnamed pairs: nothing to key on


def test_validate_with_the_peer_counts_its_fallbacks():
    batch = make_batch(b=2)
    batch.src_image.zero_()  # blank images: the peer falls back to identity on both pairs
    batch.trg_image.zero_()
    result = validate(ToyMatcher(), [batch], device=CPU, alpha=0.1, references=ValidationReferences())
    assert list(result.references) == ["identity", "classical_peer"]
    assert result.reference_fallbacks == {"identity": 0, "classical_peer": 2}
    assert result.references["classical_peer"] == result.references["identity"]
    with pytest.raises(ValueError, match="unknown reference"):
        ValidationReferences(("identity", "sift"))
    with pytest.raises(ValueError, match="string"):
        ValidationReferences("identity")


def _validate_on_rank(rank: int, world: int, store: str, out: str) -> None:
    import json

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model, references = ToyMatcher(), ValidationReferences(("identity",))
        mine = [make_batch(b=3, seed=10 * rank + i) for i in range(rank + 1)]  # ranks see different pairs
        results = [validate(model, mine, device=CPU, alpha=0.1, references=references) for _ in range(2)]
        with open(f"{out}.{rank}", "w") as f:
            json.dump([[r.pck, r.pairs, dict(r.references)] for r in results], f)
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_gets_the_same_reference_totals(tmp_path):
    """Two gloo ranks with different validation pairs: both report the totals over all pairs, every epoch."""
    import json

    args = (2, str(tmp_path / "store"), str(tmp_path / "out"))
    torch.multiprocessing.start_processes(_validate_on_rank, args=args, nprocs=2, start_method="fork")
    per_rank = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in range(2)]
    assert per_rank[0] == per_rank[1]
    everything = [make_batch(b=3, seed=0), make_batch(b=3, seed=10), make_batch(b=3, seed=11)]
    (pck, pairs, references), again = per_rank[0]
    assert again == [pck, pairs, references] and pairs == 9  # 3 batches of 3 pairs
    expected = _identity_pck_by_hand(everything)
    # per-pair scores of 0 or 1 summed over 9 pairs, one division
    assert references["identity"] == pytest.approx(expected, abs=float32_tolerance(expected, terms=10))
