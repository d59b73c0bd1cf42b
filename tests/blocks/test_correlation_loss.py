"""Cross-entropy of a correlation against the ground-truth match: known values, the bilinear target,
invalid cells, gradients, the module's pooling and paths, error paths."""

import math

import pytest
import torch
from tolerances import float32_tolerance

from actr_core.blocks import CorrelationCrossEntropy, correlation_cross_entropy


def _one_hot(b: int, h: int, w: int, match: torch.Tensor) -> torch.Tensor:
    """corr (b, h, w, h, w) putting all mass of every source cell on the integer cell ``pos + match``."""
    corr = torch.zeros(b, h, w, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            x, y = min(j + int(match[0]), w - 1), min(i + int(match[1]), h - 1)
            corr[:, i, j, y, x] = 1.0
    return corr


def test_convention_target_is_source_cell_plus_flow_channel_zero_x():
    """All mass at (x + 1, y) scores 0 for the flow (1, 0) and −log(tiny) for (0, 1), the swapped reading."""
    b, h, w = 2, 3, 4
    corr = _one_hot(b, h, w, torch.tensor([1, 0]))
    valid = torch.zeros(b, h, w, dtype=torch.bool)
    valid[:, :, : w - 1] = True  # cells whose match stays inside
    right = torch.zeros(b, 2, h, w, dtype=torch.float64)
    right[:, 0] = 1.0
    assert correlation_cross_entropy(corr, right, valid).item() == 0.0  # exact: −log 1
    down = torch.zeros(b, 2, h, w, dtype=torch.float64)
    down[:, 1] = 1.0
    floor = -math.log(torch.finfo(torch.float64).tiny)
    assert correlation_cross_entropy(corr, down, valid & (torch.arange(h) < h - 1).view(1, h, 1)).item() == pytest.approx(floor)


def test_sub_cell_match_spreads_bilinearly():
    """A match a quarter of a cell right of a cell centre weighs that cell 3/4 and its right neighbour 1/4."""
    h, w = 2, 3
    corr = torch.full((1, h, w, h, w), 1.0 / (h * w), dtype=torch.float64)
    corr[0, 0, 0] = 0.0
    corr[0, 0, 0, 0, 0], corr[0, 0, 0, 0, 1] = 0.5, 0.5
    target = torch.zeros(1, 2, h, w, dtype=torch.float64)
    target[0, 0, 0, 0] = 0.25
    valid = torch.zeros(1, h, w, dtype=torch.bool)
    valid[0, 0, 0] = True
    expected = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))
    assert correlation_cross_entropy(corr, target, valid).item() == pytest.approx(expected, abs=1e-12)
    # the minimum over distributions is at the bilinear weights themselves
    better = corr.clone()
    better[0, 0, 0, 0, 0], better[0, 0, 0, 0, 1] = 0.75, 0.25
    assert correlation_cross_entropy(better, target, valid) < correlation_cross_entropy(corr, target, valid)


def test_invalid_cells_reach_neither_value_nor_gradient_and_samples_average():
    torch.manual_seed(0)
    b, h, w = 2, 3, 5
    logits = torch.randn(b, h, w, h * w, requires_grad=True)
    corr = torch.softmax(logits, -1).view(b, h, w, h, w)
    target = torch.randn(b, 2, h, w)
    valid = torch.rand(b, h, w) > 0.4
    valid[1] = False
    valid[1, 0, 0] = True
    poisoned = torch.where(valid.unsqueeze(1), target, torch.full_like(target, float("nan")))
    loss = correlation_cross_entropy(corr, poisoned, valid)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert (logits.grad[~valid] == 0).all()
    per_sample = [correlation_cross_entropy(corr[i : i + 1], target[i : i + 1], valid[i : i + 1]) for i in range(b)]
    mean = (per_sample[0] + per_sample[1]) / 2
    assert loss.item() == pytest.approx(mean.item(), abs=float32_tolerance(mean, terms=h * w))


def test_no_valid_cell_gives_zero_connected_to_the_graph():
    corr = torch.full((1, 2, 2, 2, 2), 0.25, requires_grad=True)
    loss = correlation_cross_entropy(corr, torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (corr.grad == 0).all()


def test_gradcheck():
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 2, 2, 3, dtype=torch.float64) * 2 - 1
    valid = torch.tensor([[[True, True, False], [True, False, True]]] * 2)

    def f(x):
        return correlation_cross_entropy(torch.softmax(x, -1).view(2, 2, 3, 2, 3), target, valid)

    assert torch.autograd.gradcheck(f, (logits,))


def test_module_pools_the_flow_to_the_token_grid_and_averages_paths():
    """Flow grid 2× the token grid: the module equals the function on the pooled flow, path mean, times the weight."""
    torch.manual_seed(2)
    b, m, hs, ws = 2, 3, 3, 4
    corr = torch.softmax(torch.randn(b, m, hs, ws, hs * ws), -1).view(b, m, hs, ws, hs, ws)
    flow = torch.randn(b, 2, 2 * hs, 2 * ws)
    valid = torch.ones(b, 2 * hs, 2 * ws, dtype=torch.bool)
    valid[0, :2, :2] = False  # token cell (0, 0) of sample 0 becomes invalid
    out = CorrelationCrossEntropy(0.5)(corr, flow, valid)
    pooled = torch.nn.functional.avg_pool2d(flow, 2) / 2
    coarse_valid = torch.ones(b, hs, ws, dtype=torch.bool)
    coarse_valid[0, 0, 0] = False
    expected = 0.5 * torch.stack([correlation_cross_entropy(corr[:, i], pooled, coarse_valid) for i in range(m)]).mean()
    assert out.item() == pytest.approx(expected.item(), abs=float32_tolerance(expected, terms=hs * ws * m))


@pytest.mark.usefixtures("no_typecheck")
class TestErrors:
    def test_unequal_grids(self):
        with pytest.raises(ValueError, match=r"\(1, 2, 3, 3, 2\)"):
            correlation_cross_entropy(torch.zeros(1, 2, 3, 3, 2), torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 3, dtype=torch.bool))

    def test_target_shape(self):
        with pytest.raises(ValueError, match=r"target \(1, 2, 3, 2\)"):
            correlation_cross_entropy(torch.zeros(1, 2, 3, 2, 3), torch.zeros(1, 2, 3, 2), torch.ones(1, 2, 3, dtype=torch.bool))

    def test_mask_dtype(self):
        with pytest.raises(ValueError, match="boolean"):
            correlation_cross_entropy(torch.zeros(1, 2, 3, 2, 3), torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 3))

    def test_weight_must_be_positive(self):
        with pytest.raises(ValueError, match="weight = 0"):
            CorrelationCrossEntropy(0.0)

    def test_flow_grid_not_a_multiple(self):
        with pytest.raises(ValueError, match=r"flow grid \(5, 8\)"):
            CorrelationCrossEntropy(1.0)(
                torch.zeros(1, 1, 2, 4, 2, 4), torch.zeros(1, 2, 5, 8), torch.ones(1, 5, 8, dtype=torch.bool)
            )
