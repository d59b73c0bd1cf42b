"""ViT backbones: tokens for any multiple-of-16 input, timm's token path and gradient checkpointing,
local weights only, reports and errors."""

import copy
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from actr_core.blocks.released import dino_pos_embed_interpolation
from actr_core.models.backbones import (
    ViTBackbone,
    convert_vit_state_dict,
    create_vit,
    load_vit_weights,
    vit_base16,
    vit_small16,
)

TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 64}  # native grid 4 × 4


def tiny(**kwargs) -> ViTBackbone:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return create_vit("vit_small_patch16_224", **{**TINY, **kwargs})


@pytest.mark.parametrize(("h", "w"), [(64, 64), (32, 80), (128, 48)])
def test_tokens_shape_any_multiple_of_16(h, w):
    backbone = tiny()
    out = backbone(torch.randn(2, 3, h, w))
    assert out.shape == (2, 1 + (h // 16) * (w // 16), 32)
    assert backbone.grid_size(h, w) == (h // 16, w // 16)


def test_default_forward_equals_timm_dynamic_img_size():
    """Our token path (injected resampler) equals timm's own ``dynamic_img_size=True`` forward."""
    backbone = tiny()
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True, **TINY)
    missing, unexpected = ref.load_state_dict(backbone.state_dict(), strict=False)
    assert not missing and not unexpected
    # in float64: a resampling that differs a little would hide under a whole ViT's float32 rounding bound
    backbone, ref = backbone.double(), ref.double()
    x = torch.randn(2, 3, 48, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), ref.forward_features(x))  # float64 defaults: 1e-7


def test_state_dict_keys_are_timm_dino_and_0_1_0_names():
    """The keys of DINO/iBOT/timm checkpoints and of checkpoints saved by earlier versions (0.1.0
    saved exactly these for this model); no classifier head."""
    assert list(tiny().state_dict()) == [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        *(f"blocks.0.{k}" for k in _BLOCK_KEYS),
        "norm.weight",
        "norm.bias",
    ]


_BLOCK_KEYS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)


def test_constructor_from_timm_arguments_equals_the_model_by_name():
    by_name = tiny()
    direct = ViTBackbone(patch_size=16, **TINY)
    direct.load_state_dict(by_name.state_dict())  # strict: the same keys
    assert isinstance(by_name, timm.models.VisionTransformer)
    assert (direct.patch_size, direct.embed_dim, direct.native_grid) == (16, 32, (4, 4))
    x = torch.randn(2, 3, 32, 80)
    with torch.no_grad():
        assert torch.equal(direct(x), by_name(x))


def _gradients(backbone: ViTBackbone, image: torch.Tensor) -> tuple[dict, int]:
    """Parameter and image gradients of one training-mode step, and how often the first block ran."""
    calls = []
    handle = backbone.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    image = image.clone().requires_grad_(True)
    backbone.train()(image).square().mean().backward()
    handle.remove()
    return {"image": image.grad, **{name: p.grad for name, p in backbone.named_parameters()}}, len(calls)


def test_grad_checkpointing_gives_the_same_gradients():
    """float64, H != W, batch 2: timm's checkpointing recomputes the blocks in the backward pass
    (the first block runs twice) and every gradient equals the one without it."""
    plain = tiny(depth=2).double()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    image = torch.randn(2, 3, 32, 80, dtype=torch.float64)
    grads, calls = _gradients(plain, image)
    grads_ckpt, calls_ckpt = _gradients(checkpointed, image)
    assert (calls, calls_ckpt) == (1, 2)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)  # float64 defaults


def test_grad_checkpointing_switch_in_create_vit():
    assert tiny(grad_checkpointing=True).grad_checkpointing and not tiny().grad_checkpointing
    backbone = tiny(grad_checkpointing=True)
    backbone.set_grad_checkpointing(False)
    assert not backbone.grad_checkpointing


def test_native_grid_keeps_the_position_embedding_itself():
    backbone = tiny()
    assert backbone.position_embedding((4, 4)) is backbone.pos_embed
    assert backbone.position_embedding((3, 5)).shape == (1, 1 + 15, 32)


def test_dino_resampler_injected_changes_only_resized_grids():
    base = tiny()
    dino = tiny()
    dino.load_state_dict(base.state_dict())
    dino.resample_pos_embed = dino_pos_embed_interpolation
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(base(x), dino(x))  # native grid: no resampling in either
        y = torch.randn(1, 3, 96, 96)
        diff = (base(y) - dino(y)).abs().max()
    assert 0 < diff < 1.0  # both resample 4 → 6, at slightly different positions


def test_register_tokens_are_dropped_from_the_output():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        backbone = create_vit("vit_small_patch16_224", reg_tokens=4, **TINY)
    assert backbone.num_prefix_tokens == 5
    assert backbone(torch.randn(1, 3, 32, 48)).shape == (1, 1 + 6, 32)


def test_vit_s16_and_b16_sizes():
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        small, base = vit_small16(), vit_base16()
    assert (small.embed_dim, small.patch_size, len(small.blocks)) == (384, 16, 12)
    assert (base.embed_dim, base.patch_size, len(base.blocks)) == (768, 16, 12)
    assert sum(p.numel() for p in base.parameters()) == 85_798_656  # the released ACTR backbone's count


def test_random_init_warns_in_one_line():
    with pytest.warns(UserWarning, match="randomly initialised") as record:
        create_vit("vit_small_patch16_224", **TINY)
    assert "\n" not in str(record[0].message)


def test_pretrained_is_loaded_or_raises_never_ignored(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an empty Hugging Face cache, offline: timm cannot get the weights
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="could not load pretrained weights 'vit_small_patch16_224'"):
        create_vit("vit_small_patch16_224", pretrained=True, **TINY)


def _dino_checkpoint(backbone: ViTBackbone) -> dict:
    teacher = {f"backbone.{k}": v.clone() + 1.0 for k, v in backbone.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.zeros(8, 32)  # the DINO/iBOT projection head: not ours
    student = {f"module.backbone.{k}": v.clone() - 1.0 for k, v in backbone.state_dict().items()}
    return {"teacher": teacher, "student": student, "epoch": 100}


def test_load_ibot_dino_checkpoint_file_prefers_teacher(tmp_path):
    backbone = tiny()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save(_dino_checkpoint(backbone), path)
    report = load_vit_weights(backbone, path)
    assert report.missing == () and report.unexpected == ("head.mlp.0.weight",)
    assert len(report.matched) == len(before)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k] + 1.0)
    assert "unexpected 1 [head.mlp.0.weight]" in str(report)


def test_load_student_with_module_prefix():
    backbone = tiny()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    load_vit_weights(backbone, _dino_checkpoint(backbone), checkpoint_key="student")
    assert torch.equal(backbone.cls_token, before["cls_token"] - 1.0)


def test_load_timm_safetensors_reports_the_classifier_as_unexpected(tmp_path):
    other = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, **TINY)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    backbone = tiny()
    report = load_vit_weights(backbone, path)
    assert set(report.unexpected) == {"head.weight", "head.bias"}
    assert torch.equal(backbone.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)


def test_create_vit_with_weights_and_partial_checkpoint_warns_missing():
    source = tiny()
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("norm.")}
    with pytest.warns(UserWarning, match="missing 2"):
        backbone = create_vit("vit_small_patch16_224", weights=partial, **TINY)
    assert torch.equal(backbone.pos_embed, source.pos_embed)


def test_position_embedding_of_another_grid_is_resampled():
    small_grid = tiny(img_size=32)  # 2 × 2 grid: 5 position tokens
    backbone = tiny()
    report = load_vit_weights(backbone, small_grid.state_dict())
    assert report.resized == ("pos_embed",)
    assert backbone.pos_embed.shape == (1, 17, 32)
    assert torch.equal(backbone.pos_embed[:, :1], small_grid.pos_embed[:, :1])  # [cls] kept


def test_nothing_matched_is_an_error():
    with pytest.raises(ValueError, match="no key of state dict matches"):
        load_vit_weights(tiny(), {"encoder.layer.0.weight": torch.zeros(3)})


def test_wrong_shapes_list_the_first_keys():
    wrong = tiny(embed_dim=64).state_dict()
    with pytest.raises(ValueError, match=r"wrong shapes, first: cls_token: checkpoint \(1, 1, 64\) vs model \(1, 1, 32\)"):
        load_vit_weights(tiny(), wrong)


def test_missing_file_and_missing_checkpoint_key(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_vit_weights(tiny(), tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="no key 'teacher'"):
        convert_vit_state_dict({"model": {}}, checkpoint_key="teacher")


def test_not_a_vit_or_unknown_name(no_typecheck):
    with pytest.raises(ValueError, match="timm model 'resnet18' is not a VisionTransformer"):
        create_vit("resnet18")
    with pytest.raises(ValueError, match="expected a timm VisionTransformer, got ResNet"):
        ViTBackbone.from_timm(timm.create_model("resnet18", pretrained=False))
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        ViTBackbone.from_timm(timm.create_model("vit_small_patch16_224", pretrained=False, **TINY))
    with pytest.raises(ValueError, match="no \\[cls\\] token"):
        ViTBackbone(patch_size=16, class_token=False, global_pool="avg", **TINY)
    with pytest.raises(ValueError, match="timm has no model 'no_such_vit'"):
        create_vit("no_such_vit")


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((1, 3, 40, 64), torch.float32, r"\(1, 3, 40, 64\).*multiples of 16"),
        ((1, 4, 32, 32), torch.float32, "expected 3 channels, got 4"),
        ((1, 3, 32, 32), torch.int64, "dtype torch.int64"),
    ],
)
def test_bad_input_raises_value_error(no_typecheck, shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        tiny()(torch.zeros(shape, dtype=dtype))


def test_every_parameter_gets_a_gradient():
    backbone = tiny()
    backbone(torch.randn(2, 3, 32, 48)).square().mean().backward()
    for name, p in backbone.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
