"""Diagnostics of compressed exemplars: how much of the object a box keeps, at what area, and how
close the stored reconstruction is to the original. Pure functions on batched tensors.

- ``box_recall``: share of the true object box's area inside the stored box (1 = the whole object
  is kept at full resolution);
- ``image_mse`` / ``psnr_db``: reconstruction error of stored exemplars against the originals at
  the storage geometry (uint8 images);
- ``recall_area_curve``: for a set of thresholds τ, the mean box area and box recall that the
  same normalised CAMs would give — what the threshold buys on the user's data, without retraining.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .boxes import box_area_fraction, cam_to_boxes, check_boxes, check_image_size
from .cam import normalize_cams

#: Thresholds of the recall / area curve (``mask_threshold`` values a user would consider).
DEFAULT_TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def box_recall(boxes: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]``: area of ``boxes ∩ truth`` / area of ``truth`` (int ``[B, 4]`` each,
    (y0, y1, x0, x1) half-open). An empty true box counts as fully kept (1.0)."""
    boxes, truth = torch.as_tensor(boxes, dtype=torch.int64), torch.as_tensor(truth, dtype=torch.int64)
    if boxes.shape != truth.shape or boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes and truth must both be [B, 4], got {tuple(boxes.shape)} and {tuple(truth.shape)}")
    dy = (torch.minimum(boxes[:, 1], truth[:, 1]) - torch.maximum(boxes[:, 0], truth[:, 0])).clamp(min=0)
    dx = (torch.minimum(boxes[:, 3], truth[:, 3]) - torch.maximum(boxes[:, 2], truth[:, 2])).clamp(min=0)
    area = (truth[:, 1] - truth[:, 0]).clamp(min=0) * (truth[:, 3] - truth[:, 2]).clamp(min=0)
    inter = (dy * dx).to(torch.float64)
    return torch.where(area > 0, inter / area.clamp(min=1).to(torch.float64), torch.ones_like(inter))


def image_mse(original: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]``: mean squared error per image of two uint8 (or float) batches of one shape."""
    a, b = torch.as_tensor(original), torch.as_tensor(reconstructed)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"original and reconstructed must be batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    diff = a.to(torch.float64) - b.to(torch.float64)
    return diff.pow(2).flatten(1).mean(dim=1)


def psnr_db(mse: float | torch.Tensor, peak: float = 255.0) -> float | None:
    """PSNR in dB of a mean squared error (pooled over a set: pass the mean of ``image_mse``);
    None when the error is 0 (identical images: PSNR is infinite)."""
    mse = float(mse)
    if not math.isfinite(mse) or mse < 0:
        raise ValueError(f"mse must be a finite number >= 0, got {mse}")
    return None if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def recall_area_curve(
    cam_norm: torch.Tensor,
    truth: torch.Tensor,
    image_size: Sequence[int],
    factor: int,
    taus: Sequence[float] = DEFAULT_TAUS,
) -> list[dict]:
    """Per threshold τ: ``{"tau", "mean_box_area", "mean_recall", "fallback_share"}`` of the
    grid-aligned boxes of ``cam_norm > τ`` (normalised CAMs ``[B, h, w]``, see ``normalize_cams``)
    against the true boxes ``truth`` ``[B, 4]`` at ``image_size``. Boxes as the memory builds them
    (``cam_to_boxes``: a degenerate CAM or empty mask falls back to the full image)."""
    size = check_image_size(image_size)
    truth = check_boxes(torch.as_tensor(truth, dtype=torch.int64), size, "truth")
    if cam_norm.ndim != 3 or cam_norm.shape[0] != truth.shape[0]:
        raise ValueError(f"cam_norm must be [B, h, w] with B = {truth.shape[0]}, got {tuple(cam_norm.shape)}")
    rows = []
    for tau in taus:
        boxes, fallback = cam_to_boxes(cam_norm, size, float(tau), factor)
        n = max(1, len(boxes))
        rows.append({
            "tau": float(tau),
            "mean_box_area": float(box_area_fraction(boxes, size).sum()) / n,
            "mean_recall": float(box_recall(boxes, truth).sum()) / n,
            "fallback_share": float(fallback.sum()) / n,
        })
    return rows


class StoredDiagnostics:
    """Memory-builder observer (core/memory_builder.py) for datasets that know their object boxes:
    per class, per stored exemplar in ranked order, box recall, box area and reconstruction MSE
    (cut with the memory when it shrinks), and this phase's candidates' CAMs for the τ curve."""

    def __init__(self) -> None:
        self.per_class: dict[int, dict[str, np.ndarray]] = {}
        self.begin_phase()

    def begin_phase(self) -> None:
        self.augmentation: dict | None = None  # the last box refresh of the new classes
        self._cams: list[tuple[torch.Tensor, torch.Tensor]] = []

    def wants_cams(self, label: int, has_truth: bool) -> bool:
        return has_truth

    def observe(self, filled, memory) -> None:
        if filled.truth is None:
            return
        recon = memory.images(filled.label)  # the stored prefix of the ranked list
        ranked = filled.ranked[: len(recon)]
        size = filled.images.shape[1:3]
        boxes, truth = torch.from_numpy(filled.boxes[ranked]), torch.from_numpy(filled.truth[ranked])
        self.per_class[filled.label] = {
            "recall": box_recall(boxes, truth).numpy(),
            "area": box_area_fraction(boxes, size).numpy(),
            "mse": image_mse(torch.from_numpy(filled.images[ranked]), torch.from_numpy(recon)).numpy(),
        }
        if filled.cams is not None:
            self._cams.append((normalize_cams(filled.cams.float())[0], torch.from_numpy(filled.truth)))

    def record_augmentation(self, epoch: int, boxes: np.ndarray, truth: np.ndarray, image_size: Sequence[int]) -> None:
        b = torch.from_numpy(np.asarray(boxes, dtype=np.int64))
        self.augmentation = {
            "epoch": epoch,
            "mean_box_recall": float(box_recall(b, torch.from_numpy(truth)).mean()),
            "mean_box_area": float(box_area_fraction(b, image_size).mean()),
        }

    def summary(self, memory) -> dict | None:
        """``stored`` (every exemplar in the memory now), ``augmentation`` and ``tau_curve`` (this
        phase's new-class candidates), or None when nothing was recorded."""
        if memory is None or not self.per_class:
            return None
        counts = memory.counts()
        parts = [{k: v[: counts.get(label, 0)] for k, v in d.items()} for label, d in self.per_class.items()]
        recall, area, mse = (np.concatenate([p[k] for p in parts]) for k in ("recall", "area", "mse"))
        out: dict = {"stored": {
            "exemplars": int(len(recall)),
            "mean_box_recall": float(recall.mean()) if len(recall) else None,
            "mean_box_area": float(area.mean()) if len(area) else None,
            "psnr_db": psnr_db(float(mse.mean())) if len(mse) else None,
        }}
        if self.augmentation is not None:
            out["augmentation"] = self.augmentation
        if self._cams:
            norm, truth = torch.cat([c for c, _ in self._cams]), torch.cat([t for _, t in self._cams])
            out["tau_curve"] = recall_area_curve(norm, truth, memory.image_shape[:2], getattr(memory, "factor", 1))
        return out

    def state_dict(self) -> dict:
        return {"per_class": {int(k): {n: a.copy() for n, a in v.items()} for k, v in self.per_class.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.per_class = {int(k): {n: np.asarray(a) for n, a in v.items()} for k, v in state.get("per_class", {}).items()}
        self.begin_phase()
