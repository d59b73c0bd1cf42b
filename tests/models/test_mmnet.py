"""MMNet behind the CorrespondenceModel interface: shapes, loss, transfer, weights, error paths."""

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerances import float32_tolerance

from actr_core.batch import PairBatch
from actr_core.blocks.coarse_to_fine import reverse_correlation
from actr_core.models.base import CorrespondenceModel, parameter_count
from actr_core.models.mmnet import (
    MMNet,
    MMNetConfig,
    MMNetOutput,
    convert_released_state_dict,
    load_resnet_weights,
    mmnet_resnet50,
    mmnet_resnet101,
    mmnet_tiny,
)

H, W = 64, 96  # H != W, multiples of 32


@pytest.fixture(scope="module")
def tiny() -> MMNet:
    torch.manual_seed(0)
    return mmnet_tiny()


def _batch(b: int, n: int = 5) -> PairBatch:
    g = torch.Generator().manual_seed(1)
    src = torch.rand(b, n, 2, generator=g) * torch.tensor([W - 1, H - 1])
    trg = torch.rand(b, n, 2, generator=g) * torch.tensor([W - 1, H - 1])
    valid = torch.rand(b, n, generator=g) > 0.3
    valid[:, 0] = True
    images = torch.zeros(b, 3, H, W)  # the loss reads only the keypoints
    return PairBatch.build(images, images, src, trg, valid)


def test_is_a_matcher(tiny):
    assert isinstance(tiny, CorrespondenceModel)


def test_shapes_h_ne_w_batch_2(tiny):
    out = tiny(torch.randn(2, 3, H, W), torch.randn(2, 3, H, W))
    assert isinstance(out, MMNetOutput)
    assert out.flow.shape == (2, 2, H // 4, W // 4)
    sizes = [(H // 32, W // 32), (H // 16, W // 16), (H // 8, W // 8), (H // 4, W // 4)]
    assert [tuple(c.shape) for c in out.pyramid] == [(2, *s, *s) for s in sizes]
    assert out.correlations.shape == (2, 1, H // 4, W // 4, H // 4, W // 4)
    assert out.reverse(1).shape == (2, *sizes[1], *sizes[1])
    assert out.image_size == (H, W)


def test_loss_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = mmnet_tiny().train()
    out = model(torch.randn(2, 3, H, W), torch.randn(2, 3, H, W))
    loss = model.loss(out, _batch(2))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_is_sum_over_levels_and_directions(tiny):
    out = tiny(torch.randn(1, 3, H, W), torch.randn(1, 3, H, W))
    batch = _batch(1)
    total = torch.zeros(())
    for corr in out.pyramid:
        grid = corr.shape[1:3]
        scale = torch.tensor([grid[1] / W, grid[0] / H])
        src = (batch.src_kps + 0.5) * scale - 0.5
        trg = (batch.trg_kps + 0.5) * scale - 0.5
        total = total + tiny.criterion(corr, src, trg, batch.valid_kps)
        total = total + tiny.criterion(reverse_correlation(corr), trg, src, batch.valid_kps)
    # per term a blurred target (4 + 9), a log-softmax and a sum over the finest level's cells, 8 terms added
    cells = out.pyramid[-1].shape[1] * out.pyramid[-1].shape[2]
    torch.testing.assert_close(tiny.loss(out, batch), total, atol=float32_tolerance(total, terms=2 * cells + 13 + 8), rtol=0)


def test_convention_swapping_images_reverses_the_pyramid(tiny):
    # in float64: an identity of the composition, which a whole network's float32 rounding bound would blur
    model = copy.deepcopy(tiny).eval().double()
    a, b = torch.randn(1, 3, H, W, dtype=torch.float64), torch.randn(1, 3, H, W, dtype=torch.float64)
    with torch.no_grad():
        ab, ba = model(a, b), model(b, a)
    for level in range(4):
        torch.testing.assert_close(ab.reverse(level), ba.pyramid[level])  # float64 defaults: 1e-7


def test_coarser_levels_reach_finer_ones_detached(tiny):
    tiny.eval()
    out = tiny(torch.randn(1, 3, H, W), torch.randn(1, 3, H, W))
    # the finest level depends on the coarsest descriptors only through the forward value, not the graph
    coarse_params = list(tiny.attention[0].parameters())
    grads = torch.autograd.grad(out.pyramid[-1].sum(), coarse_params, allow_unused=True)
    # the coarsest attention still reaches the finest level through the top-down fusion path
    assert any(g is not None for g in grads)


def test_channels_last_changes_no_value():
    torch.manual_seed(0)
    a = mmnet_tiny(channels_last=True).eval()
    b = mmnet_tiny(channels_last=False).eval()
    b.load_state_dict(a.state_dict())
    # in float64, as above: the layouts must give the same values, not merely values within a network's rounding
    a, b = a.double(), b.double()
    x, y = torch.randn(1, 3, H, W, dtype=torch.float64), torch.randn(1, 3, H, W, dtype=torch.float64)
    with torch.no_grad():
        for ca, cb in zip(a(x, y).pyramid, b(x, y).pyramid):
            torch.testing.assert_close(ca, cb)  # float64 defaults: 1e-7


def _one_hot_output(match: torch.Tensor, size: tuple[int, int], levels: int = 4) -> MMNetOutput:
    """An output whose every level is a one-hot correlation (b, h, w, h, w) given flat target indices."""
    b, h, w = match.shape
    corr = F.one_hot(match, h * w).float().view(b, h, w, h, w)
    return MMNetOutput(flow=torch.zeros(b, 2, size[0] // 4, size[1] // 4), pyramid=(corr,) * levels, image_size=size)


def test_transfer_through_one_hot_correlation(tiny):
    # a 4 x 6 level in a 32 x 48 frame: cells are 8 px; cell (i, j) has its centre at 8 i + 3.5
    match = torch.randint(0, 24, (2, 4, 6))
    out = _one_hot_output(match, (32, 48))
    cell = torch.tensor([[[2.0, 1.0], [5.0, 3.0], [0.0, 0.0]]]).expand(2, 3, 2)
    src = cell * 8 + 3.5  # the centres of those cells, in frame pixels
    valid = torch.tensor([[True, True, False], [True, False, True]])
    got = tiny.transfer(out, src, valid)
    flat = match[torch.arange(2)[:, None], cell[..., 1].long(), cell[..., 0].long()]
    expected = torch.stack((flat % 6, flat // 6), dim=-1).float() * 8 + 3.5
    torch.testing.assert_close(got[valid], expected[valid], atol=0, rtol=0)  # exact: cell centres, halves
    assert torch.isnan(got[~valid]).all()
    # the released read-out (x·w/W in, corner i·W/w out) would answer half a cell up-left
    assert not torch.allclose(got[valid], (expected[valid] - 3.5))


def test_soft_transfer_tends_to_argmax():
    model = mmnet_tiny(transfer_readout="soft_argmax", soft_argmax_tau=1e-3)
    match = torch.randint(0, 24, (1, 4, 6))
    out = _one_hot_output(match, (32, 48))
    src = torch.tensor([[[19.5, 11.5], [43.5, 27.5]]])
    expected = mmnet_tiny().transfer(out, src)
    # softmax over the 24 cells, a weighted sum of 24 positions, to the frame (3 roundings)
    tol = float32_tolerance(expected, terms=24 + 2 + 24 + 3)
    torch.testing.assert_close(model.transfer(out, src), expected, atol=tol, rtol=0)


def test_soft_flow_readout_shapes():
    model = mmnet_tiny(flow_readout="soft_argmax")
    out = model(torch.randn(1, 3, H, W), torch.randn(1, 3, H, W))
    assert out.flow.shape == (1, 2, H // 4, W // 4) and out.flow.requires_grad


def test_flow_is_argmax_of_finest_level(tiny):
    out = tiny(torch.randn(1, 3, H, W), torch.randn(1, 3, H, W))
    h, w = H // 4, W // 4
    best = out.pyramid[-1].reshape(1, h * w, h * w).argmax(-1).view(h, w)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    torch.testing.assert_close(out.flow[0], torch.stack((best % w - xs, best // w - ys)).float(), atol=0, rtol=0)  # integers


def test_backbone_weights_from_local_file(tmp_path):
    torch.manual_seed(0)
    donor = mmnet_tiny()
    # torchvision/timm names: layerK.* for stages.{K-1}.*, plus a classifier to be ignored
    state = {}
    for key, value in donor.backbone.state_dict().items():
        if key.startswith("stages."):
            _, k, rest = key.split(".", 2)
            key = f"layer{int(k) + 1}.{rest}"
        state[key] = value.clone()
    state["fc.weight"] = torch.zeros(10, 64)
    path = tmp_path / "resnet.pth"
    torch.save(state, path)
    model = mmnet_tiny(backbone_weights=str(path))
    for (name, a), b in zip(donor.backbone.state_dict().items(), model.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)  # exact: copies
    del state["conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing"):
        load_resnet_weights(model.backbone, path)


def test_parameter_counts_hold_only_used_modules():
    model = mmnet_resnet50()
    # ResNet-50 without its classifier: 23.5 M
    assert parameter_count(model.backbone) == 23_508_032
    assert not hasattr(model.backbone, "fc")


@pytest.mark.slow
def test_resnet101_forward_backward_smoke():
    model = mmnet_resnet101().train()
    out = model(torch.randn(1, 3, 32, 64), torch.randn(1, 3, 32, 64))
    assert out.flow.shape == (1, 2, 8, 16)
    images = torch.zeros(1, 3, 32, 64)
    model.loss(out, PairBatch.build(images, images, torch.tensor([[[10.0, 20.0]]]), torch.tensor([[[50.0, 40.0]]]))).backward()
    assert model.multiscale[2].inputs[22].weight.grad is not None
    # random ResNet features give correlations in the hundreds (saturated softmax): still finite
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert parameter_count(model) == 52_851_093  # 609 fewer than per-bottleneck biases: one bias per stage sum


class TestErrors:
    def test_input_must_be_multiple_of_32(self, tiny, no_typecheck):
        with pytest.raises(ValueError, match="multiples of 32"):
            tiny(torch.randn(1, 3, 48, 64), torch.randn(1, 3, 48, 64))

    def test_pair_sizes_must_match(self, tiny, no_typecheck):
        with pytest.raises(ValueError, match="same size"):
            tiny(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 96))

    def test_loss_and_transfer_need_an_mmnet_output(self, tiny, no_typecheck):
        from actr_core.models.base import MatchOutput

        plain = MatchOutput(flow=torch.zeros(1, 2, 16, 24))
        with pytest.raises(ValueError, match="MMNetOutput"):
            tiny.loss(plain, _batch(1))
        with pytest.raises(ValueError, match="MMNetOutput"):
            tiny.transfer(plain, torch.zeros(1, 2, 2))

    def test_bad_config(self, no_typecheck):
        with pytest.raises(ValueError, match="same length"):
            MMNetConfig(layers=(1, 1), widths=(4,))
        with pytest.raises(ValueError, match="transfer_level"):
            MMNetConfig(transfer_level=4)
        with pytest.raises(ValueError, match="flow_readout"):
            MMNetConfig(flow_readout="mean")  # type: ignore[arg-type]

    def test_config_is_frozen(self):
        with pytest.raises(dataclasses.FrozenInstanceError):
            MMNetConfig().feature_channels = 3  # type: ignore[misc]


def _released_names(model: MMNet) -> dict[str, torch.Tensor]:
    """Our weights under the released module names (models/Model.py), plus modules it never calls."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.backbone.state_dict().items():
        if key.startswith("stages."):
            _, k, rest = key.split(".", 2)
            key = f"layer{int(k) + 1}.{rest}"
        out[f"backbone.{key}"] = value
    levels = len(model.config.layers)
    for i, depth in enumerate(model.config.layers):
        stage = model.multiscale[i]
        m = model.config.hidden_channels
        for j in range(depth):
            for p in ("weight", "bias"):
                out[f"msblock{i + 1}_{j + 1}.conv.{p}"] = getattr(stage.inputs[j], p)
                for r, branch in enumerate(stage.branches):
                    out[f"msblock{i + 1}_{j + 1}.conv{r + 1}.{p}"] = getattr(branch, p)[j * m : (j + 1) * m]
            out[f"conv{i + 1}_{j + 1}_down.weight"] = stage.proj.weight[:, j * m : (j + 1) * m]
            # the released code holds one bias per block; only their sum matters
            out[f"conv{i + 1}_{j + 1}_down.bias"] = stage.proj.bias / depth
        for p in ("weight", "bias"):
            theta, phi, g = getattr(model.attention[i].qkv, p).chunk(3)
            out[f"wa_{i + 1}.conv_theta.{p}"], out[f"wa_{i + 1}.conv_phi.{p}"], out[f"wa_{i + 1}.conv_g.{p}"] = theta, phi, g
            out[f"wa_{i + 1}.conv_back.{p}"] = getattr(model.attention[i].proj, p)
            if i != levels - 1:
                out[f"conv{i + 1}_scale.{p}"] = getattr(model.fusion[levels - 2 - i].fuse, p)
        if i != 0:
            out[f"feat_upsample_{i + 1}.weight"] = model.fusion[levels - 1 - i].up.weight
        out[f"conv{i + 1}_kernel.weight"] = torch.zeros(1)
    for unused in (
        "upsample_4.weight",
        "feature_upsample_2.weight",
        "msblock0.conv.weight",
        "conv0_down.bias",
        "backbone.fc.weight",
    ):
        out[unused] = torch.zeros(1)
    return {k: v.detach().clone() for k, v in out.items()}


def test_released_state_dict_converts_to_the_same_network():
    torch.manual_seed(0)
    donor = mmnet_tiny().eval()
    model = mmnet_tiny().eval()
    model.load_state_dict(convert_released_state_dict(_released_names(donor)), strict=True)
    x, y = torch.randn(1, 3, H, W), torch.randn(1, 3, H, W)
    with torch.no_grad():
        for a, b in zip(donor(x, y).pyramid, model(x, y).pyramid):
            torch.testing.assert_close(a, b, atol=0, rtol=0)  # exact: the same weights in the same modules


def test_released_state_dict_unknown_key(no_typecheck):
    with pytest.raises(ValueError, match="unknown key"):
        convert_released_state_dict({"head.weight": torch.zeros(1)})


def test_retired_onednn_keyword_is_accepted_and_ignored():
    """Checkpoints and configs of 0.1.0 may carry ``onednn_inference``: they still build, to the default network."""
    torch.manual_seed(0)
    old = mmnet_tiny(onednn_inference=True)
    torch.manual_seed(0)
    new = mmnet_tiny()
    assert old.config == new.config
    assert not hasattr(old.config, "onednn_inference")
    for a, b in zip(old.state_dict().values(), new.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert mmnet_resnet50(onednn_inference=False).config.layers == (3, 4, 6, 3)


# Compiled in a fresh interpreter: the test session turns on jaxtyping's run-time checks, which dynamo
# cannot trace. float64: compiled code must give the eager values, and a float32 rounding bound would
# hide a miscompiled kernel of a percent.
MMNET_COMPILE_CHECK = """
import sys, warnings, torch
warnings.simplefilter("ignore")
from actr_core.models import mmnet_tiny
torch.manual_seed(0)
model = mmnet_tiny().eval().double()
src, trg = (torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (0, 1))
compiled = torch.compile(model, fullgraph=True, backend=sys.argv[1])  # fullgraph: no graph break allowed
with torch.no_grad():
    eager, out = model(src, trg), compiled(src, trg)
for level, (a, b) in enumerate(zip(out.pyramid, eager.pyramid, strict=True)):
    torch.testing.assert_close(a, b, msg=lambda m: f"level {level}: {m}")  # float64 defaults: 1e-7
torch.testing.assert_close(out.flow, eager.flow)
print("compiled outputs equal eager")
"""


def _compile_check(backend: str, cache: Path) -> None:
    """Compile with a fresh inductor cache folder: a shared one can hand over kernels built for another
    ATen vector ISA, or a library that a concurrent run is still writing."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    run = subprocess.run(
        [sys.executable, "-c", MMNET_COMPILE_CHECK, backend], capture_output=True, text=True, timeout=1800, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiled outputs equal eager" in run.stdout


@pytest.mark.slow  # ~30 s: a fresh interpreter, the model traced
def test_torch_compile_captures_mmnet_in_one_graph(tmp_path):
    """Dynamo traces MMNet without a graph break and the captured graph gives the eager pyramid and flow."""
    _compile_check("eager", tmp_path)


@pytest.mark.slow  # minutes: inductor generates and compiles C++ kernels
def test_torch_compile_inductor_equals_eager_for_mmnet(tmp_path):
    """torch.compile, the documented fast path of MMNet inference (docs/mmnet.md), gives the eager values."""
    _compile_check("inductor", tmp_path)
