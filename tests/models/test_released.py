"""ACTR as released: blocks, composition (the ACTR class with the released stages), checkpoint key
mapping and strict loading, and the state dicts of version 0.1.0.

Equality with the released code itself needs a checkout of it and is shown by
``pipelines/compare_released.py --actr-repo PATH`` (see docs/models.md); here the released key
names and shapes come from ``tests/fixtures/actr_released_keys.json``, which that script writes.
"""

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_released import TINY_RELEASED, tiny_released_model
from tolerances import float32_tolerance

from actr_core.batch import PairBatch
from actr_core.blocks import biased_cross_attention
from actr_core.blocks.released import (
    HeadSummedCorrelation,
    ReleasedAsymmetricBlock,
    ReleasedEPELoss,
    ReleasedFlowUpsampler,
    ReleasedSoftArgmax,
    arf,
    channel_attention,
    dino_pos_embed_interpolation,
    head_summed_correlation,
    nearest_upsample_flow,
    released_epe_loss,
    released_soft_argmax,
    released_target_reweighting,
)
from actr_core.models import (
    ACTR,
    ACTRReleasedConfig,
    MatchOutput,
    OfficialCheckpointError,
    actr_released,
    actr_tiny,
    build_model,
    load_official_actr,
    official_parameter_count,
    parameter_count,
    to_official_state_dict,
)
from actr_core.models.convert import (
    official_key_to_ours,
    official_state_dict_shapes,
    our_key_to_official,
)
from actr_core.models.released import upgrade_released_state_dict

FIXTURE = Path(__file__).parents[1] / "fixtures" / "actr_released_keys.json"
#: names and shapes of the state dict of tiny_released_model() in actr_core 0.1.0 (class ACTRReleased)
FIXTURE_0_1_0 = Path(__file__).parents[1] / "fixtures" / "actr_released_0_1_0_tiny_keys.json"


def released_table() -> dict[str, tuple[tuple[int, ...], str, bool]]:
    raw = json.loads(FIXTURE.read_text())
    return {k: (tuple(shape), dtype, is_param) for k, (shape, dtype, is_param) in raw.items()}


def meta_state_dict() -> dict[str, torch.Tensor]:
    """A released state dict with the released names and shapes (no memory: meta tensors)."""
    return {
        k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, (shape, dtype, _) in released_table().items()
    }


# ------------------------------------------------------------------------------------- the blocks


def naive_arf(x):
    """The released arithmetic, as written there (overflows for large |x|)."""
    tmp = (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x - 4))
    return torch.where(tmp < 0, torch.zeros_like(tmp), tmp)


def test_arf_equals_the_released_form_where_that_is_finite():
    x = torch.linspace(-300, 300, 60001, dtype=torch.float64)
    ref = naive_arf(x)
    finite = torch.isfinite(ref)
    assert finite[torch.abs(x) < 300].all()
    assert torch.allclose(arf(x)[finite], ref[finite], rtol=1e-12, atol=1e-15)
    x32 = torch.linspace(-80, 80, 16001)
    # float32 against the released form in float64: expm1, exp, a product, a sum and a division of terms
    # at most 1 (the numerator and denominator scaled by e^-z), results in [0, 1)
    expected = naive_arf(x32.double())
    torch.testing.assert_close(arf(x32).double(), expected, atol=float32_tolerance(1.0, terms=6), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_arf_is_stable_for_large_inputs(dtype):
    x = torch.tensor([-1e4, -1e3, -100.0, 100.0, 1e3, 1e4, 3e4], dtype=dtype, requires_grad=True)
    y = arf(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert (y[:3] == 0).all() and (y[3:] == 1).all()  # exact: e^-200 and below vanish next to 1 in every dtype
    assert torch.isnan(naive_arf(torch.tensor([100.0]))).all()  # what the released form gives in float32


def test_arf_known_values_and_slope():
    assert arf(torch.tensor(0.0)) == 0
    x = torch.tensor([1e-4], dtype=torch.float64, requires_grad=True)
    arf(x).backward()
    assert math.isclose(x.grad.item(), 2 / (1 + math.exp(-4)), rel_tol=1e-3)


def test_arf_gradcheck():
    x = torch.tensor([-2.0, -0.3, 0.2, 1.5, 40.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(arf, (x,))


def reference_cross_attention(x, y, w, b, pw, pb, heads):
    """The released arithmetic: one qkv projection of each stream, q from x, k and v from y."""
    bsz, n, c = x.shape
    qx = F.linear(x, w, b).reshape(bsz, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)[0]
    kv = F.linear(y, w, b).reshape(bsz, y.shape[1], 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = ((qx @ kv[1].transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
    out = (attn @ kv[2]).transpose(1, 2).reshape(bsz, n, c)
    return F.linear(out, pw, pb), attn.sum(1)


def test_released_cross_attention_is_biased_cross_attention_with_heads_summed():
    """The released ``cattn`` is the biased cross-attention; its map, summed over the heads, is the
    released attention (each row sums to the number of heads)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 12), torch.randn(2, 7, 12)
    w, b, pw, pb = torch.randn(36, 12), torch.randn(36), torch.randn(12, 12), torch.randn(12)
    out, attn = biased_cross_attention(x, y, w, b, pw, pb, num_heads=3)
    summed = attn.sum(dim=1)
    args64 = [t.double() for t in (x, y, w, b, pw, pb)]
    ref_out, ref_attn = reference_cross_attention(*args64, 3)
    assert summed.shape == (2, 5, 7)
    # projections over 12 channels, dots over 4, softmax over 7, a weighted sum of 7, proj over 12
    torch.testing.assert_close(out.double(), ref_out, atol=float32_tolerance(ref_out, terms=44), rtol=0)
    # probabilities err by the scores' error, at the scale of the scores; 3 heads summed
    q = F.linear(args64[0], args64[2][:12], args64[3][:12]).view(2, 5, 3, 4)
    k = F.linear(args64[1], args64[2][12:24], args64[3][12:24]).view(2, 7, 3, 4)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * 4**-0.5
    torch.testing.assert_close(summed.double(), ref_attn, atol=float32_tolerance(scores, terms=12 + 4 + 9 + 3), rtol=0)
    # each head's softmax over 7 sums to 1 (9 steps), 3 heads and 7 targets summed
    three = torch.full((2, 5), 3.0)
    torch.testing.assert_close(summed.sum(-1), three, atol=float32_tolerance(three, terms=9 + 3 + 7), rtol=0)


def test_head_summed_correlation_sums_heads_then_drops_cls_without_renormalising(no_typecheck):
    attn = torch.softmax(torch.randn(2, 3, 1 + 6, 1 + 6), dim=-1)  # 2 × 3 grids, [cls] first
    corr = head_summed_correlation(attn, src_size=(2, 3), trg_size=(2, 3))
    assert corr.shape == (2, 2, 3, 2, 3)
    expected = attn.sum(1)[:, 1:, 1:].reshape(2, 2, 3, 2, 3)
    torch.testing.assert_close(corr, expected, atol=0, rtol=0)  # exact: the same sum, then a view
    assert (corr.sum((-2, -1)) < 3).all()  # the mass on [cls] is not given back (Eq. 2 would renormalise)
    torch.testing.assert_close(HeadSummedCorrelation()(attn, (2, 3)), corr, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"attn has shape \(2, 3, 7, 7\): expected 1 prefix tokens and grids \(3, 3\)"):
        head_summed_correlation(attn, src_size=(3, 3), trg_size=(2, 3))


def test_target_reweighting_adds_weighted_target_and_stops_gradient():
    t = torch.randn(2, 3, 4, requires_grad=True)
    attention = torch.rand(2, 2, 5, 3, requires_grad=True)  # per head: the heads are summed inside
    w = torch.randn(1, 1, 4)
    out = released_target_reweighting(t, attention, w)
    h = attention.detach().sum(1).mean(1).unsqueeze(-1)
    torch.testing.assert_close(out, t + t * w * torch.sigmoid(h), atol=0, rtol=0)  # exact: the same steps
    out.sum().backward()
    assert attention.grad is None  # h is a stop-gradient input


def test_convention_released_soft_argmax_align_corners_true():
    """A one-hot correlation gives target − source index (align_corners=True grid: cell i at i);
    reading the linspace grid with the pixel-centre unnormalisation ((x+1)W − 1)/2 would not."""
    ht, wt = 3, 5
    corr = torch.zeros(1, 2, 4, ht, wt)
    corr[0, 1, 3, 2, 0] = 1.0  # source (x=3, y=1) matches target (x=0, y=2)
    grid_x, grid_y = torch.linspace(-1, 1, wt), torch.linspace(-1, 1, ht)
    flow = released_soft_argmax(corr, grid_x, grid_y, beta=1e-3)
    expected = torch.tensor([-3.0, 1.0])
    # one-hot weights, a sum over 15 cells, the align_corners=True unnormalisation (3 roundings), the source cell
    torch.testing.assert_close(flow[0, :, 1, 3], expected, atol=float32_tolerance(expected, terms=15 + 4), rtol=0)
    misread_x = ((grid_x[0] + 1) * wt - 1) / 2 - 3
    assert not math.isclose(misread_x.item(), -3.0, abs_tol=0.1)


def test_released_soft_argmax_uniform_known_value_and_gradcheck():
    corr = torch.zeros(1, 2, 2, 3, 4)
    flow = released_soft_argmax(corr, torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 3), beta=0.02)
    # softmax over 12 cells, a weighted sum of 12 positions, the unnormalisation (3), the source cell; at most 3
    tol = float32_tolerance(3.0, terms=14 + 12 + 4)
    torch.testing.assert_close(flow[0, 0], torch.tensor([[1.5, 0.5], [1.5, 0.5]]), atol=tol, rtol=0)  # E[x_t] = 1.5 minus x_s
    torch.testing.assert_close(flow[0, 1], torch.tensor([[1.0, 1.0], [0.0, 0.0]]), atol=tol, rtol=0)
    c = torch.randn(1, 2, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    gx, gy = torch.linspace(-1, 1, 3, dtype=torch.float64), torch.linspace(-1, 1, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: released_soft_argmax(v, gx, gy, beta=0.5), (c,))


def test_nearest_upsample_flow_known_values():
    flow = torch.arange(8.0).view(1, 2, 2, 2)
    up = nearest_upsample_flow(flow, 4)
    assert up.shape == (1, 2, 8, 8)
    assert torch.equal(up[0, 0, :4, :4], torch.full((4, 4), 0.0)) and torch.equal(up[0, 1, 4:, 4:], torch.full((4, 4), 28.0))


def cubic_resample_1d(values: torch.Tensor, positions: torch.Tensor, a: float = -0.75) -> torch.Tensor:
    """Cubic convolution (PyTorch's bicubic kernel, a = −0.75, border taps clamped) at ``positions``."""

    def kernel(d):
        d = d.abs()
        near = (a + 2) * d**3 - (a + 3) * d**2 + 1
        far = a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))

    base = positions.floor()
    out = torch.zeros_like(positions)
    for k in (-1, 0, 1, 2):
        index = (base + k).clamp(0, len(values) - 1).long()
        out = out + kernel(positions - (base + k)) * values[index]
    return out


def test_convention_dino_pos_embed_samples_at_the_scale_factor_positions():
    """DINO passes a scale factor (grid + 0.1)/native: it samples at x0 = (x + 0.5)·w0/(w + 0.1) − 0.5,
    not at timm's size-based (x + 0.5)·w0/w − 0.5."""
    h0, w0, h, w = 6, 8, 6, 12
    torch.manual_seed(0)
    row = torch.randn(w0, dtype=torch.float64)
    pos = torch.cat((torch.full((1,), -7.0, dtype=torch.float64), row.repeat(h0))).view(1, -1, 1)
    out = dino_pos_embed_interpolation(pos, (h, w), (h0, w0), 1)
    assert out.shape == (1, 1 + h * w, 1) and out[0, 0, 0] == -7.0  # [cls] kept
    values = out[0, 1:, 0].view(h, w)[2]  # rows are constant copies: any row
    x = torch.arange(w, dtype=torch.float64)
    dino = cubic_resample_1d(row, (x + 0.5) * w0 / (w + 0.1) - 0.5)
    timm_like = cubic_resample_1d(row, (x + 0.5) * w0 / w - 0.5)
    assert torch.allclose(values, dino, atol=1e-9)
    assert not torch.allclose(values, timm_like, atol=1e-3)
    assert dino_pos_embed_interpolation(pos, (h0, w0), (h0, w0), 1) is pos


def test_channel_attention_known_value():
    x = torch.ones(1, 4, 2, 2)
    zero = torch.zeros(2, 4, 1, 1)
    assert torch.equal(channel_attention(x, zero, torch.zeros(4, 2, 1, 1)), 1.5 * x)  # x + x·σ(0), exact: σ(0) = 0.5


def test_released_epe_loss_pools_valid_cells_and_ignores_nan():
    pred = torch.zeros(2, 2, 2, 2, requires_grad=True)
    target = torch.zeros(2, 2, 2, 2)
    target[0, 0, 0, 0] = 3.0
    target[0, 1, 0, 0] = 4.0  # EPE 5 in one cell of pair 0
    target[1] = float("nan")
    valid = torch.zeros(2, 2, 2, dtype=torch.bool)
    valid[0] = True  # pair 0: 4 valid cells, pair 1 none
    loss = released_epe_loss(pred, target, valid)
    assert loss.item() == 5.0 / 4  # pooled over the batch's valid cells; exact: sqrt(25) and quarters
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[1] == 0).all()
    assert released_epe_loss(pred, target, torch.zeros_like(valid)) == 0


# ------------------------------------------------------------------------------------- the model


def test_shapes_batch_two():
    model = tiny_released_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
    assert isinstance(out, MatchOutput)
    assert out.flow.shape == (2, 2, 16, 16)
    assert out.flows_per_path.shape == (2, 2, 2, 16, 16)
    assert out.coarse_flows.shape == (2, 2, 2, 4, 4)
    assert out.correlations.shape == (2, 2, 4, 4, 4, 4)
    assert torch.equal(out.flow, out.flows_per_path.mean(1))  # exact: the same mean
    rows = out.correlations.sum((-1, -2))  # head-summed rows sum to 2 heads, less the dropped [cls] column
    assert ((rows > 1.0) & (rows < 2.0)).all()


def test_batch_elements_are_independent():
    # in float64: a whole model's float32 rounding bound would dwarf a small leak between batch members
    model = tiny_released_model().eval().double()
    src, trg = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        both = model(src, trg).flow
        one = model(src[1:], trg[1:]).flow
    torch.testing.assert_close(both[1:], one)  # float64 defaults: 1e-7


def test_every_trainable_parameter_gets_a_gradient_and_backbone_is_frozen():
    torch.manual_seed(0)
    model = tiny_released_model(freeze_backbone=False).train()
    src, trg = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    out = model(src, trg)
    loss = model.loss(out, PairBatch.build(src, trg, flow=torch.randn(2, 2, 16, 16), valid_flow=torch.rand(2, 16, 16) > 0.5))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    frozen = tiny_released_model()
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for n, p in frozen.named_parameters() if not n.startswith("backbone."))


def test_soft_argmax_grids_are_buffers_not_parameters():
    model = tiny_released_model()
    names = {n for n, _ in model.named_parameters()}
    assert not any("grid" in n for n in names)
    assert {"soft_argmax.x_grid", "soft_argmax.y_grid"} <= set(model.state_dict())


def test_transfer_and_loss_use_the_model_interface(no_typecheck):
    model = tiny_released_model().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64))
    kps = torch.tensor([[[10.0, 20.0], [63.0, 0.0]]])
    moved = model.transfer(out, kps)
    assert moved.shape == (1, 2, 2) and torch.isfinite(moved).all()
    with pytest.raises(ValueError, match="has shape"):
        model.loss(out, PairBatch.build(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), flow=torch.zeros(1, 2, 8, 8)))


@pytest.mark.parametrize(
    ("src_shape", "trg_shape", "dtype", "match"),
    [
        ((1, 3, 64, 72), (1, 3, 64, 72), torch.float32, "multiples of 16"),
        ((2, 3, 64, 64), (1, 3, 64, 64), torch.float32, "batch size 2 but trg has batch size 1"),
        ((1, 1, 64, 64), (1, 1, 64, 64), torch.float32, "expected 3 channels"),
        ((1, 3, 64, 64), (1, 3, 64, 64), torch.int32, "dtype torch.int32"),
        ((1, 3, 128, 128), (1, 3, 128, 128), torch.float32, "a 8x8 token grid.*takes the input size it was built for"),
    ],
)
def test_bad_input_raises_value_error(no_typecheck, src_shape, trg_shape, dtype, match):
    model = tiny_released_model()
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(src_shape, dtype=dtype), torch.zeros(trg_shape, dtype=dtype))


# ---------------------------------------------------------------------------- checkpoint mapping


def test_key_mapping_round_trip_and_outputs():
    """ours → released names → load_official_actr gives the same keys, values and outputs."""
    torch.manual_seed(0)
    model = tiny_released_model().eval()
    official = to_official_state_dict(model)
    for key in model.state_dict():
        assert official_key_to_ours(our_key_to_official(key, TINY_RELEASED), TINY_RELEASED) == key
    loaded = load_official_actr({"state_dict": {f"module.{k}": v for k, v in official.items()}}, config=TINY_RELEASED).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    src, trg = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(src, trg).flow, loaded(src, trg).flow)
    assert not loaded.soft_argmax.x_grid.requires_grad
    assert not any(p.requires_grad for p in loaded.backbone.parameters())


def test_load_from_file(tmp_path):
    model = tiny_released_model()
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 3, "state_dict": to_official_state_dict(model), "best_loss": 1.0}, path)
    loaded = load_official_actr(path, config=TINY_RELEASED)
    assert torch.equal(loaded.upsampler.refiner.head[0].weight, model.upsampler.refiner.head[0].weight)


def test_released_key_table_matches_our_mapping():
    """The released names/shapes (fixture written from the released code) are exactly what our
    ViT-B model maps to, and a state dict with those names loads strictly."""
    with torch.device("meta"):
        model = actr_released(warn_random_init=False)
    table = released_table()
    assert official_state_dict_shapes(model) == {k: v[0] for k, v in table.items()}
    assert official_parameter_count(model) == 172_810_369 == sum(math.prod(s) for s, _, p in table.values() if p)
    assert parameter_count(model) == 144_245_856
    loaded = load_official_actr(meta_state_dict())
    assert isinstance(loaded, ACTR) and isinstance(loaded.config, ACTRReleasedConfig)


def test_dropped_released_keys_are_exactly_the_unused_ones():
    dropped = {k for k in released_table() if official_key_to_ours(k) is None}
    pattern = re.compile(
        r"decoder\.(blocks\.[0-4]|last_block\.0)\.(mlp2\.fc[12]\.(weight|bias)|norm[34]\.(weight|bias))"
        r"|decoder\.last_block\.0\.spatial_attention\.weight|decoder\.pos_embed_[xy]|decoder\.(proj|norm)\.(weight|bias)"
        r"|learn_parm|refine_swin_decoder_[12]_[12]\.0\.transformer\.layers\.0\.blocks\.0\.attn\.relative_position_index"
    )
    assert all(pattern.fullmatch(k) for k in dropped)
    assert len(dropped) == 6 * 8 + 1 + 2 + 4 + 1 + 4  # per block: mlp2 (4), norm3 (2), norm4 (2)
    assert "x_normal" not in dropped and "y_normal" not in dropped  # loaded into the grid buffers


def test_trained_soft_argmax_grids_are_loaded_into_buffers():
    model = tiny_released_model()
    official = to_official_state_dict(model)
    official["x_normal"] = official["x_normal"] * 0.9
    loaded = load_official_actr(official, config=TINY_RELEASED)
    assert torch.equal(loaded.soft_argmax.x_grid, official["x_normal"])
    assert "soft_argmax.x_grid" in dict(loaded.named_buffers())


def test_unknown_key_is_an_error():
    state = meta_state_dict()
    state["decoder.blocks.0.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(OfficialCheckpointError, match=r"1 keys are not keys of the released ACTR.*extra\.weight"):
        load_official_actr(state)


def test_missing_key_is_an_error_naming_the_released_key():
    state = meta_state_dict()
    del state["refine_swin_decoder_2_1.1.fc.0.weight"]
    with pytest.raises(OfficialCheckpointError, match=r"1 released keys are missing.*refine_swin_decoder_2_1\.1\.fc\.0\.weight"):
        load_official_actr(state)


def test_wrong_shapes_list_the_first_mismatched_keys():
    state = meta_state_dict()
    state["decoder.blocks.0.pos_embed"] = torch.empty(1, 197, 768, device="meta")
    state["refine2.2.weight"] = torch.empty(3, 32, 3, 3, device="meta")
    with pytest.raises(
        OfficialCheckpointError,
        match=r"2 keys have wrong shapes, first: decoder\.blocks\.0\.pos_embed: checkpoint \(1, 197, 768\) vs model \(1, 257, 768\)",
    ):
        load_official_actr(state)


def test_wrong_derived_buffer_is_an_error():
    model = tiny_released_model()
    official = to_official_state_dict(model)
    key = "refine_swin_decoder_1_1.0.transformer.layers.0.blocks.0.attn.relative_position_index"
    official[key] = official[key].flip(0)
    with pytest.raises(OfficialCheckpointError, match="derived buffers differ"):
        load_official_actr(official, config=TINY_RELEASED)


def test_registry_builds_the_released_model():
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_model("actr_released")
    assert isinstance(model, ACTR) and model.config == ACTRReleasedConfig()


@pytest.mark.slow
def test_vit_b_smoke_256():
    """The one full-size test: released sizes, 256 × 256 → (1, 2, 64, 64)."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="randomly initialised"):
        model = actr_released().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256), torch.randn(1, 3, 256, 256))
    assert out.flow.shape == (1, 2, 64, 64) and torch.isfinite(out.flow).all()
    assert out.flows_per_path.shape == (1, 6, 2, 64, 64) and out.coarse_flows.shape == (1, 6, 2, 16, 16)


# ------------------------------------------------------------------ one composition, old state dicts


def test_released_is_the_actr_composition_with_released_stages():
    """No class of its own: the ACTR class, its stages swapped at composition."""
    model = tiny_released_model()
    assert type(model) is ACTR and type(actr_tiny(warn_random_init=False)) is ACTR
    assert all(isinstance(block, ReleasedAsymmetricBlock) for block in model.blocks)
    assert isinstance(model.correlation, HeadSummedCorrelation)
    assert isinstance(model.soft_argmax, ReleasedSoftArgmax)
    assert isinstance(model.upsampler, ReleasedFlowUpsampler)
    assert isinstance(model.flow_loss, ReleasedEPELoss)
    assert model.path_blocks == (0, 1) and model.config.variant == "released"


def test_state_dicts_of_version_0_1_0_load_strictly_into_the_composition():
    """Keys as version 0.1.0 saved them (decoder.*, guidance.*, refiner.*) land where they belong."""
    old_shapes = json.loads(FIXTURE_0_1_0.read_text())
    gen = torch.Generator().manual_seed(0)
    old = {k: torch.randn(shape, generator=gen) for k, shape in old_shapes.items()}
    old["soft_argmax.x_grid"], old["soft_argmax.y_grid"] = torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 4)
    assert any(k.startswith("decoder.") for k in old) and any(k.startswith("refiner.") for k in old)
    model = tiny_released_model()
    model.load_state_dict(old, strict=True)
    upgraded = upgrade_released_state_dict(old)
    assert set(upgraded) == set(model.state_dict())
    for key, value in upgraded.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(model.blocks[1].cross_attn.qkv.weight, old["decoder.1.cross_attn.qkv.weight"])
    assert torch.equal(model.upsampler.guidance.proj.weight, old["guidance.proj.weight"])
    assert upgrade_released_state_dict(model.state_dict()).keys() == model.state_dict().keys()  # today's: unchanged


def test_converters_refuse_a_model_that_is_not_as_released():
    with pytest.raises(ValueError, match="config is ACTRConfig, not ACTRReleasedConfig"):
        to_official_state_dict(actr_tiny(warn_random_init=False))
