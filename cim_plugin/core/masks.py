"""Mask sources: how the full-resolution box of each exemplar is chosen (a swappable part).

A source turns a batch of images and their labels into grid-aligned pixel boxes. The sources of
the paper's ablation (../shared/docs/method.md §6):

- ``cam``: fixed-threshold CAM of the CIL model (tight box of ``CAM > mask_threshold``);
- ``uniform``: no box at all — the whole image is downsampled (MRDC-like many-shot);
- ``random``: a box of the size the CAM box would have had, at a uniformly random position;
- ``pau``: CIM — the thresholded CAM of the mask branch (PAU activations, conv/BN shared);
- ``oracle``: the dataset's own object box, grid-aligned (a diagnostic, for datasets that know
  where their objects are, e.g. the synthetic set): it separates "localisation fails" from
  "compression hurts" at the same bytes.

The CAM itself comes from a ``cam_fn(images, labels) -> raw CAM [B, h, w]`` supplied by whoever
knows the network (the PyCIL adapter), so the same sources serve any backbone — and the CIM
branch of the next issue only has to supply another ``cam_fn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import choices
from .boxes import align_boxes, cam_to_boxes, random_boxes_like
from .cam import normalize_cams

CamFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BoxResult:
    """Boxes ``[B, 4]`` (y0, y1, x0, x1), and which of them fell back to the full image."""

    boxes: torch.Tensor
    fallback: torch.Tensor


class MaskSource:
    """Base class: ``boxes(images, labels, cam_fn)`` for a batch ``[B, C, H, W]``."""

    needs_cam = True
    needs_branch = False
    #: Whether ``boxes`` needs the true object boxes (``truth``) of the images.
    needs_truth = False

    def __init__(self, factor: int, threshold: float = 0.6, generator: torch.Generator | None = None):
        self.factor = int(factor)
        self.threshold = float(threshold)
        self.generator = generator

    @property
    def name(self) -> str:
        """The source's name in ``MASK_SOURCES`` (its class's name for a class not registered there)."""
        return next((name for name, cls in MASK_SOURCES.items() if cls is type(self)), type(self).__name__)

    def boxes(self, images: torch.Tensor, labels: torch.Tensor, cam_fn: CamFn | None,
              truth: torch.Tensor | None = None) -> BoxResult:
        raise NotImplementedError(f"{type(self).__name__} must implement boxes()")

    def _cam_boxes(self, images: torch.Tensor, labels: torch.Tensor, cam_fn: CamFn | None) -> BoxResult:
        if cam_fn is None:
            raise ValueError(f"mask source '{self.name}' needs a CAM function")
        with torch.no_grad():
            cams, degenerate = normalize_cams(cam_fn(images, labels).float())
        boxes, fallback = cam_to_boxes(cams, tuple(images.shape[-2:]), self.threshold, self.factor, degenerate)
        return BoxResult(boxes, fallback)


class CamMaskSource(MaskSource):
    def boxes(self, images, labels, cam_fn, truth=None):
        return self._cam_boxes(images, labels, cam_fn)


class PauMaskSource(CamMaskSource):
    """Like ``cam``, but the adapter hands it the CIM branch's CAM (PAU activations, shared θ)."""

    needs_branch = True


class FullMaskSource(MaskSource):
    """The whole image is the box: nothing is downsampled (a plain exemplar, cost 1 when raw)."""

    needs_cam = False

    def boxes(self, images, labels, cam_fn=None, truth=None):
        n, (h, w) = images.shape[0], images.shape[-2:]
        return BoxResult(torch.tensor([[0, h, 0, w]], dtype=torch.int64).repeat(n, 1), torch.zeros(n, dtype=torch.bool))


class UniformMaskSource(MaskSource):
    needs_cam = False

    def boxes(self, images, labels, cam_fn=None, truth=None):
        n = images.shape[0]
        return BoxResult(torch.zeros(n, 4, dtype=torch.int64), torch.zeros(n, dtype=torch.bool))


class RandomMaskSource(MaskSource):
    def boxes(self, images, labels, cam_fn, truth=None):
        res = self._cam_boxes(images, labels, cam_fn)
        moved = random_boxes_like(res.boxes, tuple(images.shape[-2:]), self.factor, self.generator)
        return BoxResult(moved, res.fallback)


class OracleMaskSource(MaskSource):
    """The true object box of each image (``truth``, int ``[B, 4]`` (y0, y1, x0, x1) in pixels of
    the images), expanded outward to the downsampling grid. No CAM, no fallback."""

    needs_cam = False
    needs_truth = True

    def boxes(self, images, labels, cam_fn=None, truth=None):
        if truth is None:
            raise ValueError(f"mask source '{self.name}' needs the true object boxes: only datasets that know where "
                             "their objects are (the synthetic set) support it")
        truth = torch.as_tensor(truth, dtype=torch.int64)
        if truth.shape != (images.shape[0], 4):
            raise ValueError(f"truth boxes must be [{images.shape[0]}, 4], got shape {tuple(truth.shape)}")
        boxes = align_boxes(truth, tuple(images.shape[-2:]), self.factor)
        return BoxResult(boxes, torch.zeros(images.shape[0], dtype=torch.bool))


#: The class of each mask source, by the names (and in the order) of ``choices.MASK_SOURCES``.
MASK_SOURCES: dict[str, type[MaskSource]] = dict(zip(
    choices.MASK_SOURCES,
    (FullMaskSource, UniformMaskSource, RandomMaskSource, CamMaskSource, PauMaskSource, OracleMaskSource),
    strict=True,
))


def make_mask_source(name: str, factor: int, threshold: float, seed: int = 0) -> MaskSource:
    """The mask source called ``name`` (see ``MASK_SOURCES``)."""
    if name not in MASK_SOURCES:
        raise ValueError(f"unknown mask source {name!r}; choose one of {', '.join(MASK_SOURCES)}")
    generator = torch.Generator().manual_seed(int(seed))
    return MASK_SOURCES[name](factor=factor, threshold=threshold, generator=generator)
