"""FLOP counting with ``torch.utils.flop_counter``, including the fused attention kernels it misses.

# b batch · g heads · s query tokens · t key tokens · d channels per head

``FlopCounterMode`` counts matrix products by the ATen operator that runs. On CPU,
``F.scaled_dot_product_attention`` runs ``aten._scaled_dot_product_flash_attention_for_cpu``
(forward) and ``..._backward``, which torch has no formula for: the counter reports 0 for them, so
a model using fused attention would look cheaper than its explicit-softmax twin.
:func:`register_sdpa_flop_formulas` registers torch's own SDPA formulas for those kernels (and the
other fused variants torch leaves out), so that a fused forward counts exactly what the explicit
``softmax(q kᵀ) v`` path counts: ``2·b·g·s·t·d`` for ``q kᵀ`` plus as much for ``· v`` (tested).
The backward formula is torch's: it includes the recomputation of ``q kᵀ`` that fused kernels do.

oneDNN's fused convolution (``torch.ops.mkldnn._convolution_pointwise``, both overloads: the
frozen inference path of MMNet's backbone) is not counted either; :func:`register_onednn_flop_formulas`
counts it as the convolution it computes (torch's ``conv_flop_count``; the fused bias, activation
and residual add are not matrix products, as for an ordinary convolution).

Registration changes a process-wide table, so it happens only when called (never at import) and
is idempotent.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "FUSED_ATTENTION_OPS",
    "count_flops",
    "register_flop_formulas",
    "register_onednn_flop_formulas",
    "register_sdpa_flop_formulas",
]

#: fused attention kernels without a formula in torch (forward, backward); registered when present
FUSED_ATTENTION_OPS: tuple[tuple[str, str], ...] = (
    ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"),
    ("_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_fused_attention_overrideable_backward"),
)


def _forward_formula(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    del args, kwargs  # dropout, causal flag, mask and scale change no matrix product
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _backward_formula(
    grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    del args, kwargs
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def register_sdpa_flop_formulas() -> tuple[str, ...]:
    """Register FLOP formulas for the fused attention kernels torch does not count.

    Returns the names of the operators registered by this call (empty when they already were, by
    an earlier call or by torch itself).
    """
    registered = []
    for forward, backward in FUSED_ATTENTION_OPS:
        for name, formula in ((forward, _forward_formula), (backward, _backward_formula)):
            packet = getattr(torch.ops.aten, name, None)
            if packet is None or packet in flop_counter.flop_registry:
                continue
            flop_counter.register_flop_formula(packet)(formula)
            registered.append(name)
    return tuple(registered)


def _onednn_conv_formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """``mkldnn::_convolution_pointwise(X, W, B, padding, ...)`` or ``.binary(X, other, W, B, padding, ...)``."""
    del kwargs
    binary = not isinstance(args[3], (list, tuple))  # the default overload has the padding there
    x, w = args[0], args[2] if binary else args[1]
    return flop_counter.conv_flop_count(list(x.shape), list(w.shape), list(out_val.shape), transposed=False)


def register_onednn_flop_formulas() -> tuple[str, ...]:
    """Register a FLOP formula for oneDNN's fused convolution when torch has the operator and none."""
    packet = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
    if packet is None or packet in flop_counter.flop_registry:
        return ()
    flop_counter.register_flop_formula(packet, get_raw=True)(_onednn_conv_formula)
    return ("mkldnn._convolution_pointwise",)


def register_flop_formulas() -> tuple[str, ...]:
    """Every formula of this module (fused attention, oneDNN convolution); names newly registered."""
    return register_sdpa_flop_formulas() + register_onednn_flop_formulas()


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
    """FLOPs of one call ``fn(*args, **kwargs)``: ``(total, per operator)``.

    Fused attention and oneDNN convolutions are counted (:func:`register_flop_formulas` is called
    first). Operators are keyed by name (``"mm"``, ``"bmm"``, ``"convolution"``, ...).
    """
    register_flop_formulas()
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    per_op = {str(op).split(".")[-1]: int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op
