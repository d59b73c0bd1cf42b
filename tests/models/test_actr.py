"""ACTR as described: shapes at 256², 512², 256×384, batch > 1, no_grad, gradients, state dict,
loss (Eq. 4), temperature (Eq. 3), tied branch weights, bad input. Tiny configs except one ViT-B
smoke test."""

import copy
import dataclasses
import io

import pytest
import torch
from tolerances import float32_tolerance

from actr_core.batch import PairBatch
from actr_core.blocks import BiasedCrossAttention, CorrelationCrossEntropy, masked_flow_loss, soft_argmax
from actr_core.flow import FLOW_STRIDE
from actr_core.models import (
    ACTR,
    ACTRConfig,
    MatchOutput,
    actr_base,
    actr_base_512,
    actr_conv_tiny,
    actr_small,
    actr_tiny,
    baseline,
    parameter_count,
)
from actr_core.models.actr import AsymmetricCrossAttention, BilinearFlowUpsampling, CrossAttentionMap, LearnedSourcePE
from actr_core.models.builders import (
    ACTR_BASE_512_CONFIG,
    ACTR_BASE_CONFIG,
    ACTR_CONV_TINY_CONFIG,
    ACTR_SMALL_512_CONFIG,
    ACTR_SMALL_CONFIG,
    ACTR_TINY_CONFIG,
    build_actr,
    config_overrides,
)
from actr_core.training.optim import parameter_groups

SMALL = (64, 96)  # a non-square frame: 4 × 6 tokens, 16 × 24 flow grid; keeps CPU tests fast


def _tiny(**overrides) -> ACTR:
    torch.manual_seed(0)
    return actr_tiny(warn_random_init=False, **overrides)


def _images(batch: int, size: tuple[int, int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=gen), torch.randn(batch, 3, *size, generator=gen)


def _batch(output: MatchOutput, seed: int = 2) -> PairBatch:
    gen = torch.Generator().manual_seed(seed)
    flow = output.flow.detach()
    b, _, h, w = flow.shape
    valid = torch.rand(b, h, w, generator=gen) < 0.3
    target = torch.randn(flow.shape, generator=gen) * 3.0
    target = torch.where(valid.unsqueeze(1), target, torch.nan)  # NaN in invalid cells must not leak
    images = torch.zeros(b, 3, h * FLOW_STRIDE, w * FLOW_STRIDE)  # the loss reads only the flow
    return PairBatch.build(images, images, flow=target, valid_flow=valid)


@pytest.fixture(scope="module")
def tiny() -> ACTR:
    return _tiny().eval()


@pytest.mark.parametrize(("size", "batch"), [((256, 256), 2), ((512, 512), 1), ((256, 384), 2)])
def test_shapes(tiny: ACTR, size: tuple[int, int], batch: int) -> None:
    src, trg = _images(batch, size)
    with torch.no_grad():
        out = tiny(src, trg)
    h, w = size[0] // 16, size[1] // 16
    m = tiny.num_paths
    assert m == ACTR_TINY_CONFIG.num_blocks
    assert out.flow.shape == (batch, 2, 4 * h, 4 * w)
    assert out.flows_per_path.shape == (batch, m, 2, 4 * h, 4 * w)
    assert out.coarse_flows.shape == (batch, m, 2, h, w)
    assert out.correlations.shape == (batch, m, h, w, h, w)
    for field in dataclasses.fields(out):
        assert torch.isfinite(getattr(out, field.name)).all(), field.name
    assert not out.flow.requires_grad  # no graph under no_grad


def test_output_is_frozen_dataclass(tiny: ACTR) -> None:
    src, trg = _images(1, SMALL)
    with torch.no_grad():
        out = tiny(src, trg)
    assert isinstance(out, MatchOutput)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.flow = out.flow  # type: ignore[misc]


def test_flow_is_mean_of_paths_and_paths_read_correlations(tiny: ACTR) -> None:
    src, trg = _images(2, SMALL)
    with torch.no_grad():
        out = tiny(src, trg)
    torch.testing.assert_close(out.flow, out.flows_per_path.mean(dim=1), atol=0, rtol=0)  # exact: the same mean
    # Eq. 3 on every path's correlation with the configured temperature (all paths in one call there):
    # softmax over the l target cells, positions (at most the grid's size) weighted and summed
    ht, wt = out.correlations.shape[-2:]
    n_cells = ht * wt  # l
    for path in range(tiny.num_paths):
        expected = soft_argmax(out.correlations[:, path], tiny.config.soft_argmax_tau)
        tol = float32_tolerance(max(ht, wt), terms=2 * n_cells + 4)
        torch.testing.assert_close(out.coarse_flows[:, path], expected, atol=tol, rtol=0)
    # Eq. 2: every source cell's correlation is a distribution over the target cells: per head a softmax
    # over [cls] and the l cells, renormalised over the l cells, a mean over the heads, the sum here
    sums = out.correlations.sum(dim=(-2, -1))
    terms = (n_cells + 3) + (n_cells + 1) + tiny.config.decoder_heads + n_cells
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=float32_tolerance(1.0, terms=terms), rtol=0)


def test_batch_members_are_independent(tiny: ACTR) -> None:
    # in float64: a whole model's float32 rounding bound would dwarf a small leak between batch members
    model = copy.deepcopy(tiny).double()
    src, trg = (x.double() for x in _images(2, SMALL))
    with torch.no_grad():
        both = model(src, trg).flow
        first = model(src[:1], trg[:1]).flow
        second = model(src[1:], trg[1:]).flow
    torch.testing.assert_close(both, torch.cat((first, second)))  # float64 defaults: 1e-7, far above its rounding


def test_every_trainable_parameter_gets_a_finite_gradient() -> None:
    model = _tiny().train()
    src, trg = _images(2, SMALL)
    out = model(src, trg)
    loss = model.loss(out, _batch(out))
    assert torch.isfinite(loss)
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"no gradient: {missing}"
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient: {bad}"
    zero = [n for n, p in params if not p.grad.abs().sum() > 0]
    assert not zero, f"identically zero gradient: {zero}"


def test_loss_is_eq4_masked_flow_loss(tiny: ACTR) -> None:
    src, trg = _images(2, SMALL)
    with torch.no_grad():
        out = tiny(src, trg)
    batch = _batch(out)
    loss = tiny.loss(out, batch)
    assert loss.shape == ()
    expected = masked_flow_loss(out.flow, batch.flow, batch.valid_flow)
    torch.testing.assert_close(loss, expected, atol=0, rtol=0)  # exact: the loss is this call
    assert torch.isfinite(loss)


def test_loss_errors_name_the_problem(tiny: ACTR, no_typecheck: None) -> None:
    src, trg = _images(1, SMALL)
    with torch.no_grad():
        out = tiny(src, trg)
    images = torch.zeros(1, 3, 32, 32)  # another frame than the model's input: a (1, 2, 8, 8) flow
    with pytest.raises(ValueError, match=r"\(1, 2, 8, 8\)"):
        tiny.loss(out, PairBatch.build(images, images, flow=torch.zeros(1, 2, 8, 8)))


def test_transfer_moves_keypoints_by_the_flow(tiny: ACTR) -> None:
    src, trg = _images(1, SMALL)
    with torch.no_grad():
        out = tiny(src, trg)
    const = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand_as(out.flow)
    out = dataclasses.replace(out, flow=const.contiguous())
    kps = torch.tensor([[[10.0, 20.0], [40.0, 33.0]]])
    moved = tiny.transfer(out, kps)
    # a constant flow of d grid pixels is d · stride input pixels (stride = 16 / 4 = 4)
    expected = kps + torch.tensor([1.5, -2.0]) * tiny.flow_stride
    # to the grid and back (3 + 3 roundings), normalised and back (4), 4 bilinear weights, the addition
    torch.testing.assert_close(moved, expected, atol=float32_tolerance(expected, terms=15), rtol=0)


def test_state_dict_round_trip() -> None:
    a = _tiny().eval()
    torch.manual_seed(123)
    b = actr_tiny(warn_random_init=False).eval()
    src, trg = _images(1, SMALL)
    with torch.no_grad():
        assert not torch.allclose(a(src, trg).flow, b(src, trg).flow)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(a(src, trg).flow, b(src, trg).flow, atol=0, rtol=0)  # exact: equal weights, same kernels


def test_temperature_matches_released_head_sum() -> None:
    """β on head-summed attention equals β / H on the head mean (Eq. 2 averages the heads)."""
    assert ACTR_BASE_CONFIG.soft_argmax_tau == pytest.approx(0.02 / 8)
    gen = torch.Generator().manual_seed(0)
    # an identity of the arithmetic, checked in float64: logits of up to 1/τ = 400 would amplify float32 rounding
    heads = torch.randn(1, 8, 3, 4, 3, 4, generator=gen, dtype=torch.float64)
    heads = torch.softmax(heads.flatten(-2) * 4, -1).view(1, 8, 3, 4, 3, 4)
    released = soft_argmax(heads.sum(1), ACTR_BASE_CONFIG.soft_argmax_beta)
    ours = soft_argmax(heads.mean(1), ACTR_BASE_CONFIG.soft_argmax_tau)
    torch.testing.assert_close(ours, released, atol=1e-12, rtol=0)


def test_branch_weights_tied_or_separate() -> None:
    tied = _tiny()
    block = tied.blocks[0]
    assert block.source_block.attn is block.target_branch.block.attn
    assert block.source_block.mlp is block.target_branch.block.mlp
    separate = _tiny(share_branch_weights=False)
    block = separate.blocks[0]
    assert block.source_block.attn is not block.target_branch.block.attn
    c = ACTR_TINY_CONFIG
    dim = tied.backbone.embed_dim
    attn = dim * 3 * dim + 3 * dim + dim * dim + dim
    mlp = 2 * dim * int(dim * c.mlp_ratio) + int(dim * c.mlp_ratio) + dim
    extra = c.num_blocks * (attn + mlp + 4 * dim)  # one more self-attention, FFN and two LayerNorms
    assert parameter_count(separate) - parameter_count(tied) == extra
    # tied tensors appear once among the parameters
    assert len(list(tied.parameters())) < len(tied.state_dict())


def test_source_pe_follows_the_grid() -> None:
    pe = LearnedSourcePE(8, (4, 6), init_std=0.02)
    tokens = torch.zeros(2, 1 + 24, 8)
    torch.testing.assert_close(pe(tokens, (4, 6)), pe.pe.expand(2, -1, -1), atol=0, rtol=0)  # native grid: added as is
    assert pe(torch.zeros(2, 1 + 35, 8), (5, 7)).shape == (2, 36, 8)


def test_attention_map_only_equals_full_cross_attention() -> None:
    torch.manual_seed(0)
    dim, heads = 16, 4
    full = AsymmetricCrossAttention(BiasedCrossAttention(dim, heads), torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim))
    only = CrossAttentionMap(dim, heads, torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim))
    with torch.no_grad():
        only.qk.weight.copy_(full.attn.qkv.weight[: 2 * dim])
        only.qk.bias.copy_(full.attn.qkv.bias[: 2 * dim])
        for a, b in ((only.norm_src, full.norm_src), (only.norm_trg, full.norm_trg)):
            a.weight.normal_()
            b.weight.copy_(a.weight)
    # in float64: the same scores from a qk projection here and a qkv projection there (float64 defaults, 1e-7)
    full, only = full.double(), only.double()
    src, trg = torch.randn(2, 7, dim, dtype=torch.float64), torch.randn(2, 5, dim, dtype=torch.float64)
    expected = full(src, trg)[2]
    s, t, attn = only(src, trg)
    torch.testing.assert_close(attn, expected)
    torch.testing.assert_close(only.attention(src, trg), full.attention(src, trg))
    assert s is src and t is trg


@pytest.mark.parametrize(
    ("src_shape", "trg_shape", "dtype", "match"),
    [
        ((1, 3, 64, 90), (1, 3, 64, 90), torch.float32, r"\(1, 3, 64, 90\).*multiples of 16"),
        ((2, 3, 64, 96), (1, 3, 64, 96), torch.float32, "batch size 2.*batch size 1"),
        ((1, 1, 64, 96), (1, 1, 64, 96), torch.float32, "3 channels, got 1"),
        ((1, 4, 64, 96), (1, 3, 64, 96), torch.float32, "3 channels, got 4"),
        ((1, 3, 64, 96), (1, 3, 64, 96), torch.uint8, "dtype torch.uint8"),
        ((1, 3, 64, 96), (1, 3, 64, 96), torch.int64, "dtype torch.int64"),
    ],
)
def test_bad_input_raises_value_error(
    tiny: ACTR, no_typecheck: None, src_shape: tuple, trg_shape: tuple, dtype: torch.dtype, match: str
) -> None:
    src = torch.zeros(src_shape, dtype=dtype)
    trg = torch.zeros(trg_shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        tiny(src, trg)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="image_size"):
        ACTRConfig(image_size=(250, 256))
    with pytest.raises(ValueError, match="variant"):
        ACTRConfig(variant="nope")
    with pytest.raises(ValueError, match="upscale"):
        dataclasses.replace(ACTR_TINY_CONFIG, upscale=2)  # the super-resolution says 4
    with pytest.raises(ValueError, match="ablation"):
        actr_tiny(ablation="no_such_thing")


def test_builders_accept_yaml_overrides() -> None:
    """Training configs come from YAML: lists, mappings and a single side become the declared types."""
    sr = {"dim": 16, "num_heads": 2, "window_sizes": [4, 8]}
    overrides = config_overrides({"image_size": [128, 96], "flow_sr": sr})
    config = dataclasses.replace(ACTR_TINY_CONFIG, **overrides)
    assert config.image_size == (128, 96) and config.token_grid == (8, 6)
    assert config.flow_sr.window_sizes == (4, 8)
    assert config_overrides({"image_size": 128})["image_size"] == (128, 128)
    model = actr_tiny(image_size=[128, 128], warn_random_init=False)
    assert model.config.image_size == (128, 128)
    assert model.blocks[0].source_pe.grid == (8, 8)


def test_frozen_backbone_trains_the_rest() -> None:
    model = build_actr(dataclasses.replace(ACTR_TINY_CONFIG, freeze_backbone=True), warn_random_init=False)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.blocks.parameters())


def test_frozen_cnn_backbone_keeps_its_new_token_layers_trainable() -> None:
    """A weight file fills only the CNN: its projection, [cls], position embedding and norm are new."""
    model = actr_conv_tiny(warn_random_init=False, freeze_backbone=True)
    assert not any(p.requires_grad for p in model.backbone.cnn.parameters())
    new = [model.backbone.proj.weight, model.backbone.cls_token, model.backbone.pos_embed, model.backbone.norm.weight]
    assert all(p.requires_grad for p in new)
    fresh = actr_conv_tiny(warn_random_init=False)
    groups = parameter_groups(fresh, backbone_lr=1.0, head_lr=2.0, weight_decay=0.0, freeze_backbone=True)
    in_backbone_group = {id(p) for g in groups if g["name"] == "backbone" for p in g["params"]}
    token_layers = {id(p) for name, p in fresh.backbone.named_parameters() if not name.startswith("cnn.")}
    assert in_backbone_group == token_layers and len(token_layers) == 6  # proj w/b, cls, pos, norm w/b


@pytest.mark.parametrize(
    ("builder", "expected"),
    [(actr_base, 144_633_120), (actr_small, 37_333_152), (actr_base_512, 148_761_888), (baseline, 141_375_744)],
)
def test_parameter_counts_in_docs(builder, expected: int) -> None:
    """The counts docs/models.md reconciles with Table 3 (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = builder(warn_random_init=False)
    assert parameter_count(model) == expected
    assert parameter_count(model, trainable_only=True) == expected  # the backbone is fine-tuned


@pytest.mark.slow
def test_vit_base_smoke_256() -> None:
    """The full-size model builds and runs a 256×256 pair."""
    torch.manual_seed(0)
    model = actr_base(warn_random_init=False).eval()
    src, trg = _images(1, (256, 256))
    with torch.no_grad():
        out = model(src, trg)
    assert out.flow.shape == (1, 2, 64, 64)
    assert out.flows_per_path.shape == (1, 6, 2, 64, 64)
    assert out.coarse_flows.shape == (1, 6, 2, 16, 16)
    assert torch.isfinite(out.flow).all()


# ---------------------------------------------------------------- the CPU recipe (not in the paper)


def _conv_tiny(**overrides) -> ACTR:
    torch.manual_seed(0)
    return actr_conv_tiny(warn_random_init=False, **overrides)


def test_paper_builders_keep_the_vit_and_eq4_alone() -> None:
    """The recipe's deviations (CNN tokens, correlation cross-entropy) are off in every paper config."""
    for config in (ACTR_BASE_CONFIG, ACTR_SMALL_CONFIG, ACTR_BASE_512_CONFIG, ACTR_SMALL_512_CONFIG, ACTR_TINY_CONFIG):
        assert config.conv_backbone is None and config.correlation_loss_weight == 0.0
    assert _tiny().correlation_loss is None
    assert ACTR_CONV_TINY_CONFIG.conv_backbone is not None and ACTR_CONV_TINY_CONFIG.correlation_loss_weight > 0


def test_conv_tiny_shapes_on_a_stride_8_token_grid() -> None:
    model = _conv_tiny().eval()
    src, trg = _images(3, SMALL)
    with torch.no_grad():
        out = model(src, trg)
    assert model.patch_size == 8 and model.flow_stride == 4
    assert out.flow.shape == (3, 2, 16, 24)
    assert out.correlations.shape == (3, 2, 8, 12, 8, 12)
    assert out.coarse_flows.shape == (3, 2, 2, 8, 12)


def test_conv_tiny_loss_adds_the_correlation_term_to_eq4() -> None:
    model = _conv_tiny()
    src, trg = _images(2, SMALL)
    with torch.no_grad():
        out = model(src, trg)
    batch = _batch(out)
    flow_term = masked_flow_loss(out.flow, batch.flow, batch.valid_flow)
    corr_term = CorrelationCrossEntropy(1.0)(out.correlations, batch.flow, batch.valid_flow)
    torch.testing.assert_close(model.loss(out, batch), flow_term + corr_term, atol=0, rtol=0)  # exact: the same calls
    assert _conv_tiny(correlation_loss_weight=0.0).correlation_loss is None


def test_conv_tiny_every_parameter_gets_a_gradient() -> None:
    """timm's ResNets start each residual block's last BatchNorm scale at zero; with those at one,
    every parameter, backbone included, gets a non-zero finite gradient from the recipe's loss."""
    model = _conv_tiny().train()
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if name.endswith("bn2.weight"):
                p.fill_(1.0)
    src, trg = _images(2, SMALL)
    out = model(src, trg)
    model.loss(out, _batch(out)).backward()
    bad = [
        n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0
    ]
    assert not bad, f"no, non-finite or zero gradient: {bad}"


def test_nested_yaml_overrides_update_the_builder_config() -> None:
    """A mapping for flow_sr or conv_backbone changes only the fields it names (the ×2 super-resolution stays)."""
    model = actr_conv_tiny(warn_random_init=False, flow_sr={"dim": 8}, conv_backbone={"embed_dim": 32})
    assert model.config.flow_sr.dim == 8 and model.config.flow_sr.upscale == 2
    assert model.config.conv_backbone.embed_dim == 32 and model.config.conv_backbone.stage == 2
    assert model.backbone.embed_dim == 32


def test_backbone_misconfigurations_name_the_problem(no_typecheck: None) -> None:
    with pytest.raises(ValueError, match="checkpoint_key = 'teacher' applies to ViT"):
        actr_conv_tiny(warn_random_init=False, checkpoint_key="teacher")
    with pytest.raises(ValueError, match="'resnet18' is not a VisionTransformer.*conv_backbone"):
        actr_conv_tiny(warn_random_init=False, conv_backbone=None)
    with pytest.raises(ValueError, match="backbone_depth = 4 cuts a ViT's blocks"):
        actr_tiny(warn_random_init=False, conv_backbone={"embed_dim": 32})
    with pytest.raises(ValueError, match="flow grid at 1/8 of the frame.*needs upscale = 4"):
        actr_conv_tiny(warn_random_init=False, conv_backbone={"stage": 3}, patch_size=16)
    with pytest.raises(ValueError, match="patch size 16 but config.patch_size = 8"):
        actr_conv_tiny(warn_random_init=False, conv_backbone={"stage": 3})


# ---------------------------------------------------------------- stages, injection, checkpointing


def test_stages_honour_their_protocols() -> None:
    from actr_core.models import (
        Backbone,
        CorrelationReadout,
        CorrespondenceStage,
        FlowLoss,
        FlowUpsampler,
        SoftArgmaxReadout,
        SourcePositionalEncoding,
    )

    model = _tiny()
    assert isinstance(model.backbone, Backbone)
    assert all(isinstance(block, CorrespondenceStage) for block in model.blocks)
    assert all(isinstance(block.source_pe, SourcePositionalEncoding) for block in model.blocks)
    assert isinstance(model.correlation, CorrelationReadout)
    assert isinstance(model.soft_argmax, SoftArgmaxReadout)
    assert isinstance(model.upsampler, FlowUpsampler)
    assert isinstance(model.flow_loss, FlowLoss)


def test_builder_takes_stage_instances() -> None:
    """An injected backbone and upsampler are used as given (the builder holds only the numbers)."""
    from actr_core.models.backbones import create_vit

    backbone = create_vit("vit_tiny_patch16_224", depth=1, warn_random_init=False)
    upsampler = BilinearFlowUpsampling(ACTR_TINY_CONFIG.upscale)
    model = build_actr(ACTR_TINY_CONFIG, backbone=backbone, upsampler=upsampler)
    assert model.backbone is backbone and model.upsampler is upsampler
    with torch.no_grad():
        out = model(*_images(1, SMALL))
    assert out.flow.shape == (1, 2, 16, 24)
    with pytest.raises(ValueError, match="either a backbone instance or backbone_weights"):
        build_actr(ACTR_TINY_CONFIG, backbone=backbone, checkpoint_key="teacher")


@pytest.mark.parametrize("builder", ["actr_tiny", "actr_conv_tiny"])
def test_grad_checkpointing_gives_the_same_gradients(builder: str) -> None:
    """Checkpointing recomputes each block (and the backbone's blocks where it can): in float64, the
    loss and every parameter's gradient equal those without it (float64 defaults: 1e-7)."""
    build = actr_tiny if builder == "actr_tiny" else actr_conv_tiny
    torch.manual_seed(0)
    plain = build(warn_random_init=False).double().train()
    torch.manual_seed(0)
    checkpointed = build(warn_random_init=False, grad_checkpointing=True).double().train()
    assert checkpointed.grad_checkpointing and checkpointed.config.grad_checkpointing
    checkpointed.load_state_dict(plain.state_dict())
    src, trg = (x.double() for x in _images(2, SMALL))
    grads = []
    for model in (plain, checkpointed):
        for module in model.modules():  # dropout-free models: every recomputation gives the same values
            assert not isinstance(module, torch.nn.Dropout) or module.p == 0
        out = model(src, trg)
        target = torch.randn(out.flow.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        loss = model.loss(out, PairBatch.build(src, trg, flow=target))  # valid everywhere
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, msg=name)


def test_grad_checkpointing_is_switchable_and_runs_only_in_training() -> None:
    model = _tiny()
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    out = model.train()(*_images(1, SMALL))
    out.flow.sum().backward()
    assert len(calls) == 2  # the forward pass, then its recomputation in the backward pass
    calls.clear()
    with torch.no_grad():
        model.eval()(*_images(1, SMALL))
    assert len(calls) == 1  # no recomputation without gradients
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing and "grad_checkpointing=False" in repr(model).splitlines()[1]
