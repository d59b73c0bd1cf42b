"""The public surface of actr_core.blocks."""

import inspect

from torch import nn

from actr_core import blocks

REQUIRED = {
    "biased_cross_attention": "BiasedCrossAttention",
    "target_reweighting": "TargetReweighting",
    "multihead_correlation": "MultiHeadCorrelation",
    "soft_argmax": "SoftArgmax",
    "masked_flow_loss": "MaskedFlowLoss",
}


def test_all_lists_every_block_function_and_module():
    names = set(blocks.__all__)
    assert set(REQUIRED) | set(REQUIRED.values()) | {"DualWindowFlowSR"} <= names
    for name in blocks.__all__:
        assert hasattr(blocks, name), name
    for function, module in REQUIRED.items():
        assert inspect.isfunction(getattr(blocks, function))
        assert issubclass(getattr(blocks, module), nn.Module)


def test_public_callables_are_annotated():
    for name in blocks.__all__:
        obj = getattr(blocks, name)
        target = obj.forward if inspect.isclass(obj) and issubclass(obj, nn.Module) else obj
        if inspect.isfunction(target):
            assert "return" in inspect.get_annotations(inspect.unwrap(target)), name
