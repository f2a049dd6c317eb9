"""A memory of PCA-coded feature maps (AnytimeCL's attention-weighted per-image PCA, issue #12
part 2), under the image memory's byte budget. PyCIL-free.

Each class keeps a *ranked* list (herding order) of codes of one map shape ``(C, h, w)`` and one k
(core/feature_pca.py: uint8 mean, k uint8 directions, k uint8 coefficient rows, float16 ranges):
``code_bytes(C, h·w, k)`` bytes per exemplar. The budget is the image memory's: ``units`` per class
of ``full_exemplar_bytes`` (one uncompressed image exemplar), so a class holds
``floor(units × full_exemplar_bytes) // code_bytes`` codes (``capacity``), counted exactly:
``bytes_used`` is the stored tensors' ``numel × element_size``. Shrinking a class's budget cuts its
list.

Beside each code the memory keeps (``metadata_bytes``, not counted in the budget, as the image
memory's boxes are not) the position of its image among the class's training items (int64) and the
cosine of its decoded map to the original (float32, measured when it was encoded; nothing trains on
either). ``batch`` / ``all`` give codes and labels for rehearsal, ``class_means`` the NME means of
the decoded maps through a caller's ``embed`` (the network's stages above the stored map), timed;
``state_dict`` / ``load_state_dict`` the explicit state (checkpoints: uint8 / float16 tensors).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .feature_pca import PCACode, code_bytes, decode
from .memory import RankedClassLists

#: Version of the state_dict layout; bump when it changes.
FORMAT_VERSION = 1


@dataclass
class ClassCodes:
    code: PCACode  # ranked, n images
    positions: np.ndarray  # int64 [n]: each code's image among the class's training items
    cosine: np.ndarray  # float32 [n]: mean position cosine of the decoded map to the original at encoding

    def __len__(self) -> int:
        return len(self.positions)

    def head(self, n: int) -> "ClassCodes":
        return ClassCodes(self.code.select(slice(0, n)), self.positions[:n].copy(), self.cosine[:n].copy())


class PCAMemory(RankedClassLists):
    """Ranked PCA codes per class, budgeted in bytes (see module docstring)."""

    kind = "pca"

    def __init__(self, map_shape: tuple[int, int, int], k: int, full_exemplar_bytes: int,
                 storage_shape: tuple[int, ...] | None = None):
        c, h, w = (int(v) for v in map_shape)
        if min(c, h, w, int(full_exemplar_bytes)) < 1:
            raise ValueError(f"map shape and full_exemplar_bytes must be positive, got {map_shape}, {full_exemplar_bytes}")
        if not 1 <= int(k) <= min(c, h * w):
            raise ValueError(f"k must lie in [1, min(C, h·w)] = [1, {min(c, h * w)}] for maps {c}×{h}×{w}, got {k}")
        self.map_shape, self.k = (c, h, w), int(k)
        self.full_exemplar_bytes = int(full_exemplar_bytes)
        self.storage_shape = None if storage_shape is None else tuple(int(v) for v in storage_shape)
        self._classes: dict[int, ClassCodes] = {}

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def item_bytes(self) -> int:
        """Bytes of one stored code (the analytic size; ``bytes_used`` counts the tensors)."""
        c, h, w = self.map_shape
        return code_bytes(c, h * w, self.k)

    def bytes_used(self) -> int:
        return int(sum(c.code.nbytes() for c in self._classes.values()))

    def metadata_bytes(self) -> int:
        return int(sum(c.positions.nbytes + c.cosine.nbytes for c in self._classes.values()))

    # -- content -------------------------------------------------------------------------------
    def code(self, label: int) -> PCACode:
        return self._classes[int(label)].code

    def positions(self, label: int) -> np.ndarray:
        return self._classes[int(label)].positions.copy()

    def add_class(self, label: int, code: PCACode, positions: np.ndarray, cosine: np.ndarray,
                  units: float | None = None) -> int:
        """Store ranked ``code`` (n images, with their images' ``positions`` and encoding ``cosine``)
        for ``label``, replacing what it held; keeps the first ``capacity(units)`` (all when None)."""
        positions = np.asarray(positions, dtype=np.int64)
        cosine = np.asarray(cosine, dtype=np.float32)
        if code.shape != self.map_shape or code.k != self.k:
            raise ValueError(f"codes of maps {code.shape} with k={code.k} do not fit this memory "
                             f"({self.map_shape}, k={self.k})")
        if positions.shape != (len(code),) or cosine.shape != (len(code),):
            raise ValueError(f"positions and cosine must be [{len(code)}], got {positions.shape} and {cosine.shape}")
        keep = len(code) if units is None else min(len(code), self.capacity(units))
        cpu = code.to("cpu")
        self._classes[int(label)] = ClassCodes(cpu, positions, cosine).head(keep)
        return keep

    def all(self) -> tuple[PCACode | None, torch.Tensor]:
        """Every stored code (class, rank order) and its label ``[N]``; (None, empty) when empty."""
        if not self._classes:
            return None, torch.zeros(0, dtype=torch.int64)
        code = PCACode.cat([self._classes[k].code for k in self.labels])
        labels = torch.cat([torch.full((len(self._classes[k]),), k, dtype=torch.int64) for k in self.labels])
        return code, labels

    def mean_cosine(self) -> float | None:
        """Mean encoding cosine (decoded vs original maps) of every stored exemplar."""
        if not len(self):
            return None
        return float(np.concatenate([c.cosine for c in self._classes.values()]).mean())

    def class_means(self, embed: Callable[[torch.Tensor], torch.Tensor], num_classes: int, dim: int,
                    batch_size: int = 256) -> tuple[np.ndarray, dict]:
        """NME means ``[num_classes, dim]``: the normalised mean of each class's normalised
        ``embed(decoded maps)`` (0 without codes), and the decode figures (codes, seconds spent in
        ``decode`` alone, batched by ``batch_size``)."""
        means, decoded, seconds = np.zeros((num_classes, dim)), 0, 0.0
        for label in self.labels:
            code, feats = self._classes[label].code, []
            if not len(code):
                continue
            for s in range(0, len(code), batch_size):
                t0 = time.perf_counter()
                maps = decode(code.select(slice(s, s + batch_size)))
                seconds += time.perf_counter() - t0
                decoded += len(maps)
                with torch.no_grad():
                    feats.append(embed(maps).detach().double().cpu())
            x = F.normalize(torch.cat(feats), dim=1)
            m = x.mean(dim=0)
            means[label] = (m / (m.norm() + 1e-8)).numpy()
        return means, {"decoded": decoded, "decode_seconds": round(seconds, 6),
                       "decode_ms_per_exemplar": round(1000 * seconds / decoded, 6) if decoded else None}

    def summary(self, units_per_class: float | None = None, num_classes: int | None = None) -> dict:
        return {**super().summary(units_per_class, num_classes),
                "analytic_bytes_per_exemplar": self.item_bytes, "map_shape": list(self.map_shape), "pca_components": self.k,
                "reconstruction_cosine": None if not len(self) else round(self.mean_cosine(), 6)}

    # -- persistence ---------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"kind": self.kind, "map_shape": list(self.map_shape), "k": self.k,
                "full_exemplar_bytes": self.full_exemplar_bytes}

    def state_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **self.meta(),
                "storage_shape": None if self.storage_shape is None else list(self.storage_shape),
                "classes": {label: {"mean": c.code.mean.clone(), "basis": c.code.basis.clone(),
                                    "coeffs": c.code.coeffs.clone(), "ranges": c.code.ranges.clone(),
                                    "positions": c.positions.copy(), "cosine": c.cosine.copy()}
                            for label, c in self._classes.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``; refuses a state made with other settings."""
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"pca memory format version {state.get('format_version')!r} is not supported "
                             f"(expected {FORMAT_VERSION})")
        mine, theirs = self.meta(), {k: state.get(k) for k in self.meta()}
        theirs["map_shape"] = None if theirs["map_shape"] is None else [int(v) for v in theirs["map_shape"]]
        if mine != theirs:
            diff = ", ".join(f"{k}: saved {theirs[k]!r}, this run {mine[k]!r}" for k in mine if mine[k] != theirs[k])
            raise ValueError(f"pca memory was saved with other settings ({diff}); refusing to load it")
        c, h, w = self.map_shape
        classes = {}
        for label, e in state["classes"].items():
            code = PCACode(e["mean"].clone(), e["basis"].clone(), e["coeffs"].clone(), e["ranges"].clone(), self.map_shape)
            n = len(code)
            ok = (code.mean.dtype == code.basis.dtype == code.coeffs.dtype == torch.uint8 and code.ranges.dtype == torch.float16
                  and code.mean.shape == (n, c) and code.basis.shape == (n, self.k, c) and code.coeffs.shape == (n, self.k, h * w)
                  and code.ranges.shape == (n, 1 + 2 * self.k, 2))
            positions, cosine = np.asarray(e["positions"], dtype=np.int64), np.asarray(e["cosine"], dtype=np.float32)
            if not ok or positions.shape != (n,) or cosine.shape != (n,):
                raise ValueError(f"pca memory state of class {label} is inconsistent (corrupt?)")
            classes[int(label)] = ClassCodes(code, positions.copy(), cosine.copy())
        self._classes = classes
