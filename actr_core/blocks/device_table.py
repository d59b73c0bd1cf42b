"""Execution choices that depend on the device type, decided in one table.

Every entry picks between execution paths of a block that are tested equal (chunked or batched
super-resolution, fused or explicit window attention, float32 or mixed precision on request):
they change speed and memory, never what a model computes in float32. The blocks ask
:func:`device_choices` with the device of their input at each call, so one model moves between
devices without being rebuilt; an explicit argument of a block (``chunk=``, ``fused=``) overrides
the table.

=============================  ==========  ==========  ==================================================
choice                         ``cpu``     ``cuda``    why
=============================  ==========  ==========  ==================================================
``sr_chunk``                   1           0 (all)     CPU: one flow at a time keeps the SR working set in
                                                       the caches and is no slower on 2 cores
                                                       (docs/benchmarks.md); GPU: one batched call fills
                                                       the device, fewer kernel launches
``fused_min_window_tokens``    32          0           CPU: the fused kernel is ~4× faster for 8×8 windows,
                                                       ~1.5× slower for 4×4 (measured,
                                                       ``benchmarks/block_choices.py``); GPU: the fused
                                                       kernels win at every size
``fused_mask_grad``            False       True        CPU's fused kernel has no gradient for the additive
                                                       mask (torch falls back to a slower path), CUDA's
                                                       memory-efficient kernel has one
``mixed_precision``            False       True        ``precision="bf16"/"fp16"`` runs under autocast;
                                                       CPU autocast is slower than float32 for these
                                                       models on small machines, so CPU stays float32
=============================  ==========  ==========  ==================================================

The CPU column holds the values the blocks had before the table existed (every CPU equality test
and the equality with the released code are unchanged). The CUDA column is a choice by the kind
of kernel a GPU offers, not yet measured on a GPU: ``benchmarks/gpu_check.py`` measures it. A
device type not in the table (``mps``, ``xpu``, ...) takes the CPU column.
"""

import contextlib
import dataclasses
import functools

import torch

__all__ = [
    "DEVICE_CHOICES",
    "PRECISIONS",
    "DeviceChoices",
    "autocast_dtype",
    "cpu_bf16_refusal",
    "device_choices",
    "precision_context",
]

#: precision name → autocast dtype (None: float32, no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class DeviceChoices:
    """One column of the table (see the module docstring for each value's reason)."""

    sr_chunk: int  # flows per call of the SR rounds (DualWindowFlowSR, ReleasedFlowRefiner); 0 = all at once
    fused_min_window_tokens: int  # windows of at least this many tokens take F.scaled_dot_product_attention
    fused_mask_grad: bool  # the fused kernel differentiates its additive mask (a trained bias table may use it)
    mixed_precision: bool  # a "bf16" / "fp16" precision request runs under autocast (else float32)

    def __post_init__(self) -> None:
        if self.sr_chunk < 0 or self.fused_min_window_tokens < 0:
            raise ValueError(
                f"sr_chunk = {self.sr_chunk}, fused_min_window_tokens = {self.fused_min_window_tokens}: expected >= 0"
            )


#: device type → its choices; :func:`device_choices` reads it (types not listed take "cpu")
DEVICE_CHOICES: dict[str, DeviceChoices] = {
    "cpu": DeviceChoices(sr_chunk=1, fused_min_window_tokens=32, fused_mask_grad=False, mixed_precision=False),
    "cuda": DeviceChoices(sr_chunk=0, fused_min_window_tokens=0, fused_mask_grad=True, mixed_precision=True),
}


def device_choices(device: torch.device | str) -> DeviceChoices:
    """The choices for ``device``'s type (``"cuda:1"`` → the ``cuda`` column); unlisted types take CPU's."""
    kind = torch.device(device).type
    return DEVICE_CHOICES.get(kind, DEVICE_CHOICES["cpu"])


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype a precision name (``"fp32"``, ``"bf16"``, ``"fp16"``) gets on ``device``:
    its dtype where the table enables mixed precision (CUDA), None (float32) elsewhere.

    Raises:
        ValueError: an unknown precision name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision] if device_choices(device).mixed_precision else None


def precision_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """Run a forward pass at a precision: ``torch.autocast`` with :func:`autocast_dtype` on
    ``device``'s type, or a no-op where that is None (``"fp32"``, or a device without mixed precision).

    The inference entry point: ``with precision_context("bf16", device), torch.inference_mode():
    flow = model(src, trg).flow`` (the flow comes out in float32 where the last operation is a
    float32 one under autocast, else cast it with ``.float()``). fp16 has a narrower range than
    bf16: for training it needs a ``torch.amp.GradScaler`` (``actr_core.training``); bf16 does not.
    """
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@functools.cache
def cpu_bf16_refusal() -> str | None:
    """PyTorch's reason for refusing bf16 attention on this CPU (its first line), or None when it runs.

    On a CPU with AMX, PyTorch's bf16 attention kernel picks the AMX route from the hardware and
    then refuses it when ``ATEN_CPU_CAPABILITY=default`` has switched AVX-512 off ("pack_vnni2 is
    only supported when avx512 is supported"): a limit of the platform, found by one tiny call
    (once per process). bf16 matching on the CPU (:class:`actr_core.Matcher`) is refused with this
    reason instead of failing inside the model.
    """
    q = torch.zeros(1, 1, 64, 16, dtype=torch.bfloat16)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return None
