"""Tests for cim_plugin.core.codec: downsampling, blends, costs and the byte codec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cim_plugin.core.boxes import align_boxes, box_area_fraction, boxes_to_mask, is_aligned
from cim_plugin.core import codec
from cim_plugin.core.codec import (
    blend_compress,
    decode,
    decode_batch,
    downsample_factor,
    encode_batch,
    exemplar_cost,
    lowres,
    paper_cost,
    soft_blend,
    upsample_nearest,
)

FAST = settings(max_examples=60, deadline=None)


def _brute_blend(x: np.ndarray, boxes: np.ndarray, s: int) -> np.ndarray:
    """Plain loops: inside the box keep the pixel, outside take the top-left pixel of its s-cell."""
    out = np.empty_like(x)
    batch, _, height, width = x.shape
    for b in range(batch):
        y0, y1, x0, x1 = boxes[b]
        for y in range(height):
            for xx in range(width):
                if y0 <= y < y1 and x0 <= xx < x1:
                    out[b, :, y, xx] = x[b, :, y, xx]
                else:
                    out[b, :, y, xx] = x[b, :, (y // s) * s, (xx // s) * s]
    return out


def _brute_stored(box, height: int, width: int, s: int) -> int:
    y0, y1, x0, x1 = (int(v) for v in box)
    inside = 0
    for i in range(math.ceil(height / s)):
        for j in range(math.ceil(width / s)):
            if y0 <= i * s < y1 and x0 <= j * s < x1:
                inside += 1
    return (y1 - y0) * (x1 - x0) + math.ceil(height / s) * math.ceil(width / s) - inside


@st.composite
def aligned_case(draw, max_side: int = 20, max_batch: int = 4):
    """(images uint8 [B, H, W, C], aligned boxes [B, 4], s)."""
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    channels = draw(st.integers(1, 3))
    s = draw(st.integers(2, 5))
    batch = draw(st.integers(1, max_batch))
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["box", "box", "empty", "full"]))
        if kind == "empty":
            rows.append([0, 0, 0, 0])
        elif kind == "full":
            rows.append([0, height, 0, width])
        else:
            y0 = draw(st.integers(0, height - 1))
            x0 = draw(st.integers(0, width - 1))
            rows.append([y0, draw(st.integers(y0 + 1, height)), x0, draw(st.integers(x0 + 1, width))])
    boxes = align_boxes(torch.tensor(rows, dtype=torch.long), (height, width), s)
    seed = draw(st.integers(0, 2**31 - 1))
    images = np.random.default_rng(seed).integers(0, 256, (batch, height, width, channels), dtype=np.uint8)
    return images, boxes, s


# --------------------------------------------------------------------------------------------
# downsample_factor, lowres, upsample_nearest
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio, s", [(4, 2), (4.0, 2), (9.0, 3), (16, 4), (100.0, 10), (4.0 + 1e-12, 2)])
def test_downsample_factor_accepts_squares(ratio, s):
    assert downsample_factor(ratio) == s


@pytest.mark.parametrize("ratio", [1.0, 2.0, 3.0, 8.0, 4.1, 4.0 + 1e-6, 0.25, -4.0, float("nan"), float("inf"), True, "4"])
def test_downsample_factor_rejects_others(ratio):
    with pytest.raises(ValueError, match="compress_ratio"):
        downsample_factor(ratio)


@pytest.mark.parametrize("height, width, s", [(7, 5, 2), (1, 1, 2), (1, 6, 3), (9, 9, 3), (4, 11, 4)])
def test_lowres_and_upsample_exact_uint8(height, width, s):
    x = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    low = lowres(x, s)
    assert low.shape == (2, 3, math.ceil(height / s), math.ceil(width / s))
    up = upsample_nearest(low, s, (height, width))
    assert up.dtype == torch.uint8 and up.shape == x.shape
    for y in range(height):
        for xx in range(width):
            assert torch.equal(up[..., y, xx], x[..., (y // s) * s, (xx // s) * s])


def test_upsample_nearest_rejects_wrong_grid():
    with pytest.raises(ValueError, match="low"):
        upsample_nearest(torch.zeros(1, 1, 3, 3), 2, (8, 6))
    with pytest.raises(ValueError, match="s must"):
        lowres(torch.zeros(1, 1, 3, 3), 0)


# --------------------------------------------------------------------------------------------
# blend_compress / soft_blend
# --------------------------------------------------------------------------------------------


@FAST
@given(aligned_case())
def test_blend_compress_matches_brute_force(case):
    images, boxes, s = case
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    out = blend_compress(x, boxes, s)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    np.testing.assert_array_equal(out.numpy(), _brute_blend(x.numpy(), boxes.numpy(), s))


def test_blend_compress_unaligned_box_and_extremes():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 9, 7, generator=g)
    boxes = torch.tensor([[1, 4, 2, 5], [0, 0, 0, 0], [0, 9, 0, 7]])
    out = blend_compress(x, boxes, 3)
    np.testing.assert_array_equal(out.numpy(), _brute_blend(x.numpy(), boxes.numpy(), 3))
    assert torch.equal(out[2], x[2])  # full box: untouched
    assert torch.equal(out[1], upsample_nearest(lowres(x[1:2], 3), 3, (9, 7))[0])  # empty: all low-res
    assert not torch.equal(out[1], x[1])


def test_blend_compress_batch_equals_singles_and_grad():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 3, 10, 6, generator=g, requires_grad=True)
    boxes = torch.tensor([[2, 6, 0, 4], [0, 0, 0, 0], [0, 10, 0, 6], [4, 10, 2, 6]])
    out = blend_compress(x, boxes, 2)
    singles = torch.cat([blend_compress(x[i : i + 1], boxes[i : i + 1], 2) for i in range(4)])
    assert torch.equal(out, singles)
    out.sum().backward()
    # each low-res anchor pixel receives the gradient of its whole cell outside the box
    assert x.grad.sum().item() == pytest.approx(out.numel())
    assert x.grad[1, 0, 0, 0].item() == 4.0 and x.grad[1, 0, 0, 1].item() == 0.0


def _where_blend(x: torch.Tensor, boxes: torch.Tensor, s: int) -> torch.Tensor:
    """The straightforward definition: one torch.where with the box mask."""
    inside = boxes_to_mask(boxes, tuple(x.shape[-2:])).unsqueeze(1)
    return torch.where(inside, x, upsample_nearest(lowres(x, s), s, tuple(x.shape[-2:])))


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int8, torch.bool, torch.int16, torch.float16, torch.float32, torch.int64, torch.float64]
)
@pytest.mark.parametrize("height, width, s", [(7, 5, 2), (1, 1, 2), (8, 8, 2), (6, 12, 2), (9, 10, 3), (8, 16, 4), (5, 17, 4), (3, 9, 8)])
def test_fill_upsampled_equals_the_broadcast_definition(dtype, height, width, s):
    g = torch.Generator().manual_seed(height * 100 + width)
    big = torch.randint(-128, 128, (3, 2, height, width), generator=g).to(dtype)
    for x in (big, big[1:], big.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):  # offset, channels-last
        out = codec._fill_upsampled(x, s, torch.empty_like(x))
        assert torch.equal(out, upsample_nearest(lowres(x, s), s, (height, width)))


def test_fill_top_words_used_when_the_layout_allows():
    x = torch.randint(0, 256, (2, 3, 6, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    top = torch.empty_like(x)[..., ::2, :]
    assert codec._fill_top_words(x, 2, top) == 10  # 2-byte words: the multiply path
    assert codec._fill_top_words(x, 4, torch.empty_like(x)[..., ::4, :]) == 8  # shift-or, 2 leftover columns
    assert codec._fill_top_words(x.float(), 2, torch.empty(2, 3, 6, 10)[..., ::2, :]) == 10  # 8-byte words
    assert codec._fill_top_words(x, 3, torch.empty_like(x)[..., ::3, :]) == 0  # 3-byte words: strided copies
    assert codec._fill_top_words(x.double(), 2, torch.empty(2, 3, 6, 10, dtype=torch.float64)[..., ::2, :]) == 0
    odd = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)  # rows of 7 bytes: not viewable as int16
    assert codec._fill_top_words(odd, 2, torch.empty_like(odd)[..., ::2, :]) == 0


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.bool, torch.int16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]
)
def test_blend_fast_path_equals_where_definition(dtype):
    g = torch.Generator().manual_seed(5)
    for height, width, s in [(9, 7, 2), (8, 8, 2), (12, 10, 3), (5, 5, 4), (1, 3, 2), (16, 16, 4)]:
        boxes = torch.tensor(
            [[0, 0, 0, 0], [0, height, 0, width], [1, height - 1, 0, 1], [0, 1, width - 1, width], [2, 5, 1, 3]]
        ).clamp(min=0)
        boxes[:, :2] = boxes[:, :2].clamp(max=height)
        boxes[:, 2:] = boxes[:, 2:].clamp(max=width)
        boxes[:, 1] = torch.maximum(boxes[:, 1], boxes[:, 0])
        boxes[:, 3] = torch.maximum(boxes[:, 3], boxes[:, 2])
        for b in (boxes, align_boxes(boxes, (height, width), s)):
            x = (torch.rand(len(b) + 1, 3, height, width, generator=g) * 200).to(dtype)
            for view in (x[:-1], x[1:], x[1:].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
                want = _where_blend(view, b, s)
                got = blend_compress(view, b, s)
                assert got.dtype == dtype and torch.equal(got, want), (dtype, height, width, s)
            sliced = x[:-1, :, :, 1:]  # not dense: the torch.where route
            sb = b.clone()
            sb[:, 2:] = sb[:, 2:].clamp(max=width - 1)
            assert torch.equal(blend_compress(sliced, sb, s), _where_blend(sliced, sb, s))


def test_blend_fast_path_keeps_channels_last_and_numpy_layout():
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 256, (4, 12, 10, 3), dtype=np.uint8)  # PyCIL's HWC storage
    x = torch.from_numpy(chunk).permute(0, 3, 1, 2)
    boxes = torch.tensor([[2, 8, 4, 10], [0, 0, 0, 0], [0, 12, 0, 10], [6, 12, 0, 2]])
    out = blend_compress(x, boxes, 2)
    assert out.stride() == x.stride()  # HWC in memory, so permuting back is free
    np.testing.assert_array_equal(out.numpy(), _brute_blend(x.numpy(), boxes.numpy(), 2))
    assert np.array_equal(chunk, x.permute(0, 2, 3, 1).numpy())  # input untouched


def test_blend_fast_path_no_grad_and_empty_batch():
    x = torch.rand(3, 2, 10, 6, requires_grad=True)
    boxes = torch.tensor([[2, 6, 0, 4], [0, 0, 0, 0], [0, 10, 0, 6]])
    with torch.no_grad():
        fast = blend_compress(x, boxes, 2)
    assert not fast.requires_grad
    assert torch.equal(fast, blend_compress(x, boxes, 2).detach())
    empty = blend_compress(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, 4, dtype=torch.long), 2)
    assert empty.shape == (0, 3, 8, 8)


def test_blend_compress_shape_errors():
    with pytest.raises(ValueError, match="boxes"):
        blend_compress(torch.zeros(2, 3, 4, 4), torch.tensor([[0, 2, 0, 2]]), 2)
    with pytest.raises(ValueError, match="x must"):
        blend_compress(torch.zeros(3, 4, 4), torch.tensor([[0, 2, 0, 2]]), 2)


def test_soft_blend_limits_and_hard_mask_equivalence():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 7, 9, generator=g)
    blurred = upsample_nearest(lowres(x, 2), 2, (7, 9))
    torch.testing.assert_close(soft_blend(x, torch.ones(2, 1, 7, 9), 2), x)
    torch.testing.assert_close(soft_blend(x, torch.zeros(2, 7, 9), 2), blurred)
    boxes = torch.tensor([[2, 6, 0, 4], [0, 7, 4, 9]])
    hard = boxes_to_mask(boxes, (7, 9)).float()
    torch.testing.assert_close(soft_blend(x, hard, 2), blend_compress(x, boxes, 2))
    half = soft_blend(x, torch.full((2, 1, 7, 9), 0.5), 2)
    torch.testing.assert_close(half, 0.5 * x + 0.5 * blurred)


def test_soft_blend_gradients_reach_mask_and_image():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 8, 8, generator=g, requires_grad=True)
    logits = torch.randn(2, 1, 8, 8, generator=g, requires_grad=True)
    out = soft_blend(x, torch.sigmoid(logits), 2)
    loss = (out - torch.rand(out.shape, generator=g)).pow(2).sum()
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    # pixels that are not cell anchors only get gradient through the mask branch
    assert (x.grad[:, :, 1::2, :].abs().sum() > 0)


def test_soft_blend_gradient_through_the_low_res_path():
    x = torch.rand(1, 2, 5, 4, requires_grad=True)
    soft_blend(x, torch.zeros(1, 5, 4), 2).sum().backward()
    # with mask 0 every output pixel comes from its cell anchor: anchors get the cell size
    expected = torch.zeros(1, 2, 5, 4)
    expected[..., ::2, ::2] = torch.tensor([[4.0, 4.0], [4.0, 4.0], [2.0, 2.0]])
    assert torch.equal(x.grad, expected)


def test_soft_blend_bad_inputs():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="mask"):
        soft_blend(x, torch.rand(2, 2, 4, 4), 2)
    with pytest.raises(ValueError, match="mask"):
        soft_blend(x, torch.rand(1, 4, 4), 2)
    with pytest.raises(ValueError, match="floating"):
        soft_blend(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.rand(2, 4, 4), 2)


# --------------------------------------------------------------------------------------------
# costs
# --------------------------------------------------------------------------------------------


@FAST
@given(aligned_case())
def test_exemplar_cost_matches_brute_count(case):
    images, boxes, s = case
    height, width = images.shape[1:3]
    cost = exemplar_cost(boxes, (height, width), s)
    assert cost.dtype == torch.float64
    for b in range(boxes.shape[0]):
        assert cost[b].item() == _brute_stored(boxes[b], height, width, s) / (height * width)
    assert torch.all(cost <= 1.0) and torch.all(cost > 0)


@FAST
@given(
    st.integers(1, 8), st.integers(1, 8), st.integers(2, 4), st.integers(0, 2**31 - 1),
)
def test_exemplar_cost_equals_paper_cost_when_divisible(gh, gw, s, seed):
    height, width = gh * s, gw * s
    rng = np.random.default_rng(seed)
    ys = np.sort(rng.integers(0, gh + 1, (6, 2)), axis=1) * s
    xs = np.sort(rng.integers(0, gw + 1, (6, 2)), axis=1) * s
    boxes = torch.from_numpy(np.stack([ys[:, 0], ys[:, 1], xs[:, 0], xs[:, 1]], 1))
    boxes = torch.where(((boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2]))[:, None], boxes, 0)
    ours = exemplar_cost(boxes, (height, width), s)
    paper = paper_cost(box_area_fraction(boxes, (height, width)), float(s * s))
    torch.testing.assert_close(ours, paper, rtol=0, atol=1e-12)


def test_cost_edge_cases():
    # empty box: the low-res share only; full box: 1
    assert exemplar_cost(torch.tensor([[0, 0, 0, 0]]), (8, 8), 2).item() == 0.25
    assert exemplar_cost(torch.tensor([[0, 8, 0, 8]]), (8, 8), 2).item() == 1.0
    assert exemplar_cost(torch.tensor([[0, 7, 0, 5]]), (7, 5), 2).item() == 1.0
    # not divisible: the partial cells make the empty box dearer than 1/ratio
    assert exemplar_cost(torch.tensor([[0, 0, 0, 0]]), (7, 5), 2).item() == 12 / 35
    # image smaller than s: one cell, so nothing is saved
    assert exemplar_cost(torch.tensor([[0, 0, 0, 0], [0, 1, 0, 1]]), (1, 1), 2).tolist() == [1.0, 1.0]
    assert exemplar_cost(torch.tensor([[0, 0, 0, 0]]), (1, 6), 3).item() == 2 / 6
    with pytest.raises(ValueError, match="aligned"):
        exemplar_cost(torch.tensor([[1, 4, 0, 4]]), (8, 8), 2)


def test_paper_cost_types_and_errors():
    assert paper_cost(0.0, 4.0) == 0.25
    assert paper_cost(1.0, 4.0) == 1.0
    assert paper_cost(0.5, 9) == pytest.approx(0.5 + 0.5 / 9)
    arr = paper_cost(np.array([0.0, 0.5]), 4.0)
    assert isinstance(arr, np.ndarray) and arr.tolist() == [0.25, 0.625]
    ten = paper_cost(torch.tensor([0.0, 1.0], dtype=torch.float64), 4.0)
    assert isinstance(ten, torch.Tensor) and ten.tolist() == [0.25, 1.0]
    with pytest.raises(ValueError, match="area_fraction"):
        paper_cost(1.5, 4.0)
    with pytest.raises(ValueError, match="compress_ratio"):
        paper_cost(0.5, 0.5)


# --------------------------------------------------------------------------------------------
# storage codec
# --------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(aligned_case())
def test_codec_round_trip_equals_blend(case):
    images, boxes, s = case
    batch, height, width, channels = images.shape
    payload, offsets = encode_batch(images, boxes, s)
    assert payload.dtype == np.uint8 and payload.ndim == 1
    assert offsets.dtype == np.int64 and offsets.shape == (batch + 1,) and offsets[-1] == payload.size
    costs = exemplar_cost(boxes, (height, width), s).numpy()
    np.testing.assert_array_equal(np.diff(offsets), np.rint(costs * height * width * channels).astype(np.int64))
    np.testing.assert_allclose(np.diff(offsets), costs * height * width * channels, rtol=1e-12)

    expected = blend_compress(torch.from_numpy(images).permute(0, 3, 1, 2), boxes, s).permute(0, 2, 3, 1).numpy()
    decoded = decode_batch(payload, offsets, boxes, None, (height, width, channels), s)
    np.testing.assert_array_equal(decoded, expected)
    for b in range(batch):
        one = decode(payload[offsets[b] : offsets[b + 1]], boxes[b], (height, width, channels), s)
        np.testing.assert_array_equal(one, expected[b])
        y0, y1, x0, x1 = boxes[b].tolist()
        np.testing.assert_array_equal(one[y0:y1, x0:x1], images[b, y0:y1, x0:x1])
        # the item starts with the raw crop
        crop = images[b, y0:y1, x0:x1].reshape(-1)
        np.testing.assert_array_equal(payload[offsets[b] : offsets[b] + crop.size], crop)


def test_codec_layout_example():
    images = np.arange(4 * 4, dtype=np.uint8).reshape(1, 4, 4, 1)
    boxes = np.array([[0, 2, 2, 4]])
    payload, offsets = encode_batch(images, boxes, 2)
    # crop rows 0-1, cols 2-3; then low-res cells (0,0), (1,0), (1,1) anchors 0, 8, 10
    assert payload.tolist() == [2, 3, 6, 7, 0, 8, 10]
    assert offsets.tolist() == [0, 7]
    out = decode(payload, boxes[0], (4, 4, 1), 2)[..., 0]
    assert out.tolist() == [[0, 0, 2, 3], [0, 0, 6, 7], [8, 8, 10, 10], [8, 8, 10, 10]]


def test_codec_numpy_and_torch_boxes_agree_and_subset_decode():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 9, 6, 3), dtype=np.uint8)
    boxes = align_boxes(torch.tensor([[1, 5, 1, 4], [0, 0, 0, 0], [0, 9, 0, 6], [3, 9, 2, 3], [2, 3, 5, 6]]), (9, 6), 2)
    assert is_aligned(boxes, (9, 6), 2).all()
    p1, o1 = encode_batch(images, boxes, 2)
    p2, o2 = encode_batch(images, boxes.numpy().astype(np.int32), 2)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(o1, o2)
    full = decode_batch(p1, o1, boxes, None, (9, 6, 3), 2)
    sub = decode_batch(p1, o1, boxes.numpy(), [4, 0, 4], (9, 6, 3), 2)
    np.testing.assert_array_equal(sub, full[[4, 0, 4]])
    assert decode_batch(p1, o1, boxes, [], (9, 6, 3), 2).shape == (0, 9, 6, 3)
    # full box stores the image verbatim
    np.testing.assert_array_equal(full[2], images[2])


def test_codec_tiny_images():
    images = np.array([[[[7, 8]]], [[[9, 1]]]], dtype=np.uint8)  # [2, 1, 1, 2]
    boxes = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 1]])
    payload, offsets = encode_batch(images, boxes, 2)
    assert offsets.tolist() == [0, 2, 4]
    np.testing.assert_array_equal(decode_batch(payload, offsets, boxes, None, (1, 1, 2), 2), images)


def test_codec_errors():
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="aligned"):
        encode_batch(images, np.array([[1, 4, 0, 4], [0, 0, 0, 0]]), 2)
    with pytest.raises(ValueError, match="images"):
        encode_batch(images.astype(np.float32), np.zeros((2, 4), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="boxes"):
        encode_batch(images, np.zeros((3, 4), dtype=np.int64), 2)
    payload, offsets = encode_batch(images, np.array([[0, 4, 0, 4], [0, 0, 0, 0]]), 2)
    with pytest.raises(ValueError, match="payload_item"):
        decode(payload[: offsets[1] - 1], np.array([0, 4, 0, 4]), (8, 8, 3), 2)
    with pytest.raises(ValueError, match="box"):
        decode(payload[: offsets[1]], np.array([0, 3, 0, 4]), (8, 8, 3), 2)
    with pytest.raises(ValueError, match="offsets"):
        decode_batch(payload, offsets[:-1], np.array([[0, 4, 0, 4], [0, 0, 0, 0]]), None, (8, 8, 3), 2)
    with pytest.raises(ValueError, match="indices"):
        decode_batch(payload, offsets, np.array([[0, 4, 0, 4], [0, 0, 0, 0]]), [2], (8, 8, 3), 2)
