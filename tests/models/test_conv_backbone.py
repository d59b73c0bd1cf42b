"""CNN stage as [cls] + grid tokens: layout, position embedding, weights from local files, errors."""

import copy

import pytest
import timm
import torch
from tolerances import float32_tolerance

from actr_core.models.conv_backbone import ConvBackbone, ConvBackboneConfig, create_conv_backbone, load_conv_weights


def _backbone(**kwargs):
    kwargs.setdefault("config", ConvBackboneConfig(embed_dim=24))
    return create_conv_backbone("resnet18", image_size=(32, 48), warn_random_init=False, **kwargs)


def test_tokens_are_cls_then_stride_8_cells_row_major_with_h_ne_w():
    torch.manual_seed(0)
    backbone = _backbone().eval()
    image = torch.randn(2, 3, 32, 48)
    tokens = backbone(image)
    assert backbone.patch_size == 8 and backbone.embed_dim == 24
    assert tokens.shape == (2, 1 + 4 * 6, 24)
    assert torch.equal(tokens[:, 0], backbone.cls_token[0].expand(2, -1))
    # row-major: the token of cell (row 1, column 2) is the projection of that feature-map cell
    features = backbone.cnn(image)[-1]
    ref = copy.deepcopy(backbone).double()  # the projection and the norm in float64, from the same features
    cell = ref.proj(features[:, :, 1, 2].double()) + ref.pos_embed[:, 1 * 6 + 2]
    expected = ref.norm(cell)
    # the projection over the stage's channels, the position embedding, a LayerNorm over 24 (mean, variance)
    terms = features.shape[1] + 1 + 2 * 24 + 2
    torch.testing.assert_close(tokens[:, 1 + 1 * 6 + 2].double(), expected, atol=float32_tolerance(expected, terms=terms), rtol=0)


def test_other_grids_resample_the_position_embedding():
    backbone = _backbone().eval()
    assert backbone(torch.randn(1, 3, 64, 32)).shape == (1, 1 + 8 * 4, 24)
    assert backbone.position_embedding((4, 6)) is backbone.pos_embed  # the native grid: unchanged
    # the resampled embedding keeps rows as rows: one that varies down the rows only (4 × 6 native
    # grid, row-major) still varies down the rows only on an 8 × 12 grid, and increases down them
    rows = torch.arange(4.0).repeat_interleave(6).view(1, 24, 1).expand(1, 24, 24)
    with torch.no_grad():
        backbone.pos_embed.copy_(rows)
    grid = backbone.position_embedding((8, 12))[0, :, 0].view(8, 12)
    assert (grid - grid[:, :1]).abs().max() <= 1e-5 * grid.abs().max()
    assert (grid[1:, 0] >= grid[:-1, 0]).all() and grid[-1, 0] - grid[0, 0] > 2.5


def test_every_parameter_gets_a_gradient():
    """timm zero-initialises each residual block's last BatchNorm scale (its branch starts silent,
    so the branch's convolutions get zero gradients in the first step); with those scales at one,
    every parameter gets a non-zero gradient."""
    backbone = _backbone()
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if name.endswith("bn2.weight"):
                p.fill_(1.0)
    backbone(torch.randn(2, 3, 32, 48)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())


def _train_step(backbone: ConvBackbone, image: torch.Tensor) -> tuple[torch.Tensor, dict, dict, int]:
    """Tokens, parameter gradients, buffers after one training-mode step, and how often ``layer1`` ran."""
    calls = []
    handle = backbone.cnn.layer1.register_forward_pre_hook(lambda *_: calls.append(1))
    image = image.clone().requires_grad_(True)
    tokens = backbone.train()(image)
    tokens.square().mean().backward()
    handle.remove()
    grads = {name: p.grad for name, p in backbone.named_parameters()}
    grads["image"] = image.grad
    return tokens, grads, {k: v.clone() for k, v in backbone.named_buffers()}, len(calls)


def test_grad_checkpointing_gives_the_same_gradients_and_running_statistics():
    """float64, H != W, batch 2: each CNN module's activations are recomputed in the backward pass
    (``layer1`` runs twice), the tokens, every gradient (image included) and the BatchNorm running
    statistics (updated once, not again by the recomputation) equal those without checkpointing."""
    torch.manual_seed(0)
    plain = _backbone().double()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith("bn2.weight"):  # timm starts them at zero: make every branch carry gradient
                p.fill_(1.0)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    image = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    tokens, grads, buffers, calls = _train_step(plain, image)
    tokens_ckpt, grads_ckpt, buffers_ckpt, calls_ckpt = _train_step(checkpointed, image)
    assert (calls, calls_ckpt) == (1, 2)
    torch.testing.assert_close(tokens_ckpt, tokens)  # float64 defaults
    assert grads_ckpt.keys() == grads.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)
    assert buffers["cnn.bn1.num_batches_tracked"] == 1
    for name, buffer in buffers.items():
        torch.testing.assert_close(buffers_ckpt[name], buffer, msg=name)


def test_grad_checkpointing_only_in_training_mode():
    backbone = _backbone(grad_checkpointing=True).eval()
    calls = []
    backbone.cnn.layer1.register_forward_pre_hook(lambda *_: calls.append(1))
    image = torch.randn(1, 3, 32, 48, requires_grad=True)
    backbone(image).sum().backward()
    assert backbone.grad_checkpointing and len(calls) == 1  # eval mode: no recomputation
    backbone.set_grad_checkpointing(False)
    assert not backbone.grad_checkpointing


def test_stride_follows_the_stage():
    backbone = create_conv_backbone(
        "resnet18", config=ConvBackboneConfig(stage=3, embed_dim=16), image_size=(32, 32), warn_random_init=False
    )
    assert backbone.patch_size == 16 and backbone(torch.randn(1, 3, 32, 32)).shape == (1, 5, 16)


def test_weights_from_a_local_timm_state_dict(tmp_path):
    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    backbone = _backbone()
    report = load_conv_weights(backbone, path)
    assert "conv1.weight" in report.matched and not report.missing
    assert any(k.startswith("layer3.") for k in report.unexpected) and "fc.weight" in report.unexpected
    torch.testing.assert_close(  # exact: copies
        backbone.cnn.state_dict()["layer2.0.conv1.weight"], full.state_dict()["layer2.0.conv1.weight"], atol=0, rtol=0
    )
    loaded = _backbone(weights=str(path))
    assert torch.equal(loaded.cnn.conv1.weight, full.conv1.weight)


def test_random_init_warns_once_by_default():
    with pytest.warns(UserWarning, match="randomly initialised"):
        create_conv_backbone("resnet18", config=ConvBackboneConfig(embed_dim=8), image_size=(16, 16))


@pytest.mark.usefixtures("no_typecheck")
class TestErrors:
    def test_input_not_a_multiple_of_the_stride(self):
        with pytest.raises(ValueError, match=r"multiples of 8"):
            _backbone()(torch.randn(1, 3, 30, 48))

    def test_image_size_not_a_multiple_of_the_stride(self):
        with pytest.raises(ValueError, match=r"image_size = \(30, 48\).*stride 8"):
            create_conv_backbone("resnet18", image_size=(30, 48), warn_random_init=False)

    def test_weights_that_match_nothing(self):
        with pytest.raises(ValueError, match="no key"):
            load_conv_weights(_backbone(), {"head.weight": torch.zeros(3)})

    def test_weights_with_wrong_shapes(self):
        with pytest.raises(ValueError, match="conv1.weight"):
            load_conv_weights(_backbone(), {"conv1.weight": torch.zeros(3, 3, 3, 3)})

    def test_model_without_features_only(self):
        with pytest.raises(ValueError, match="features_only"):
            ConvBackbone(timm.create_model("resnet18", pretrained=False), embed_dim=8, grid=(2, 2))

    def test_grad_checkpointing_needs_a_feature_list_network(self):
        cnn = timm.create_model("resnet18", pretrained=False, features_only=True, feature_cls="hook", out_indices=(2,))
        backbone = ConvBackbone(cnn, embed_dim=8, grid=(2, 2))
        with pytest.raises(ValueError, match="the CNN is a FeatureHookNet"):
            backbone.set_grad_checkpointing(True)

    def test_bad_config(self):
        with pytest.raises(ValueError, match="embed_dim = 0"):
            ConvBackboneConfig(embed_dim=0)
