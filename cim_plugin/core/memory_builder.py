"""Filling the exemplar memory one class at a time: candidates → boxes → features → herding → store.

PyCIL-free. The network is reached through an ``Encoder`` (raw CAMs and pooled features of uint8
storage images), the box through a ``MaskSource`` (core/masks.py), the storage through the memory
(core/memory.py: its ``costs_of`` prices a box, its ``reconstruct`` says what a stored exemplar
will look like). Herding ranks the candidates by the features of what the memory will hold and
consumes the class's budget in full-exemplar units; the memory keeps the longest ranked prefix that
fits. Whatever else wants to see a class's candidates — the gallery, the diagnostics — registers as
an observer and is called once per filled class with a ``FilledClass``.

This is the seam through which other memory codecs plug in: a memory with its own ``costs_of`` and
``reconstruct`` is filled by the same builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from .herding import herding_rank
from .masks import MaskSource


class Encoder(Protocol):
    """What the builder needs from a network (eval mode, no grad; uint8 ``[B, H, W, C]`` in)."""

    def cams(self, images: np.ndarray, labels: np.ndarray, features: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw CAMs ``[B, h, w]`` of ``labels`` and, when ``features``, pooled features ``[B, D]``."""

    def features(self, images: np.ndarray) -> torch.Tensor:
        """Pooled features ``[B, D]``."""


class Observer(Protocol):
    def wants_cams(self, label: int, has_truth: bool) -> bool:
        """Whether ``observe`` needs this class's raw CAMs (they are kept only then)."""

    def observe(self, filled: "FilledClass", memory) -> None:
        """Called after the class's exemplars are stored."""


@dataclass
class Boxing:
    """Boxes of a batch of candidates from the mask source, with what the pass computed on the way."""

    boxes: torch.Tensor  # int64 [B, 4] at the storage resolution
    fallback: torch.Tensor  # bool [B]: degenerate CAM, full image kept
    features: torch.Tensor | None  # [B, D] of the clean images, when the source's pass gave them
    cams: torch.Tensor | None  # raw CAMs [B, h, w], when the source computes one


@dataclass
class FilledClass:
    """One class's candidates as the builder saw them (given to observers)."""

    label: int
    images: np.ndarray  # uint8 [n, H, W, C], the readable candidates
    boxes: np.ndarray  # int64 [n, 4]
    ranked: np.ndarray  # int64: candidate indices in herding order (the stored prefix first)
    cams: torch.Tensor | None  # raw CAMs [n, h, w] (kept when an observer asked for them)
    truth: np.ndarray | None  # true object boxes [n, 4] when the dataset knows them


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=1, keepdim=True) + 1e-8)


class MemoryBuilder:
    """Budget-consuming herding of boxed, stored-as-compressed exemplars into ``memory``."""

    def __init__(self, memory, source: MaskSource, encoder: Encoder, batch_size: int,
                 observers: Sequence[Observer] = ()):
        self.memory = memory
        self.source = source
        self.encoder = encoder
        self.batch_size = int(batch_size)
        self.observers = list(observers)

    def boxes(self, images: np.ndarray, labels: np.ndarray, truth: np.ndarray | None = None,
              features: bool = True) -> Boxing:
        """Boxes of uint8 ``[B, H, W, C]`` images from the mask source; ``truth``: the true object
        boxes (the ``oracle`` source needs them)."""
        cam = feats = None
        if self.source.needs_cam:
            cam, feats = self.encoder.cams(images, labels, features)
        if self.source.needs_truth and truth is None:
            raise ValueError(f"mask source '{type(self.source).__name__}' needs true object boxes: "
                             "this dataset does not provide them (the synthetic set does)")
        res = self.source.boxes(torch.from_numpy(images).permute(0, 3, 1, 2), torch.as_tensor(labels),
                                (lambda *_: cam) if cam is not None else None,
                                truth=None if truth is None else torch.as_tensor(truth))
        return Boxing(res.boxes, res.fallback, feats, cam)

    def fill_class(self, label: int, images: np.ndarray, budget: float, truth: np.ndarray | None = None,
                   aspects: np.ndarray | None = None) -> int:
        """Rank ``images`` (the class's readable candidates) and store the prefix that fits
        ``budget`` units, replacing what the class held; returns the number of CAM fallbacks.
        ``aspects``: the views the images squeeze (path images stored whole), kept with them."""
        if not len(images):
            return 0
        labels = np.full(len(images), label, dtype=np.int64)
        keep_cams = any(o.wants_cams(label, truth is not None) for o in self.observers)
        boxes, clean, stored, cams, fallbacks = [], [], [], [], 0
        for start in range(0, len(images), self.batch_size):
            sl = slice(start, start + self.batch_size)
            chunk = images[sl]
            got = self.boxes(chunk, labels[sl], truth=None if truth is None else truth[sl])
            feats = got.features if got.features is not None else self.encoder.features(chunk)
            kept = self.memory.reconstruct(chunk, got.boxes.numpy())
            boxes.append(got.boxes)
            clean.append(l2_normalize(feats))
            stored.append(l2_normalize(self.encoder.features(kept)))
            if keep_cams:
                cams.append(got.cams)
            fallbacks += int(got.fallback.sum())
        boxes_np = torch.cat(boxes).numpy()
        target = torch.cat(clean).mean(dim=0)
        costs = self.memory.costs_of(boxes_np, images)
        ranked = herding_rank(torch.cat(stored), target, costs, budget)
        self.memory.add_class(label, images[ranked], boxes_np[ranked], budget,
                              aspects=None if aspects is None else np.asarray(aspects)[ranked], costs=costs[ranked])
        all_cams = torch.cat(cams) if cams and cams[0] is not None else None
        filled = FilledClass(label, images, boxes_np, np.asarray(ranked, dtype=np.int64), all_cams, truth)
        for observer in self.observers:
            observer.observe(filled, self.memory)
        return fallbacks

    def class_means(self, num_classes: int, dim: int) -> np.ndarray:
        """NME class means ``[num_classes, dim]`` from the stored exemplars as replayed, L2-normalised
        (classes without exemplars stay 0)."""
        means = np.zeros((num_classes, dim))
        for label in self.memory.labels:
            imgs = self.memory.images(label)
            feats = torch.cat([l2_normalize(self.encoder.features(imgs[s : s + self.batch_size]))
                               for s in range(0, len(imgs), self.batch_size)])
            mean = feats.mean(dim=0)
            means[label] = (mean / (mean.norm() + 1e-8)).numpy()
        return means
