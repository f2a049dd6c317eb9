"""Exemplar memories that hold real uint8 pixels under a budget in full-exemplar units.

``ExemplarMemory`` keeps plain exemplars (each costs 1 unit); ``CompressedExemplarMemory`` keeps
CIM exemplars: the box crop at full resolution plus the low-resolution cells outside it, each
costing r = stored bytes / full bytes (= a + (1 - a)/ratio for grid-aligned boxes).

Per class the exemplars are a *ranked* list (herding order), so shrinking a class's budget is
cutting the list at the longest prefix that fits. The memory yields samples like a dataset
(``as_dataset``) and serialises itself (``state_dict`` / ``save`` / ``load``) so that it can travel
inside checkpoints.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_open
from . import codec, pixel_codec
from .herding import fit_prefix

#: Version of the on-disk / state_dict layout; bump when it changes.
FORMAT_VERSION = 1


def budget_figures(units_per_class: float, num_classes: int, full_exemplar_bytes: int) -> dict:
    """The budget part of a memory's summary: units per class, and the budget in units and bytes."""
    return {"units_per_class": units_per_class, "budget_units": units_per_class * num_classes,
            "budget_bytes": int(units_per_class * num_classes * full_exemplar_bytes)}


def summary_figures(memory, storage_shape, units_per_class: float | None, num_classes: int | None) -> dict:
    """The summary keys every memory kind reports (image, features, pca), read from the memory's own
    counts, units, bytes and box areas; with ``units_per_class``, the budget as well."""
    counts = memory.counts()
    n = len(memory)
    out = {
        "kind": memory.kind,
        "exemplars": n,
        "exemplars_per_class": {str(k): v for k, v in counts.items()},
        "mean_exemplars_per_class": float(np.mean(list(counts.values()))) if counts else 0.0,
        "units_used": round(memory.units_used(), 6),
        "mean_cost": round(memory.units_used() / n, 6) if n else None,
        "mean_box_area": memory.mean_box_area(),
        "bytes_used": memory.bytes_used(),
        "bytes_per_exemplar": memory.bytes_per_exemplar(),
        "metadata_bytes": memory.metadata_bytes(),
        "full_exemplar_bytes": memory.full_exemplar_bytes,
        "storage_shape": None if storage_shape is None else list(storage_shape),
    }
    if units_per_class is not None:
        out.update(budget_figures(units_per_class, len(counts) if num_classes is None else num_classes,
                                  memory.full_exemplar_bytes))
    return out


@dataclass
class ClassExemplars:
    """One class's ranked exemplars, packed: item i is ``payload[offsets[i]:offsets[i+1]]``."""

    boxes: np.ndarray  # int64 [n, 4] (y0, y1, x0, x1) at the storage resolution
    costs: np.ndarray  # float64 [n] full-exemplar units
    payload: np.ndarray  # uint8 [total]
    offsets: np.ndarray  # int64 [n + 1]
    aspects: np.ndarray  # float32 [n]: width / height of the view each stored image squeezes (1 = as stored)

    def __len__(self) -> int:
        return len(self.costs)

    def prefix(self, k: int) -> "ClassExemplars":
        return ClassExemplars(
            self.boxes[:k].copy(),
            self.costs[:k].copy(),
            self.payload[: self.offsets[k]].copy(),
            self.offsets[: k + 1].copy(),
            self.aspects[:k].copy(),
        )


class ExemplarMemory:
    """Plain exemplars: whole uint8 images of one storage shape ``(H, W, C)``, 1 unit each."""

    kind = "plain"

    def __init__(self, image_shape: tuple[int, int, int]):
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {image_shape}")
        self.image_shape = tuple(int(v) for v in image_shape)
        self._classes: dict[int, ClassExemplars] = {}
        self._index: np.ndarray | None = None  # cumulative counts over sorted labels

    # -- codec (overridden by the compressed memory) ------------------------------------------
    def costs_of(self, boxes: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
        """Cost of storing each image with its box, in full-exemplar units (``images``: for
        memories whose cost depends on the content, such as entropy-coded ones)."""
        return np.ones(len(boxes), dtype=np.float64)

    def _encode(self, images: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(images)
        offsets = np.arange(n + 1, dtype=np.int64) * self.full_exemplar_bytes
        return np.ascontiguousarray(images, dtype=np.uint8).reshape(-1), offsets

    def _decode(self, store: ClassExemplars, indices: np.ndarray) -> np.ndarray:
        starts = store.offsets[indices]
        full = self.full_exemplar_bytes
        flat = store.payload.reshape(-1, full) if len(store) else store.payload.reshape(0, full)
        return flat[starts // full].reshape(len(indices), *self.image_shape)

    def reconstruct(self, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """What storing uint8 ``[n, H, W, C]`` images with ``boxes`` would give back on reading
        (the memory builder ranks candidates by it); plain exemplars come back as they are."""
        return images

    def meta(self) -> dict:
        return {"kind": self.kind, "image_shape": list(self.image_shape)}

    # -- sizes -------------------------------------------------------------------------------
    @property
    def full_exemplar_bytes(self) -> int:
        h, w, c = self.image_shape
        return h * w * c

    def full_boxes(self, n: int) -> np.ndarray:
        h, w, _ = self.image_shape
        return np.tile(np.array([[0, h, 0, w]], dtype=np.int64), (n, 1))

    # -- content -----------------------------------------------------------------------------
    @property
    def labels(self) -> list[int]:
        return sorted(self._classes)

    def __len__(self) -> int:
        return sum(len(s) for s in self._classes.values())

    def __contains__(self, label: int) -> bool:
        return int(label) in self._classes

    def count(self, label: int) -> int:
        store = self._classes.get(int(label))
        return 0 if store is None else len(store)

    def counts(self) -> dict[int, int]:
        return {k: len(self._classes[k]) for k in self.labels}

    def units_used(self, label: int | None = None) -> float:
        stores = self._classes.values() if label is None else [self._classes[int(label)]]
        return float(sum(s.costs.sum() for s in stores))

    def bytes_used(self) -> int:
        """Pixel bytes actually held (crops + low-resolution cells)."""
        return int(sum(s.offsets[-1] for s in self._classes.values()))

    def bytes_per_exemplar(self) -> dict | None:
        """Mean, min and max payload bytes of one stored exemplar (None when empty)."""
        sizes = np.concatenate([np.diff(s.offsets) for s in self._classes.values()]) if self._classes else np.zeros(0)
        if not len(sizes):
            return None
        return {"mean": round(float(sizes.mean()), 1), "min": int(sizes.min()), "max": int(sizes.max())}

    def metadata_bytes(self) -> int:
        """Bytes of the per-exemplar bookkeeping (box, cost, offset) beside the pixels."""
        return int(sum(s.boxes.nbytes + s.costs.nbytes + s.offsets.nbytes + s.aspects.nbytes for s in self._classes.values()))

    def mean_box_area(self) -> float | None:
        """Mean share of the image kept at full resolution, over every stored exemplar."""
        if not len(self):
            return None
        h, w, _ = self.image_shape
        boxes = np.concatenate([s.boxes for s in self._classes.values()])
        areas = np.clip(boxes[:, 1] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 2], 0, None)
        return round(float(areas.mean()) / (h * w), 6)

    def boxes(self, label: int) -> np.ndarray:
        return self._classes[int(label)].boxes.copy()

    def costs(self, label: int) -> np.ndarray:
        return self._classes[int(label)].costs.copy()

    def targets(self) -> np.ndarray:
        """Label of every stored exemplar, in (class, rank) order — the dataset order."""
        if not self._classes:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.full(len(self._classes[k]), k, dtype=np.int64) for k in self.labels])

    # -- updates -----------------------------------------------------------------------------
    def add_class(
        self, label: int, images: np.ndarray, boxes: np.ndarray | None = None, budget: float | None = None,
        aspects: np.ndarray | None = None, costs: np.ndarray | None = None,
    ) -> int:
        """Store ``images`` (uint8 ``[n, H, W, C]``, in rank order) for ``label``.

        Keeps the longest prefix whose cost fits ``budget`` units (all when None) and replaces
        whatever the class held before. ``aspects``: width / height of the view each image
        squeezes (path images stored whole, see ``restore_view``; default 1). ``costs``: the
        images' ``costs_of`` when the caller has them already (an entropy-coded memory prices an
        image by encoding it). Returns how many were kept.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images for class {label} must be uint8 [n, {', '.join(map(str, self.image_shape))}], "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        boxes = self.full_boxes(len(images)) if boxes is None else np.asarray(boxes, dtype=np.int64)
        if boxes.shape != (len(images), 4):
            raise ValueError(f"boxes must be [{len(images)}, 4], got {tuple(boxes.shape)}")
        costs = self.costs_of(boxes, images) if costs is None else np.asarray(costs, dtype=np.float64)
        if costs.shape != (len(images),):
            raise ValueError(f"costs must be [{len(images)}], got {tuple(costs.shape)}")
        keep = len(images) if budget is None else fit_prefix(costs, budget)
        aspects = np.ones(len(images), dtype=np.float32) if aspects is None else np.asarray(aspects, dtype=np.float32)
        if aspects.shape != (len(images),) or not (np.isfinite(aspects) & (aspects > 0)).all():
            raise ValueError(f"aspects must be [{len(images)}] positive numbers, got {aspects!r}")
        payload, offsets = self._encode(images[:keep], boxes[:keep])
        self._classes[int(label)] = ClassExemplars(boxes[:keep].copy(), costs[:keep], payload, offsets, aspects[:keep].copy())
        self._index = None
        return keep

    def reduce(self, budget: float) -> dict[int, int]:
        """Cut every class's ranked list to the longest prefix within ``budget`` units."""
        removed = {}
        for label, store in self._classes.items():
            keep = fit_prefix(store.costs, budget)
            if keep < len(store):
                removed[label] = len(store) - keep
                self._classes[label] = store.prefix(keep)
        self._index = None
        return removed

    # -- reading -----------------------------------------------------------------------------
    def images(self, label: int, indices: np.ndarray | None = None) -> np.ndarray:
        """Reconstructed uint8 images ``[n, H, W, C]`` of one class (all, or ``indices``)."""
        store = self._classes[int(label)]
        idx = np.arange(len(store)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return np.zeros((0, *self.image_shape), dtype=np.uint8)
        if idx.min() < 0 or idx.max() >= len(store):
            raise IndexError(f"exemplar indices of class {label} must lie in [0, {len(store)}), got [{idx.min()}, {idx.max()}]")
        return self._decode(store, idx)

    def item(self, index: int) -> tuple[np.ndarray, int]:
        """The ``index``-th exemplar in dataset order, reconstructed, with its label."""
        image, label, _ = self.item_view(index)
        return image, label

    def item_view(self, index: int) -> tuple[np.ndarray, int, float]:
        """``item`` and the aspect of the view the stored image squeezes (see ``restore_view``)."""
        if self._index is None:
            self._index = np.cumsum([len(self._classes[k]) for k in self.labels])
        n = int(self._index[-1]) if len(self._index) else 0
        if not 0 <= index < n:
            raise IndexError(f"memory index {index} out of range [0, {n})")
        c = int(np.searchsorted(self._index, index, side="right"))
        label = self.labels[c]
        local = index - (int(self._index[c - 1]) if c else 0)
        return self.images(label, np.array([local]))[0], label, float(self._classes[label].aspects[local])

    def as_dataset(self, transform: Callable | None = None) -> "MemoryDataset":
        return MemoryDataset(self, transform)

    def summary(self, units_per_class: float | None = None, num_classes: int | None = None) -> dict:
        """Figures for logs and results files."""
        return summary_figures(self, self.image_shape, units_per_class, num_classes)

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"format_version": FORMAT_VERSION, **self.meta(), "classes": {}}
        for label, s in self._classes.items():
            state["classes"][label] = {
                "boxes": s.boxes.copy(),
                "costs": s.costs.copy(),
                "payload": s.payload.copy(),
                "offsets": s.offsets.copy(),
                "aspects": s.aspects.copy(),
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict``; refuses a state made with other settings (no silent misread)."""
        version = state.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"memory format version {version!r} is not supported (expected {FORMAT_VERSION})")
        mine, theirs = self.meta(), {k: state.get(k) for k in self.meta()}
        if mine != theirs:
            diff = ", ".join(f"{k}: saved {theirs[k]!r}, this run {mine[k]!r}" for k in mine if mine[k] != theirs[k])
            raise ValueError(f"memory was saved with other settings ({diff}); refusing to load it")
        classes = {}
        for label, s in state["classes"].items():
            store = ClassExemplars(
                np.asarray(s["boxes"], dtype=np.int64),
                np.asarray(s["costs"], dtype=np.float64),
                np.asarray(s["payload"], dtype=np.uint8),
                np.asarray(s["offsets"], dtype=np.int64),
                np.asarray(s.get("aspects", np.ones(len(s["costs"]))), dtype=np.float32),
            )
            n = len(store.costs)
            if (store.boxes.shape != (n, 4) or store.offsets.shape != (n + 1,) or store.offsets[-1] != len(store.payload)
                    or store.aspects.shape != (n,)):
                raise ValueError(f"memory state of class {label} is inconsistent (corrupt?)")
            try:
                self._check_store(store)
            except ValueError as err:
                raise ValueError(f"memory state of class {label} is inconsistent (corrupt?): {err}") from err
            classes[int(label)] = store
        self._classes = classes
        self._index = None

    def _check_store(self, store: ClassExemplars) -> None:
        """Raise ``ValueError`` unless a loaded class's items are what ``_decode`` reads: checked
        once on loading, so reads during replay need no checks of their own."""
        if np.any(np.diff(store.offsets) != self.full_exemplar_bytes) or (len(store.offsets) and store.offsets[0] != 0):
            raise ValueError(f"every plain exemplar must hold {self.full_exemplar_bytes} bytes")

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (.npz) atomically: a temporary file in the same folder, then rename."""
        path = Path(path)
        state = self.state_dict()
        arrays = {"meta": np.frombuffer(json.dumps({k: v for k, v in state.items() if k != "classes"}).encode(), dtype=np.uint8)}
        for label, s in state["classes"].items():
            for key, arr in s.items():
                arrays[f"class{label}_{key}"] = arr
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Load a file written by ``save`` into this memory (same settings required)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                classes: dict = {}
                for key in data.files:
                    if key == "meta":
                        continue
                    head, field_name = key.split("_", 1)
                    classes.setdefault(int(head[len("class"):]), {})[field_name] = data[key]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"cannot read exemplar memory file {path}: {err}") from err
        self.load_state_dict({**meta, "classes": classes})


class CompressedExemplarMemory(ExemplarMemory):
    """CIM exemplars: full-resolution box crop + low-resolution rest, downsampled by sqrt(ratio)."""

    kind = "compressed"

    def __init__(self, image_shape: tuple[int, int, int], compress_ratio: float):
        super().__init__(image_shape)
        self.compress_ratio = float(compress_ratio)
        self.factor = codec.downsample_factor(compress_ratio)

    def meta(self) -> dict:
        return {**super().meta(), "compress_ratio": self.compress_ratio}

    def costs_of(self, boxes: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
        return np.asarray(
            codec.exemplar_cost(torch.as_tensor(boxes, dtype=torch.int64), self.image_shape[:2], self.factor),
            dtype=np.float64,
        )

    def reconstruct(self, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
        return codec.blend_compress(x, torch.as_tensor(boxes, dtype=torch.int64), self.factor).permute(0, 2, 3, 1).numpy()

    def _encode(self, images: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(images) == 0:
            return np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64)
        return codec.encode_batch(images, boxes, self.factor)

    def _check_store(self, store: ClassExemplars) -> None:
        codec.check_encoded(store.payload, store.offsets, store.boxes, self.image_shape, self.factor)

    def _decode(self, store: ClassExemplars, indices: np.ndarray) -> np.ndarray:
        # the store was made by encode_batch or checked on loading (_check_store): no per-read checks
        return codec.decode_items(store.payload, store.offsets, store.boxes, indices, self.image_shape, self.factor)


class CodedExemplarMemory(CompressedExemplarMemory):
    """CIM exemplars whose pixels are entropy-coded (core/pixel_codec.py): the box crop and the
    whole low-resolution image (every s-th pixel) as two files. Item payload: 4-byte little-endian
    length of the crop's file, the crop's file, the low-resolution file. An exemplar costs its
    payload bytes over the bytes of one raw full exemplar, so herding consumes the byte budget with
    real costs. A box covering the whole image stores no low-resolution file (MRDC: the whole image
    as one JPEG); an empty box stores no crop. JPEG's tables are stored once (``metadata_bytes``),
    not per exemplar (see pixel_codec)."""

    kind = "coded"
    HEADER = 4

    def __init__(self, image_shape: tuple[int, int, int], compress_ratio: float, codec: str, quality: int):
        super().__init__(image_shape, compress_ratio)
        pixel_codec.check_codec(codec, quality)
        self.codec, self.quality = codec, int(quality)

    def meta(self) -> dict:
        return {**super().meta(), "codec": self.codec, "quality": self.quality}

    def metadata_bytes(self) -> int:
        """Per-exemplar bookkeeping plus the JPEG tables shared by every stored file."""
        shared = len(pixel_codec.jpeg_tables(self.quality)) if self.codec == "jpeg" and len(self) else 0
        return super().metadata_bytes() + shared

    def _check_store(self, store: ClassExemplars) -> None:
        # coded items have their own sizes; the box geometry and the offsets are still checked
        codec.check_aligned_boxes(store.boxes, self.image_shape[:2], self.factor)
        if len(store.offsets) and (store.offsets[0] != 0 or np.any(np.diff(store.offsets) < self.HEADER)):
            raise ValueError(f"offsets must start at 0 and every item hold at least its {self.HEADER}-byte header")

    def _encode_item(self, image: np.ndarray, box: np.ndarray) -> bytes:
        y0, y1, x0, x1 = (int(v) for v in box)
        h, w, _ = self.image_shape
        crop = pixel_codec.encode(np.ascontiguousarray(image[y0:y1, x0:x1]), self.codec, self.quality)
        full = y0 <= 0 and x0 <= 0 and y1 >= h and x1 >= w
        low = b"" if full else pixel_codec.encode(np.ascontiguousarray(image[:: self.factor, :: self.factor]), self.codec, self.quality)
        return len(crop).to_bytes(self.HEADER, "little") + crop + low

    def _encode(self, images: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        items = [self._encode_item(img, box) for img, box in zip(images, boxes)]
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in items])]).astype(np.int64)
        payload = np.frombuffer(b"".join(items), dtype=np.uint8).copy() if items else np.zeros(0, dtype=np.uint8)
        return payload, offsets

    def _decode_item(self, data: np.ndarray, box: np.ndarray) -> np.ndarray:
        h, w, c = self.image_shape
        s = self.factor
        y0, y1, x0, x1 = (int(v) for v in box)
        n_crop = int.from_bytes(bytes(data[: self.HEADER]), "little")
        crop = pixel_codec.decode(data[self.HEADER : self.HEADER + n_crop], (max(y1 - y0, 0), max(x1 - x0, 0), c), self.quality)
        rest = data[self.HEADER + n_crop :]
        if len(rest):
            low = pixel_codec.decode(rest, (-(-h // s), -(-w // s), c), self.quality)
            out = low[np.arange(h) // s][:, np.arange(w) // s]
        else:
            out = np.zeros((h, w, c), dtype=np.uint8)
        if crop.size:
            out[y0:y1, x0:x1] = crop
        return out

    def _decode(self, store: ClassExemplars, indices: np.ndarray) -> np.ndarray:
        return np.stack([self._decode_item(store.payload[store.offsets[i] : store.offsets[i + 1]], store.boxes[i])
                         for i in indices])

    def costs_of(self, boxes: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
        if images is None:
            raise ValueError("an entropy-coded memory prices an exemplar by its encoded bytes: pass the images")
        boxes = np.asarray(boxes, dtype=np.int64)
        super().costs_of(boxes)  # the same box checks as the raw memory (aligned, inside the image)
        sizes = [len(self._encode_item(img, box)) for img, box in zip(images, boxes)]
        return np.asarray(sizes, dtype=np.float64) / self.full_exemplar_bytes

    def reconstruct(self, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        encoded = [np.frombuffer(self._encode_item(img, box), dtype=np.uint8) for img, box in zip(images, boxes)]
        return np.stack([self._decode_item(e, box) for e, box in zip(encoded, boxes)]) if encoded else np.asarray(images)


def make_memory(image_shape: tuple[int, int, int], compress_ratio: float, codec: str = "raw", quality: int = 50) -> ExemplarMemory:
    """The memory of a run: raw CIM exemplars, or entropy-coded ones (``codec`` jpeg / webp / png)."""
    if codec == "raw":
        return CompressedExemplarMemory(image_shape, compress_ratio)
    return CodedExemplarMemory(image_shape, compress_ratio, codec, quality)


def restore_view(image: np.ndarray, aspect: float) -> Image.Image:
    """A stored ``[S, S, C]`` image as the view it squeezes: shorter side S, width / height =
    ``aspect`` (1: the image as stored)."""
    pil = Image.fromarray(np.ascontiguousarray(image))
    if abs(aspect - 1.0) < 1e-6:
        return pil
    side = image.shape[0]
    size = (max(side, round(side * aspect)), side) if aspect > 1 else (side, max(side, round(side / aspect)))
    return pil.resize(size, Image.BILINEAR)


class MemoryDataset(torch.utils.data.Dataset):
    """The memory as a dataset: yields ``(index, transform(image), label)`` like PyCIL's DummyDataset.

    Images are reconstructed from the stored (compressed) form on every access, so what a learner
    replays is exactly what the memory holds; a path image stored whole is given back at its own
    aspect (``restore_view``) before the transform.
    """

    def __init__(self, memory: ExemplarMemory, transform: Callable | None = None):
        self.memory = memory
        self.transform = transform
        self.labels = memory.targets()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image, label, aspect = self.memory.item_view(index)
        if self.transform is None:
            return index, image, label
        return index, self.transform(restore_view(image, aspect)), label


class RankedClassLists:
    """What the fixed-size-item memories (``features``, ``pca``) share: per class a ranked list
    (``self._classes[label]``, with ``len`` and ``head(n)``) of items of ``item_bytes`` each, under a
    budget of ``units`` × ``full_exemplar_bytes`` per class; shrinking cuts the lists."""

    item_bytes: int
    full_exemplar_bytes: int
    storage_shape: tuple[int, ...] | None
    _classes: dict

    def capacity(self, units: float) -> int:
        """Items that fit ``units`` full-exemplar units (the byte budget ``floor(units × full bytes)``)."""
        if units <= 0:
            return 0
        return int(np.floor(float(units) * self.full_exemplar_bytes + 1e-9)) // self.item_bytes

    def units_used(self) -> float:
        return self.bytes_used() / self.full_exemplar_bytes

    def mean_box_area(self) -> None:
        return None  # no boxes

    def bytes_per_exemplar(self) -> dict | None:
        n = len(self)
        return {"mean": self.bytes_used() / n, "min": self.item_bytes, "max": self.item_bytes} if n else None

    def summary(self, units_per_class: float | None = None, num_classes: int | None = None) -> dict:
        """Figures for logs and results files, with the same keys as the image memory's."""
        return summary_figures(self, self.storage_shape, units_per_class, num_classes)

    @property
    def labels(self) -> list[int]:
        return sorted(self._classes)

    def __len__(self) -> int:
        return sum(len(c) for c in self._classes.values())

    def counts(self) -> dict[int, int]:
        return {k: len(self._classes[k]) for k in self.labels}

    def reduce(self, units: float) -> dict[int, int]:
        """Cut every class's ranked list to ``capacity(units)``; returns {label: removed}."""
        keep, removed = self.capacity(units), {}
        for label, c in self._classes.items():
            if len(c) > keep:
                removed[label] = len(c) - keep
                self._classes[label] = c.head(keep)
        return removed
