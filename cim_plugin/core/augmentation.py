"""The artefact augmentation's state (method.md §3): boxes of the current phase's new-class training
items and the share of them compressed on the fly. PyCIL-free.

Every ``interval`` epochs the boxes are recomputed from the current model (``refresh``) and the
share grows by ``share_step`` (capped at 1). A dataset wrapper (pycil/data.py) reads ``boxes`` and
``share`` when it draws an item.
"""

from __future__ import annotations

import numpy as np


class ArtefactAugmentation:
    def __init__(self, factor: int, interval: int, share_step: float):
        #: ``compress(images [n, H, W, C] uint8, boxes [n, 4]) -> images``: what storing does to an
        #: image (the memory's ``reconstruct``, so that an entropy-coded memory's artefacts are
        #: trained on too); None: box at full resolution, the rest downsampled by ``factor``.
        self.compress = None
        self.factor = int(factor)
        self.interval = int(interval)
        self.share_step = float(share_step)
        self.reset()

    def reset(self) -> None:
        """A new phase: no boxes yet, nothing compressed."""
        self.share = 0.0
        self.boxes: np.ndarray | None = None  # int64 [N, 4] at the storage resolution
        self.refreshes = 0

    @property
    def enabled(self) -> bool:
        return self.share_step > 0

    def due(self, epoch: int) -> bool:
        """Whether the boxes are refreshed after ``epoch`` (1-based epochs of a training stage)."""
        return self.enabled and epoch % self.interval == 0

    def refresh(self, boxes: np.ndarray) -> None:
        self.boxes = np.asarray(boxes, dtype=np.int64)
        self.refreshes += 1
        self.share = min(1.0, self.refreshes * self.share_step)
