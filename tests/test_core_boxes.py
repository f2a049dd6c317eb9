"""Tests for cim_plugin.core.boxes: masks <-> boxes, grid alignment, CAM boxes and their fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import cim_plugin.core.boxes as boxes_mod
from cim_plugin.core.boxes import (
    align_boxes,
    box_area_fraction,
    boxes_to_mask,
    cam_to_boxes,
    is_aligned,
    mask_to_boxes,
    random_boxes_like,
    scale_boxes,
    threshold_boxes,
    upsampled_threshold_boxes,
)
from cim_plugin.core.cam import upsample_cams

FAST = settings(max_examples=60, deadline=None)


def _brute_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.where(mask)
    if ys.size == 0:
        return (0, 0, 0, 0)
    return (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)


@st.composite
def boxes_in_image(draw, max_side: int = 24, max_batch: int = 5):
    """(boxes [B, 4] int64, (H, W), s) with arbitrary (unaligned, possibly empty) boxes."""
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    s = draw(st.integers(1, 5))
    batch = draw(st.integers(1, max_batch))
    rows = []
    for _ in range(batch):
        if draw(st.booleans()) and draw(st.booleans()):
            rows.append([0, 0, 0, 0])
            continue
        y0 = draw(st.integers(0, height - 1))
        y1 = draw(st.integers(y0 + 1, height))
        x0 = draw(st.integers(0, width - 1))
        x1 = draw(st.integers(x0 + 1, width))
        rows.append([y0, y1, x0, x1])
    return torch.tensor(rows, dtype=torch.long), (height, width), s


# --------------------------------------------------------------------------------------------
# mask_to_boxes / boxes_to_mask
# --------------------------------------------------------------------------------------------


@FAST
@given(
    batch=st.integers(1, 4),
    height=st.integers(1, 17),
    width=st.integers(1, 17),
    density=st.sampled_from([0.0, 0.01, 0.05, 0.3, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_mask_to_boxes_matches_brute_force(batch, height, width, density, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, height, width)) < density
    boxes, empty = mask_to_boxes(torch.from_numpy(mask))
    assert boxes.dtype == torch.int64 and boxes.shape == (batch, 4)
    for b in range(batch):
        assert tuple(boxes[b].tolist()) == _brute_box(mask[b])
        assert bool(empty[b]) == (not mask[b].any())


def test_mask_to_boxes_single_pixels_and_corners():
    mask = torch.zeros(4, 5, 7, dtype=torch.bool)
    mask[0, 0, 0] = True
    mask[1, 4, 6] = True
    mask[2, 2, 3] = True
    mask[2, 3, 1] = True
    boxes, empty = mask_to_boxes(mask)
    assert boxes.tolist() == [[0, 1, 0, 1], [4, 5, 6, 7], [2, 4, 1, 4], [0, 0, 0, 0]]
    assert empty.tolist() == [False, False, False, True]


def test_mask_to_boxes_rejects_bad_input():
    with pytest.raises(ValueError, match="bool"):
        mask_to_boxes(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="mask"):
        mask_to_boxes(torch.zeros(3, 3, dtype=torch.bool))


@FAST
@given(boxes_in_image())
def test_boxes_to_mask_round_trip_and_area(data):
    boxes, size, _ = data
    mask = boxes_to_mask(boxes, size)
    assert mask.shape == (boxes.shape[0], *size)
    back, empty = mask_to_boxes(mask)
    assert torch.equal(back, boxes)
    assert torch.equal(empty, (boxes == 0).all(1))
    frac = box_area_fraction(boxes, size)
    assert frac.dtype == torch.float64
    torch.testing.assert_close(frac, mask.double().mean(dim=(1, 2)))


# --------------------------------------------------------------------------------------------
# align_boxes
# --------------------------------------------------------------------------------------------


@FAST
@given(boxes_in_image())
def test_align_boxes_contains_is_aligned_and_minimal(data):
    boxes, (height, width), s = data
    aligned = align_boxes(boxes, (height, width), s)
    assert is_aligned(aligned, (height, width), s).all()
    empty = (boxes == 0).all(1)
    assert torch.all(aligned[empty] == 0)
    nb, na = boxes[~empty], aligned[~empty]
    # contains the original, inside the image
    assert torch.all(na[:, 0] <= nb[:, 0]) and torch.all(na[:, 2] <= nb[:, 2])
    assert torch.all(na[:, 1] >= nb[:, 1]) and torch.all(na[:, 3] >= nb[:, 3])
    assert torch.all(na[:, 1] <= height) and torch.all(na[:, 3] <= width)
    # grows by less than s on every side
    assert torch.all(nb[:, 0] - na[:, 0] < s) and torch.all(na[:, 1] - nb[:, 1] < s)
    assert torch.all(nb[:, 2] - na[:, 2] < s) and torch.all(na[:, 3] - nb[:, 3] < s)
    # idempotent
    assert torch.equal(align_boxes(aligned, (height, width), s), aligned)


def test_align_boxes_examples():
    boxes = torch.tensor([[1, 3, 2, 5], [0, 0, 0, 0], [5, 7, 0, 7], [3, 3, 1, 4]])
    out = align_boxes(boxes, (7, 7), 2)
    assert out.tolist() == [[0, 4, 2, 6], [0, 0, 0, 0], [4, 7, 0, 7], [0, 0, 0, 0]]


def test_box_validation_errors():
    with pytest.raises(ValueError, match="boxes"):
        align_boxes(torch.tensor([[0, 9, 0, 2]]), (8, 8), 2)
    with pytest.raises(ValueError, match="boxes"):
        align_boxes(torch.tensor([[3, 1, 0, 2]]), (8, 8), 2)
    with pytest.raises(ValueError, match="boxes"):
        align_boxes(torch.tensor([[0.0, 1.0, 0.0, 2.0]]), (8, 8), 2)
    with pytest.raises(ValueError, match="boxes"):
        align_boxes(torch.tensor([0, 1, 0, 2]), (8, 8), 2)
    with pytest.raises(ValueError, match="s must"):
        align_boxes(torch.tensor([[0, 1, 0, 2]]), (8, 8), 0)
    with pytest.raises(ValueError, match="image_size"):
        align_boxes(torch.tensor([[0, 1, 0, 2]]), (8, 0), 2)


# --------------------------------------------------------------------------------------------
# cam_to_boxes
# --------------------------------------------------------------------------------------------


def _blob_cam(h: int, w: int, y: slice, x: slice) -> torch.Tensor:
    cam = torch.zeros(h, w)
    cam[y, x] = 1.0
    return cam


def test_cam_to_boxes_localises_a_blob():
    cam = _blob_cam(8, 8, slice(2, 4), slice(5, 7)).unsqueeze(0)  # CAM cells rows 2-3, cols 5-6
    boxes, fallback = cam_to_boxes(cam, (32, 32), threshold=0.5, s=2)
    assert not fallback.any()
    y0, y1, x0, x1 = boxes[0].tolist()
    # CAM cell k covers pixels [4k, 4k+4); the 0.5 level crosses at the blob border
    assert (y0, y1, x0, x1) == (8, 16, 20, 28)
    assert is_aligned(boxes, (32, 32), 2).all()


def test_cam_to_boxes_degenerate_and_empty_fall_back_to_full_image():
    size = (12, 10)
    good = _blob_cam(4, 4, slice(1, 2), slice(1, 2))
    constant = torch.zeros(4, 4)  # what normalize_cams gives a constant CAM
    nan = good.clone()
    nan[0, 0] = float("nan")
    low = good * 0.3  # every value below the threshold
    cam = torch.stack([good, constant, nan, low, good])
    flag = torch.tensor([False, True, False, False, True])  # last: caller says degenerate
    boxes, fallback = cam_to_boxes(cam, size, threshold=0.5, s=2, degenerate=flag)
    assert fallback.tolist() == [False, True, True, True, True]
    full = torch.tensor([0, 12, 0, 10])
    for b in range(1, 5):
        assert torch.equal(boxes[b], full)
    assert not torch.equal(boxes[0], full)
    # without the flag, the last one is an ordinary box
    boxes2, fallback2 = cam_to_boxes(cam, size, threshold=0.5, s=2)
    assert fallback2.tolist() == [False, True, True, True, False]
    assert torch.equal(boxes2[4], boxes2[0])


def test_cam_to_boxes_threshold_extremes():
    g = torch.Generator().manual_seed(0)
    cam = torch.rand(3, 5, 5, generator=g)
    cam = (cam - cam.amin((1, 2), keepdim=True)) / (cam.amax((1, 2), keepdim=True) - cam.amin((1, 2), keepdim=True))
    # threshold 0: everything above the minimum -> (nearly) the whole image, no fallback
    boxes, fallback = cam_to_boxes(cam, (20, 20), threshold=0.0, s=2)
    assert not fallback.any()
    assert (box_area_fraction(boxes, (20, 20)) > 0.5).all()
    # threshold 1: nothing is strictly above the max -> fallback to full
    boxes, fallback = cam_to_boxes(cam, (20, 20), threshold=1.0, s=2)
    assert fallback.all() and torch.all(boxes == torch.tensor([0, 20, 0, 20]))
    # threshold close to 1 with a plateau of ones: a small box around the plateau
    plateau = _blob_cam(6, 6, slice(2, 4), slice(2, 4)).unsqueeze(0)
    boxes, fallback = cam_to_boxes(plateau, (24, 24), threshold=0.999, s=2)
    assert not fallback.any()
    y0, y1, x0, x1 = boxes[0].tolist()
    assert 8 <= y0 and y1 <= 16 and 8 <= x0 and x1 <= 16 and y1 > y0 and x1 > x0


def test_cam_to_boxes_tiny_and_non_square_images():
    cam = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    for size in [(1, 1), (1, 5), (5, 1), (3, 7)]:
        boxes, fallback = cam_to_boxes(cam, size, threshold=0.5, s=2)
        assert boxes.shape == (1, 4)
        assert is_aligned(boxes, size, 2).all()
        y0, y1, x0, x1 = boxes[0].tolist()
        assert 0 <= y0 < y1 <= size[0] and 0 <= x0 < x1 <= size[1]
    # 1x1 image: whichever path, the box is the single pixel
    boxes, _ = cam_to_boxes(cam, (1, 1), threshold=0.5, s=2)
    assert boxes[0].tolist() == [0, 1, 0, 1]


def test_cam_to_boxes_batch_equals_singles():
    g = torch.Generator().manual_seed(3)
    cam = torch.rand(6, 7, 5, generator=g)
    cam[2] = 0.0
    cam[4, 1, 1] = float("nan")
    boxes, fb = cam_to_boxes(cam, (21, 15), threshold=0.6, s=3)
    singles = [cam_to_boxes(cam[i : i + 1], (21, 15), threshold=0.6, s=3) for i in range(6)]
    assert torch.equal(boxes, torch.cat([b for b, _ in singles]))
    assert torch.equal(fb, torch.cat([f for _, f in singles]))


def test_cam_to_boxes_bad_arguments():
    cam = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="threshold"):
        cam_to_boxes(cam, (8, 8), threshold=1.5, s=2)
    with pytest.raises(ValueError, match="threshold"):
        cam_to_boxes(cam, (8, 8), threshold=float("nan"), s=2)
    with pytest.raises(ValueError, match="degenerate"):
        cam_to_boxes(cam, (8, 8), threshold=0.5, s=2, degenerate=torch.tensor([True]))
    with pytest.raises(ValueError, match="cam_norm"):
        cam_to_boxes(cam[0], (8, 8), threshold=0.5, s=2)


# --------------------------------------------------------------------------------------------
# threshold_boxes / upsampled_threshold_boxes (the fast routes of cam_to_boxes)
# --------------------------------------------------------------------------------------------


@FAST
@given(
    batch=st.integers(0, 4),
    height=st.integers(1, 13),
    width=st.integers(1, 13),
    threshold=st.sampled_from([-1.0, 0.0, 0.25, 0.5, 0.999, 1.0, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_threshold_boxes_equals_the_mask_definition(batch, height, width, threshold, seed):
    rng = np.random.default_rng(seed)
    values = torch.from_numpy(np.round(rng.random((batch, height, width)) * 4) / 4).float()
    if batch > 1:
        values[1, rng.integers(height), rng.integers(width)] = float(rng.choice([np.nan, np.inf, -np.inf]))
    boxes, empty = threshold_boxes(values, threshold)
    want_boxes, want_empty = mask_to_boxes(values > threshold) if batch else (torch.zeros(0, 4), torch.zeros(0))
    assert boxes.shape == (batch, 4) and boxes.dtype == torch.int64
    assert torch.equal(boxes, want_boxes.long()) and torch.equal(empty, want_empty.bool())


def test_threshold_boxes_rejects_bad_input():
    with pytest.raises(ValueError, match="values"):
        threshold_boxes(torch.zeros(3, 3), 0.5)
    with pytest.raises(ValueError, match="floating"):
        threshold_boxes(torch.zeros(1, 3, 3, dtype=torch.long), 0.5)


def test_linear_pieces_is_interpolate_and_peaks_hold_the_maximum():
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in [(7, 224), (1, 5), (2, 3), (5, 5), (9, 4), (3, 31)]:
        matrix, peaks = boxes_mod._linear_pieces(n_in, n_out, torch.device("cpu"))
        assert matrix.shape == (n_out, n_in) and peaks[0] == 0 and peaks[-1] == n_out - 1
        signal = torch.rand(50, n_in, generator=g, dtype=torch.float64)
        want = F.interpolate(signal.unsqueeze(1), size=n_out, mode="linear", align_corners=False)[:, 0]
        got = signal @ matrix.T
        assert torch.allclose(got, want, atol=1e-12)
        assert torch.allclose(got.amax(dim=1), got[:, peaks].amax(dim=1), atol=1e-12, rtol=0)
        assert torch.allclose(got.amin(dim=1), got[:, peaks].amin(dim=1), atol=1e-12, rtol=0)


def _values_near_threshold(cam: torch.Tensor, size, rng) -> list[float]:
    """Adversarial thresholds: values the upsampled map takes (so some pixels sit exactly on it)."""
    up = upsample_cams(cam, size).flatten()
    flat = cam.flatten().float()
    return [float(up[rng.integers(up.numel())]) for _ in range(3)] + [float(flat[rng.integers(flat.numel())]), 0.6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_upsampled_threshold_boxes_equals_upsample_then_mask(dtype, one_thread):
    rng = np.random.default_rng(1)
    cases = [((7, 7), (224, 224)), ((7, 7), (33, 17)), ((1, 1), (40, 40)), ((2, 5), (50, 9)), ((3, 3), (5, 5)),
             ((6, 4), (4, 6)), ((14, 14), (224, 160)), ((5, 1), (64, 64))]
    for (h, w), size in cases:
        base = rng.random((6, h, w))
        base[1] = np.round(base[1] * 3) / 3  # plateaus
        base[2] *= 1e3
        base[3] = base[3] * 2 - 1
        base[4] = 0.5  # constant
        cam = torch.from_numpy(base).to(dtype)
        for threshold in _values_near_threshold(cam, size, rng):
            got = upsampled_threshold_boxes(cam, size, threshold)
            want = mask_to_boxes(upsample_cams(cam, size) > threshold)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), ((h, w), size, threshold)


def test_upsampled_threshold_boxes_non_finite_and_fast_route(monkeypatch, one_thread):
    g = torch.Generator().manual_seed(2)
    cam = F.avg_pool2d(torch.rand(64, 1, 28, 28, generator=g), 4).squeeze(1)
    cam = (cam - cam.amin((1, 2), keepdim=True)) / (cam.amax((1, 2), keepdim=True) - cam.amin((1, 2), keepdim=True))
    cam[5, 0, 0] = float("nan")
    cam[6, 3, 3] = float("inf")
    redone = []
    real = boxes_mod.threshold_boxes

    def spy(values, threshold):
        redone.append(values.shape[0])
        return real(values, threshold)

    monkeypatch.setattr(boxes_mod, "threshold_boxes", spy)
    got = upsampled_threshold_boxes(cam, (224, 224), 0.6)
    want = mask_to_boxes(upsample_cams(cam, (224, 224)) > 0.6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert 2 <= sum(redone) <= 6  # the two non-finite maps, and at most a few near-threshold ones
    redone.clear()
    upsampled_threshold_boxes(cam[:0], (224, 224), 0.6)
    upsampled_threshold_boxes(cam[:2], (12, 12), 0.6)  # image not larger than 2 (h + 1): direct route
    assert redone == [0, 2]


def test_cam_to_boxes_equals_the_upsample_mask_definition(one_thread):
    g = torch.Generator().manual_seed(4)
    cam = F.avg_pool2d(torch.rand(32, 1, 28, 28, generator=g), 4).squeeze(1)
    norm = (cam - cam.amin((1, 2), keepdim=True)) / (cam.amax((1, 2), keepdim=True) - cam.amin((1, 2), keepdim=True))
    for size, s in [((224, 224), 2), ((97, 130), 3), ((64, 64), 4)]:
        boxes, fallback = cam_to_boxes(norm, size, 0.6, s)
        raw, empty = mask_to_boxes(upsample_cams(norm, size) > 0.6)
        want = torch.where(empty.unsqueeze(1), torch.tensor([0, size[0], 0, size[1]]), align_boxes(raw, size, s))
        assert torch.equal(boxes, want) and torch.equal(fallback, empty)


# --------------------------------------------------------------------------------------------
# random_boxes_like
# --------------------------------------------------------------------------------------------


@FAST
@given(boxes_in_image(), st.integers(0, 2**31 - 1))
def test_random_boxes_like_properties(data, seed):
    boxes, size, s = data
    boxes = align_boxes(boxes, size, s)
    out = random_boxes_like(boxes, size, s, generator=torch.Generator().manual_seed(seed))
    assert out.dtype == torch.int64 and out.shape == boxes.shape
    assert is_aligned(out, size, s).all()
    empty = (boxes == 0).all(1)
    assert torch.all(out[empty] == 0)
    h, w = boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]
    oh, ow = out[:, 1] - out[:, 0], out[:, 3] - out[:, 2]
    assert torch.all(oh[~empty] >= h[~empty]) and torch.all(oh[~empty] < h[~empty] + s)
    assert torch.all(ow[~empty] >= w[~empty]) and torch.all(ow[~empty] < w[~empty] + s)
    # sides that are multiples of s keep their size exactly
    keep_h = (~empty) & (h % s == 0)
    keep_w = (~empty) & (w % s == 0)
    assert torch.equal(oh[keep_h], h[keep_h]) and torch.equal(ow[keep_w], w[keep_w])
    # same generator seed -> same boxes
    again = random_boxes_like(boxes, size, s, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)


def test_random_boxes_like_covers_positions_uniformly():
    boxes = torch.tensor([[0, 4, 0, 4]]).repeat(4000, 1)
    out = random_boxes_like(boxes, (12, 8), 2, generator=torch.Generator().manual_seed(0))
    # y0 in {0, 2, 4, 6, 8}, x0 in {0, 2, 4}
    ys = torch.bincount(out[:, 0], minlength=9)[::2]
    xs = torch.bincount(out[:, 2], minlength=5)[::2]
    assert ys.numel() == 5 and xs.numel() == 3
    assert (ys > 4000 / 5 * 0.8).all() and (xs > 4000 / 3 * 0.8).all()
    # rows and columns are drawn independently: every (y0, x0) pair is about equally frequent
    joint = torch.bincount((out[:, 0] // 2) * 3 + out[:, 2] // 2, minlength=15)
    assert joint.numel() == 15 and (joint > 4000 / 15 * 0.7).all()
    assert torch.equal(out[:, 1] - out[:, 0], torch.full((4000,), 4))


# --------------------------------------------------------------------------------------------
# scale_boxes
# --------------------------------------------------------------------------------------------


@FAST
@given(boxes_in_image(), st.integers(1, 40), st.integers(1, 40))
def test_scale_boxes_cover_the_scaled_region(data, h2, w2):
    boxes, (h1, w1), s = data
    out = scale_boxes(boxes, (h1, w1), (h2, w2), s)
    assert is_aligned(out, (h2, w2), s).all()
    empty = (boxes == 0).all(1)
    assert torch.all(out[empty] == 0)
    ne, no = boxes[~empty].double(), out[~empty].double()
    # the scaled box contains the exact (real-valued) image of the original box
    assert torch.all(no[:, 0] <= ne[:, 0] * h2 / h1 + 1e-9) and torch.all(no[:, 1] >= ne[:, 1] * h2 / h1 - 1e-9)
    assert torch.all(no[:, 2] <= ne[:, 2] * w2 / w1 + 1e-9) and torch.all(no[:, 3] >= ne[:, 3] * w2 / w1 - 1e-9)
    assert torch.all(no[:, 1] > no[:, 0]) and torch.all(no[:, 3] > no[:, 2])


def test_scale_boxes_examples_full_and_identity():
    boxes = torch.tensor([[0, 8, 0, 6], [0, 0, 0, 0], [2, 4, 2, 6]])
    out = scale_boxes(boxes, (8, 6), (32, 24), 4)
    assert out.tolist() == [[0, 32, 0, 24], [0, 0, 0, 0], [8, 16, 8, 24]]
    aligned = align_boxes(boxes, (8, 6), 2)
    assert torch.equal(scale_boxes(aligned, (8, 6), (8, 6), 2), aligned)
    down = scale_boxes(torch.tensor([[3, 5, 1, 2]]), (10, 10), (5, 5), 1)
    assert down.tolist() == [[1, 3, 0, 1]]
    with pytest.raises(ValueError, match="to_size"):
        scale_boxes(boxes, (8, 6), (0, 3), 2)
