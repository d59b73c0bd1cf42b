"""FLOP counting: fused attention counts what the explicit softmax path counts."""

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

from actr_core.bench import count_flops, register_sdpa_flop_formulas
from actr_core.bench.flops import FUSED_ATTENTION_OPS


def _explicit(q, k, v, mask=None):
    scores = torch.einsum("bgsd,bgtd->bgst", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    return torch.einsum("bgst,bgtd->bgsd", torch.softmax(scores, dim=-1), v)


def _qkv(b=2, g=3, s=7, t=5, d=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(b, g, n, d, generator=gen, dtype=dtype) for n in (s, t, t))


def test_register_is_idempotent_and_covers_the_cpu_kernel():
    register_sdpa_flop_formulas()
    assert register_sdpa_flop_formulas() == ()
    cpu_forward, cpu_backward = FUSED_ATTENTION_OPS[0]
    assert getattr(torch.ops.aten, cpu_forward) in flop_counter.flop_registry
    assert getattr(torch.ops.aten, cpu_backward) in flop_counter.flop_registry


def test_fused_forward_counts_what_the_explicit_path_counts():
    q, k, v = _qkv(s=7, t=5, d=4)  # queries and keys of different lengths: no symmetric accident
    fused, per_op = count_flops(F.scaled_dot_product_attention, q, k, v)
    explicit, _ = count_flops(_explicit, q, k, v)
    assert explicit == 4 * 2 * 3 * 7 * 5 * 4  # two products of 2·b·g·s·t·d
    assert fused == explicit
    assert fused > 0 and "_scaled_dot_product_flash_attention_for_cpu" in per_op


def test_fused_forward_with_a_mask_counts_the_same():
    q, k, v = _qkv(s=6, t=6, d=8)
    mask = torch.randn(6, 6)
    fused, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    explicit, _ = count_flops(lambda: _explicit(q, k, v, mask))
    assert fused == explicit


def test_fused_backward_counts_the_explicit_backward_plus_the_recomputed_scores():
    def step(attention):
        q, k, v = (x.requires_grad_() for x in _qkv(s=7, t=5, d=4))
        attention(q, k, v).sum().backward()

    fused, _ = count_flops(step, F.scaled_dot_product_attention)
    explicit, _ = count_flops(step, _explicit)
    products = 2 * 2 * 3 * 7 * 5 * 4  # one product of 2·b·g·s·t·d
    # explicit: 2 forward + 4 backward products; fused: 2 forward + the scores again + 4 backward
    assert explicit == 6 * products
    assert fused == explicit + products


def test_count_flops_of_a_linear_layer():
    layer = torch.nn.Linear(16, 8)
    total, per_op = count_flops(layer, torch.randn(3, 16))
    assert total == 2 * 3 * 16 * 8
    assert set(per_op) == {"addmm"}


def test_onednn_inference_path_counts_what_the_module_path_counts():
    """MMNet's frozen oneDNN convolutions (eval, no autograd) count the FLOPs of its plain convolutions."""
    import dataclasses
    import warnings

    from actr_core.models.mmnet import MMNet, mmnet_tiny

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = mmnet_tiny().eval()
    plain = MMNet(dataclasses.replace(fast.config, onednn_inference=False)).eval()
    src, trg = torch.randn(1, 3, 64, 96), torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        fused, per_op = count_flops(fast, src, trg)
        reference, _ = count_flops(plain, src, trg)
    assert fused == reference > 0
    assert "_convolution_pointwise" in per_op
