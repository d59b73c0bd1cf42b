"""CUDA paths of every registered model and of the fast paths (marked ``cuda``; skipped without a GPU).

The checks and their tolerances live in ``benchmarks/cuda_checks.py``; ``benchmarks/gpu_check.py``
runs the same checks (and the GPU benchmark) in one command. Run these alone with
``python -m pytest -m cuda tests/cuda``.
"""

import cuda_checks
import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"
MODELS = cuda_checks.registered_models()  # a newly registered model gets its tests


@pytest.mark.parametrize("name", MODELS)
def test_forward_on_cuda_equals_cpu(name):
    figures = cuda_checks.check_forward_equality(name, DEVICE)
    assert figures["max_diff"] <= figures["tolerance"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", MODELS)
def test_autocast_forward_and_backward_are_finite(name, precision):
    figures = cuda_checks.check_autocast_step(name, DEVICE, precision)
    assert figures["gradients"] > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_attention_takes_a_fused_kernel(name, precision):
    figures = cuda_checks.check_fused_attention(name, DEVICE, precision)
    assert figures["sdpa_calls"] > 0 or name.startswith("mmnet")  # MMNet's attention is local, without SDPA


@pytest.mark.parametrize("name", cuda_checks.CHANNELS_LAST_MODELS)
def test_channels_last_changes_no_value(name):
    cuda_checks.check_channels_last(name, DEVICE)


@pytest.mark.parametrize("name", cuda_checks.CHECKPOINTING_MODELS)
def test_grad_checkpointing_gives_the_same_gradients(name):
    cuda_checks.check_grad_checkpointing(name, DEVICE)


def test_compiled_forward_equals_eager():
    figures = cuda_checks.check_compile(cuda_checks.COMPILE_MODEL, DEVICE)
    assert figures["first_call_s"] > 0


def test_every_registered_model_is_checked():
    ids = [check_id for check_id, _ in cuda_checks.all_checks(DEVICE)]
    for name in MODELS:
        assert f"forward_equality[{name}]" in ids and f"autocast_fp16[{name}]" in ids
