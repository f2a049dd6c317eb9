"""Data side of the adapter: storage images, datasets the plugin registers, and replay.

- ``StorageView``: raw training items of a PyCIL DataManager (uint8 arrays, or file paths for
  ImageNet-style folders) brought to the memory's storage resolution as uint8 ``[n, H, W, 3]``.
  Array datasets keep their native size. Path datasets are stored at ``cim_storage_size`` (S):
  shorter side resized to round(S·256/224), then a centre S×S crop — PyCIL's own test geometry
  (Resize 256 + CenterCrop 224 at S = 224), so the stored view is what the model sees at test time.
- ``PluginDataManager``: wraps PyCIL's DataManager for one phase. When a learner asks for its
  training set with ``appendent=<the plugin memory>``, it returns PyCIL's own dataset for the new
  classes (optionally with the artefact augmentation) concatenated with the memory as a dataset,
  both through PyCIL's own transforms. Everything else is forwarded unchanged.
- ``get_idata``: the synthetic set and ImageNet-style folders, registered by name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from ..core.codec import blend_compress
from ..core.memory import ExemplarMemory

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


def load_path_image(path: str, size: int) -> np.ndarray:
    """A file as uint8 ``[size, size, 3]``: shorter side to round(size·256/224), centre crop."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img = img.convert("RGB")
    short = round(size * 256 / 224)
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_storage(items: Sequence, use_path: bool, size: int) -> np.ndarray:
    """Raw items (arrays or paths) as uint8 ``[n, H, W, 3]`` at the storage resolution."""
    if not use_path:
        return np.ascontiguousarray(np.asarray(items), dtype=np.uint8)
    out = np.zeros((len(items), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(items):
        out[i] = load_path_image(path, size)
    return out


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


class AugmentState:
    """Boxes of the current phase's new-class training items and the share compressed on the fly."""

    def __init__(self, factor: int):
        self.factor = factor
        self.share = 0.0
        self.boxes: np.ndarray | None = None  # int64 [N, 4] at the storage resolution
        self.refreshes = 0

    def reset(self) -> None:
        self.share, self.boxes, self.refreshes = 0.0, None, 0


class ArtefactAugmentedDataset(Dataset):
    """PyCIL's new-class dataset where a share of items is replaced by its compressed version.

    A drawn item is taken at the storage resolution, blended with its current box (box at full
    resolution, the rest downsampled) and then passed through PyCIL's own transform.
    """

    def __init__(self, base: Dataset, state: AugmentState, storage_size: int):
        self.base = base
        self.state = state
        self.storage_size = storage_size
        self.images, self.labels = base.images, base.labels
        self.trsf, self.use_path = base.trsf, base.use_path

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int):
        st = self.state
        if st.boxes is None or st.share <= 0 or float(torch.rand(())) >= st.share:
            return self.base[idx]
        raw = to_storage([self.images[idx]], self.use_path, self.storage_size)
        x = torch.from_numpy(raw).permute(0, 3, 1, 2)
        box = torch.as_tensor(st.boxes[idx : idx + 1], dtype=torch.int64)
        img = blend_compress(x, box, st.factor)[0].permute(1, 2, 0).numpy()
        return idx, self.trsf(Image.fromarray(img)), self.labels[idx]


class PluginDataManager:
    """A PyCIL DataManager seen through the plugin for one phase (see module docstring)."""

    def __init__(self, data_manager: Any, learner: Any):
        self._dm = data_manager
        self._learner = learner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dm, name)

    def get_dataset(self, indices, source, mode, appendent=None, ret_data=False, m_rate=None):
        memory = appendent if isinstance(appendent, ExemplarMemory) else None
        if memory is not None:
            appendent = None
        result = self._dm.get_dataset(indices, source, mode, appendent=appendent, ret_data=ret_data, m_rate=m_rate)
        dataset = result[-1] if ret_data else result
        if source == "train" and mode == "train":
            dataset = self._learner._cim_wrap_train_dataset(dataset)
        if memory is not None and len(memory):
            dataset = ConcatDataset([dataset, memory.as_dataset(dataset.trsf)])
        if source == "train" and mode == "train":
            self._learner._cim_train_set = dataset
        return (*result[:-1], dataset) if ret_data else dataset

    def class_items(self, label: int) -> tuple[Sequence, np.ndarray]:
        """Raw training items (arrays or paths) of one class and their positions."""
        idx = np.where(self._dm._train_targets == label)[0]
        data = self._dm._train_data
        items = data[idx] if isinstance(data, np.ndarray) else [data[i] for i in idx]
        return items, idx


# ---------------------------------------------------------------------------------------------
# Datasets registered by name


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

    return iSynthetic()


def synthetic_spec(args: dict):
    from ..data.synthetic import SyntheticSpec

    fields = {
        "num_classes": "synthetic_num_classes",
        "image_size": "synthetic_image_size",
        "train_per_class": "synthetic_train_per_class",
        "test_per_class": "synthetic_test_per_class",
        "seed": "synthetic_seed",
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


def imagenet_idata(name: str, root: str) -> Any:
    """PyCIL's own iImageNet100/1000 (same transforms), reading ``root``/train and ``root``/val."""
    from torchvision import datasets
    from utils.data import iImageNet100, iImageNet1000  # PyCIL
    from utils.toolkit import split_images_labels  # PyCIL

    base = iImageNet100 if name == "imagenet100" else iImageNet1000
    folder = Path(root).expanduser()

    class iImageFolder(base):
        def download_data(self):
            train = datasets.ImageFolder(str(folder / "train"))
            test = datasets.ImageFolder(str(folder / "val"))
            self.train_data, self.train_targets = split_images_labels(train.imgs)
            self.test_data, self.test_targets = split_images_labels(test.imgs)
            self.class_order = list(range(len(train.classes)))

    return iImageFolder()


FOLDER_DATASETS = ("imagenet100", "imagenet1000")
