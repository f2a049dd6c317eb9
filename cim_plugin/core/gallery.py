"""Memory-builder observer that keeps, for the first ``classes`` labels, the top-ranked exemplar as
original, CAM (normalised, upsampled; NaN for mask sources without one), box and reconstruction,
and writes them as one ``.npz`` for the gallery figure (figures.py). PyCIL-free."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..atomic import atomic_open
from .cam import normalize_cams, upsample_cams

log = logging.getLogger(__name__)


class Gallery:
    def __init__(self, classes: int, source: str):
        self.classes = int(classes)
        self.source = source
        self.rows: dict[int, tuple] = {}

    def wants_cams(self, label: int, has_truth: bool) -> bool:
        return label < self.classes

    def observe(self, filled, memory) -> None:
        if filled.label >= self.classes or not len(filled.ranked) or memory.count(filled.label) == 0:
            return
        first = int(filled.ranked[0])
        cam = None if filled.cams is None else filled.cams[first : first + 1]
        stored = memory.images(filled.label, np.zeros(1, dtype=np.int64))[0]
        self.rows[filled.label] = (filled.images[first], cam, filled.boxes[first], stored)

    def write(self, path: str | Path) -> None:
        """Write the rows kept so far to ``path`` atomically (a figure aid: an OSError is logged)."""
        rows = self.rows
        if not rows:
            return
        labels = sorted(rows)
        h, w = rows[labels[0]][0].shape[:2]
        cams = np.full((len(labels), h, w), np.nan, dtype=np.float16)
        for i, label in enumerate(labels):
            cam = rows[label][1]
            if cam is not None:
                cams[i] = upsample_cams(normalize_cams(cam.float())[0], (h, w))[0].numpy()
        path = Path(path)
        try:
            with atomic_open(path, "wb") as f:
                np.savez_compressed(
                    f, labels=np.asarray(labels, dtype=np.int64), originals=np.stack([rows[k][0] for k in labels]),
                    cams=cams, boxes=np.stack([rows[k][2] for k in labels]).astype(np.int64),
                    reconstructions=np.stack([np.asarray(rows[k][3]) for k in labels]), source=np.array(self.source),
                )
        except OSError as err:
            log.warning("CIM gallery not written to %s: %s", path, err)
