"""The exemplar codec: box at full resolution, the rest downsampled (method.md §1, steps 4–5).

Compressed image  x̃ = M_B ⊙ x + (1 − M_B) ⊙ x_η, with x_η = x downsampled by the integer factor
``s = sqrt(compress_ratio)`` per side (nearest: ``x[..., ::s, ::s]``) and upsampled back by
repeating each low-resolution cell ``s × s`` (cropped to ``H × W``).

Two halves:

* torch ops on ``[B, C, H, W]`` tensors (any dtype, exact for uint8, differentiable for float):
  ``lowres``, ``upsample_nearest``, ``blend_compress``, ``soft_blend``, and the costs.
* the storage codec on numpy uint8 ``[B, H, W, C]`` arrays (PyCIL keeps images that way):
  ``encode_batch`` / ``decode`` / ``decode_batch``. For an aligned box (see ``boxes``) each
  low-resolution cell lies wholly inside or wholly outside the box, so what is stored per item is
  the box crop (row-major HWC) followed by the low-resolution cells outside the box (row-major
  over the grid, ``C`` bytes each) — exactly ``exemplar_cost * H * W * C`` bytes — and decoding
  reproduces ``blend_compress`` bit for bit.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch

from .boxes import boxes_to_mask, check_boxes, check_factor, check_image_size, is_aligned
from .choices import downsample_factor  # noqa: F401 (the compress-ratio rule, torch-free; codec.downsample_factor)

ArrayOrTensor = np.ndarray | torch.Tensor


# --------------------------------------------------------------------------------------------
# factor and costs
# --------------------------------------------------------------------------------------------


def _inside_counts(boxes: torch.Tensor, s: int) -> torch.Tensor:
    """Low-res cells inside each aligned box: ``(ceil(y1/s) - ceil(y0/s)) * (same for x)``, int64 ``[B]``."""
    def ceil_div(v: torch.Tensor) -> torch.Tensor:
        return -torch.div(-v, s, rounding_mode="floor")

    rows = (ceil_div(boxes[:, 1]) - ceil_div(boxes[:, 0])).clamp(min=0)
    cols = (ceil_div(boxes[:, 3]) - ceil_div(boxes[:, 2])).clamp(min=0)
    empty = (boxes[:, 1] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 2])
    return torch.where(empty, torch.zeros_like(rows), rows * cols)


def _stored_pixels(boxes: torch.Tensor, image_size: tuple[int, int], s: int) -> torch.Tensor:
    """int64 ``[B]``: box pixels + low-res cells outside the box (boxes already checked, aligned)."""
    height, width = image_size
    cells = math.ceil(height / s) * math.ceil(width / s)
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    return area + cells - _inside_counts(boxes, s)


def check_aligned_boxes(
    boxes: ArrayOrTensor | Sequence[int], image_size: tuple[int, int], s: int, name: str = "boxes"
) -> torch.Tensor:
    """int64 ``[B, 4]`` CPU tensor of ``boxes`` (tensor, array or nested ints), checked as valid
    boxes of ``image_size`` aligned to the ``s`` grid; ``ValueError`` naming ``name`` otherwise."""
    boxes = check_boxes(_as_box_tensor(boxes, name), image_size, name)
    _check_aligned(boxes, image_size, s, name)
    return boxes


def _check_aligned(boxes: torch.Tensor, image_size: tuple[int, int], s: int, name: str = "boxes") -> None:
    ok = is_aligned(boxes, image_size, s)
    if not bool(ok.all()):
        first = int(torch.nonzero(~ok)[0, 0])
        raise ValueError(
            f"{name}[{first}] = {boxes[first].tolist()} is not aligned to the s={s} grid of an image "
            f"of size {image_size} (use boxes.align_boxes)"
        )


def exemplar_cost(boxes: torch.Tensor, image_size: Sequence[int], s: int) -> torch.Tensor:
    """float64 ``[B]``: stored pixels / ``(H * W)`` for each aligned box.

    Stored = box pixels + low-resolution cells outside the box. The empty box stores every cell
    (``ceil(H/s) * ceil(W/s) / (H*W)``), the full box costs exactly 1. When ``H`` and ``W`` are
    multiples of ``s`` this equals ``paper_cost(box_area_fraction, s**2)``.
    """
    size = check_image_size(image_size)
    s = check_factor(s)
    boxes = check_aligned_boxes(boxes, size, s)
    return _stored_pixels(boxes, size, s).to(torch.float64) / float(size[0] * size[1])


def paper_cost(area_fraction: float | ArrayOrTensor, compress_ratio: float) -> float | ArrayOrTensor:
    """The paper's cost ``r = a + (1 - a) / ratio`` (method.md §1, step 5); same type as ``area_fraction``.

    area_fraction: ``a`` in ``[0, 1]`` (float, numpy array or tensor).
    compress_ratio: any finite ratio >= 1.
    """
    if isinstance(compress_ratio, bool) or not isinstance(compress_ratio, (int, float, np.integer, np.floating)):
        raise ValueError(f"compress_ratio must be a finite number >= 1, got {compress_ratio!r}")
    ratio = float(compress_ratio)
    if not math.isfinite(ratio) or ratio < 1.0:
        raise ValueError(f"compress_ratio must be a finite number >= 1, got {compress_ratio!r}")
    if isinstance(area_fraction, torch.Tensor):
        a_check = area_fraction.detach()
        bad = bool((~torch.isfinite(a_check) | (a_check < 0) | (a_check > 1)).any())
    else:
        a_arr = np.asarray(area_fraction, dtype=np.float64)
        bad = bool((~np.isfinite(a_arr) | (a_arr < 0) | (a_arr > 1)).any())
    if bad:
        raise ValueError(f"area_fraction must lie in [0, 1], got {area_fraction!r}")
    return area_fraction + (1 - area_fraction) / ratio


# --------------------------------------------------------------------------------------------
# torch ops
# --------------------------------------------------------------------------------------------


def lowres(x: torch.Tensor, s: int) -> torch.Tensor:
    """Nearest downsampling ``x[..., ::s, ::s]``: ``[..., H, W] -> [..., ceil(H/s), ceil(W/s)]``."""
    s = check_factor(s)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dims [..., H, W], got shape {tuple(x.shape)}")
    return x[..., ::s, ::s]


def upsample_nearest(low: torch.Tensor, s: int, size: Sequence[int]) -> torch.Tensor:
    """Repeat each low-res cell ``s × s`` and crop: ``[..., ceil(H/s), ceil(W/s)] -> [..., H, W]``.

    A broadcast (expand + reshape + crop), so it is exact for every dtype and differentiable for
    float inputs. The result is a cropped view of a fresh tensor (not necessarily contiguous).
    """
    s = check_factor(s)
    height, width = check_image_size(size, "size")
    expected = (math.ceil(height / s), math.ceil(width / s))
    if low.ndim < 2 or tuple(low.shape[-2:]) != expected:
        raise ValueError(
            f"low must be [..., {expected[0]}, {expected[1]}] for size {(height, width)} and s={s}, "
            f"got shape {tuple(low.shape)}"
        )
    lead = low.shape[:-2]
    grid_h, grid_w = expected
    blocks = low.unsqueeze(-1).unsqueeze(-3).expand(*lead, grid_h, s, grid_w, s)
    return blocks.reshape(*lead, grid_h * s, grid_w * s)[..., :height, :width]


def _check_images(x: torch.Tensor, name: str = "x") -> tuple[int, int]:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a [B, C, H, W] tensor, got {shape}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(x.shape)}")
    return int(x.shape[2]), int(x.shape[3])


def blend_compress(x: torch.Tensor, boxes: torch.Tensor, s: int) -> torch.Tensor:
    """Compressed images: box pixels unchanged, the rest ``upsample_nearest(lowres(x))``.

    x: ``[B, C, H, W]`` any dtype. boxes: int ``[B, 4]`` (aligned or not). Returns the same shape
    and dtype, bit-exact. Differentiable for float ``x`` that requires grad (one ``torch.where``
    over the batch); otherwise the fast path ``_blend_into``: the low-res image is written once
    straight from ``x``, then a bit-select on machine words puts the box pixels back, with no
    float conversion and no per-image loop. The output keeps the memory format of ``x``.
    """
    size = _check_images(x)
    s = check_factor(s)
    boxes = check_boxes(boxes, size)
    if boxes.shape[0] != x.shape[0]:
        raise ValueError(f"boxes has B={boxes.shape[0]} rows but x has B={x.shape[0]} images")
    boxes = boxes.to(x.device)
    if torch.is_grad_enabled() and x.requires_grad:
        inside = boxes_to_mask(boxes, size).unsqueeze(1)  # [B, 1, H, W]
        return torch.where(inside, x, upsample_nearest(lowres(x, s), s, size))
    out = torch.empty_like(x)  # same strides as x when x is dense (NCHW or channels-last)
    return _blend_into(x, boxes, s, out)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fill_upsampled(x: torch.Tensor, s: int, out: torch.Tensor) -> torch.Tensor:
    """Write ``upsample_nearest(lowres(x, s), s, size)`` into ``out`` (same shape as ``x``, any strides).

    Every output element is written once and ``x`` is read only at the rows it needs. First the
    top row of each block of ``s`` rows (``out[..., ::s, :]``): by ``_fill_top_words`` when the
    layout allows, else one strided copy per column phase (``out[..., ::s, b::s] = x[..., ::s, ::s]``).
    Then each other row phase copies that row (``out[..., a::s, :] = out[..., ::s, :]``, inner loop
    over the full width). Sizes not divisible by ``s`` crop the last block. No autograd.
    """
    height, width = x.shape[-2:]
    top = out[..., ::s, :]
    done = _fill_top_words(x, s, top)
    if done < width:
        low = x[..., ::s, done::s]
        for b in range(min(s, width - done)):
            dst = top[..., done + b :: s]
            dst.copy_(low[..., : dst.shape[-1]])
    for a in range(1, min(s, height)):
        dst = out[..., a::s, :]
        dst.copy_(top[..., : dst.shape[-2], :])
    return out


def _viewable_as(t: torch.Tensor, nbytes: int) -> bool:
    """``t.view(<int of nbytes>)`` is legal (torch's rule for a wider dtype view)."""
    size = t.element_size()
    if nbytes % size:
        return False
    ratio = nbytes // size
    return (
        t.ndim > 0
        and t.stride(-1) == 1
        and t.shape[-1] % ratio == 0
        and t.storage_offset() % ratio == 0
        and all(st % ratio == 0 for st in t.stride()[:-1])
    )


def _fill_top_words(x: torch.Tensor, s: int, top: torch.Tensor) -> int:
    """Top rows of the low-res image, ``top[..., j] = x[..., ::s, (j // s) * s]``, for the first
    ``W - W % s`` columns; returns how many columns it wrote (0 when the layout does not allow it).

    Integer-factor nearest resampling without a strided loop: on a little-endian machine the
    ``s`` elements of a cell row, read as one integer word of ``s * k`` bytes (``k`` the element
    size, ``s * k`` in 2, 4, 8), have the cell's sample in the low ``k`` bytes. Masking those and
    replicating them ``s`` times (multiply by 257 for 2-byte words, else shift-or doublings; both
    wrap-free in torch) gives the output word. Two or three vectorised passes over half-size rows
    instead of ``s`` strided copies.
    """
    k = x.element_size()
    word = s * k
    width = x.shape[-1]
    cols = width - width % s
    if sys.byteorder != "little" or word not in _INT_OF_SIZE or cols == 0:
        return 0
    src = x[..., ::s, :cols]
    dst = top[..., :cols]
    if not (_viewable_as(src, word) and _viewable_as(dst, word)):
        return 0
    int_t = _INT_OF_SIZE[word]
    src_w, dst_w = src.view(int_t), dst.view(int_t)
    bits = 8 * k
    torch.bitwise_and(src_w, (1 << bits) - 1, out=dst_w)
    if word == 2:
        dst_w.mul_(257)  # int16 products are computed in int and narrowed: no signed overflow
    else:
        shift = bits
        while shift < 8 * word:  # s is 2, 4 or 8 here
            dst_w.bitwise_or_(dst_w << shift)  # torch shifts the unsigned representation
            shift *= 2
    return cols


def _word_views(tensors: Sequence[torch.Tensor], n_bytes: int) -> list[torch.Tensor]:
    """View int tensors (last dim contiguous, ``n_bytes`` per last-dim row) as the widest common int words."""
    size = tensors[0].element_size()
    for word in (8, 4, 2):
        if size < word and n_bytes % word == 0 and all(t.storage_offset() * size % word == 0 for t in tensors):
            return [t.view(_INT_OF_SIZE[word]) for t in tensors]
    return list(tensors)


def _blend_into(x: torch.Tensor, boxes: torch.Tensor, s: int, out: torch.Tensor) -> torch.Tensor:
    """``out = blend_compress(x, boxes, s)`` without autograd; ``out`` is fresh, shaped like ``x``.

    Low-res image by ``_fill_upsampled``, then the box pixels by a bit-select over the whole batch,
    ``out ^= x; out &= keep; out ^= x`` where ``keep`` has every bit set outside the box and none
    inside (so ``out`` becomes ``x`` inside and stays low-res outside). The three passes run on
    8-byte words when the row length allows: the box mask broadcasts over channels for NCHW
    memory and is built per channel byte for channels-last memory. Other layouts, or element
    sizes without an integer twin (complex128), use one ``torch.where``.
    """
    batch, channels, height, width = x.shape
    _fill_upsampled(x, s, out)
    if batch == 0:
        return out
    ys = torch.arange(height, device=x.device)
    xs = torch.arange(width, device=x.device)
    rows = (ys >= boxes[:, 0:1]) & (ys < boxes[:, 1:2])  # [B, H]
    cols = (xs >= boxes[:, 2:3]) & (xs < boxes[:, 3:4])  # [B, W]
    size = x.element_size()
    int_t = _INT_OF_SIZE.get(size)
    nchw = x.is_contiguous() and out.is_contiguous()
    nhwc = x.permute(0, 2, 3, 1).is_contiguous() and out.permute(0, 2, 3, 1).is_contiguous()
    if int_t is None or not (nchw or nhwc):
        inside = (rows.unsqueeze(2) & cols.unsqueeze(1)).unsqueeze(1)
        return out.copy_(torch.where(inside, x, out))
    # keep = -1 (all bits) outside the box, 0 inside: outside the box rows OR outside its columns
    row_keep = rows.to(int_t).sub_(1)  # [B, H]
    col_keep = cols.to(int_t).sub_(1)  # [B, W]
    if nchw:
        xv = x.view(int_t).view(batch, channels, height * width)
        ov = out.view(int_t).view(batch, channels, height * width)
        keep = (row_keep.unsqueeze(2) | col_keep.unsqueeze(1)).view(batch, 1, height * width)
    else:
        n = height * width * channels
        xv = x.view(int_t).permute(0, 2, 3, 1).view(batch, 1, n)
        ov = out.view(int_t).permute(0, 2, 3, 1).view(batch, 1, n)
        col_keep = col_keep.repeat_interleave(channels, dim=1)  # [B, W * C]
        keep = (row_keep.unsqueeze(2) | col_keep.unsqueeze(1)).view(batch, 1, n)
    xv, ov, keep = _word_views([xv, ov, keep], xv.shape[-1] * size)
    ov.bitwise_xor_(xv).bitwise_and_(keep).bitwise_xor_(xv)
    return out


def soft_blend(x: torch.Tensor, mask: torch.Tensor, s: int) -> torch.Tensor:
    """Differentiable blend ``mask * x + (1 - mask) * upsample_nearest(lowres(x))`` (method.md §4, inner step).

    x: float ``[B, C, H, W]``. mask: float ``[B, 1, H, W]`` or ``[B, H, W]`` (values in ``[0, 1]``;
    ``[B, C, H, W]`` also accepted). Returns ``[B, C, H, W]``; gradients reach ``x`` and ``mask``.
    """
    size = _check_images(x)
    s = check_factor(s)
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor for soft_blend, got dtype {x.dtype}")
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if (
        mask.ndim != 4
        or mask.shape[0] != x.shape[0]
        or mask.shape[1] not in (1, x.shape[1])
        or tuple(mask.shape[2:]) != size
    ):
        raise ValueError(
            f"mask must be [B, 1, H, W] or [B, H, W] matching x {tuple(x.shape)}, got shape {tuple(mask.shape)}"
        )
    blurred = upsample_nearest(lowres(x, s), s, size)
    return mask * x + (1 - mask) * blurred


# --------------------------------------------------------------------------------------------
# storage codec (numpy uint8 HWC)
# --------------------------------------------------------------------------------------------


def _as_box_tensor(boxes: ArrayOrTensor | Sequence[int], name: str = "boxes") -> torch.Tensor:
    if isinstance(boxes, torch.Tensor):
        return boxes.detach().cpu()
    arr = np.asarray(boxes)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return torch.from_numpy(arr.astype(np.int64))


def _check_hwc_images(images: np.ndarray) -> tuple[int, int, int, int]:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
        desc = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"images must be a uint8 numpy array [B, H, W, C], got {desc}")
    batch, height, width, channels = images.shape
    if height == 0 or width == 0 or channels == 0:
        raise ValueError(f"images must have H, W, C >= 1, got shape {images.shape}")
    return batch, height, width, channels


def _item_masks(boxes: np.ndarray, image_size: tuple[int, int], s: int) -> tuple[np.ndarray, np.ndarray]:
    """What an item stores, as Bool masks: the box's pixels ``[B, H, W]`` (row-major: the crop's
    byte order) and the low-resolution cells outside the box ``[B, ceil(H/s), ceil(W/s)]``."""
    height, width = image_size
    in_rows = (np.arange(height) >= boxes[:, 0:1]) & (np.arange(height) < boxes[:, 1:2])
    in_cols = (np.arange(width) >= boxes[:, 2:3]) & (np.arange(width) < boxes[:, 3:4])
    grid = (math.ceil(height / s), math.ceil(width / s))
    return in_rows[:, :, None] & in_cols[:, None, :], ~_grid_inside(boxes, grid, s)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, start + length)`` for every pair, without a Python loop."""
    lengths = lengths.astype(np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(starts.astype(np.int64) - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)


def _grid_inside(boxes: np.ndarray, grid: tuple[int, int], s: int) -> np.ndarray:
    """Bool ``[B, ceil(H/s), ceil(W/s)]``: low-res cell (i, j) has ``y0 <= i*s < y1`` and ``x0 <= j*s < x1``."""
    gy = np.arange(grid[0]) * s
    gx = np.arange(grid[1]) * s
    in_y = (gy >= boxes[:, 0:1]) & (gy < boxes[:, 1:2])
    in_x = (gx >= boxes[:, 2:3]) & (gx < boxes[:, 3:4])
    return in_y[:, :, None] & in_x[:, None, :]


def encode_batch(
    images: np.ndarray, boxes: ArrayOrTensor, s: int
) -> tuple[np.ndarray, np.ndarray]:
    """Encode uint8 images ``[B, H, W, C]`` with aligned ``boxes`` ``[B, 4]`` into one byte payload.

    Item ``b`` is ``payload[offsets[b]:offsets[b + 1]]``: the box crop (row-major HWC), then the
    low-res cells outside the box (row-major over the grid, ``C`` bytes each). Its length is
    ``exemplar_cost * H * W * C`` exactly. Raises ``ValueError`` for unaligned boxes.
    Returns ``(payload uint8 [N], offsets int64 [B + 1])``.
    """
    batch, height, width, channels = _check_hwc_images(images)
    s = check_factor(s)
    box_np = check_aligned_boxes(boxes, (height, width), s).numpy()
    if box_np.shape[0] != batch:
        raise ValueError(f"boxes has B={box_np.shape[0]} rows but images has B={batch}")

    low = images[:, ::s, ::s, :]  # [B, hl, wl, C], whole batch at once
    inside_px, outside = _item_masks(box_np, (height, width), s)

    box_bytes = images[inside_px].reshape(-1)  # items in order, each crop row-major HWC
    low_bytes = low[outside].reshape(-1)  # items in order, each row-major over the grid
    box_off = np.concatenate([[0], np.cumsum(inside_px.sum(axis=(1, 2)) * channels)])
    low_off = np.concatenate([[0], np.cumsum(outside.sum(axis=(1, 2)) * channels)])
    parts: list[np.ndarray] = []
    for b in range(batch):
        parts.append(box_bytes[box_off[b] : box_off[b + 1]])
        parts.append(low_bytes[low_off[b] : low_off[b + 1]])
    payload = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    offsets = (box_off + low_off).astype(np.int64)
    return payload.astype(np.uint8, copy=False), offsets


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in shape):
        raise ValueError(f"image_shape must be (H, W, C) positive integers, got {image_shape!r}")
    return tuple(int(v) for v in shape)  # type: ignore[return-value]


def check_encoded(
    payload: np.ndarray, offsets: np.ndarray, boxes: ArrayOrTensor, image_shape: Sequence[int], s: int,
    name: str = "payload",
) -> tuple[np.ndarray, tuple[int, int, int], int]:
    """Check that ``payload`` / ``offsets`` / ``boxes`` are a consistent ``encode_batch`` result for
    ``image_shape`` at ``s`` (uint8 payload, offsets rising from 0 to its length, valid aligned
    boxes, each item exactly its box's size) in one vectorised pass; ``ValueError`` naming ``name``
    otherwise. Returns the boxes (int64 numpy), the shape and ``s`` as ``decode_items`` takes them:
    a memory checks what it loads once, then reads without re-checking."""
    height, width, channels = shape = _check_image_shape(image_shape)
    s = check_factor(s)
    payload, offsets = np.asarray(payload), np.asarray(offsets)
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ValueError(f"{name} must be a 1-D uint8 array, got {payload.dtype} of shape {payload.shape}")
    box_t = check_aligned_boxes(boxes, (height, width), s)
    if offsets.ndim != 1 or offsets.shape[0] != box_t.shape[0] + 1:
        raise ValueError(
            f"offsets must be [B + 1] = [{box_t.shape[0] + 1}] for {box_t.shape[0]} boxes, got shape {offsets.shape}"
        )
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != len(payload):
        raise ValueError(
            f"offsets must rise from 0 to len(payload)={len(payload)}, got [{offsets[0]}, ..., {offsets[-1]}]"
        )
    sizes = np.diff(offsets)
    expected = _stored_pixels(box_t, (height, width), s).numpy() * channels
    wrong = np.flatnonzero(sizes != expected)
    if wrong.size:
        i = int(wrong[0])
        raise ValueError(
            f"{name} item {i} has {int(sizes[i])} bytes but box {box_t[i].tolist()} of an image "
            f"{(height, width, channels)} at s={s} needs {int(expected[i])}"
        )
    return box_t.numpy(), shape, s


def decode_items(
    payload: np.ndarray, offsets: np.ndarray, boxes: np.ndarray, indices: np.ndarray,
    image_shape: tuple[int, int, int], s: int,
) -> np.ndarray:
    """uint8 ``[n, H, W, C]``: items ``indices`` of an ``encode_batch`` payload, whole batch at once
    (the inverse of ``encode_batch``'s masks), without checks: for stores made by ``encode_batch``
    or checked with ``check_encoded``. Equals ``blend_compress`` of the originals."""
    height, width, channels = image_shape
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    box_np = np.asarray(boxes, dtype=np.int64)[idx]
    inside_px, outside = _item_masks(box_np, (height, width), s)
    starts, sizes = offsets[idx], offsets[idx + 1] - offsets[idx]
    n_box = inside_px.sum(axis=(1, 2)) * channels
    low = np.zeros((len(idx), *outside.shape[1:], channels), dtype=np.uint8)
    low[outside] = payload[_ranges(starts + n_box, sizes - n_box)].reshape(-1, channels)
    out = low[:, np.arange(height) // s][:, :, np.arange(width) // s]
    out[inside_px] = payload[_ranges(starts, n_box)].reshape(-1, channels)
    return out


def decode(
    payload_item: np.ndarray,
    box: ArrayOrTensor | Sequence[int],
    image_shape: Sequence[int],
    s: int,
) -> np.ndarray:
    """Rebuild one uint8 image ``[H, W, C]`` from its payload slice and aligned ``box`` ``(y0, y1, x0, x1)``.

    Equals ``blend_compress`` of the original image; the box pixels are the original bytes.
    """
    data = np.asarray(payload_item)
    offsets = np.array([0, data.size])
    boxes = _as_box_tensor(box, "box").reshape(1, -1)
    box_np, shape, s = check_encoded(data, offsets, boxes, image_shape, s, "payload_item")
    return decode_items(data, offsets, box_np, np.zeros(1, dtype=np.int64), shape, s)[0]


def decode_batch(
    payload: np.ndarray,
    offsets: np.ndarray,
    boxes: ArrayOrTensor,
    indices: Sequence[int] | np.ndarray | None,
    image_shape: Sequence[int],
    s: int,
) -> np.ndarray:
    """Decode items ``indices`` (all when None) of an ``encode_batch`` payload: uint8 ``[n, H, W, C]``."""
    box_np, shape, s = check_encoded(payload, offsets, boxes, image_shape, s)
    n = box_np.shape[0]
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    return decode_items(np.asarray(payload), np.asarray(offsets), box_np, idx, shape, s)
