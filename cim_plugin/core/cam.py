"""Class activation maps (CAM) for the true class, normalised per map (method.md §1, step 1).

A = ω_yᵀ F(x; θ) is an ``h × w`` map per image; M = (A − min A) / (max A − min A). Every function
works on a whole batch at once and is differentiable where that makes sense, so the mask branch
(method.md §3–4) can backpropagate through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def class_activation_maps(fmap: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Raw CAM of each image for its label.

    fmap: ``[B, C, h, w]`` last convolutional feature map.
    weight: ``[K, C]`` classifier rows (one per class).
    labels: ``[B]`` integer class of each image, in ``[0, K)``.
    Returns ``[B, h, w]`` with ``cam[b] = sum_c weight[labels[b], c] * fmap[b, c]``; differentiable
    in ``fmap`` and ``weight``.
    """
    if fmap.ndim != 4:
        raise ValueError(f"fmap must be [B, C, h, w], got shape {tuple(fmap.shape)}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be [K, C], got shape {tuple(weight.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be [B], got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    batch, channels = fmap.shape[:2]
    if weight.shape[1] != channels:
        raise ValueError(
            f"channel mismatch: fmap has C={channels} (dim 1) but weight has C={weight.shape[1]} (dim 1)"
        )
    if labels.shape[0] != batch:
        raise ValueError(f"batch mismatch: fmap has B={batch} (dim 0) but labels has B={labels.shape[0]}")
    num_classes = weight.shape[0]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, K={num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    rows = weight.index_select(0, labels.to(device=weight.device, dtype=torch.long))
    return torch.einsum("bc,bchw->bhw", rows, fmap)


def normalize_cams(cam: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-map min-max normalisation to ``[0, 1]``.

    cam: ``[B, h, w]`` raw maps (integer maps are cast to float32).
    eps: a map whose ``max − min <= eps`` counts as constant.
    Returns ``(norm [B, h, w], degenerate Bool[B])``. A map is *degenerate* when it holds any
    non-finite value or is (numerically) constant; its normalised map is all zeros (never NaN).
    Gradients flow through the non-degenerate maps (no in-place ops, masked with ``torch.where``).
    """
    if cam.ndim != 3:
        raise ValueError(f"cam must be [B, h, w], got shape {tuple(cam.shape)}")
    if not (eps >= 0.0) or eps == float("inf"):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    if not cam.dtype.is_floating_point:
        cam = cam.float()
    if cam.shape[1] * cam.shape[2] == 0:
        raise ValueError(f"cam must have at least one value per map, got shape {tuple(cam.shape)}")
    finite = torch.isfinite(cam)
    safe = torch.where(finite, cam, torch.zeros_like(cam))
    low = safe.amin(dim=(1, 2), keepdim=True)
    high = safe.amax(dim=(1, 2), keepdim=True)
    span = high - low
    degenerate = (~finite.all(dim=2).all(dim=1)) | (span.reshape(-1) <= eps)
    deg = degenerate.reshape(-1, 1, 1)
    denom = torch.where(deg, torch.ones_like(span), span)
    norm = (safe - low) / denom
    return torch.where(deg, torch.zeros_like(norm), norm), degenerate


def upsample_cams(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling (``align_corners=False``) of ``[B, h, w]`` maps to ``[B, H, W]``.

    size: ``(H, W)`` positive integers. Integer maps are cast to float32.
    """
    if cam.ndim != 3:
        raise ValueError(f"cam must be [B, h, w], got shape {tuple(cam.shape)}")
    size = tuple(size)
    if len(size) != 2 or any(isinstance(v, bool) or int(v) != v or v < 1 for v in size):
        raise ValueError(f"size must be two positive integers (H, W), got {size!r}")
    if not cam.dtype.is_floating_point:
        cam = cam.float()
    out = F.interpolate(cam.unsqueeze(1), size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
    return out.squeeze(1)
