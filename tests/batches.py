"""Comparing typed batches in tests (imported by name, as ``tolerances``)."""

import dataclasses

import torch

from actr_core.data import PairBatch


def assert_same_batch(got: PairBatch, want: PairBatch, *, strides: bool = False) -> None:
    """Every field equal (flags too), tensors exactly, and with equal strides when asked."""
    assert type(got) is PairBatch and got.flags.keys() == want.flags.keys()
    fields = [(f.name, getattr(got, f.name), getattr(want, f.name)) for f in dataclasses.fields(want) if f.name != "flags"]
    for name, a, b in fields + [(flag, got.flags[flag], want.flags[flag]) for flag in want.flags]:
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b) and (not strides or a.stride() == b.stride()), name
        else:
            assert a == b, name
