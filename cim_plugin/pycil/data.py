"""Data side of the adapter: storage images, datasets the plugin registers, and replay.

- Storage images (``to_storage``): raw training items of a PyCIL DataManager (uint8 arrays, or
  file paths for ImageNet-style folders) brought to the memory's storage resolution as uint8
  ``[n, H, W, 3]``. Array datasets keep their native size. Path datasets are stored at
  ``cim_storage_size`` (S) as S×S uint8: by default (``cim_storage_view`` "whole") the whole image
  squeezed to S×S with its aspect kept beside it, and replay rebuilds the image (shorter side S, its
  aspect) before PyCIL's transforms — so an exemplar keeps the field of view PyCIL's own replay of
  the file sees; with "crop", PyCIL's test geometry (shorter side to round(S·256/224), centre S×S
  crop), the view the model sees at test time.
- Bad files: every image mode becomes 8-bit RGB (``to_rgb``: 16-bit scaled, alpha composited on
  black, palette/CMYK/... converted; 1×1 or 3×900 images still give S×S). A file that cannot be
  decoded never stops a phase: ``to_storage`` reports it in its ``ok`` mask (warned once per
  file), ``RobustPathDataset`` substitutes another image of the class, and ``cim_check_images``
  leaves such files out of ImageNet-style folders before training.
- ``PluginDataManager``: wraps PyCIL's DataManager for one phase. When a learner asks for its
  training set with ``appendent=<the plugin memory>``, it returns PyCIL's own dataset for the new
  classes (optionally with the artefact augmentation) concatenated with the memory as a dataset,
  both through PyCIL's own transforms. Path datasets are read through ``RobustPathDataset``.
  Everything else is forwarded unchanged.
- ``get_idata``: the synthetic set and ImageNet-style folders, registered by name.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from ..core.augmentation import ArtefactAugmentation
from ..core.codec import blend_compress
from ..core.memory import ExemplarMemory, restore_view

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Storage images


def storage_shape(data_manager: Any, storage_size: int) -> tuple[int, int, int]:
    """(H, W, 3) of one stored exemplar for this DataManager's data."""
    if data_manager.use_path:
        return (storage_size, storage_size, 3)
    shape = np.asarray(data_manager._train_data[:1]).shape
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"array datasets must hold uint8 [N, H, W, 3] images, got shape {shape}")
    return tuple(int(v) for v in shape[1:])


#: Colour that transparent pixels (RGBA, LA, PA, palette with transparency) are composited on.
#: Black: PyCIL's own loader (``convert("RGB")``) drops alpha, and fully transparent pixels are
#: usually stored as (0, 0, 0, 0), so black keeps the plugin's images closest to plain PyCIL's.
ALPHA_BACKGROUND = (0, 0, 0)

#: What decoding a broken file can raise: PIL's plugins raise OSError (UnidentifiedImageError,
#: "image file is truncated"), SyntaxError, ValueError, EOFError, struct.error, and
#: DecompressionBombError (an Exception). Any Exception marks the file unreadable.
_UNREADABLE = Exception

#: Paths already reported as unreadable in this process (each is warned about once).
_WARNED: set[str] = set()


def _gray_to_uint8(img: Image.Image) -> Image.Image:
    """Single-channel images with more than 8 bits as mode "L", scaled (never clipped).

    "I;16*" (16-bit): v / 257, so 65535 -> 255. "I" (32-bit int; Pillow's mode for 16-bit PGM
    and older 16-bit PNG reads): read as 16-bit when every value is in [0, 65535], else stretched
    min-max. "F" (float): values in [0, 1] times 255, else stretched min-max.
    """
    a = np.asarray(img).astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        a = a / 257.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit "RGB": high-bit-depth gray scaled to 8 bit, alpha composited on
    ``ALPHA_BACKGROUND``, palette / CMYK / YCbCr / LAB / HSV / 1-bit through Pillow's own conversion."""
    if img.mode.startswith("I") or img.mode == "F":
        return _gray_to_uint8(img).convert("RGB")
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if not has_alpha:
        return img if img.mode == "RGB" else img.convert("RGB")
    if img.mode == "La":  # premultiplied: Pillow converts it to LA only
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def open_rgb(path: str) -> Image.Image:
    """A file fully decoded as 8-bit RGB (see ``to_rgb``); raises if it cannot be read."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return to_rgb(img)


def storage_crop(img: Image.Image, size: int) -> np.ndarray:
    """An RGB image as uint8 ``[size, size, 3]`` in PyCIL's test geometry: shorter side to
    round(size·256/224), centre size×size crop.

    The crop is taken in source coordinates and resized in one step (``resize(box=...)``), so a
    1×1 or 1×5000 image costs a size×size resize, not a huge intermediate: same geometry as
    resize-then-crop up to sub-pixel rounding.
    """
    w, h = img.size
    short = round(size * 256 / 224)
    side = size * min(w, h) / short  # the crop's side in source pixels
    left, top = (w - side) / 2, (h - side) / 2
    out = img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    return np.asarray(out, dtype=np.uint8)


#: The widest whole view kept (width / height or its inverse): a wider image is centre-cropped to
#: it first, so that replay never rebuilds a 1:300 strip from an S×S store.
MAX_ASPECT = 4.0


def storage_whole(img: Image.Image, size: int) -> tuple[np.ndarray, float]:
    """The whole RGB image squeezed to uint8 ``[size, size, 3]``, and its aspect (width / height).

    Replay undoes the squeeze (``restore_view``: shorter side ``size``, the aspect as it was), so
    the exemplar keeps the field of view PyCIL's own replay of the file sees; only the longer side
    is stored at fewer pixels (size instead of size × aspect). Views wider than ``MAX_ASPECT`` are
    centre-cropped to it first.
    """
    w, h = img.size
    aspect = w / h
    box = (0.0, 0.0, float(w), float(h))
    if aspect > MAX_ASPECT:
        cw = h * MAX_ASPECT
        box, aspect = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h)), MAX_ASPECT
    elif aspect < 1 / MAX_ASPECT:
        ch = w * MAX_ASPECT
        box, aspect = (0.0, (h - ch) / 2, float(w), (h + ch) / 2), 1 / MAX_ASPECT
    out = img.resize((size, size), Image.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8), float(aspect)


def load_path_image(path: str, size: int, view: str = "whole") -> tuple[np.ndarray, float]:
    """A file as uint8 ``[size, size, 3]`` and its aspect (``open_rgb`` then ``storage_whole``, or
    ``storage_crop`` with aspect 1 for ``view`` "crop"); raises if unreadable."""
    img = open_rgb(path)
    if view == "crop":
        return storage_crop(img, size), 1.0
    return storage_whole(img, size)


def warn_unreadable(path: str, err: BaseException) -> None:
    """One warning per unreadable file per process, naming the file and the error."""
    key = str(path)
    if key in _WARNED:
        return
    _WARNED.add(key)
    log.warning("cim-plugin: cannot read image %s (%s: %s): skipped", key, type(err).__name__, err)


def read_storage(items: Sequence, use_path: bool, size: int, view: str = "whole") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw items (arrays or paths) as uint8 ``[n, H, W, 3]`` at the storage resolution, a bool
    ``[n]`` mask of the items that could be read (rows of unreadable files are zeros), and each
    item's aspect (float32 ``[n]``: width / height of the view the store squeezes, see
    ``storage_whole``; 1 for arrays and crops).

    Never raises for a bad file: each unreadable file is warned about once (see
    ``warn_unreadable``), and a call with several bad files also logs their count.
    """
    if not use_path:
        images = np.ascontiguousarray(np.asarray(items), dtype=np.uint8)
        return images, np.ones(len(images), dtype=bool), np.ones(len(images), dtype=np.float32)
    out = np.zeros((len(items), size, size, 3), dtype=np.uint8)
    ok = np.ones(len(items), dtype=bool)
    aspects = np.ones(len(items), dtype=np.float32)
    for i, path in enumerate(items):
        try:
            out[i], aspects[i] = load_path_image(path, size, view)
        except _UNREADABLE as err:
            ok[i] = False
            warn_unreadable(path, err)
    bad = int((~ok).sum())
    if bad and len(items) > 1:
        log.warning("cim-plugin: %d of %d images could not be read and were skipped", bad, len(items))
    return out, ok, aspects


def to_storage(items: Sequence, use_path: bool, size: int, view: str = "whole") -> tuple[np.ndarray, np.ndarray]:
    """``read_storage`` without the aspects: the stored images and the readable mask."""
    return read_storage(items, use_path, size, view)[:2]


def check_image(path: str) -> str | None:
    """Why a file cannot be read as an RGB image (None when it can).

    ``verify()`` checks the structure (PNG CRCs, ...), then the file is decoded for real, at a
    reduced scale for JPEG (``draft``), which still reads every byte: truncated files fail.
    """
    try:
        with open(path, "rb") as f:
            Image.open(f).verify()
        with open(path, "rb") as f:
            img = Image.open(f)
            img.draft("RGB", (64, 64))
            img.load()
            to_rgb(img)
    except _UNREADABLE as err:
        return f"{type(err).__name__}: {err}"
    return None


def scan_images(paths: Sequence[str], workers: int | None = None) -> dict[str, str]:
    """{path: reason} for every unreadable file among ``paths`` (decoding runs in threads)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(check_image, paths, chunksize=64))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


class Normalizer:
    """uint8 ``[B, H, W, C]`` batches -> normalised float ``[B, C, H, W]`` as PyCIL's ToTensor + Normalize."""

    def __init__(self, mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def from_data_manager(cls, data_manager: Any) -> "Normalizer":
        from torchvision import transforms

        for t in [*data_manager._common_trsf, *data_manager._test_trsf]:
            if isinstance(t, transforms.Normalize):
                return cls(t.mean, t.std)
        return cls()

    def __call__(self, images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        x = torch.as_tensor(images).to(device)
        if x.ndim != 4:
            raise ValueError(f"expected uint8 [B, H, W, C] images, got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


# ---------------------------------------------------------------------------------------------
# Artefact augmentation and replay


class ArtefactAugmentedDataset(Dataset):
    """PyCIL's new-class dataset where a share of items is replaced by its compressed version.

    A drawn item is taken at the storage resolution, blended with its current box (box at full
    resolution, the rest downsampled) and then passed through PyCIL's own transform.
    """

    def __init__(self, base: Dataset, state: ArtefactAugmentation, storage_size: int, view: str = "whole"):
        self.base = base
        self.state = state
        self.storage_size = storage_size
        self.view = view
        self.images, self.labels = base.images, base.labels
        self.trsf, self.use_path = base.trsf, base.use_path

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int):
        st = self.state
        if st.boxes is None or st.share <= 0 or float(torch.rand(())) >= st.share:
            return self.base[idx]
        raw, ok, aspects = read_storage([self.images[idx]], self.use_path, self.storage_size, self.view)
        if not ok[0]:  # unreadable file: PyCIL's own item (a readable stand-in, see RobustPathDataset)
            return self.base[idx]
        box = np.asarray(st.boxes[idx : idx + 1], dtype=np.int64)
        if st.compress is not None:  # the memory's own codec (raw CIM, or entropy-coded)
            img = np.ascontiguousarray(st.compress(raw, box)[0])
        else:
            img = blend_compress(torch.from_numpy(raw).permute(0, 3, 1, 2), torch.from_numpy(box), st.factor)[0].permute(1, 2, 0).numpy()
        return idx, self.trsf(restore_view(img, float(aspects[0]))), self.labels[idx]


class RobustPathDataset(Dataset):
    """PyCIL's DummyDataset over file paths, read with the plugin's loader and never crashing.

    Each file is decoded with ``open_rgb`` (the same conversion as the stored exemplars: 16-bit
    scaled, alpha composited on ``ALPHA_BACKGROUND``), then PyCIL's transform. An unreadable file
    is warned about once and replaced by the next readable item of the same class (the index and
    label returned stay the item's own); a class with no readable item at all gives a mid-grey
    image. Bad indices and warnings are remembered per process: DataLoader workers are processes,
    so with ``num_workers`` > 0 a bad file can be reported again by each new worker
    (``cim_check_images`` leaves such files out before training instead).
    """

    #: Side of the grey stand-in when a whole class is unreadable (PyCIL's transforms resize it).
    GREY_SIDE = 256

    def __init__(self, base: Dataset):
        self.base = base
        self.images, self.labels = base.images, base.labels
        self.trsf, self.use_path = base.trsf, base.use_path
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.images)

    def _read(self, idx: int) -> Image.Image | None:
        if idx in self._bad:
            return None
        try:
            return open_rgb(self.images[idx])
        except _UNREADABLE as err:
            self._bad.add(idx)
            warn_unreadable(self.images[idx], err)
            return None

    def __getitem__(self, idx: int):
        img = self._read(idx)
        if img is None:
            labels = np.asarray(self.labels)
            same = np.flatnonzero(labels == labels[idx])
            start = int(np.searchsorted(same, idx))
            for j in np.roll(same, -start):
                img = None if j == idx else self._read(int(j))
                if img is not None:
                    break
            if img is None:
                log.warning("cim-plugin: no readable image of class %s: a grey stand-in is used", labels[idx])
                img = Image.new("RGB", (self.GREY_SIDE, self.GREY_SIDE), (128, 128, 128))
        return idx, self.trsf(img), self.labels[idx]


class PluginDataManager:
    """A PyCIL DataManager seen through the plugin for one phase (see module docstring).

    ``get_dataset`` only wraps what PyCIL's own call returns: path datasets are read robustly, the
    phase's new-class training set (``new_classes``, train mode) gets the artefact augmentation
    (``augmentation``: boxes and share, refreshed by the learner), the compressed memory passed as
    ``appendent`` is replayed as a dataset. It writes no state anywhere.
    """

    def __init__(self, data_manager: Any, augmentation: ArtefactAugmentation | None = None,
                 storage_size: int = 224, new_classes: Sequence[int] = (), view: str = "whole"):
        self._dm = data_manager
        self._augmentation = augmentation
        self._storage_size = int(storage_size)
        self._view = view
        self._new_classes = [int(c) for c in new_classes]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dm, name)

    def _own_dataset(self, indices, source, mode, appendent=None, ret_data=False, m_rate=None):
        result = self._dm.get_dataset(indices, source, mode, appendent=appendent, ret_data=ret_data, m_rate=m_rate)
        dataset = result[-1] if ret_data else result
        if getattr(dataset, "use_path", False):
            dataset = RobustPathDataset(dataset)
        return result, dataset

    def get_dataset(self, indices, source, mode, appendent=None, ret_data=False, m_rate=None):
        memory = appendent if isinstance(appendent, ExemplarMemory) else None
        if memory is not None:
            appendent = None
        result, dataset = self._own_dataset(indices, source, mode, appendent, ret_data, m_rate)
        new_set = source == "train" and mode == "train" and m_rate is None and [int(c) for c in indices] == self._new_classes
        if new_set and self._augmentation is not None and self._new_classes:
            dataset = ArtefactAugmentedDataset(dataset, self._augmentation, self._storage_size, self._view)
        if memory is not None and len(memory):
            dataset = ConcatDataset([dataset, memory.as_dataset(dataset.trsf)])
        return (*result[:-1], dataset) if ret_data else dataset

    def clean_train_set(self, classes: Sequence[int]) -> tuple[Dataset, np.ndarray | None]:
        """PyCIL's training set of ``classes`` (train transforms, no augmentation by the plugin,
        items in the order PyCIL's own call gives them) and its true object boxes, or None."""
        indices = np.asarray(classes, dtype=np.int64)
        dataset = self._own_dataset(indices, "train", "train")[1]
        truth = self.new_class_object_boxes(indices)
        return dataset, truth if truth is not None and len(truth) == len(dataset) else None

    def class_items(self, label: int) -> tuple[Sequence, np.ndarray]:
        """Raw training items (arrays or paths) of one class and their positions."""
        idx = np.where(self._dm._train_targets == label)[0]
        data = self._dm._train_data
        items = data[idx] if isinstance(data, np.ndarray) else [data[i] for i in idx]
        return items, idx

    def object_boxes(self, positions: np.ndarray) -> np.ndarray | None:
        """True object boxes (int64 ``[n, 4]``, pixels of the stored image) of the training items
        at ``positions``, or None when the dataset does not know where its objects are."""
        boxes = object_boxes_of(getattr(self._dm, "_train_data", None))
        return None if boxes is None else boxes[np.asarray(positions, dtype=np.int64)]

    def new_class_object_boxes(self, indices: Sequence[int]) -> np.ndarray | None:
        """True boxes of the training set PyCIL's ``get_dataset(indices, "train", ...)`` builds
        (classes in the order given, items of a class in data order), or None."""
        if object_boxes_of(getattr(self._dm, "_train_data", None)) is None:
            return None
        positions = [np.where(self._dm._train_targets == c)[0] for c in indices]
        return self.object_boxes(np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Datasets registered by name

#: (training images, their true object boxes) of the dataset the plugin loaded last in this
#: process (the synthetic set knows its boxes). PyCIL's DataManager keeps the iData's
#: ``train_data`` array itself, so the boxes are found again by identity (``object_boxes_of``).
_OBJECT_BOXES: list = []


def register_object_boxes(train_data: Any, boxes: np.ndarray) -> None:
    _OBJECT_BOXES[:] = [train_data, np.asarray(boxes, dtype=np.int64)]


def object_boxes_of(train_data: Any) -> np.ndarray | None:
    """The true boxes registered for exactly this ``train_data`` object, or None."""
    if _OBJECT_BOXES and train_data is not None and _OBJECT_BOXES[0] is train_data:
        return _OBJECT_BOXES[1]
    return None


def synthetic_idata(args: dict) -> Any:
    """PyCIL iData for the built-in synthetic small-object set (keys ``synthetic_*``)."""
    from torchvision import transforms

    from ..data.synthetic import default_cache_dir, load_synthetic

    spec = synthetic_spec(args)
    cache = Path(args["data_root"]) if "data_root" in args else default_cache_dir()
    size = spec.image_size

    class iSynthetic:
        use_path = False
        train_trsf = [
            transforms.RandomCrop(size, padding=size // 8),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
        test_trsf = [transforms.ToTensor()]
        common_trsf = [transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))]
        class_order = list(range(spec.num_classes))

        def download_data(self):
            data = load_synthetic(spec, cache)
            self.train_data, self.train_targets = data.train_x, data.train_y
            self.test_data, self.test_targets = data.test_x, data.test_y
            self.class_names = data.class_names
            register_object_boxes(self.train_data, data.train_boxes)

    return iSynthetic()


def synthetic_spec(args: dict):
    from ..data.synthetic import SyntheticSpec

    fields = {
        "num_classes": "synthetic_num_classes",
        "image_size": "synthetic_image_size",
        "train_per_class": "synthetic_train_per_class",
        "test_per_class": "synthetic_test_per_class",
        "seed": "synthetic_seed",
        "colour": "synthetic_colour",
    }
    return SyntheticSpec(**{f: args[k] for f, k in fields.items() if k in args})


def folder_problems(root: str) -> list[str]:
    """Problems with an ImageNet-style ``data_root`` (train/ and val/ with class folders)."""
    path = Path(root).expanduser()
    if not path.is_dir():
        return [f"key 'data_root' = {root!r}: no such folder"]
    problems = []
    for split in ("train", "val"):
        sub = path / split
        if not sub.is_dir():
            problems.append(f"key 'data_root' = {root!r}: missing the '{split}' folder")
        elif not any(p.is_dir() for p in sub.iterdir()):
            problems.append(f"key 'data_root' = {root!r}: '{split}' has no class folders")
    return problems


class UnreadableClassError(ValueError):
    """A class none of whose files can be read (the message names its folder)."""


def drop_unreadable(imgs: Sequence[tuple[str, int]], split: str) -> list[tuple[str, int]]:
    """ImageFolder's ``(path, target)`` list without the files ``scan_images`` finds unreadable
    (each one named in a warning). A class left without any file raises UnreadableClassError
    naming its folder: PyCIL cannot train or test a class with no image."""
    t0 = time.time()
    bad = scan_images([p for p, _ in imgs])
    for path, reason in bad.items():
        log.warning("cim-plugin: cim_check_images: cannot read %s (%s): left out of '%s'", path, reason, split)
        _WARNED.add(str(path))
    log.info("cim-plugin: cim_check_images: '%s': %d files scanned in %.1f s, %d unreadable left out",
             split, len(imgs), time.time() - t0, len(bad))
    kept = [(p, t) for p, t in imgs if p not in bad]
    emptied = sorted({t for _, t in imgs} - {t for _, t in kept})
    if emptied:
        log.warning("cim-plugin: cim_check_images: class(es) %s of '%s' have no readable file left", emptied, split)
        folders = []
        for target in emptied:
            files = [p for p, t in imgs if t == target]
            folders.append(f"{os.path.commonpath([os.path.dirname(p) for p in files])} ({len(files)} file(s), none readable)")
        raise UnreadableClassError(
            f"cim-plugin: cim_check_images: no readable image left in {len(emptied)} class folder(s) of '{split}':\n"
            + "\n".join(f"  - {f}" for f in folders)
            + "\nReplace the files (each unreadable one is named above) or remove the class from train/ and val/."
        )
    return kept


def imagenet_idata(name: str, root: str, check_images: bool = False) -> Any:
    """PyCIL's own iImageNet100/1000 (same transforms), reading ``root``/train and ``root``/val.

    ``check_images`` (key ``cim_check_images``): decode every file once when the data is loaded,
    before training, and leave the unreadable ones out of both splits (each is named in a warning);
    a class with no readable file left stops the run, naming its folder.
    """
    from torchvision import datasets
    from utils.data import iImageNet100, iImageNet1000  # PyCIL
    from utils.toolkit import split_images_labels  # PyCIL

    base = iImageNet100 if name == "imagenet100" else iImageNet1000
    folder = Path(root).expanduser()

    class iImageFolder(base):
        def download_data(self):
            train = datasets.ImageFolder(str(folder / "train"))
            test = datasets.ImageFolder(str(folder / "val"))
            train_imgs, test_imgs = train.imgs, test.imgs
            if check_images:
                try:
                    train_imgs, test_imgs = drop_unreadable(train_imgs, "train"), drop_unreadable(test_imgs, "val")
                except UnreadableClassError as err:  # before training: a clear stop, no traceback
                    raise SystemExit(str(err)) from None
            self.train_data, self.train_targets = split_images_labels(train_imgs)
            self.test_data, self.test_targets = split_images_labels(test_imgs)
            self.class_order = list(range(len(train.classes)))

    return iImageFolder()


FOLDER_DATASETS = ("imagenet100", "imagenet1000")
