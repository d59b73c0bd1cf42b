"""Samples: resizing to the model frame, keypoint rescaling, pseudo-flow, shard encoding round trip."""

import numpy as np
import pytest
import torch
from tolerances import float32_tolerance

from actr_core.data import PairRecord, PseudoFlow, build_sample, decode_sample, encode_sample, pseudo_flow
from actr_core.data.samples import rescale_box, sample_size
from actr_core.data.synthetic import SyntheticConfig, generate_pair
from actr_core.flow import keypoints_to_flow, rescale_keypoints


def _record(src_size=(30, 40), trg_size=(36, 48), n=5, seed=0, flags=None) -> PairRecord:
    rng = np.random.default_rng(seed)
    (sh, sw), (th, tw) = src_size, trg_size
    return PairRecord(
        pair_id=f"p{seed}",
        dataset="spair",
        split="test",
        category="cat",
        src_image=rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8),
        trg_image=rng.integers(0, 256, (th, tw, 3), dtype=np.uint8),
        src_kps=rng.uniform(0, [sw - 1, sh - 1], (n, 2)),
        trg_kps=rng.uniform(0, [tw - 1, th - 1], (n, 2)),
        src_bbox=np.array([1.0, 2.0, sw - 3.0, sh - 2.0]),
        trg_bbox=np.array([0.0, 1.0, tw - 1.0, th - 4.0]),
        flags=flags or {},
    )


def test_build_resizes_and_rescales_with_pixel_centres():
    record = _record()
    sample = build_sample(record, (64, 96))
    assert sample.src_image.shape == (3, 64, 96) and sample.trg_image.dtype == torch.uint8
    expected = (torch.from_numpy(record.src_kps).float() + 0.5) * torch.tensor([96 / 40, 64 / 30]) - 0.5
    # the scale, then x + 0.5, a product and − 0.5
    torch.testing.assert_close(sample.src_kps, expected, atol=float32_tolerance(expected, terms=4), rtol=0)
    naive = torch.from_numpy(record.src_kps).float() * torch.tensor([96 / 40, 64 / 30])
    assert not torch.allclose(sample.src_kps, naive, atol=0.1)
    # exact: the same conversion, the same rescaling call
    torch.testing.assert_close(sample.src_kps_orig, torch.from_numpy(record.src_kps).float(), atol=0, rtol=0)
    assert sample.src_size == (30, 40) and sample.trg_size == (36, 48)
    torch.testing.assert_close(sample.trg_frame_bbox, rescale_box(sample.trg_bbox, (36, 48), (64, 96)), atol=0, rtol=0)
    assert sample.valid_kps.all()


def test_pseudo_flow_is_keypoints_to_flow_on_the_quarter_grid():
    sample = build_sample(_record(), (64, 96))
    grid = (16, 24)
    src = rescale_keypoints(sample.src_kps, (64, 96), grid)
    trg = rescale_keypoints(sample.trg_kps, (64, 96), grid)
    flow, valid = keypoints_to_flow(src[None], trg[None], sample.valid_kps[None], grid)
    assert sample.flow_kind == "pseudo"
    torch.testing.assert_close(sample.flow, flow[0], atol=0, rtol=0)  # exact: the same rescaling and splatting
    assert torch.equal(sample.valid_flow, valid[0])
    assert sample.valid_flow.any()


def test_pseudo_flow_neighbourhood_is_configurable():
    sample = build_sample(_record(n=1), 64)
    _wide, valid_wide = pseudo_flow(sample.src_kps, sample.trg_kps, sample.valid_kps, (64, 64), PseudoFlow(neighbourhood=70.0))
    assert valid_wide.sum() > sample.valid_flow.sum()


def test_exact_flow_is_kept_and_must_fit_the_frame():
    record = generate_pair(SyntheticConfig(size=(32, 48), n_kps=4), "train", 0)
    sample = build_sample(record, (32, 48))
    assert sample.flow_kind == "exact"
    torch.testing.assert_close(sample.flow, torch.from_numpy(record.flow), atol=0, rtol=0)  # exact: kept as it is
    with pytest.raises(ValueError, match="exact flow must come at the frame size"):
        build_sample(record, (64, 96))


def test_keypoints_outside_the_image_are_invalid():
    record = _record()
    kps = record.src_kps.copy()
    kps[0] = [-3.0, 5.0]
    bad = PairRecord(**{**record.__dict__, "src_kps": kps})
    assert build_sample(bad, 32).valid_kps.tolist() == [False, True, True, True, True]


@pytest.mark.parametrize("image_format", ["jpg", "png"])
def test_encode_decode_round_trip(image_format):
    sample = build_sample(_record(flags={"truncation": 1}), (32, 48))
    members = encode_sample(sample, image_format)
    assert set(members) == {f"src.{image_format}", f"trg.{image_format}", "flow.npy", "valid.npy", "kps.json", "meta.json"}
    back = decode_sample(members)
    assert (back.pair_id, back.dataset, back.split, back.category, back.flow_kind) == ("p0", "spair", "test", "cat", "pseudo")
    if image_format == "png":
        torch.testing.assert_close(back.src_image, sample.src_image)
    else:
        assert (back.src_image.float() - sample.src_image.float()).abs().mean() < 40  # noise image, JPEG q90
    # keypoints stored to 1e-4 px: half of that, plus the rounding back to float32
    for got, stored in ((back.src_kps, sample.src_kps), (back.trg_kps_orig, sample.trg_kps_orig)):
        torch.testing.assert_close(got, stored, atol=0.5e-4 + float32_tolerance(stored, terms=1), rtol=0)
    # float16 storage: half a float16 ulp (relative 2^-11, or 2^-25 among subnormals)
    half = torch.finfo(torch.float16)
    torch.testing.assert_close(back.flow, sample.flow, atol=half.smallest_normal * half.eps / 2, rtol=half.eps / 2)
    assert torch.equal(back.valid_flow, sample.valid_flow)
    assert torch.equal(back.valid_kps, sample.valid_kps)
    assert back.src_size == sample.src_size and back.flags == {"truncation": 1}
    # the box moved to the frame again, in numpy: x + 0.5, a product, − 0.5
    expected = sample.trg_frame_bbox
    torch.testing.assert_close(back.trg_frame_bbox, expected, atol=float32_tolerance(expected, terms=3), rtol=0)


def test_encoding_is_deterministic():
    sample = build_sample(_record(), 32)
    assert encode_sample(sample) == encode_sample(sample)


def test_stored_flow_is_float16_with_zeros_where_invalid():
    import io

    sample = build_sample(_record(), 32)
    stored = np.load(io.BytesIO(encode_sample(sample)["flow.npy"]))
    assert stored.dtype == np.float16 and stored.shape == (2, 8, 8)
    assert (stored[:, ~sample.valid_flow.numpy()] == 0).all()


@pytest.mark.parametrize("size", [(30, 32), (0, 32), (32,)])
def test_size_errors(size):
    with pytest.raises(ValueError):
        sample_size(size)


def test_encode_rejects_unknown_format():
    with pytest.raises(ValueError, match="image_format"):
        encode_sample(build_sample(_record(), 32), "webp")
