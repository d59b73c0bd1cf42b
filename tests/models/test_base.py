"""The model interface (CorrespondenceModel): output dataclass, input checks, keypoint transfer."""

import dataclasses

import pytest
import torch
from tolerances import float32_tolerance

from actr_core.models.base import CorrespondenceModel, MatchOutput, check_image_pair, parameter_count


class ConstantFlow(CorrespondenceModel):
    """A model whose flow is a fixed displacement (in flow-grid pixels) everywhere."""

    def __init__(self, dx: float, dy: float) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor([dx, dy]))

    def forward(self, src, trg):
        check_image_pair(src, trg)
        b, _, h, w = src.shape
        flow = self.shift.view(1, 2, 1, 1).expand(b, 2, h // self.flow_stride, w // self.flow_stride)
        return MatchOutput(flow=flow)

    def loss(self, output, batch):
        return (output.flow - batch.flow).abs().mean()


def test_match_output_is_frozen_and_optional_fields_default_to_none():
    out = MatchOutput(flow=torch.zeros(2, 2, 4, 6))
    assert out.flows_per_path is None and out.coarse_flows is None and out.correlations is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.flow = torch.ones(1)


def test_correspondence_model_is_abstract():
    with pytest.raises(TypeError):
        CorrespondenceModel()


def test_transfer_zero_flow_is_identity_in_the_input_frame():
    model = ConstantFlow(0.0, 0.0)
    out = model(torch.zeros(2, 3, 32, 48), torch.zeros(2, 3, 32, 48))
    kps = torch.tensor([[[0.0, 0.0], [47.0, 31.0], [10.3, 5.7]]]).expand(2, 3, 2).contiguous()
    # to the grid and back (3 + 3 roundings), normalised and back (4), 4 bilinear weights, the addition
    torch.testing.assert_close(model.transfer(out, kps), kps, atol=float32_tolerance(kps, terms=15), rtol=0)


def test_convention_transfer_scales_grid_displacement_by_the_stride():
    """One flow-grid pixel is ``flow_stride`` input pixels (not 1, the misreading that skips the rescale)."""
    model = ConstantFlow(1.0, -0.5)
    out = model(torch.zeros(1, 3, 64, 32), torch.zeros(1, 3, 64, 32))
    kps = torch.tensor([[[12.0, 30.0]]])
    moved = model.transfer(out, kps)
    expected = torch.tensor([[[16.0, 28.0]]])
    torch.testing.assert_close(moved, expected, atol=float32_tolerance(expected, terms=15), rtol=0)  # as above
    assert not torch.allclose(moved, kps + torch.tensor([1.0, -0.5]))


def test_transfer_invalid_keypoints_are_nan_and_ignore_padding():
    model = ConstantFlow(1.0, 1.0)
    out = model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
    kps = torch.tensor([[[4.0, 4.0], [float("nan"), float("nan")]]])
    valid = torch.tensor([[True, False]])
    moved = model.transfer(out, kps, valid)
    assert torch.isfinite(moved[0, 0]).all() and torch.isnan(moved[0, 1]).all()


def test_parameter_count_counts_shared_tensors_once_and_trainable_only():
    lin = torch.nn.Linear(3, 4)
    seq = torch.nn.Sequential(lin, lin)
    assert parameter_count(seq) == 16
    lin.bias.requires_grad_(False)
    assert parameter_count(seq, trainable_only=True) == 12


@pytest.mark.parametrize(
    ("src", "trg", "match"),
    [
        (torch.zeros(1, 3, 250, 256), torch.zeros(1, 3, 250, 256), r"\(1, 3, 250, 256\).*multiples of 16"),
        (torch.zeros(2, 3, 32, 32), torch.zeros(3, 3, 32, 32), "batch size 2 but trg has batch size 3"),
        (torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), "expected 3 channels, got 1"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 3, 32, 32), "dtype torch.uint8"),
        (torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 48), "32x32 but trg is 32x48"),
        (torch.zeros(3, 32, 32), torch.zeros(3, 32, 32), r"\(3, 32, 32\): expected \(b, 3, H, W\)"),
        ([0.0], torch.zeros(1, 3, 32, 32), "must be a torch.Tensor"),
    ],
)
def test_check_image_pair_errors_name_the_values(no_typecheck, src, trg, match):
    with pytest.raises(ValueError, match=match):
        check_image_pair(src, trg)


def test_check_image_pair_other_multiple(no_typecheck):
    assert check_image_pair(torch.zeros(1, 3, 28, 42), torch.zeros(1, 3, 28, 42), multiple=14) == (28, 42)
    with pytest.raises(ValueError, match="multiples of 14"):
        check_image_pair(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), multiple=14)
