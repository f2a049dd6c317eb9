"""Attention-weighted per-image PCA of feature maps, quantised to 8 bit (AnytimeCL, Zhu et al.,
ECCV 2024; issue: feature memories). PyCIL-free, batched over images.

Each image's map ``[C, h, w]`` is seen as N = h·w vectors of C channels. With per-position weights
w (the exemplar's CAM in the plugin: the ResNet analogue of attention to the class token), the
weighted mean μ and the top-k principal directions V (``[C, k]``, of the w-weighted covariance) are
computed for that image alone, and each position keeps its k coefficients A = (x − μ)·V. Stored per
image: μ (C values), V (C·k) and A (N·k), each vector quantised to uint8 with its own min and max
(two float16 each): ``code_bytes(C, N, k)`` bytes in all, against C·N float32 values raw.

``encode`` returns a ``PCACode`` (uint8 tensors plus float16 ranges); ``decode`` gives the maps back
(float32), ``x̂ = A·Vᵀ + μ``. Both work on a whole batch at once (one batched SVD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Bytes of one quantised vector's range: its min and max as float16.
RANGE_BYTES = 4


@dataclass
class PCACode:
    """A batch of encoded maps; every tensor's first dimension is the image."""

    mean: torch.Tensor  # uint8 [B, C]
    basis: torch.Tensor  # uint8 [B, k, C] (the k directions, one quantised vector each)
    coeffs: torch.Tensor  # uint8 [B, k, N] (each direction's coefficients over the positions)
    ranges: torch.Tensor  # float16 [B, 1 + 2k, 2]: min and max of mean, each direction, each coefficient row
    shape: tuple[int, int, int]  # (C, h, w)

    @property
    def k(self) -> int:
        return self.basis.shape[1]

    def nbytes_per_image(self) -> int:
        c, h, w = self.shape
        return code_bytes(c, h * w, self.k)

    def __len__(self) -> int:
        return self.mean.shape[0]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.mean, self.basis, self.coeffs, self.ranges

    def nbytes(self) -> int:
        """Bytes the batch's tensors hold (numel × element size): what a memory of them stores."""
        return int(sum(t.numel() * t.element_size() for t in self.tensors()))

    def select(self, index) -> "PCACode":
        """The codes of the images ``index`` picks (a slice, or an index tensor on any device)."""
        if isinstance(index, torch.Tensor):
            index = index.to(self.mean.device)
        return PCACode(*(t[index] for t in self.tensors()), self.shape)

    def to(self, device) -> "PCACode":
        return PCACode(*(t.to(device) for t in self.tensors()), self.shape)

    @staticmethod
    def cat(codes: "list[PCACode]") -> "PCACode":
        if not codes or any(c.shape != codes[0].shape or c.k != codes[0].k for c in codes):
            raise ValueError("PCACode.cat needs at least one code, all of one map shape and k")
        return PCACode(*(torch.cat(ts) for ts in zip(*(c.tensors() for c in codes))), codes[0].shape)


def code_bytes(channels: int, positions: int, k: int) -> int:
    """Stored bytes of one image's code: uint8 mean, basis and coefficients plus their ranges."""
    return channels + k * channels + k * positions + (1 + 2 * k) * RANGE_BYTES


def _quantise(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``v`` ``[..., L]`` to uint8 with per-row float16 (min, max) ``[..., 2]``."""
    lo, hi = v.amin(dim=-1, keepdim=True), v.amax(dim=-1, keepdim=True)
    rng = torch.cat([lo, hi], dim=-1).to(torch.float16)
    lo16, hi16 = rng[..., :1].float(), rng[..., 1:].float()
    scale = (hi16 - lo16).clamp(min=1e-12)
    q = ((v - lo16) / scale * 255.0).round().clamp(0, 255).to(torch.uint8)
    return q, rng


def _dequantise(q: torch.Tensor, rng: torch.Tensor) -> torch.Tensor:
    lo, hi = rng[..., :1].float(), rng[..., 1:].float()
    return lo + q.float() / 255.0 * (hi - lo)


def encode(maps: torch.Tensor, weights: torch.Tensor | None, k: int) -> PCACode:
    """Encode feature maps ``[B, C, h, w]`` with per-position weights ``[B, h, w]`` (>= 0; None or
    an all-zero image: uniform) into k principal directions per image (k <= min(C, h·w))."""
    if maps.ndim != 4:
        raise ValueError(f"maps must be [B, C, h, w], got shape {tuple(maps.shape)}")
    b, c, h, w = maps.shape
    n = h * w
    if not 1 <= k <= min(c, n):
        raise ValueError(f"k must lie in [1, min(C, h·w)] = [1, {min(c, n)}], got {k}")
    x = maps.detach().float().reshape(b, c, n).transpose(1, 2)  # [B, N, C]
    wt = torch.ones(b, n) if weights is None else weights.detach().float().reshape(b, n).clamp(min=0)
    wt = wt.to(x.device)
    total = wt.sum(dim=1, keepdim=True)
    wt = torch.where(total > 0, wt / total.clamp(min=1e-12), torch.full_like(wt, 1.0 / n))  # [B, N], sums to 1
    mean = (wt.unsqueeze(-1) * x).sum(dim=1)  # [B, C]
    centred = x - mean.unsqueeze(1)
    # principal directions of the weighted covariance: right singular vectors of sqrt(w)·(x − μ)
    _, _, vh = torch.linalg.svd(wt.sqrt().unsqueeze(-1) * centred, full_matrices=False)  # vh [B, min(N,C), C]
    basis = vh[:, :k, :]  # [B, k, C], orthonormal rows
    coeffs = torch.einsum("bnc,bkc->bkn", centred, basis)  # [B, k, N]
    q_mean, r_mean = _quantise(mean)
    q_basis, r_basis = _quantise(basis)
    q_coeffs, r_coeffs = _quantise(coeffs)
    ranges = torch.cat([r_mean.unsqueeze(1), r_basis, r_coeffs], dim=1)  # [B, 1 + 2k, 2]
    return PCACode(q_mean, q_basis, q_coeffs, ranges, (c, h, w))


def decode(code: PCACode) -> torch.Tensor:
    """The maps ``[B, C, h, w]`` (float32) of ``encode``'s code."""
    c, h, w = code.shape
    k = code.k
    mean = _dequantise(code.mean, code.ranges[:, 0])
    basis = _dequantise(code.basis, code.ranges[:, 1 : 1 + k])
    coeffs = _dequantise(code.coeffs, code.ranges[:, 1 + k :])
    x = torch.einsum("bkn,bkc->bnc", coeffs, basis) + mean.unsqueeze(1)  # [B, N, C]
    return x.transpose(1, 2).reshape(-1, c, h, w)


def position_cosine(original: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity per image between the C-vectors of two maps ``[B, C, h, w]`` ([B])."""
    a, b = original.float().flatten(2), decoded.float().flatten(2)
    return torch.nn.functional.cosine_similarity(a, b, dim=1).mean(dim=1)
