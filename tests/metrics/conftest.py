"""Hand-made batches and a tiny fake matcher for the evaluation tests."""

import pytest
import torch
from torch import Tensor

from actr_core.data import PairBatch
from actr_core.flow import rescale_keypoints
from actr_core.models.base import CorrespondenceModel, MatchOutput


class ConstantFlowMatcher(CorrespondenceModel):
    """Predicts the same displacement everywhere: ``displacement`` pixels of the H/4 grid."""

    def __init__(self, displacement: tuple[float, float]) -> None:
        super().__init__()
        self.register_buffer("displacement", torch.tensor(displacement, dtype=torch.float32))

    def forward(self, src: Tensor, trg: Tensor) -> MatchOutput:
        b, _, h, w = src.shape
        flow = self.displacement.view(1, 2, 1, 1).expand(b, 2, h // self.flow_stride, w // self.flow_stride)
        return MatchOutput(flow=flow.clone())

    def loss(self, output: MatchOutput, batch: PairBatch) -> Tensor:
        return output.flow.sum() * 0.0


def make_batch(
    src_kps_orig,
    trg_kps_orig,
    valid=None,
    *,
    src_size=((512, 512),),
    trg_size=((512, 512),),
    src_bbox=None,
    trg_bbox=None,
    input_size=(64, 64),
    dataset=None,
    category=None,
    flags=None,
) -> PairBatch:
    """A batch from original-pixel keypoints; input-frame keypoints follow the convention."""
    src_o = torch.as_tensor(src_kps_orig, dtype=torch.float32)
    trg_o = torch.as_tensor(trg_kps_orig, dtype=torch.float32)
    b = src_o.shape[0]
    src_size = list(src_size) * (b // len(src_size))
    trg_size = list(trg_size) * (b // len(trg_size))
    full = [[0.0, 0.0, float(w), float(h)] for h, w in trg_size]
    return PairBatch.build(
        torch.zeros(b, 3, *input_size),
        torch.zeros(b, 3, *input_size),
        torch.stack([rescale_keypoints(src_o[i], src_size[i], input_size) for i in range(b)]),
        torch.stack([rescale_keypoints(trg_o[i], trg_size[i], input_size) for i in range(b)]),
        None if valid is None else torch.as_tensor(valid, dtype=torch.bool),
        src_kps_orig=src_o,
        trg_kps_orig=trg_o,
        src_size=torch.tensor(src_size, dtype=torch.int64),
        trg_size=torch.tensor(trg_size, dtype=torch.int64),
        src_bbox=torch.tensor(src_bbox if src_bbox is not None else full, dtype=torch.float32),
        trg_bbox=torch.tensor(trg_bbox if trg_bbox is not None else full, dtype=torch.float32),
        category=category if category is not None else ["cat"] * b,
        pair_id=[f"p{i}" for i in range(b)],
        dataset=dataset if dataset is not None else ["spair"] * b,
        flags={key: torch.tensor(values, dtype=torch.int64) for key, values in (flags or {}).items()},
    )


@pytest.fixture
def shift_matcher() -> ConstantFlowMatcher:
    """One H/4-grid cell to the right: 4 px in the 64-px input frame, 32 px in a 512-px original."""
    return ConstantFlowMatcher((1.0, 0.0))


@pytest.fixture
def batch_factory():
    """:func:`make_batch` as a fixture (test modules do not import conftest)."""
    return make_batch


@pytest.fixture
def matcher_factory():
    """:class:`ConstantFlowMatcher` as a fixture."""
    return ConstantFlowMatcher
