"""The trainer mixin: compressed many-shot exemplars for PyCIL's iCaRL, DER and FOSTER.

Composed in front of the learner's own class at get_model time (see hook.py); none of the
learners' training loops is copied. The mixin only uses PyCIL's seams:

- ``incremental_train(data_manager)``: the learner gets a ``PluginDataManager`` for the phase, so
  its own ``get_dataset(..., appendent=self._get_memory())`` call replays the compressed memory
  and compresses a share of new-class images on the fly (artefact augmentation);
- ``_init_train`` / ``_update_representation`` / ``_feature_boosting`` receive a scheduler whose
  once-per-epoch ``step()`` also refreshes the new-class boxes every ``cam_update_interval``
  epochs and raises the augmented share by ``randombbxblur_prob_incre``;
- ``build_rehearsal_memory(data_manager, per_class)``: budget-consuming herding into a
  ``CompressedExemplarMemory`` and NME class means computed on the compressed exemplars.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ..config import CIMConfig
from ..core.codec import blend_compress
from ..core.herding import herding_rank
from ..core.masks import make_mask_source
from ..core.memory import CompressedExemplarMemory
from .data import ArtefactAugmentedDataset, AugmentState, Normalizer, PluginDataManager, storage_shape, to_storage
from .nets import cam_and_features, eval_mode, unwrap

log = logging.getLogger(__name__)


class EpochEndScheduler:
    """Wraps a learner's lr scheduler: every ``step()`` (once per epoch) also calls ``on_epoch_end``."""

    def __init__(self, scheduler: Any, on_epoch_end: Callable[[int], None]):
        self._scheduler = scheduler
        self._on_epoch_end = on_epoch_end
        self.epochs_done = 0

    def step(self, *args, **kwargs):
        out = self._scheduler.step(*args, **kwargs)
        self.epochs_done += 1
        self._on_epoch_end(self.epochs_done)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)


def _l2n(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=1, keepdim=True) + 1e-8)


class CIMLearnerMixin:
    """Adds CIM's compressed exemplar memory to a PyCIL BaseLearner subclass."""

    _cim: CIMConfig

    def _cim_setup(self, cfg: CIMConfig) -> None:
        self._cim = cfg
        self._cim_memory: CompressedExemplarMemory | None = None
        self._cim_aug = AugmentState(cfg.downsample_factor)
        self._cim_mask = make_mask_source(cfg.cim_mask, cfg.downsample_factor, cfg.mask_threshold, cfg.seed)
        self._cim_dm: PluginDataManager | None = None
        self._cim_train_items: Any = None
        self._cim_phase_log: list[dict] = []

    # -- PyCIL seams ---------------------------------------------------------------------------
    def incremental_train(self, data_manager):
        dm = data_manager if isinstance(data_manager, PluginDataManager) else PluginDataManager(data_manager, self)
        self._cim_dm = dm
        self._cim_aug.reset()
        if self._cim_memory is None:
            shape = storage_shape(dm, self._cim.cim_storage_size)
            self._cim_memory = CompressedExemplarMemory(shape, self._cim.compress_ratio)
            self._cim_norm = Normalizer.from_data_manager(dm)
        return super().incremental_train(dm)

    def _get_memory(self):
        mem = self._cim_memory
        return mem if mem is not None and len(mem) else None

    @property
    def exemplar_size(self) -> int:
        return 0 if self._cim_memory is None else len(self._cim_memory)

    @property
    def samples_old_class(self) -> int:
        """FOSTER's per-class count of old samples (class-balanced weights): the real mean count."""
        mem = self._cim_memory
        if mem is None or not len(mem):
            return super().samples_old_class
        return max(1, int(round(len(mem) / max(1, len(mem.labels)))))

    def _init_train(self, train_loader, test_loader, optimizer, scheduler):
        return super()._init_train(train_loader, test_loader, optimizer, self._cim_hooked(scheduler))

    def _update_representation(self, train_loader, test_loader, optimizer, scheduler):
        return super()._update_representation(train_loader, test_loader, optimizer, self._cim_hooked(scheduler))

    def _feature_boosting(self, train_loader, test_loader, optimizer, scheduler):
        return super()._feature_boosting(train_loader, test_loader, optimizer, self._cim_hooked(scheduler))

    def build_rehearsal_memory(self, data_manager, per_class):
        dm = data_manager if isinstance(data_manager, PluginDataManager) else PluginDataManager(data_manager, self)
        mem = self._cim_memory
        if not self._fixed_memory:
            removed = mem.reduce(per_class)
            if removed:
                log.info("CIM memory: budget %s units/class, cut %d exemplars of old classes", per_class, sum(removed.values()))
        new = range(self._known_classes, self._total_classes)
        fallbacks = 0
        for label in tqdm(new, desc="CIM exemplars", leave=False):
            fallbacks += self._cim_fill_class(dm, label, per_class)
        self._class_means = self._cim_class_means()
        stats = mem.summary(per_class, self._total_classes)
        log.info(
            "CIM memory after task %d: %d exemplars (%.1f per class, plain PyCIL would keep %d), "
            "%.2f/%s units, %d/%d bytes; %d CAM fallbacks to full image",
            self._cur_task, stats["exemplars"], stats["mean_exemplars_per_class"], per_class,
            stats["units_used"], stats["budget_units"], stats["bytes_used"], stats["budget_bytes"], fallbacks,
        )

    # -- training-set side ---------------------------------------------------------------------
    def _cim_wrap_train_dataset(self, dataset):
        """PyCIL's new-class training set, with the artefact augmentation attached."""
        self._cim_train_items = dataset
        return ArtefactAugmentedDataset(dataset, self._cim_aug, self._cim.cim_storage_size)

    def _cim_hooked(self, scheduler):
        return EpochEndScheduler(scheduler, self._cim_on_epoch_end)

    def _cim_on_epoch_end(self, epoch: int) -> None:
        cfg = self._cim
        if epoch % cfg.cam_update_interval or self._cim_train_items is None or cfg.randombbxblur_prob_incre <= 0:
            return
        ds = self._cim_train_items
        labels = np.asarray(ds.labels, dtype=np.int64)
        boxes = np.zeros((len(labels), 4), dtype=np.int64)
        for start in range(0, len(labels), cfg.cam_batch_size):
            sl = slice(start, start + cfg.cam_batch_size)
            raw = to_storage(ds.images[sl], ds.use_path, cfg.cim_storage_size)
            boxes[sl] = self._cim_boxes(raw, labels[sl])[0].numpy()
        aug = self._cim_aug
        aug.boxes = boxes
        aug.refreshes += 1
        aug.share = min(1.0, aug.refreshes * cfg.randombbxblur_prob_incre)
        log.info("CIM: epoch %d, refreshed %d new-class boxes; compressed share now %.2f", epoch, len(boxes), aug.share)

    # -- memory side ---------------------------------------------------------------------------
    def _cim_forward(self, raw: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CAM and pooled features of uint8 storage images (eval mode, no grad)."""
        net = unwrap(self._network)
        x = self._cim_norm(raw, self._device)
        y = torch.as_tensor(labels, dtype=torch.int64, device=self._device)
        with eval_mode(net), torch.no_grad():
            cam, feats = cam_and_features(net, x, y)
        return cam.cpu(), feats.cpu()

    def _cim_features(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        net = unwrap(self._network)
        with eval_mode(net), torch.no_grad():
            return net.extract_vector(self._cim_norm(raw, self._device)).cpu()

    def _cim_boxes(self, raw: np.ndarray, labels: np.ndarray):
        """Boxes ``[B, 4]`` at storage resolution from the configured mask source."""
        cam = feats = None
        images = torch.from_numpy(raw).permute(0, 3, 1, 2)
        if self._cim_mask.needs_cam:
            cam, feats = self._cim_forward(raw, labels)
        res = self._cim_mask.boxes(images, torch.as_tensor(labels), (lambda *_: cam) if cam is not None else None)
        return res.boxes, res.fallback, feats

    def _cim_fill_class(self, dm: PluginDataManager, label: int, budget: float) -> int:
        """Herd compressed exemplars of one new class into the memory; returns CAM fallbacks."""
        cfg, mem = self._cim, self._cim_memory
        items, _ = dm.class_items(label)
        raw = to_storage(items, dm.use_path, cfg.cim_storage_size)
        labels = np.full(len(raw), label, dtype=np.int64)
        boxes, clean, stored, fallbacks = [], [], [], 0
        for start in range(0, len(raw), cfg.cam_batch_size):
            chunk, lab = raw[start : start + cfg.cam_batch_size], labels[start : start + cfg.cam_batch_size]
            b, fb, feats = self._cim_boxes(chunk, lab)
            if feats is None:
                feats = self._cim_features(chunk)
            compressed = blend_compress(torch.from_numpy(chunk).permute(0, 3, 1, 2), b, mem.factor)
            boxes.append(b)
            clean.append(_l2n(feats))
            stored.append(_l2n(self._cim_features(compressed.permute(0, 2, 3, 1))))
            fallbacks += int(fb.sum())
        boxes_np = torch.cat(boxes).numpy()
        target = torch.cat(clean).mean(dim=0)
        ranked = herding_rank(torch.cat(stored), target, mem.costs_of(boxes_np), budget)
        mem.add_class(label, raw[ranked], boxes_np[ranked], budget)
        return fallbacks

    def _cim_class_means(self) -> np.ndarray:
        """NME class means from the compressed exemplars (as replayed), L2-normalised."""
        mem = self._cim_memory
        means = np.zeros((self._total_classes, self.feature_dim))
        for label in mem.labels:
            imgs = mem.images(label)
            feats = torch.cat(
                [_l2n(self._cim_features(imgs[s : s + self._cim.cam_batch_size])) for s in range(0, len(imgs), self._cim.cam_batch_size)]
            )
            mean = feats.mean(dim=0)
            means[label] = (mean / (mean.norm() + 1e-8)).numpy()
        return means
