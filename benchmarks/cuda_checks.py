"""The checks of the CUDA paths, in one place: ``tests/cuda`` runs them under pytest (marked ``cuda``,
skipped without a GPU) and ``benchmarks/gpu_check.py`` runs them directly where pytest is missing.

Each check builds what it needs from a registered model name (``actr_core.models.model_entries``),
runs on ``device``, raises ``AssertionError`` naming the figures when it fails and returns the
figures when it passes. They need the core install only (torch, timm, einops, jaxtyping, numpy).

Tolerances (stated once, here):
    Forward equality: the flow on ``device`` in float32 with TF32 off, compared with CPU float64
    (the same weights), may differ by at most ``max(8 · e_cpu, 1e-4 · (1 + max|flow|))`` where
    ``e_cpu`` is CPU float32's own difference from float64: the device may round differently,
    not worse. Compiled and channels-last forwards, and gradient checkpointing's gradients, are
    compared with the plain float32 run on the same device, within ``1e-4 · (1 + max|value|)``.
    Mixed precision (bf16 / fp16 autocast) is checked for finite outputs, loss and gradients, not
    for values.
"""

import contextlib
import copy
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from model_costs import synthetic_batch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from actr_core.models import build_model, model_entries

#: forward-equality frame ``(H, W)``: H ≠ W, multiples of 16 (models with a fixed frame use theirs)
EQUALITY_SIZE = (64, 96)
FIXED_FRAME = {"actr_released": (256, 256)}  # ACTR as released takes its 256 × 256 frame only
RELATIVE_TOLERANCE = 1e-4  # of (1 + max|value|), see the module docstring
CPU_ERROR_FACTOR = 8.0  # the device may be this many times CPU float32's own error from float64
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
COMPILE_MODEL = "actr_small"  # the one torch.compile case of the GPU check
CHANNELS_LAST_MODELS = ("mmnet_tiny", "mmnet_resnet50")  # models with a channels_last switch (MMNetConfig)
CHECKPOINTING_MODELS = ("actr_tiny", "actr_conv_tiny")  # ViT and CNN backbones, both checkpointed (those in the run)


def registered_models() -> list[str]:
    """Every registered model name (a newly registered model gets its checks)."""
    return [entry.name for entry in model_entries()]


@functools.cache
def _built(name: str, options: tuple[tuple[str, Any], ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-initialisation notices
        return build_model(name, **dict(options))


def build(name: str, **kwargs: Any) -> torch.nn.Module:
    """The registered model ``name`` with seeded random weights (no weight files), in eval mode, on
    CPU: a copy of the one built for the first check that asked (building ViT-B takes seconds)."""
    return copy.deepcopy(_built(name, tuple(sorted(kwargs.items())))).eval()


def frame(name: str, size: tuple[int, int] = EQUALITY_SIZE) -> tuple[int, int]:
    """The input frame a check uses for ``name``."""
    return FIXED_FRAME.get(name, size)


def pair(name: str, batch: int = 2, size: tuple[int, int] = EQUALITY_SIZE, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """A seeded source/target pair for ``name`` on ``device``."""
    g = torch.Generator().manual_seed(1)
    shape = (batch, 3, *frame(name, size))
    return tuple(torch.randn(shape, generator=g).to(device) for _ in range(2))


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """TF32 off for matrix products and cuDNN convolutions (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _flow(model: torch.nn.Module, src: torch.Tensor, trg: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(src, trg).flow.double().cpu()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max())


def _close(name: str, value: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """``max|value − reference| ≤ 1e-4 · (1 + max|reference|)`` or an AssertionError naming both."""
    diff, bound = _max_diff(value, reference), RELATIVE_TOLERANCE * (1 + float(reference.abs().max()))
    assert diff <= bound, f"{name}: max |difference| {diff:.3g} > tolerance {bound:.3g}"
    return {"max_diff": diff, "tolerance": bound}


def check_forward_equality(name: str, device: str) -> dict[str, float]:
    """The flow of ``name`` on ``device`` (float32, TF32 off) against CPU float64, within the tolerance."""
    model = build(name)
    src, trg = pair(name)
    reference = _flow(copy.deepcopy(model).double(), src.double(), trg.double())
    e_cpu = _max_diff(_flow(model, src, trg), reference)
    with tf32_off():
        on_device = _flow(model.to(device), src.to(device), trg.to(device))
    diff = _max_diff(on_device, reference)
    bound = max(CPU_ERROR_FACTOR * e_cpu, RELATIVE_TOLERANCE * (1 + float(reference.abs().max())))
    assert diff <= bound, f"{name} on {device}: max |flow − float64| {diff:.3g} > {bound:.3g} (CPU float32: {e_cpu:.3g})"
    return {"max_diff": diff, "cpu_fp32_diff": e_cpu, "tolerance": bound}


def _finite_grads(model: torch.nn.Module) -> int:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    bad = sum(not bool(torch.isfinite(g).all()) for g in grads)
    assert bad == 0, f"{bad} of {len(grads)} gradients hold inf/NaN"
    return len(grads)


SCALER_TRIES = 30  # float16: the GradScaler halves its scale after each overflow (2^16 → 2^-14 at most)


def check_autocast_step(name: str, device: str, precision: str) -> dict[str, float]:
    """Forward, ``model.loss`` and backward under ``precision`` autocast on ``device``: finite flow,
    loss and gradients. float16 goes through a ``GradScaler`` as training runs it: a step whose
    scaled gradients overflow is skipped and the scale halved, so the check asks for finite
    gradients within :data:`SCALER_TRIES` steps (an optimiser with lr 0 leaves the weights as they are)."""
    dtype = AUTOCAST_DTYPES[precision]
    model = build(name).to(device).train()
    height, width = frame(name)
    batch = synthetic_batch(2, height, width, seed=0, device=device)
    kind = torch.device(device).type
    scaler = torch.amp.GradScaler(kind, enabled=dtype is torch.float16)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    tries = 0
    while tries < SCALER_TRIES:
        tries += 1
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(kind, dtype=dtype):
            out = model(batch.src_image, batch.trg_image)
            loss = model.loss(out, batch)
        loss_value = float(loss.detach())
        assert bool(torch.isfinite(out.flow).all()), f"{name} {precision}: the flow holds inf/NaN"
        assert math.isfinite(loss_value), f"{name} {precision}: loss {loss_value}"
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        scaler.step(optimizer)
        scaler.update()
        if finite or not scaler.is_enabled():
            break
    return {"loss": loss_value, "gradients": _finite_grads(model), "scaler_tries": tries, "scale": scaler.get_scale()}


class _AttentionCalls(TorchFunctionMode):
    """Counts the ``F.scaled_dot_product_attention`` calls of a forward pass (so the check is not vacuous)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def check_fused_attention(name: str, device: str, precision: str = "fp32") -> dict[str, Any]:
    """A forward pass with only the fused SDPA backends allowed (flash, memory-efficient): a call
    that would take the math fallback raises instead. Returns the number of SDPA calls (a model
    without SDPA, e.g. MMNet, passes with 0)."""
    model = build(name).to(device)
    src, trg = pair(name, device=device)
    autocast = (
        torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])
        if precision in AUTOCAST_DTYPES
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast, sdpa_kernel(FUSED_BACKENDS), _AttentionCalls() as counter:
        model(src, trg)  # a call the fused kernels cannot serve raises here instead of taking the math path
    return {"sdpa_calls": counter.calls}


def _timed(fn: Callable[[], Any], device: str) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def check_compile(name: str, device: str, backend: str = "inductor", size: tuple[int, int] = (256, 256)) -> dict[str, float]:
    """``torch.compile(model)`` gives the eager flow (float32, TF32 off); also the first (compiling)
    call's time and one compiled and one eager forward after it."""
    model = build(name).to(device)
    src, trg = pair(name, batch=1, size=size, device=device)
    compiled = torch.compile(model, backend=backend)
    with tf32_off(), torch.inference_mode():
        eager = model(src, trg).flow
        first = _timed(lambda: compiled(src, trg), device)
        flow = compiled(src, trg).flow
        compiled_s, eager_s = _timed(lambda: compiled(src, trg), device), _timed(lambda: model(src, trg), device)
    return {
        **_close(f"{name} compiled ({backend})", flow, eager),
        "first_call_s": first,
        "compiled_s": compiled_s,
        "eager_s": eager_s,
    }


def check_channels_last(name: str, device: str) -> dict[str, float]:
    """A model's ``channels_last`` switch changes no value on ``device`` (float32, TF32 off)."""
    src, trg = pair(name, device=device)
    with tf32_off():
        flows = [_flow(build(name, channels_last=flag).to(device), src, trg) for flag in (True, False)]
    return _close(f"{name} channels-last", flows[0], flows[1])


def _gradients(name: str, device: str, checkpointing: bool) -> torch.Tensor:
    model = build(name, grad_checkpointing=checkpointing).to(device).train()
    height, width = frame(name)
    batch = synthetic_batch(2, height, width, seed=0, device=device)
    torch.manual_seed(0)  # dropout draws the same masks in both runs (checkpointing replays the RNG state)
    model.loss(model(batch.src_image, batch.trg_image), batch).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def check_grad_checkpointing(name: str, device: str) -> dict[str, float]:
    """Gradient checkpointing gives the gradients of the plain backward on ``device`` (float32, TF32 off)."""
    with tf32_off():
        plain, recomputed = (_gradients(name, device, flag) for flag in (False, True))
    assert plain.shape == recomputed.shape, f"{name}: {recomputed.numel()} gradient values vs {plain.numel()}"
    return _close(f"{name} gradient checkpointing", recomputed, plain)


def all_checks(
    device: str,
    models: list[str] | None = None,
    *,
    compile_backend: str = "inductor",
    compile_size: tuple[int, int] = (256, 256),
    compile_model: str = COMPILE_MODEL,
) -> list[tuple[str, Callable[[], Any]]]:
    """``(check id, call)`` for every check on ``device``: the tests' list, runnable without pytest.

    Per registered model (or ``models``): forward equality, bf16 and fp16 autocast steps, fused
    attention (float32 and bf16); then channels-last, gradient checkpointing and one compile case.
    """
    names = registered_models() if models is None else models
    checks: list[tuple[str, Callable[[], Any]]] = []
    for name in names:
        checks.append((f"forward_equality[{name}]", lambda n=name: check_forward_equality(n, device)))
        for precision in AUTOCAST_DTYPES:
            checks.append((f"autocast_{precision}[{name}]", lambda n=name, p=precision: check_autocast_step(n, device, p)))
        for precision in ("fp32", "bf16"):
            checks.append(
                (f"fused_attention_{precision}[{name}]", lambda n=name, p=precision: check_fused_attention(n, device, p))
            )
    checks += [(f"channels_last[{n}]", lambda n=n: check_channels_last(n, device)) for n in CHANNELS_LAST_MODELS if n in names]
    checks += [
        (f"grad_checkpointing[{n}]", lambda n=n: check_grad_checkpointing(n, device)) for n in CHECKPOINTING_MODELS if n in names
    ]
    if compile_model in names:
        checks.append((f"compile[{compile_model}]", lambda: check_compile(compile_model, device, compile_backend, compile_size)))
    return checks
