"""MMNet's multi-scale blocks: dilated pyramid, local self-attention, top-down fusion."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tolerances import float32_tolerance
from torch import nn

from actr_core.blocks.multiscale import (
    LocalSelfAttention,
    MultiScaleDilatedBlock,
    MultiScaleStage,
    TopDownFusion,
    local_self_attention,
    multiscale_dilated_conv,
    multiscale_stage,
    top_down_fusion,
)


def _released_order_attention(module: LocalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The released order: gather the replicate-padded 3x3 neighbours first, project each, then attend."""
    b, c, h, w = x.shape
    r = module.kernel_size
    d = module.reduced_channels
    wq, wk, wv = module.qkv.weight.chunk(3, dim=0)
    bq, bk, bv = module.qkv.bias.chunk(3, dim=0)
    neighbours = F.unfold(F.pad(x, (r // 2,) * 4, mode="replicate"), r).view(b, c, r * r, h, w)
    neighbours = neighbours.permute(0, 2, 1, 3, 4).reshape(b * r * r, c, h, w)
    theta = F.conv2d(x, wq, bq)  # b d h w
    phi = F.conv2d(neighbours, wk, bk).view(b, r * r, d, h, w)
    g = F.conv2d(neighbours, wv, bv).view(b, r * r, d, h, w)
    sim = F.cosine_similarity(phi, theta[:, None], dim=2, eps=module.eps)  # b k h w
    attn = sim.softmax(dim=1)
    out = (attn[:, :, None] * g).sum(dim=1)
    return x + module.proj(out)


class TestMultiScaleDilated:
    def test_shapes_h_ne_w(self):
        block = MultiScaleDilatedBlock(6, 5, hidden_channels=4, dilations=(1, 2, 3))
        out = block(torch.randn(2, 6, 7, 11))
        assert out.shape == (2, 5, 7, 11)

    def test_known_value_with_zero_branches(self):
        # identity input conv on one channel, zero branch weights with biases: out = relu(x) + Σ relu(b_r)
        x = torch.randn(1, 1, 5, 6)
        weight = torch.zeros(1, 1, 3, 3)
        weight[0, 0, 1, 1] = 1.0
        branch_w = [torch.zeros(1, 1, 3, 3) for _ in range(3)]
        branch_b = [torch.tensor([0.5]), torch.tensor([-1.0]), torch.tensor([2.0])]
        out = multiscale_dilated_conv(x, weight, None, branch_w, branch_b, (4, 8, 12))
        expected = x.relu() + 2.5
        # a 3x3 convolution (9 terms), then three branch additions
        torch.testing.assert_close(out, expected, atol=float32_tolerance(expected, terms=12), rtol=0)

    def test_dilated_branch_reaches_exactly_rate_cells_away(self):
        x = torch.zeros(1, 1, 9, 9)
        x[0, 0, 4, 4] = 1.0
        weight = torch.zeros(1, 1, 3, 3)
        weight[0, 0, 1, 1] = 1.0
        branch = torch.ones(1, 1, 3, 3)
        out = multiscale_dilated_conv(x, weight, None, [branch], [None], (3,)) - x
        rows, cols = torch.nonzero(out[0, 0], as_tuple=True)
        assert set(rows.tolist()) == {1, 4, 7} and set(cols.tolist()) == {1, 4, 7}

    def test_module_matches_released_composition(self):
        # released: o = relu(conv(x)); o + relu(conv1(o)) + relu(conv2(o)) + relu(conv3(o)); then 1x1 down
        block = MultiScaleDilatedBlock(3, 2, hidden_channels=4, dilations=(1, 2, 3), init_std=0.3)
        x = torch.randn(2, 3, 6, 8)
        ref = copy.deepcopy(block).double()
        o = ref.conv(x.double()).relu()
        expected = ref.proj(o + sum(conv(o).relu() for conv in ref.branches))
        # 3x3 over 3 channels (27), 3x3 over 4 (36), 4 summed maps, 1x1 over 4
        torch.testing.assert_close(block(x).double(), expected, atol=float32_tolerance(expected, terms=71), rtol=0)

    def test_init_is_normal_with_zero_bias(self):
        torch.manual_seed(0)
        block = MultiScaleDilatedBlock(64, 3, hidden_channels=32, init_std=0.01)
        assert abs(block.conv.weight.std().item() - 0.01) < 1e-3  # sampling bound (~20 standard errors), not rounding
        assert torch.count_nonzero(block.conv.bias) == 0
        assert all(torch.count_nonzero(c.bias) == 0 for c in block.branches)

    def test_gradcheck(self):
        torch.manual_seed(0)
        x = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
        w = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
        bw = [torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        bb = [torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        assert torch.autograd.gradcheck(
            lambda x, w, a, b, c, d: multiscale_dilated_conv(x, w, None, [a, b], [c, d], (1, 2)),
            (x, w, bw[0], bw[1], bb[0], bb[1]),
            fast_mode=True,
        )

    def test_errors(self, no_typecheck):
        with pytest.raises(ValueError, match="odd kernel"):
            MultiScaleDilatedBlock(3, 2, kernel_size=2)
        with pytest.raises(ValueError, match="dilations"):
            MultiScaleDilatedBlock(3, 2, dilations=(0, 1))
        with pytest.raises(ValueError, match="channels"):
            multiscale_dilated_conv(torch.randn(1, 4, 5, 5), torch.randn(2, 3, 3, 3), None, [], [], ())
        with pytest.raises(ValueError, match="one of each"):
            multiscale_dilated_conv(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3), None, [torch.randn(2, 2, 3, 3)], [], (1,))
        with pytest.raises(ValueError, match="4 dimensions"):
            multiscale_dilated_conv(torch.randn(3, 5, 5), torch.randn(2, 3, 3, 3), None, [], [], ())


class TestLocalSelfAttention:
    def test_shapes_h_ne_w(self):
        module = LocalSelfAttention(21)
        assert module.reduced_channels == 10
        assert module(torch.randn(2, 21, 5, 9)).shape == (2, 21, 5, 9)

    def test_equals_released_order(self):
        torch.manual_seed(0)
        module = LocalSelfAttention(6, kernel_size=3)
        x = torch.randn(2, 6, 5, 7)
        expected = _released_order_attention(copy.deepcopy(module).double(), x.double())
        # qkv over 6 channels, cosine over 3 (+ norms), softmax and weighted sum over 9, proj over 3, residual
        torch.testing.assert_close(module(x).double(), expected, atol=float32_tolerance(expected, terms=35), rtol=0)

    def test_constant_values_pass_through(self):
        # the weights sum to one, so a constant value field is returned unchanged
        q, k = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
        v = torch.full((2, 3, 4, 6), 1.5)
        # softmax over 9 neighbours (exp, sum, divide), then a weighted sum of 9
        torch.testing.assert_close(local_self_attention(q, k, v), v, atol=float32_tolerance(v, terms=20), rtol=0)

    def test_window_of_one_returns_values(self):
        q, k, v = torch.randn(3, 1, 2, 3, 4).unbind(0)
        # exact: a softmax over one neighbour is exp(0) / exp(0) = 1
        torch.testing.assert_close(local_self_attention(q, k, v, kernel_size=1), v, atol=0, rtol=0)

    def test_known_value_two_cells(self):
        # 1 x 2 grid, one channel: cosine similarities are ±1; replicate padding repeats cells
        q = torch.tensor([[[[1.0, 1.0]]]])
        k = torch.tensor([[[[1.0, -1.0]]]])
        v = torch.tensor([[[[2.0, 4.0]]]])
        # each cell's 3x3 window over the padded 1x2 row: columns (0,0,1) for cell 0 and (0,1,1) for cell 1,
        # each repeated on 3 rows
        e, ei = torch.exp(torch.tensor(1.0)), torch.exp(torch.tensor(-1.0))
        cell0 = (6 * e * 2 + 3 * ei * 4) / (6 * e + 3 * ei)
        cell1 = (3 * e * 2 + 6 * ei * 4) / (3 * e + 6 * ei)
        out = local_self_attention(q, k, v)
        expected = torch.stack((cell0, cell1))
        torch.testing.assert_close(out[0, 0, 0], expected, atol=float32_tolerance(expected, terms=20), rtol=0)

    def test_gradcheck(self):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        assert torch.autograd.gradcheck(local_self_attention, (q, k, v), fast_mode=True)

    def test_errors(self, no_typecheck):
        x = torch.randn(1, 2, 3, 4)
        with pytest.raises(ValueError, match="same shape"):
            local_self_attention(x, x, torch.randn(1, 2, 3, 5))
        with pytest.raises(ValueError, match="odd window"):
            local_self_attention(x, x, x, kernel_size=2)
        with pytest.raises(ValueError, match="eps"):
            local_self_attention(x, x, x, eps=0.0)
        with pytest.raises(ValueError, match="reduced_channels"):
            LocalSelfAttention(1)


class TestTopDownFusion:
    def test_shapes_h_ne_w(self):
        module = TopDownFusion(4)
        out = module(torch.randn(2, 4, 6, 10), torch.randn(2, 4, 3, 5))
        assert out.shape == (2, 4, 6, 10)

    def test_matches_released_composition(self):
        module = TopDownFusion(3)
        fine, coarse = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 2, 3)
        up = nn.functional.conv_transpose2d(coarse, module.up.weight, stride=2, padding=1)
        expected = module.fuse(torch.cat((fine, up), dim=1))
        # exact: the same two kernels on the same inputs
        torch.testing.assert_close(module(fine, coarse), expected, atol=0, rtol=0)
        assert module.up.bias is None

    def test_gradcheck(self):
        torch.manual_seed(0)
        fine = torch.randn(1, 1, 4, 6, dtype=torch.float64, requires_grad=True)
        coarse = torch.randn(1, 1, 2, 3, dtype=torch.float64, requires_grad=True)
        up = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
        fw = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
        fb = torch.randn(1, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(top_down_fusion, (fine, coarse, up, fw, fb), fast_mode=True)

    def test_size_mismatch(self, no_typecheck):
        module = TopDownFusion(2)
        with pytest.raises(ValueError, match="does not match fine"):
            module(torch.randn(1, 2, 5, 6), torch.randn(1, 2, 2, 3))


class TestMultiScaleStage:
    def test_equals_sum_of_blocks_h_ne_w(self):
        torch.manual_seed(0)
        blocks = [MultiScaleDilatedBlock(6, 5, hidden_channels=4, dilations=(1, 2, 3), init_std=0.3) for _ in range(3)]
        stage = MultiScaleStage.from_blocks(blocks)
        xs = [torch.randn(2, 6, 5, 9) for _ in blocks]
        expected = sum(copy.deepcopy(block).double()(x.double()) for block, x in zip(blocks, xs))
        # 3x3 over 6 channels (54), 3x3 over 4 (36), 4 summed maps, 1x1 over 4, 3 blocks summed
        torch.testing.assert_close(stage(xs).double(), expected, atol=float32_tolerance(expected, terms=101), rtol=0)
        assert stage(xs).shape == (2, 5, 5, 9)

    def test_gradients_equal_sum_of_blocks(self):
        torch.manual_seed(0)
        blocks = [MultiScaleDilatedBlock(3, 2, hidden_channels=2, dilations=(1, 2), init_std=0.5) for _ in range(2)]
        stage = MultiScaleStage.from_blocks(blocks)
        xs = [torch.randn(1, 3, 4, 6, requires_grad=True) for _ in blocks]
        g_stage = torch.autograd.grad(stage(xs).square().sum(), xs)
        xs64 = [x.detach().double().requires_grad_() for x in xs]
        out64 = sum(copy.deepcopy(b).double()(x) for b, x in zip(blocks, xs64))
        g_blocks = torch.autograd.grad(out64.square().sum(), xs64)
        # forward 27 + 18 + 3 + 2 + 2 terms, backward through the 1x1 (2), the branches (18 + 3) and the input conv (18)
        for a, b in zip(g_stage, g_blocks):
            torch.testing.assert_close(a.double(), b, atol=float32_tolerance(b, terms=93), rtol=0)

    def test_one_projection_bias(self):
        stage = MultiScaleStage(8, 3, 4, hidden_channels=2)
        assert stage.proj.weight.shape == (3, 8, 1, 1) and stage.proj.bias.shape == (3,)
        assert stage.branches[0].groups == 4

    def test_gradcheck(self):
        torch.manual_seed(0)
        xs = [torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        ws = [torch.randn(2, 1, 3, 3, dtype=torch.float64) for _ in range(2)]
        bw = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
        pw = torch.randn(1, 4, 1, 1, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda a, b, w, p: multiscale_stage([a, b], ws, [None, None], [w], [None], (2,), p, None),
            (*xs, bw, pw),
            fast_mode=True,
        )

    def test_errors(self, no_typecheck):
        w = [torch.randn(2, 3, 3, 3)]
        with pytest.raises(ValueError, match="one each"):
            multiscale_stage([], [], [], [], [], (), torch.randn(1, 2, 1, 1), None)
        with pytest.raises(ValueError, match="must match features"):
            multiscale_stage(
                [torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 5)], w * 2, [None, None], [], [], (), torch.randn(1, 4, 1, 1), None
            )
        with pytest.raises(ValueError, match="num_maps"):
            MultiScaleStage(3, 2, 0)
