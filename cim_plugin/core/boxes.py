"""Pixel boxes: from a normalised CAM to the box kept at full resolution (method.md §1, steps 2–3).

Conventions used throughout the core:

* A box is an int64 row ``(y0, y1, x0, x1)``, half-open; a batch of boxes is ``[B, 4]``.
* The *empty* box is ``(0, 0, 0, 0)`` (the "uniform" ablation: the whole image is downsampled).
  Any zero-area box behaves like the empty one everywhere; producers here always emit the
  canonical ``(0, 0, 0, 0)``.
* ``s`` is the integer downsampling factor per side. A box is *aligned* when ``y0, x0`` are
  multiples of ``s`` and ``y1`` (``x1``) is a multiple of ``s`` or equals ``H`` (``W``); aligned
  boxes split the low-resolution grid cleanly (see ``codec``).

Everything is batched and vectorised; boxes stay on the device of the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .cam import upsample_cams


# --------------------------------------------------------------------------------------------
# validation helpers (shared with codec)
# --------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_factor(s: object, name: str = "s") -> int:
    """Return ``s`` as an int after checking it is a positive integer."""
    if not _is_int(s) or int(s) < 1:  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a positive integer, got {s!r}")
    return int(s)  # type: ignore[arg-type]


def check_image_size(image_size: object, name: str = "image_size") -> tuple[int, int]:
    """Return ``(H, W)`` as ints after checking both are positive integers."""
    try:
        size = tuple(image_size)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a pair (H, W) of positive integers, got {image_size!r}") from None
    if len(size) != 2 or not all(_is_int(v) and int(v) >= 1 for v in size):
        raise ValueError(f"{name} must be a pair (H, W) of positive integers, got {image_size!r}")
    return int(size[0]), int(size[1])


def check_boxes(boxes: torch.Tensor, image_size: tuple[int, int], name: str = "boxes") -> torch.Tensor:
    """Check ``boxes`` is an integer ``[B, 4]`` tensor inside the image; return it as int64.

    Requires ``0 <= y0 <= y1 <= H`` and ``0 <= x0 <= x1 <= W``.
    """
    if not isinstance(boxes, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must be [B, 4] (y0, y1, x0, x1), got shape {tuple(boxes.shape)}")
    if boxes.dtype.is_floating_point or boxes.dtype.is_complex or boxes.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {boxes.dtype}")
    boxes = boxes.long()
    height, width = image_size
    y0, y1, x0, x1 = boxes.unbind(1)
    bad = (y0 < 0) | (y1 < y0) | (y1 > height) | (x0 < 0) | (x1 < x0) | (x1 > width)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"{name}[{first}] = {boxes[first].tolist()} is not a box inside an image of size "
            f"{(height, width)} (need 0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W)"
        )
    return boxes


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def full_boxes(batch: int, image_size: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``[batch, 4]`` boxes ``(0, H, 0, W)`` covering the whole image."""
    height, width = check_image_size(image_size)
    row = torch.tensor([0, height, 0, width], dtype=torch.long, device=device)
    return row.expand(batch, 4).clone()


def box_is_empty(boxes: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: the box has zero area (the canonical empty box is ``(0, 0, 0, 0)``)."""
    return (boxes[:, 1] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 2])


def is_aligned(boxes: torch.Tensor, image_size: Sequence[int], s: int) -> torch.Tensor:
    """Bool ``[B]``: the box is aligned to the ``s``-grid of an image of ``image_size``."""
    size = check_image_size(image_size)
    s = check_factor(s)
    boxes = check_boxes(boxes, size)
    y0, y1, x0, x1 = boxes.unbind(1)
    return (
        (y0 % s == 0)
        & (x0 % s == 0)
        & ((y1 % s == 0) | (y1 == size[0]))
        & ((x1 % s == 0) | (x1 == size[1]))
    )


def _hits_to_boxes(rows_hit: torch.Tensor, cols_hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes from Bool ``[B, H]`` row hits and ``[B, W]`` column hits: first and last hit of each."""
    height, width = rows_hit.shape[1], cols_hit.shape[1]
    empty = ~rows_hit.any(dim=1)
    rows = rows_hit.to(torch.uint8)
    cols = cols_hit.to(torch.uint8)
    y0 = rows.argmax(dim=1)
    y1 = height - rows.flip(1).argmax(dim=1)
    x0 = cols.argmax(dim=1)
    x1 = width - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([y0, y1, x0, x1], dim=1).long()
    boxes = torch.where(empty.unsqueeze(1), torch.zeros_like(boxes), boxes)
    return boxes, empty


def mask_to_boxes(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight box around all True pixels of each mask.

    mask: Bool ``[B, H, W]``.
    Returns ``(boxes int64 [B, 4], empty Bool [B])``; an all-False mask gives ``(0, 0, 0, 0)`` and
    ``empty = True``. Vectorised: ``any`` over rows / columns, then ``argmax`` for first and last.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be [B, H, W], got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape[1] == 0 or mask.shape[2] == 0:
        raise ValueError(f"mask must have H, W >= 1, got shape {tuple(mask.shape)}")
    return _hits_to_boxes(mask.any(dim=2), mask.any(dim=1))


def threshold_boxes(values: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight box of ``values > threshold`` per map, without building the mask.

    values: float ``[B, H, W]``. Equals ``mask_to_boxes(values > threshold)`` exactly: a row (column)
    holds a pixel above the threshold iff its maximum is above it, so two ``amax`` reductions
    replace the ``B x H x W`` Bool mask and its two ``any`` passes. A NaN poisons ``amax``
    (``NaN > t`` is False pixel-wise but not for the row max), so a batch holding any NaN takes
    the mask route. Returns ``(boxes int64 [B, 4], empty Bool [B])``.
    """
    if values.ndim != 3:
        raise ValueError(f"values must be [B, H, W], got shape {tuple(values.shape)}")
    if not values.dtype.is_floating_point:
        raise ValueError(f"values must be a floating-point tensor, got dtype {values.dtype}")
    if values.shape[1] == 0 or values.shape[2] == 0:
        raise ValueError(f"values must have H, W >= 1, got shape {tuple(values.shape)}")
    if values.shape[0] == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=values.device), torch.zeros(
            0, dtype=torch.bool, device=values.device
        )
    row_max = values.amax(dim=2)  # [B, H]
    if bool(torch.isnan(row_max).any()):
        return mask_to_boxes(values > threshold)
    return _hits_to_boxes(row_max > threshold, values.amax(dim=1) > threshold)


def _linear_pieces(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D linear resampling ``n_in -> n_out`` (``align_corners=False``) as a float64 matrix.

    Output ``d`` samples source coordinate ``c = (d + 0.5) * n_in / n_out - 0.5`` clamped to
    ``[0, n_in - 1]`` (what ``F.interpolate`` does): row ``d`` of the ``[n_out, n_in]`` matrix holds
    the two weights ``1 - frac(c)``, ``frac(c)``. The resampled signal is linear in ``d`` on each
    run of outputs with the same ``floor(c)`` (a clamped run is constant), so its maximum over
    any such runs is at a run's first or last output; ``peaks`` lists those (sorted, int64).
    Returns ``(matrix, peaks)``.
    """
    d = torch.arange(n_out, dtype=torch.float64, device=device)
    c = (d + 0.5) * (n_in / n_out) - 0.5
    run = torch.floor(c).clamp(-1, n_in - 1)  # -1: clamped to source 0; n_in - 1: at the last source
    c = c.clamp(0, n_in - 1)
    i0 = torch.floor(c).long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = c - i0
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    matrix.index_put_((d.long(), i0), 1.0 - w1, accumulate=True)
    matrix.index_put_((d.long(), i1), w1, accumulate=True)
    edge = torch.zeros(n_out, dtype=torch.bool, device=device)
    edge[0] = edge[-1] = True
    change = run[1:] != run[:-1]
    edge[1:] |= change
    edge[:-1] |= change
    return matrix, torch.nonzero(edge).flatten()


def upsampled_threshold_boxes(
    cam: torch.Tensor, size: Sequence[int], threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight box of ``upsample_cams(cam, size) > threshold``, found at the CAM's resolution.

    cam: float ``[B, h, w]``; size: ``(H, W)``. Returns ``(boxes int64 [B, 4], empty Bool [B])``,
    equal to ``threshold_boxes(upsample_cams(cam, size), threshold)`` (tests check it), without
    the ``B x H x W`` upsampled map when the CAM is much smaller than the image.

    Why it is exact. The bilinear map is ``Ry @ cam @ Rx^T`` (``_linear_pieces``); along a row it
    is a linear resampling, piecewise linear, so the row maximum is at one of at most
    ``2 (w + 1)`` peak columns, and likewise for columns. Row and column maxima of the exact map
    thus cost two small float64 matmuls (``B x H x 2(w+1)`` and ``B x 2(h+1) x W`` values).
    ``F.interpolate`` rounds (coordinates and four products per value) with unit roundoff ``u``
    of the dtype, so each of its values is within
    ``eps = 64 u ((h + w + 2) * range + max|cam| + |threshold|)`` of the exact one, several times
    the worst case. A row (column) whose exact maximum is more than ``eps`` above the threshold
    is hit by the kernel's mask too, one more than ``eps`` below is not; the boxes of the sure
    hits and of the possible hits agree for nearly every map. A map where they differ (a maximum
    within ``eps`` of the threshold), or that holds a non-finite value, is upsampled and
    thresholded for real (``threshold_boxes``); so is the whole batch when the image is not
    larger than ``2 (h + 1)`` x ``2 (w + 1)``.
    """
    if cam.ndim != 3:
        raise ValueError(f"cam must be [B, h, w], got shape {tuple(cam.shape)}")
    height, width = check_image_size(size)
    batch, h, w = cam.shape
    if not cam.dtype.is_floating_point:
        cam = cam.float()
    if batch == 0 or h * w == 0 or height <= 2 * (h + 1) or width <= 2 * (w + 1):
        return threshold_boxes(upsample_cams(cam, (height, width)), threshold)
    ry, y_peaks = _linear_pieces(h, height, cam.device)  # [H, h]
    rx, x_peaks = _linear_pieces(w, width, cam.device)  # [W, w]
    a = cam.to(torch.float64)
    row_max = (rx[x_peaks] @ a.transpose(1, 2) @ ry.T).amax(dim=1)  # [B, peaks, H] -> [B, H]
    col_max = (ry[y_peaks] @ a @ rx.T).amax(dim=1)  # [B, peaks, W] -> [B, W]

    flat = a.flatten(1)
    top, bottom = flat.amax(dim=1), flat.amin(dim=1)
    unit = torch.finfo(cam.dtype).eps / 2
    tau = float(threshold)
    eps = 64 * unit * ((h + w + 2) * (top - bottom) + torch.maximum(top.abs(), bottom.abs()) + abs(tau))
    eps = eps.unsqueeze(1)
    sure, _ = _hits_to_boxes(row_max > tau + eps, col_max > tau + eps)
    boxes, empty = _hits_to_boxes(row_max >= tau - eps, col_max >= tau - eps)
    # sure hits are possible hits, so equal boxes have the same first and last rows and columns
    redo = (sure != boxes).any(dim=1) | ~torch.isfinite(flat).all(dim=1)
    if bool(redo.any()):
        idx = torch.nonzero(redo).flatten()
        exact, exact_empty = threshold_boxes(upsample_cams(cam[idx], (height, width)), threshold)
        boxes = boxes.index_put((idx,), exact)
        empty = empty.index_put((idx,), exact_empty)
    return boxes, empty


def align_boxes(boxes: torch.Tensor, image_size: Sequence[int], s: int) -> torch.Tensor:
    """Expand boxes outward to the ``s``-grid.

    boxes: int ``[B, 4]`` inside ``image_size = (H, W)``.
    ``y0 -> floor(y0 / s) * s``, ``y1 -> min(ceil(y1 / s) * s, H)`` (same for x). Zero-area boxes
    become the canonical empty box ``(0, 0, 0, 0)``. Returns int64 ``[B, 4]``.
    """
    height, width = check_image_size(image_size)
    s = check_factor(s)
    boxes = check_boxes(boxes, (height, width))
    y0, y1, x0, x1 = boxes.unbind(1)
    y0 = torch.div(y0, s, rounding_mode="floor") * s
    x0 = torch.div(x0, s, rounding_mode="floor") * s
    y1 = torch.clamp(-torch.div(-y1, s, rounding_mode="floor") * s, max=height)
    x1 = torch.clamp(-torch.div(-x1, s, rounding_mode="floor") * s, max=width)
    out = torch.stack([y0, y1, x0, x1], dim=1)
    return torch.where(box_is_empty(boxes).unsqueeze(1), torch.zeros_like(out), out)


def cam_to_boxes(
    cam_norm: torch.Tensor,
    image_size: Sequence[int],
    threshold: float,
    s: int,
    degenerate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned box of the thresholded CAM of each image (method.md §1, steps 2–3).

    cam_norm: ``[B, h, w]`` normalised CAMs (values in ``[0, 1]``, see ``normalize_cams``).
    image_size: ``(H, W)`` of the images the boxes are for.
    threshold: ``τ`` in ``[0, 1]``; the mask is ``upsample(cam_norm) > τ`` (strict).
    s: downsampling factor; the boxes are aligned to its grid (``align_boxes``).
    degenerate: optional Bool ``[B]`` (the flag of ``normalize_cams``).
    Returns ``(boxes int64 [B, 4], fallback Bool [B])``.

    FALLBACK: where the CAM is degenerate (flag given, or any non-finite value in ``cam_norm``)
    or the thresholded mask is empty (``τ`` at or above every upsampled value), the box is the
    FULL image ``(0, H, 0, W)`` and ``fallback`` is True: that exemplar is kept uncompressed
    (cost 1), so nothing is lost when the CAM carries no usable localisation.
    """
    size = check_image_size(image_size)
    s = check_factor(s)
    if cam_norm.ndim != 3:
        raise ValueError(f"cam_norm must be [B, h, w], got shape {tuple(cam_norm.shape)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise ValueError(f"threshold must be a float in [0, 1], got {threshold!r}")
    if not (0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"threshold must be a float in [0, 1], got {threshold!r}")
    batch = cam_norm.shape[0]
    bad = ~torch.isfinite(cam_norm).flatten(1).all(dim=1) if batch else torch.zeros(0, dtype=torch.bool)
    bad = bad.to(cam_norm.device)
    if degenerate is not None:
        if degenerate.shape != (batch,):
            raise ValueError(f"degenerate must be Bool [{batch}], got shape {tuple(degenerate.shape)}")
        bad = bad | degenerate.to(device=cam_norm.device, dtype=torch.bool)
    if batch == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=cam_norm.device), bad
    boxes, empty = upsampled_threshold_boxes(cam_norm.detach(), size, float(threshold))
    boxes = align_boxes(boxes, size, s)
    fallback = bad | empty
    full = full_boxes(batch, size, device=boxes.device)
    return torch.where(fallback.unsqueeze(1), full, boxes), fallback


def boxes_to_mask(boxes: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """Bool ``[B, H, W]``, True inside each box (broadcast aranges, no loop)."""
    height, width = check_image_size(image_size)
    boxes = check_boxes(boxes, (height, width))
    ys = torch.arange(height, device=boxes.device)
    xs = torch.arange(width, device=boxes.device)
    rows = (ys >= boxes[:, 0:1]) & (ys < boxes[:, 1:2])  # [B, H]
    cols = (xs >= boxes[:, 2:3]) & (xs < boxes[:, 3:4])  # [B, W]
    return rows.unsqueeze(2) & cols.unsqueeze(1)


def box_area_fraction(boxes: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """float64 ``[B]``: box area / image area."""
    height, width = check_image_size(image_size)
    boxes = check_boxes(boxes, (height, width))
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    return area.to(torch.float64) / float(height * width)


def random_boxes_like(
    boxes: torch.Tensor,
    image_size: Sequence[int],
    s: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boxes of the same height and width as ``boxes`` at uniformly random positions ("random box" ablation).

    boxes: int ``[B, 4]`` inside ``image_size = (H, W)``.
    The top-left corner is drawn uniformly among the grid positions (multiples of ``s``) where a
    box of that size fits, then the box is aligned (``align_boxes``). So an aligned box whose sides
    are multiples of ``s`` keeps its size — and its cost — exactly; otherwise alignment may grow it
    by less than ``s`` per side. Empty boxes stay empty. One ``torch.rand`` call for the batch.
    Returns int64 ``[B, 4]``.
    """
    height, width = check_image_size(image_size)
    s = check_factor(s)
    boxes = check_boxes(boxes, (height, width))
    batch = boxes.shape[0]
    box_h = boxes[:, 1] - boxes[:, 0]
    box_w = boxes[:, 3] - boxes[:, 2]
    slots_y = torch.div(height - box_h, s, rounding_mode="floor") + 1  # grid positions that fit
    slots_x = torch.div(width - box_w, s, rounding_mode="floor") + 1
    gen_device = generator.device if generator is not None else boxes.device
    u = torch.rand(2, batch, generator=generator, device=gen_device, dtype=torch.float64).to(boxes.device)
    y0 = torch.minimum((u[0] * slots_y).long(), slots_y - 1) * s
    x0 = torch.minimum((u[1] * slots_x).long(), slots_x - 1) * s
    moved = torch.stack([y0, y0 + box_h, x0, x0 + box_w], dim=1)
    moved = torch.where(box_is_empty(boxes).unsqueeze(1), torch.zeros_like(moved), moved)
    return align_boxes(moved, (height, width), s)


def scale_boxes(
    boxes: torch.Tensor,
    from_size: Sequence[int],
    to_size: Sequence[int],
    s: int,
) -> torch.Tensor:
    """Map boxes computed at ``from_size = (H1, W1)`` onto ``to_size = (H2, W2)``, then align at ``s``.

    ``y0 -> floor(y0 * H2 / H1)``, ``y1 -> ceil(y1 * H2 / H1)`` (exact integer arithmetic, clamped
    to the image; same for x), so the scaled box always covers the original region. Empty stays
    empty, the full box stays full. Returns int64 ``[B, 4]``.
    """
    h1, w1 = check_image_size(from_size, "from_size")
    h2, w2 = check_image_size(to_size, "to_size")
    s = check_factor(s)
    boxes = check_boxes(boxes, (h1, w1))
    y0, y1, x0, x1 = boxes.unbind(1)
    y0 = torch.div(y0 * h2, h1, rounding_mode="floor")
    x0 = torch.div(x0 * w2, w1, rounding_mode="floor")
    y1 = -torch.div(-y1 * h2, h1, rounding_mode="floor")
    x1 = -torch.div(-x1 * w2, w1, rounding_mode="floor")
    out = torch.stack([y0.clamp(0, h2), y1.clamp(0, h2), x0.clamp(0, w2), x1.clamp(0, w2)], dim=1)
    out = torch.where(box_is_empty(boxes).unsqueeze(1), torch.zeros_like(out), out)
    return align_boxes(out, (h2, w2), s)
