"""The device table: CPU values as before, the CUDA column picked by device type, and the blocks
reading it (the SR chunking, the fused-window choice) and mixed precision by name."""

import dataclasses
import warnings

import pytest
import torch

from actr_core.blocks import (
    DEVICE_CHOICES,
    DualWindowFlowSR,
    FlowSRConfig,
    autocast_dtype,
    device_choices,
    device_table,
    flow_sr,
    precision_context,
    released,
    windows,
)
from actr_core.blocks.released import ReleasedFlowRefiner
from actr_core.blocks.windows import FUSED_MIN_WINDOW_TOKENS, window_self_attention

TINY_SR = FlowSRConfig(dim=8, num_heads=2, window_sizes=(2, 4), shift=1, head_hidden=4)


def test_cpu_column_keeps_the_values_the_blocks_had():
    cpu = device_choices("cpu")
    assert (cpu.sr_chunk, cpu.fused_min_window_tokens, cpu.fused_mask_grad, cpu.mixed_precision) == (1, 32, False, False)
    assert FUSED_MIN_WINDOW_TOKENS == 32


def test_device_types_pick_their_column():
    assert device_choices("cuda:1") is DEVICE_CHOICES["cuda"] is device_choices(torch.device("cuda"))
    assert device_choices("cuda").sr_chunk == 0 and device_choices("cuda").fused_min_window_tokens == 0
    assert device_choices("meta") is DEVICE_CHOICES["cpu"]  # a type not in the table takes CPU's


def test_a_bad_column_is_refused():
    with pytest.raises(ValueError, match="sr_chunk = -1"):
        device_table.DeviceChoices(sr_chunk=-1, fused_min_window_tokens=0, fused_mask_grad=True, mixed_precision=True)


def test_precision_by_name():
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16 and autocast_dtype("fp16", "cuda:0") is torch.float16
    assert autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("bf16", "cpu") is None  # CPU runs float32 whatever is asked
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("fp8", "cuda")
    with precision_context("bf16", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # building a CUDA autocast without a GPU warns that it is disabled
        assert isinstance(precision_context("bf16", "cuda"), torch.autocast)


def test_training_precision_follows_the_table():
    from actr_core.training import precision_settings

    assert precision_settings("fp16", torch.device("cuda")) == (torch.float16, True)
    assert precision_settings("bf16", torch.device("cuda")) == (torch.bfloat16, False)
    assert precision_settings("bf16", torch.device("cpu")) == (None, False)


def _as_cuda_column(monkeypatch):
    """Make CPU tensors take the CUDA column (what a GPU run would choose)."""
    monkeypatch.setitem(DEVICE_CHOICES, "cpu", DEVICE_CHOICES["cuda"])


@pytest.mark.parametrize("module", [flow_sr, released])
def test_sr_modules_take_their_chunk_from_the_table(monkeypatch, module):
    seen = []
    real = module.refine_paths
    monkeypatch.setattr(module, "refine_paths", lambda *a, chunk: seen.append(chunk) or real(*a, chunk=chunk))
    torch.manual_seed(0)
    sr = DualWindowFlowSR(6, TINY_SR) if module is flow_sr else ReleasedFlowRefiner(8, 2, (2, 4), hidden=4, reduction=4)
    flow, second = torch.randn(4, 2, 4, 6), torch.randn(2, 6, 4, 6)  # 2 paths × batch 2; features or guidance
    first = sr(flow, second)
    _as_cuda_column(monkeypatch)
    batched = sr(flow, second)
    sr.chunk = 2  # an explicit chunk overrides the table
    sr(flow, second)
    assert seen == [1, 0, 2]
    torch.testing.assert_close(batched, first, atol=1e-5, rtol=1e-5)


def _window_inputs(window, requires_grad):
    g = torch.Generator().manual_seed(0)
    c, heads = 8, 2
    weights = [torch.randn(3 * c, c, generator=g) * 0.3, torch.zeros(3 * c), torch.randn(c, c, generator=g) * 0.3, torch.zeros(c)]
    table = torch.randn((2 * window - 1) ** 2, heads, generator=g, requires_grad=requires_grad)
    return torch.randn(1, 8, 8, c, generator=g), [*weights, table]


@pytest.mark.parametrize(
    ("column", "window", "requires_grad", "expect_fused"),
    [
        ("cpu", 4, False, False),
        ("cpu", 8, False, True),
        ("cpu", 8, True, False),  # CPU's fused kernel has no gradient for the mask
        ("cuda", 4, False, True),
        ("cuda", 8, True, True),
    ],
)
def test_window_attention_path_follows_the_table(monkeypatch, column, window, requires_grad, expect_fused):
    if column == "cuda":
        _as_cuda_column(monkeypatch)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(windows.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, params = _window_inputs(window, requires_grad)
    out = window_self_attention(x, *params, window_size=window)
    assert bool(calls) == expect_fused
    reference = window_self_attention(x, *params, window_size=window, fused=not expect_fused)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_table_entries_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEVICE_CHOICES["cpu"].sr_chunk = 4  # type: ignore[misc]
