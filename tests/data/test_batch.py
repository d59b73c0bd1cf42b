"""PairBatch: the typed batch — construction and its checks, moving, pinning, normalising."""

import dataclasses

import jaxtyping
import pytest
import torch
from tolerances import float32_tolerance
from torch.utils.data import DataLoader

from actr_core.data import PairBatch, prepare_batch
from actr_core.imaging import IMAGENET_STD, normalise_image

B, N, SIZE = 2, 3, (16, 24)  # H != W; flow grid (4, 6)


def _batch(**fields) -> PairBatch:
    g = torch.Generator().manual_seed(0)
    src_kps = torch.rand(B, N, 2, generator=g) * 15
    return PairBatch.build(
        torch.randn(B, 3, *SIZE, generator=g),
        torch.randn(B, 3, *SIZE, generator=g),
        src_kps,
        src_kps + 1.0,
        torch.tensor([[True, True, False], [True, False, False]]),
        flow=torch.randn(B, 2, 4, 6, generator=g),
        **fields,
    )


def _tensors(batch: PairBatch) -> dict[str, torch.Tensor]:
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return {name: v for name, v in fields.items() if isinstance(v, torch.Tensor)} | dict(batch.flags)


def test_build_fills_the_absent_fields_from_the_frame():
    batch = _batch(category=["cat", "dog"])
    assert len(batch) == B and batch.input_size == SIZE
    assert batch.category == ("cat", "dog") and batch.dataset == ("unknown", "unknown") and batch.pair_id == ("", "")
    assert batch.annotated_kps is batch.valid_kps and batch.src_kps_orig is batch.src_kps
    assert batch.valid_flow.all() and batch.flags == {}  # flow given: defined everywhere
    assert batch.src_size.tolist() == batch.trg_size.tolist() == [[16, 24]] * B
    assert batch.src_size.dtype == torch.int64 and batch.src_bbox.dtype == torch.float32
    assert batch.trg_bbox.tolist() == [[0.0, 0.0, 24.0, 16.0]] * B  # (x1, y1, x2, y2): the whole frame
    bare = PairBatch.build(torch.zeros(B, 3, *SIZE), torch.zeros(B, 3, *SIZE))
    assert bare.src_kps.shape == (B, 0, 2) and bare.valid_kps.shape == (B, 0)
    assert bare.flow.shape == (B, 2, 4, 6) and not bare.valid_flow.any()  # no ground truth


def test_to_moves_every_tensor_and_keeps_the_strings():
    batch = _batch(flags={"occlusion": torch.tensor([0, 1]), "truncation": torch.tensor([1, 1])})
    moved = batch.to("meta")
    tensors = _tensors(moved)
    assert len(tensors) == 16  # 14 tensor fields and the two flags
    assert all(t.device.type == "meta" for t in tensors.values()), [k for k, t in tensors.items() if t.is_meta is False]
    assert all(t.device.type == "cpu" for t in _tensors(batch).values())  # the original is untouched
    assert moved.pair_id is batch.pair_id and moved.category is batch.category and moved.dataset is batch.dataset
    assert {k: t.dtype for k, t in tensors.items()} == {k: t.dtype for k, t in _tensors(batch).items()}


def test_pin_memory_pins_every_tensor(monkeypatch):
    """``pin_memory`` pins each tensor (recorded here: pinning needs an accelerator), and the function
    ``DataLoader(pin_memory=True)`` applies to each batch hands the batch to that method."""
    pinned = []

    def fake_pin(tensor):
        pinned.append(tensor)
        return tensor.clone()

    batch = _batch(flags={"occlusion": torch.tensor([0, 1])})
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = torch.utils.data._utils.pin_memory.pin_memory(batch)
    assert isinstance(out, PairBatch) and out.pair_id == batch.pair_id
    assert {id(t) for t in pinned} == {id(t) for t in _tensors(batch).values()} and len(pinned) == 15
    assert all(a is not b and torch.equal(a, b) for a, b in zip(_tensors(out).values(), _tensors(batch).values()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dataloader_pins_batches_on_cuda():
    batches = [_batch(), _batch()]
    for got in DataLoader(batches, batch_size=None, pin_memory=True):
        assert isinstance(got, PairBatch) and all(t.is_pinned() for t in _tensors(got).values())


def test_normalised_turns_uint8_images_into_model_input():
    raw = torch.randint(0, 256, (B, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batch = PairBatch.build(raw, raw.contiguous(memory_format=torch.channels_last))
    ready = prepare_batch(batch, "cpu")
    for image in (ready.src_image, ready.trg_image):
        assert image.dtype == torch.float32 and image.is_contiguous()
        atol = float32_tolerance(1 / torch.tensor(IMAGENET_STD), terms=8)  # x·a − c against (x/255 − mean)/std
        torch.testing.assert_close(image, normalise_image(raw), atol=atol, rtol=0)
    assert ready.normalised() is ready  # float images: nothing to do


def test_frozen_and_replace_checks_again(no_typecheck):
    batch = _batch()
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.flow = batch.flow  # type: ignore[misc]
    assert dataclasses.replace(batch, dataset=("spair",) * B).dataset == ("spair", "spair")
    with pytest.raises(ValueError, match="valid_kps must be Bool"):
        dataclasses.replace(batch, valid_kps=batch.valid_kps.float())


CASES = {
    "not a tensor": (dict(src_bbox=[[0, 0, 1, 1]] * B), "src_bbox must be a torch.Tensor, got list"),
    "keypoints not float": (dict(src_kps_orig=torch.zeros(B, N, 2, dtype=torch.int64)), "src_kps_orig must be Float"),
    "mask not bool": (dict(annotated_kps=torch.ones(B, N)), "annotated_kps must be Bool"),
    "sizes not integer": (dict(trg_size=torch.ones(B, 2)), "trg_size must be Int"),
    "image neither float nor uint8": (dict(trg_image=torch.zeros(B, 3, *SIZE, dtype=torch.int32)), "trg_image must be"),
    "keypoint count": (
        dict(trg_kps_orig=torch.zeros(B, N + 1, 2)),
        r"trg_kps_orig has shape \(2, 4, 2\), expected \(b, n, 2\) = \(2, 3, 2\)",
    ),
    "batch size": (dict(src_bbox=torch.zeros(B + 1, 4)), r"src_bbox has shape \(3, 4\), expected \(b, 4\) = \(2, 4\)"),
    "image sizes": (
        dict(trg_image=torch.zeros(B, 3, 16, 16)),
        r"trg_image has shape \(2, 3, 16, 16\), expected \(b, 3, H, W\) = \(2, 3, 16, 24\)",
    ),
    "channels": (dict(src_image=torch.zeros(B, 4, *SIZE)), r"src_image has shape \(2, 4, 16, 24\)"),
    "flow grid": (
        dict(flow=torch.zeros(B, 2, 8, 12), valid_flow=torch.ones(B, 8, 12, dtype=torch.bool)),
        r"flow has the grid \(8, 12\), expected \(H/4, W/4\) = \(4, 6\)",
    ),
    "mask grid": (
        dict(valid_flow=torch.ones(B, 4, 5, dtype=torch.bool)),
        r"valid_flow has shape \(2, 4, 5\), expected \(b, h, w\) = \(2, 4, 6\)",
    ),
    "string count": (dict(pair_id=("a",)), r"pair_id must be a tuple of b=2 strings, got \('a',\)"),
    "strings not str": (dict(category=(1, 2)), "category must be a tuple of b=2 strings"),
    "unknown flag": (
        dict(flags={"difficulty": torch.zeros(B, dtype=torch.int64)}),
        "flags has 'difficulty'; the SPair flags are",
    ),
    "flag shape": (dict(flags={"occlusion": torch.zeros(B + 1, dtype=torch.int64)}), r"flags\['occlusion'\] has shape \(3,\)"),
    "flag dtype": (dict(flags={"occlusion": torch.zeros(B)}), r"flags\['occlusion'\] must be Int"),
}


@pytest.mark.parametrize("case", CASES)
def test_construction_errors_name_the_field(case, no_typecheck):
    changes, message = CASES[case]
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(_batch(), **changes)


def test_jaxtyping_checks_the_field_shapes():
    """In the test suite, the field annotations are checked at run time too (before the ValueError path)."""
    batch = _batch()
    assert jaxtyping.config.jaxtyping_disable is False
    with pytest.raises(jaxtyping.TypeCheckError):
        dataclasses.replace(batch, trg_kps=torch.zeros(B, N + 1, 2))
    with pytest.raises(jaxtyping.TypeCheckError):
        dataclasses.replace(batch, valid_flow=torch.ones(B, 4, 5, dtype=torch.bool))
    with pytest.raises(jaxtyping.TypeCheckError):
        dataclasses.replace(batch, flags={"occlusion": torch.zeros(B + 1, dtype=torch.int64)})
