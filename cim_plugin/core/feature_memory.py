"""A memory of final feature vectors (Iscen, Zhang, Lazebnik, Schmid, ECCV 2020), under the image
memory's byte budget. PyCIL-free.

Each class keeps a *ranked* list (herding order) of feature vectors ``[n, D]`` in ``dtype``
(float16 or float32: D × 2 or D × 4 bytes each). The budget is the image memory's: ``units`` per
class of ``full_exemplar_bytes`` (the bytes of one uncompressed image exemplar), so a class holds
``floor(units × full_exemplar_bytes) // (D × itemsize)`` vectors (``capacity``), counted exactly:
``bytes_used`` is the stored arrays' ``nbytes``. Shrinking a class's budget cuts its list.

Beside each vector the memory keeps the position of its image among the class's training items
(int64, ``metadata_bytes``): nothing trains on it; the drift diagnostic reads those images again to
compare the stored vectors with a new model's features of the same images.

``transform(fn)`` carries every stored vector through ``fn`` (the adaptation MLP) and stores the
result in ``dtype`` again; ``batch(indices)`` / ``all`` give vectors and labels for rehearsal;
``class_means`` the NME means; ``state_dict`` / ``load_state_dict`` the explicit state (checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .choices import FEATURE_DTYPES
from .memory import RankedClassLists

#: Version of the state_dict layout; bump when it changes.
FORMAT_VERSION = 1


@dataclass
class ClassFeatures:
    features: np.ndarray  # [n, D] in the memory's dtype, ranked
    positions: np.ndarray  # int64 [n]: each vector's image among the class's training items

    def __len__(self) -> int:
        return len(self.positions)

    def head(self, n: int) -> "ClassFeatures":
        return ClassFeatures(self.features[:n].copy(), self.positions[:n].copy())


class FeatureMemory(RankedClassLists):
    """Ranked feature vectors per class, budgeted in bytes (see module docstring)."""

    kind = "features"

    def __init__(self, dim: int, dtype: str, full_exemplar_bytes: int, storage_shape: tuple[int, ...] | None = None):
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(FEATURE_DTYPES)}, got {dtype!r}")
        if int(dim) < 1 or int(full_exemplar_bytes) < 1:
            raise ValueError(f"dim and full_exemplar_bytes must be positive, got {dim}, {full_exemplar_bytes}")
        self.dim, self.dtype = int(dim), dtype
        self.full_exemplar_bytes = int(full_exemplar_bytes)
        self.storage_shape = None if storage_shape is None else tuple(int(v) for v in storage_shape)
        self._classes: dict[int, ClassFeatures] = {}

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def item_bytes(self) -> int:
        """Bytes of one stored vector."""
        return self.dim * np.dtype(self.dtype).itemsize

    def bytes_used(self) -> int:
        return int(sum(c.features.nbytes for c in self._classes.values()))

    def metadata_bytes(self) -> int:
        """The images' positions (diagnostic only, see module docstring)."""
        return int(sum(c.positions.nbytes for c in self._classes.values()))

    # -- content -------------------------------------------------------------------------------
    def features(self, label: int) -> np.ndarray:
        return self._classes[int(label)].features.copy()

    def positions(self, label: int) -> np.ndarray:
        return self._classes[int(label)].positions.copy()

    def add_class(self, label: int, features: np.ndarray | torch.Tensor, positions: np.ndarray, units: float | None = None) -> int:
        """Store ranked ``features`` ``[n, D]`` (with their images' ``positions``) for ``label``,
        replacing what it held; keeps the first ``capacity(units)`` (all when None). Returns how many."""
        feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        positions = np.asarray(positions, dtype=np.int64)
        if feats.ndim != 2 or feats.shape[1] != self.dim or positions.shape != (len(feats),):
            raise ValueError(f"features must be [n, {self.dim}] with positions [n], got {feats.shape} and {positions.shape}")
        if not np.isfinite(feats).all():
            raise ValueError(f"features of class {label} are not finite")
        keep = len(feats) if units is None else min(len(feats), self.capacity(units))
        self._classes[int(label)] = ClassFeatures(np.ascontiguousarray(feats[:keep], dtype=self.dtype), positions[:keep].copy())
        return keep

    def all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored vector as float32 ``[N, D]`` and its label ``[N]`` (class, rank order)."""
        if not self._classes:
            return torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.int64)
        feats = np.concatenate([self._classes[k].features for k in self.labels]).astype(np.float32)
        labels = np.concatenate([np.full(len(self._classes[k]), k, dtype=np.int64) for k in self.labels])
        return torch.from_numpy(feats), torch.from_numpy(labels)

    def transform(self, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 1024) -> None:
        """Replace every stored vector v by ``fn(v)`` (float32 in, stored in ``dtype`` again)."""
        for label, c in self._classes.items():
            x = torch.from_numpy(c.features.astype(np.float32))
            with torch.no_grad():
                out = torch.cat([fn(x[s : s + batch_size]).detach().float().cpu() for s in range(0, len(x), batch_size)]) \
                    if len(x) else x
            self._classes[label] = ClassFeatures(np.ascontiguousarray(out.numpy(), dtype=self.dtype), c.positions)

    def class_means(self, num_classes: int) -> np.ndarray:
        """NME means ``[num_classes, D]``: the normalised mean of each class's normalised vectors (0 without)."""
        means = np.zeros((num_classes, self.dim))
        for label in self.labels:
            x = torch.from_numpy(self._classes[label].features.astype(np.float64))
            x = x / (x.norm(dim=1, keepdim=True) + 1e-8)
            m = x.mean(dim=0)
            means[label] = (m / (m.norm() + 1e-8)).numpy()
        return means

    def summary(self, units_per_class: float | None = None, num_classes: int | None = None) -> dict:
        return {**super().summary(units_per_class, num_classes), "feature_dim": self.dim, "feature_dtype": self.dtype}

    # -- persistence ---------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "dtype": self.dtype, "full_exemplar_bytes": self.full_exemplar_bytes}

    def state_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **self.meta(),
                "storage_shape": None if self.storage_shape is None else list(self.storage_shape),
                "classes": {label: {"features": c.features.copy(), "positions": c.positions.copy()}
                            for label, c in self._classes.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``; refuses a state made with other settings."""
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"feature memory format version {state.get('format_version')!r} is not supported "
                             f"(expected {FORMAT_VERSION})")
        mine, theirs = self.meta(), {k: state.get(k) for k in self.meta()}
        if mine != theirs:
            diff = ", ".join(f"{k}: saved {theirs[k]!r}, this run {mine[k]!r}" for k in mine if mine[k] != theirs[k])
            raise ValueError(f"feature memory was saved with other settings ({diff}); refusing to load it")
        classes = {}
        for label, c in state["classes"].items():
            feats, pos = np.asarray(c["features"]), np.asarray(c["positions"], dtype=np.int64)
            if feats.dtype != np.dtype(self.dtype) or feats.ndim != 2 or feats.shape[1] != self.dim or pos.shape != (len(feats),):
                raise ValueError(f"feature memory state of class {label} is inconsistent (corrupt?)")
            classes[int(label)] = ClassFeatures(feats.copy(), pos.copy())
        self._classes = classes
