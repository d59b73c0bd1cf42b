"""Table 4 ablations and the Baseline as compositions: each builds, runs, trains every parameter,
and differs from ACTR in exactly the parts it names (tiny configs, small non-square frames)."""

import pytest
import torch
from tolerances import float32_tolerance

from actr_core.batch import PairBatch
from actr_core.blocks import DualWindowFlowSR
from actr_core.flow import resize_flow
from actr_core.models import ABLATIONS, ACTR, actr_tiny, baseline, parameter_count
from actr_core.models.actr import (
    AsymmetricCrossAttention,
    BilinearFlowUpsampling,
    CrossAttentionMap,
    LearnedSourcePE,
    NoSourcePE,
    PlainTargetBranch,
    SalientTargetBranch,
    SymmetricCrossAttention,
)
from actr_core.models.builders import ACTR_TINY_CONFIG, COMPOSITIONS
from actr_core.models.config import VARIANTS

SIZE = (48, 80)  # 3 × 5 tokens, a 12 × 20 flow grid: non-square, not a multiple of the 8-px window
M = ACTR_TINY_CONFIG.num_blocks


def _build(variant: str) -> ACTR:
    torch.manual_seed(0)
    if variant == "baseline":
        return baseline(ACTR_TINY_CONFIG, warn_random_init=False)
    return actr_tiny(ablation=None if variant == "actr" else variant, warn_random_init=False)


@pytest.fixture(scope="module")
def reference() -> ACTR:
    return _build("actr")


def test_every_variant_has_a_composition() -> None:
    assert set(COMPOSITIONS) == set(VARIANTS)
    assert set(ABLATIONS) < set(VARIANTS)
    assert len(ABLATIONS) == 6  # Table 4


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_runs_and_trains_every_parameter(variant: str) -> None:
    model = _build(variant).train()
    assert model.config.variant == variant
    gen = torch.Generator().manual_seed(1)
    src, trg = torch.randn(2, 3, *SIZE, generator=gen), torch.randn(2, 3, *SIZE, generator=gen)
    out = model(src, trg)
    m = model.num_paths
    h, w = SIZE[0] // 16, SIZE[1] // 16
    assert out.flow.shape == (2, 2, 4 * h, 4 * w)
    assert out.flows_per_path.shape == (2, m, 2, 4 * h, 4 * w)
    assert out.coarse_flows.shape == (2, m, 2, h, w)
    assert torch.isfinite(out.flow).all() and torch.isfinite(out.flows_per_path).all()
    valid = torch.rand(2, 4 * h, 4 * w, generator=gen) < 0.3
    loss = model.loss(out, PairBatch.build(src, trg, flow=torch.randn(out.flow.shape, generator=gen), valid_flow=valid))
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"{variant}: no gradient for {missing}"
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not bad, f"{variant}: non-finite gradient for {bad}"


def _kinds(model: ACTR, attr: str) -> set[type]:
    return {type(getattr(block, attr)) for block in model.blocks}


def test_no_source_pe(reference: ACTR) -> None:
    model = _build("no_source_pe")
    assert _kinds(reference, "source_pe") == {LearnedSourcePE}
    assert _kinds(model, "source_pe") == {NoSourcePE}
    h, w = ACTR_TINY_CONFIG.token_grid
    dim = model.backbone.embed_dim
    assert parameter_count(reference) - parameter_count(model) == M * (1 + h * w) * dim


def test_no_target_reweighting(reference: ACTR) -> None:
    model = _build("no_target_reweighting")
    assert _kinds(reference, "target_branch") == {SalientTargetBranch}
    assert _kinds(model, "target_branch") == {PlainTargetBranch}
    assert parameter_count(model) == parameter_count(reference)  # reweighting has no parameters
    assert _kinds(model, "cross") == {AsymmetricCrossAttention}


def test_no_asymmetric_cross_attention_uses_baseline_blocks() -> None:
    model = _build("no_asymmetric_cross_attention")
    assert _kinds(model, "cross") == {SymmetricCrossAttention}
    assert _kinds(model, "source_pe") == {NoSourcePE}
    assert _kinds(model, "target_branch") == {PlainTargetBranch}
    assert isinstance(model.upsampler, DualWindowFlowSR)
    assert model.path_blocks == tuple(range(M))


def test_no_multi_path(reference: ACTR) -> None:
    model = _build("no_multi_path")
    assert reference.path_blocks == tuple(range(M))
    assert model.path_blocks == (M - 1,)
    assert parameter_count(model) == parameter_count(reference)


def test_single_window(reference: ACTR) -> None:
    model = _build("single_window")
    windows = {b.attn.window_size for r in model.upsampler.rounds for b in r.branches}
    assert windows == {ACTR_TINY_CONFIG.single_window_size}
    assert {b.attn.window_size for r in reference.upsampler.rounds for b in r.branches} == {4, 8}
    assert [b.attn.shift for r in model.upsampler.rounds for b in r.branches] == [0, ACTR_TINY_CONFIG.flow_sr.shift]


def test_no_flow_sr_is_bilinear_multi_path(reference: ACTR) -> None:
    model = _build("no_flow_sr").eval()
    assert isinstance(model.upsampler, BilinearFlowUpsampling)
    assert model.path_blocks == tuple(range(M))
    # nothing reads the final tokens: the last block computes only its attention map
    assert isinstance(model.blocks[-1].cross, CrossAttentionMap)
    assert all(isinstance(b.cross, AsymmetricCrossAttention) for b in model.blocks[:-1])
    dim = model.backbone.embed_dim
    removed = parameter_count(reference.upsampler) + 2 * dim * dim + 2 * dim  # SR, last W_V and proj
    assert parameter_count(reference) - parameter_count(model) == removed
    src, trg = torch.randn(1, 3, *SIZE), torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        out = model(src, trg)
    for path in range(model.num_paths):
        expected = resize_flow(out.coarse_flows[:, path], out.flow.shape[-2:])
        # 4 bilinear weights and the scaling, all paths in one call there
        torch.testing.assert_close(out.flows_per_path[:, path], expected, atol=float32_tolerance(expected, terms=5), rtol=0)


def test_baseline() -> None:
    model = _build("baseline")
    assert isinstance(model.upsampler, BilinearFlowUpsampling)
    assert model.path_blocks == (M - 1,)
    assert _kinds(model, "source_pe") == {NoSourcePE}
    assert _kinds(model, "target_branch") == {PlainTargetBranch}
    assert all(isinstance(b.cross, SymmetricCrossAttention) for b in model.blocks[:-1])
    assert isinstance(model.blocks[-1].cross, CrossAttentionMap)
    with pytest.raises(ValueError, match="variant"):
        baseline(ACTR_TINY_CONFIG, variant="actr")


def test_swapped_part_is_in_use() -> None:
    """Same weights, the source PE removed: the flow changes (the PE really enters the forward)."""
    src, trg = torch.randn(1, 3, *SIZE), torch.randn(1, 3, *SIZE)
    full = _build("actr").eval()
    torch.nn.init.normal_(full.blocks[0].source_pe.pe, std=0.5)  # zero-initialised: make it matter
    ablated = _build("no_source_pe").eval()
    result = ablated.load_state_dict(full.state_dict(), strict=False)
    assert not result.missing_keys and all("source_pe" in k for k in result.unexpected_keys)
    with torch.no_grad():
        assert not torch.allclose(full(src, trg).flow, ablated(src, trg).flow)
