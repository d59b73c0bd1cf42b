"""Every optimised execution path gives the reference path's outputs (within float tolerance).

The optimisations (docs/benchmarks.md, "Performance"): fused attention where no probabilities are
needed, window attention with the bias broadcast to all windows, the super-resolution paths in
one call executed in chunks, channels-last maps, S and T batched through the released block's
shared self-attention stage, bf16 autocast, torch.compile.
"""

import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from tiny_released import TINY_RELEASED, tiny_released_model
from tolerances import float32_tolerance

from actr_core.blocks import DualWindowFlowSR, FlowSRConfig, cpu_bf16_refusal, flow_sr_input, window_self_attention
from actr_core.blocks.released import ReleasedAsymmetricBlock, ReleasedFlowRefiner, ReleasedTargetReweighting
from actr_core.blocks.windows import FUSED_MIN_WINDOW_TOKENS, relative_position_index
from actr_core.models import ACTR, actr_tiny

TINY_SR = FlowSRConfig(dim=16, num_heads=2, head_hidden=8)


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _window_params(c: int, g: int, window: int, dtype=torch.float64):
    gen = _seeded(1)
    return (
        torch.randn(3 * c, c, generator=gen, dtype=dtype) * c**-0.5,
        torch.randn(3 * c, generator=gen, dtype=dtype),
        torch.randn(c, c, generator=gen, dtype=dtype) * c**-0.5,
        torch.randn(c, generator=gen, dtype=dtype),
        torch.randn((2 * window - 1) ** 2, g, generator=gen, dtype=dtype),
    )


def _naive_window_attention(x, qkv_w, qkv_b, proj_w, proj_b, table, window):
    """Unshifted, unpadded Swin attention written out window by window (the textbook reference)."""
    b, h, w, c = x.shape
    g = table.shape[1]
    bias = table[relative_position_index(window)].permute(2, 0, 1)
    out = torch.empty_like(x)
    for i in range(0, h, window):
        for j in range(0, w, window):
            tokens = x[:, i : i + window, j : j + window].reshape(b, window * window, c)
            q, k, v = F.linear(tokens, qkv_w, qkv_b).view(b, -1, 3, g, c // g).permute(2, 0, 3, 1, 4)
            attn = torch.softmax(q @ k.mT * (c // g) ** -0.5 + bias, dim=-1)
            y = F.linear((attn @ v).transpose(1, 2).reshape(b, -1, c), proj_w, proj_b)
            out[:, i : i + window, j : j + window] = y.view(b, window, window, c)
    return out


@pytest.mark.parametrize("window", [4, 8])
@pytest.mark.parametrize("fused", [None, True, False])
def test_window_attention_paths_equal_the_textbook_reference(window, fused):
    params = _window_params(8, 2, window)
    x = torch.randn(2, 16, 24, 8, generator=_seeded(), dtype=torch.float64)
    out = window_self_attention(x, *params, window_size=window, fused=fused)
    torch.testing.assert_close(out, _naive_window_attention(x, *params, window))


def test_window_attention_auto_path_picks_the_fused_kernel_for_large_windows():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    for window, expect_fused in ((8, True), (4, False)):
        assert (window**2 >= FUSED_MIN_WINDOW_TOKENS) == expect_fused
        params = _window_params(8, 2, window, dtype=torch.float32)
        with Ops() as ops:
            window_self_attention(torch.randn(1, 16, 16, 8), *params, window_size=window)
        fused_kernel = any("scaled_dot_product" in name for name in ops.names)
        math_fallback = any("_scaled_dot_product_attention_math" in name for name in ops.names)
        assert fused_kernel == expect_fused and not math_fallback


@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_is_layout_independent(shift):
    """A channels-last view (what the SR rounds pass) gives the same values as a contiguous map."""
    params = _window_params(8, 2, 4, dtype=torch.float32)
    nchw = torch.randn(2, 8, 12, 16, generator=_seeded()).contiguous(memory_format=torch.channels_last)
    view = rearrange(nchw, "b c h w -> b h w c")
    assert view.is_contiguous()
    out = window_self_attention(view, *params, window_size=4, shift=shift)
    expected = window_self_attention(view.contiguous(), *params, window_size=4, shift=shift)
    # maybe other matrix-product kernels for the strided input: qkv over 8 channels, dots over 4, the bias,
    # softmax over 16 tokens, a weighted sum of 16, proj over 8
    torch.testing.assert_close(out, expected, atol=float32_tolerance(expected, terms=8 + 4 + 1 + 18 + 16 + 8), rtol=0)


def test_dual_window_sr_chunks_equal_one_batched_call():
    torch.manual_seed(0)
    sr = DualWindowFlowSR(12, TINY_SR).double().eval()
    flow = torch.randn(6, 2, 4, 5, dtype=torch.float64)  # 3 paths × batch 2, path-major
    features = torch.randn(2, 12, 4, 5, dtype=torch.float64)
    outs = {}
    for chunk in (0, 1, 4):
        sr.chunk = chunk
        outs[chunk] = sr(flow, features)
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(outs[4], outs[0])


def test_dual_window_sr_equals_the_unoptimised_composition():
    """The rounds run on flow_sr_input's repeated, contiguous (NCHW) input, as before the optimisation."""
    torch.manual_seed(0)
    sr = DualWindowFlowSR(12, TINY_SR).double().eval()
    flow = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    features = torch.randn(2, 12, 4, 4, dtype=torch.float64)
    up_flow, x = flow_sr_input(flow, sr.feature_proj(features), TINY_SR.upscale)
    for round_ in sr.rounds:
        x = round_(x.contiguous())
    torch.testing.assert_close(sr(flow, features), up_flow + sr.head(x))


def test_released_refiner_chunks_and_shared_guidance_equal_the_repeated_batch():
    torch.manual_seed(0)
    refiner = ReleasedFlowRefiner(16, 2, (8, 4), hidden=8, reduction=4).double().eval()
    flow_up = torch.randn(6, 2, 16, 16, dtype=torch.float64)  # 3 paths × batch 2, (m b) order
    guidance = torch.randn(2, 14, 16, 16, dtype=torch.float64)
    repeated = guidance.repeat(3, 1, 1, 1)
    refiner.chunk = 0
    reference = refiner(flow_up, repeated)
    for chunk in (0, 1, 2, 4):
        refiner.chunk = chunk
        torch.testing.assert_close(refiner(flow_up, guidance), reference)
        torch.testing.assert_close(refiner(flow_up, repeated), reference)
    # the reference itself: rounds on a plain NCHW concatenation, as the released code runs them
    x = torch.cat((flow_up, repeated), dim=1)
    torch.testing.assert_close(reference, flow_up + refiner.head(refiner.rounds(x)))


def test_released_block_batched_self_attention_equals_two_calls():
    torch.manual_seed(0)
    block = ReleasedAsymmetricBlock(16, 2, 5, reweighting=ReleasedTargetReweighting(16)).double().eval()
    with torch.no_grad():
        block.source_pos.normal_()
    s0, t0 = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    s, t, attn = block(s0, t0, (2, 2))  # 5 tokens: [cls] and a 2 × 2 grid
    # the released order of operations, one stream at a time
    rs = s0 + block.source_pos
    s_att, t_att = block.self_attn(block.norm1(rs)), block.self_attn(block.norm1(t0))
    rs = rs + s_att + block.mlp(block.norm2(s_att))
    rt = t0 + t_att + block.mlp(block.norm2(t_att))
    c_att, ref_attn = block.cross_attn(block.norm1(rs), block.norm1(rt))
    c_att = block.activation(c_att)
    rs = rs + c_att + block.mlp(block.norm2(c_att))
    torch.testing.assert_close(s, rs)
    torch.testing.assert_close(t, block.reweighting(rt, ref_attn))
    torch.testing.assert_close(attn, ref_attn)


def _released_tiny(**changes) -> ACTR:
    torch.manual_seed(0)
    return tiny_released_model(**changes).eval()


def test_released_model_refine_chunk_changes_no_value():
    chunked, batched = _released_tiny(refine_chunk=1), _released_tiny(refine_chunk=0)
    batched.load_state_dict(chunked.state_dict())
    # in float64: the chunks must change no value, not merely stay within a whole model's float32 rounding bound
    chunked, batched = chunked.double(), batched.double()
    src, trg = (torch.randn(2, 3, 64, 64, generator=_seeded(s), dtype=torch.float64) for s in (0, 1))
    with torch.no_grad():
        a, b = chunked(src, trg), batched(src, trg)
    torch.testing.assert_close(a.flows_per_path, b.flows_per_path)  # float64 defaults: 1e-7
    torch.testing.assert_close(a.flow, b.flow)


def _tiny_actr():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return actr_tiny().eval()


def _pair(height=32, width=48, batch=2):
    return (torch.randn(batch, 3, height, width, generator=_seeded(s)) for s in (0, 1))


def test_actr_sr_chunk_changes_no_value():
    model = _tiny_actr().double()  # in float64, as above
    src, trg = (x.double() for x in _pair())
    with torch.no_grad():
        model.upsampler.chunk = 1
        chunked = model(src, trg)
        model.upsampler.chunk = 0
        batched = model(src, trg)
    torch.testing.assert_close(chunked.flows_per_path, batched.flows_per_path)  # float64 defaults: 1e-7


@pytest.mark.parametrize("builder", ["actr", "released"])
def test_bf16_autocast_stays_close_to_fp32(builder):
    model = _tiny_actr() if builder == "actr" else _released_tiny()
    src, trg = _pair(64, 64) if builder == "released" else _pair()
    if refusal := cpu_bf16_refusal():  # PyTorch's own limit (AMX without AVX-512), not the model's
        pytest.skip(f"PyTorch refuses bf16 attention on this CPU: {refusal}")
    with torch.no_grad():
        reference = model(src, trg).flow
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(src, trg).flow.float()
    assert torch.isfinite(low).all()
    # bf16 keeps 8 bits of mantissa, and the soft-argmax's low temperature (tau = 0.0025 on the
    # head mean) multiplies the attention's rounding into the coarse flow: on a CPU with native
    # bf16 matrix units (Intel AMX) the flow moved by 0.28 px of the H/4 grid (0.07 of a token
    # cell), on CPUs that compute bf16 products in float32 by less. Bound: a tenth of a token cell.
    cell = 16 / 4  # flow-grid pixels per token cell (ViT/16, flow at H/4) for both tiny models
    assert (low - reference).abs().max() <= 0.1 * cell


# torch.compile runs in a fresh interpreter: the test session wraps every annotated function in
# run-time shape checks (jaxtyping + beartype), which dynamo cannot trace (a graph break per call).
# The models run in float64: compiled code must give the eager values, and a whole model's float32
# rounding bound (tests/tolerances.py) would hide a miscompiled kernel of a percent.
COMPILE_CHECK = """
import sys, warnings, torch
warnings.simplefilter("ignore")
from actr_core.models import ACTRReleasedConfig, actr_released, actr_tiny
backend = sys.argv[1]
pair = lambda h, w: [torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (0, 1)]
torch.manual_seed(0)
released = actr_released(ACTRReleasedConfig(**%(released)r)).eval().double()
for model, (src, trg) in ((actr_tiny().eval().double(), pair(32, 48)), (released, pair(64, 64))):
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fullgraph: no graph break allowed
    with torch.no_grad():
        eager, out = model(src, trg), compiled(src, trg)
    torch.testing.assert_close(out.flow, eager.flow)  # float64 defaults: 1e-7, far above its rounding
    torch.testing.assert_close(out.correlations, eager.correlations)
print("compiled outputs equal eager")
"""


def _compile_check(backend: str, cache: Path) -> None:
    """Compile in a fresh interpreter with its own inductor cache folder: a cache shared with other runs
    can hand over kernels built for another ATen vector ISA (ATEN_CPU_CAPABILITY), or a library that
    a concurrent run of the suite is still writing ("file too short")."""
    released = {f.name: getattr(TINY_RELEASED, f.name) for f in dataclasses.fields(TINY_RELEASED)}
    script = COMPILE_CHECK % {"released": released}
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}  # (inductor sets the variable in our process)
    run = subprocess.run([sys.executable, "-c", script, backend], capture_output=True, text=True, timeout=1800, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiled outputs equal eager" in run.stdout


@pytest.mark.slow  # ~90 s of CPU: a fresh interpreter, two models traced
def test_torch_compile_captures_tiny_models_in_one_graph(tmp_path):
    """Dynamo traces ACTR (as described) and ACTR as released without a graph break, and the
    captured graphs give the eager outputs (backend ``eager``: no code generation)."""
    _compile_check("eager", tmp_path)


@pytest.mark.slow  # minutes: inductor generates and compiles C++ for both models
def test_torch_compile_inductor_equals_eager(tmp_path):
    """The full compiler (inductor code generation; minutes on two cores)."""
    _compile_check("inductor", tmp_path)


def test_no_attention_falls_back_to_the_unfused_kernel():
    """Every fused attention call of the tiny models reaches the fused kernel (a 3-D mask or a mask
    that needs a gradient would send it to torch's slower math fallback)."""
    from torch.profiler import ProfilerActivity, profile

    for model, (src, trg) in ((_tiny_actr(), _pair()), (_released_tiny(), _pair(64, 64))):
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
            model(src, trg)
        names = {event.key for event in prof.key_averages()}
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
        assert "aten::_scaled_dot_product_attention_math" not in names


def test_the_fallback_detector_sees_a_fallback():
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(1, 2, 16, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(2, 16, 16))  # 3-D mask: fallback
    assert "aten::_scaled_dot_product_attention_math" in {event.key for event in prof.key_averages()}
