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

import contextlib
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from torch.utils.data import ConcatDataset, DataLoader

from ..config import CIMConfig
from ..core.bilevel import BilevelSettings, mask_step
from ..core.branch import PAUBranch
from ..atomic import atomic_open
from ..core.cam import normalize_cams, upsample_cams
from ..core.boxes import box_area_fraction
from ..core.codec import blend_compress
from ..core.diagnostics import box_recall, image_mse, psnr_db, recall_area_curve
from ..core.herding import herding_rank
from ..core.masks import make_mask_source
from ..core.memory import CompressedExemplarMemory
from .data import ArtefactAugmentedDataset, AugmentState, Normalizer, PluginDataManager, storage_shape, to_storage
from .losses import cil_loss_for
from .results import run_base
from .nets import (
    backbones, branch_outputs, cam_and_features, eval_mode, extract_vector, feature_dim, maps_and_features,
    trained_backbones_batch_statistics, unwrap,
)

log = logging.getLogger(__name__)


class EpochEndScheduler:
    """Wraps a learner's lr scheduler: every ``step()`` (once per epoch) also calls ``on_epoch_end``."""

    def __init__(self, scheduler: Any, on_epoch_end: Callable[[int, Any], None]):
        self._scheduler = scheduler
        self._on_epoch_end = on_epoch_end
        self.epochs_done = 0

    def step(self, *args, **kwargs):
        out = self._scheduler.step(*args, **kwargs)
        self.epochs_done += 1
        self._on_epoch_end(self.epochs_done, self._scheduler)
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
        self._cim_branch: PAUBranch | None = None
        self._cim_meta: dict = {}
        self._cim_seconds: defaultdict[str, float] = defaultdict(float)  # CIM's own work, per phase
        self._cim_gallery_rows: dict[int, tuple] = {}
        self._cim_train_truth: np.ndarray | None = None  # true object boxes of the new-class training set
        #: Per class, per stored exemplar in ranked order: box recall, box area, reconstruction
        #: MSE (datasets that know their object boxes; cut with the memory, see diagnostics()).
        self._cim_stored_diag: dict[int, dict[str, np.ndarray]] = {}
        self._cim_phase_diag: dict[str, Any] = {}
        self._cim_bilevel = BilevelSettings(
            factor=cfg.downsample_factor, div_coef=cfg.div_coef, reg_coef=cfg.reg_coef,
            max_phi_grad_norm=cfg.max_phi_grad_norm, mode=cfg.cim_bilevel,
        )

    # -- PyCIL seams ---------------------------------------------------------------------------
    def incremental_train(self, data_manager):
        dm = data_manager if isinstance(data_manager, PluginDataManager) else PluginDataManager(data_manager, self)
        self._cim_dm = dm
        self._cim_aug.reset()
        self._cim_meta = {}
        self._cim_phase_diag = {}
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

    def _init_train(self, train_loader, test_loader, optimizer, scheduler):
        return super()._init_train(train_loader, test_loader, optimizer, self._cim_hooked(scheduler))

    def _update_representation(self, train_loader, test_loader, optimizer, scheduler):
        return super()._update_representation(train_loader, test_loader, optimizer, self._cim_hooked(scheduler))

    def _feature_boosting(self, train_loader, test_loader, optimizer, scheduler):
        return super()._feature_boosting(train_loader, test_loader, optimizer, self._cim_hooked(scheduler))

    @contextlib.contextmanager
    def _cim_timed(self, part: str):
        """Adds the block's wall seconds to ``_cim_seconds[part]`` (reported per phase in results.json)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._cim_seconds[part] += time.perf_counter() - t0

    def build_rehearsal_memory(self, data_manager, per_class):
        with self._cim_timed("memory"):
            self._cim_build_memory(data_manager, per_class)
        self._cim_write_gallery()

    def _cim_build_memory(self, data_manager, per_class):
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

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, filename):
        """PyCIL's own checkpoint, plus ``<filename>_<task>_cim.pt`` with φ and the memory."""
        super().save_checkpoint(filename)
        path = f"{filename}_{self._cur_task}_cim.pt"
        torch.save(self._cim_state_dict(), path)
        return path

    def _cim_state_dict(self) -> dict:
        return {
            "task": self._cur_task,
            "phi": None if self._cim_branch is None else {k: v.detach().cpu() for k, v in self._cim_branch.state_dict().items()},
            "memory": None if self._cim_memory is None else self._cim_memory.state_dict(),
        }

    def _cim_load_state_dict(self, state: dict) -> None:
        """Restore φ (into a branch over the network's current backbones) and the memory."""
        if state.get("phi") is not None:
            self._cim_branch = None
            self._cim_meta = {}
            branch = self._cim_sync_branch()
            bbs = backbones(self._network)
            n_saved = 1 + max(int(k.split(".")[1]) for k in state["phi"])
            if n_saved > len(bbs):
                raise ValueError(f"checkpoint has PAUs for {n_saved} backbones, the network has {len(bbs)}")
            result = branch.load_state_dict({k: v.to(self._device) for k, v in state["phi"].items()}, strict=False)
            if result.unexpected_keys:
                raise ValueError(f"checkpoint PAUs do not fit this network's ReLU sites: {result.unexpected_keys[:3]} ...")
        if state.get("memory") is not None:
            meta = state["memory"]
            if self._cim_memory is None:
                self._cim_memory = CompressedExemplarMemory(tuple(meta["image_shape"]), self._cim.compress_ratio)
            self._cim_memory.load_state_dict(meta)

    # -- training-set side ---------------------------------------------------------------------
    def _cim_wrap_train_dataset(self, dataset, truth: np.ndarray | None = None):
        """PyCIL's new-class training set, with the artefact augmentation attached; ``truth``: the
        items' true object boxes when the dataset knows them (diagnostics, the oracle source)."""
        self._cim_train_items = dataset
        self._cim_train_truth = truth
        return ArtefactAugmentedDataset(dataset, self._cim_aug, self._cim.cim_storage_size)

    def _cim_hooked(self, scheduler):
        return EpochEndScheduler(scheduler, self._cim_on_epoch_end)

    def _cim_on_epoch_end(self, epoch: int, scheduler: Any = None) -> None:
        """After each CIL epoch: the mask-level steps (pau), then, on schedule, new-class boxes
        (also after a stage's last epoch: FOSTER's compression stage trains on them next)."""
        if self._cim_mask.needs_branch and self._cim_bilevel.mode != "none":
            with self._cim_timed("mask_steps"):
                self._cim_mask_steps(scheduler)
        if epoch % self._cim.cam_update_interval == 0:
            with self._cim_timed("box_refresh"):
                self._cim_refresh_boxes(epoch)

    def _cim_refresh_boxes(self, epoch: int) -> None:
        cfg = self._cim
        if self._cim_train_items is None or cfg.randombbxblur_prob_incre <= 0:
            return
        ds, truth = self._cim_train_items, self._cim_train_truth
        labels = np.asarray(ds.labels, dtype=np.int64)
        boxes = np.zeros((len(labels), 4), dtype=np.int64)
        for start in range(0, len(labels), cfg.cam_batch_size):
            sl = slice(start, start + cfg.cam_batch_size)
            raw, ok = to_storage(ds.images[sl], ds.use_path, cfg.cim_storage_size)
            chunk = np.tile(np.array([0, raw.shape[1], 0, raw.shape[2]], dtype=np.int64), (len(raw), 1))
            if ok.any():  # unreadable items keep the full-image box (they are never compressed)
                t = None if truth is None else truth[sl][ok]
                chunk[ok] = self._cim_boxes(raw[ok], labels[sl][ok], features=False, truth=t)[0].numpy()
            boxes[sl] = chunk
        if truth is not None:
            size = raw.shape[1:3]
            self._cim_phase_diag["augmentation"] = {
                "epoch": epoch,
                "mean_box_recall": float(box_recall(torch.from_numpy(boxes), torch.from_numpy(truth)).mean()),
                "mean_box_area": float(box_area_fraction(torch.from_numpy(boxes), size).mean()),
            }
        aug = self._cim_aug
        aug.boxes = boxes
        aug.refreshes += 1
        aug.share = min(1.0, aug.refreshes * cfg.randombbxblur_prob_incre)
        log.info("CIM: epoch %d, refreshed %d new-class boxes; compressed share now %.2f", epoch, len(boxes), aug.share)

    # -- memory side ---------------------------------------------------------------------------
    def _cim_forward(self, raw: np.ndarray, labels: np.ndarray, features: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw CAM (of the CIL model, or of the CIM branch for "pau") and pooled CIL features
        of uint8 storage images (eval mode, no grad). For "pau" the features cost a pass of the
        CIL model of their own: ``features=False`` skips it (box refreshes need only the CAM)."""
        net = unwrap(self._network)
        x = self._cim_norm(raw, self._device)
        y = torch.as_tensor(labels, dtype=torch.int64, device=self._device)
        with eval_mode(net), torch.no_grad():
            if self._cim_mask.needs_branch:  # the CAM comes from the branch: the CIL pass gives features only
                feats = maps_and_features(net, x)[1] if features else None
                cam, _ = self._cim_branch_outputs(x, y)
            else:
                cam, feats = cam_and_features(net, x, y)
        return cam.cpu(), None if feats is None else feats.cpu()

    # -- the CIM branch (PAU activations, conv/BN shared) and its bilevel steps ------------------
    def _cim_sync_branch(self) -> PAUBranch:
        """The branch, following the network's backbones (DER/FOSTER grow one per phase; FOSTER's
        student takes the place of index 0). Old backbones' PAUs are trained only if
        ``cim_train_old_paus`` says so."""
        bbs = backbones(self._network)
        branch = self._cim_branch
        if branch is None:
            branch = self._cim_branch = PAUBranch(bbs)
        if branch is not None and (len(branch.backbones) != len(bbs) or any(a is not b for a, b in zip(branch.backbones, bbs)) or "synced" not in self._cim_meta):
            self._cim_meta["synced"] = True
            self._cim_branch.sync(bbs, train_old=self._cim.cim_train_old_paus)
            self._cim_branch.to(self._device)
            self._cim_meta.pop("optimizer", None)
        return self._cim_branch

    def _cim_branch_outputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CAM ``[B, h, w]`` and classifier logits of the branch (``nets.branch_outputs``)."""
        return branch_outputs(self._network, self._cim_sync_branch(), x, y)

    def _cim_meta_set(self):
        """The mask steps' data: the phase's clean new-class images (PyCIL's own dataset, without
        the artefact augmentation) plus the compressed memory, as the official code's loader."""
        mem, new = self._cim_memory, self._cim_train_items
        if mem is not None and len(mem):
            return ConcatDataset([new, mem.as_dataset(new.trsf)])
        return new

    def _cim_meta_batches(self):
        """Endless (x, y) batches of ``_cim_meta_set`` (new classes + memory)."""
        data = self._cim_meta_set()
        loader = DataLoader(data, batch_size=self._cim.meta_batch_size, shuffle=True,
                            num_workers=0, drop_last=len(data) > self._cim.meta_batch_size)
        while True:
            for _, x, y in loader:
                yield x.to(self._device), torch.as_tensor(y, dtype=torch.int64).to(self._device)

    def _cim_mask_steps(self, scheduler: Any) -> None:
        cfg, meta = self._cim, self._cim_meta
        if self._cim_train_items is None:
            return
        branch = self._cim_sync_branch()
        phi = branch.trainable_parameters()
        if not phi:
            return
        n_new = self._total_classes - self._known_classes
        iters = max(1, int(round(n_new * cfg.num_meta_iters_per_cls)))
        if "optimizer" not in meta:
            meta["optimizer"] = torch.optim.Adam(phi, lr=cfg.phi_lr, weight_decay=cfg.phi_weight_decay)
            meta["scheduler"] = torch.optim.lr_scheduler.CosineAnnealingLR(
                meta["optimizer"], T_max=max(1, iters * self._cim_phase_epochs(scheduler))
            )
            meta["batches"] = self._cim_meta_batches()
            meta["steps"] = 0
        lr = scheduler.optimizer.param_groups[0]["lr"] if scheduler is not None else 0.0
        net = unwrap(self._network)
        theta = [n for n, p in net.named_parameters() if p.requires_grad and n.startswith(("convnet.", "convnets."))]
        loss_fn = cil_loss_for(self)
        parts, skipped = {}, 0
        with eval_mode(net), trained_backbones_batch_statistics(net):  # BN as in PyCIL's training step
            for _ in range(iters):
                inner, outer = next(meta["batches"]), next(meta["batches"])
                parts = mask_step(net, theta, self._cim_branch_outputs, loss_fn, inner, outer,
                                  lr * cfg.lr_ratio, phi, meta["optimizer"], self._cim_bilevel)
                meta["scheduler"].step()
                meta["steps"] += 1
                skipped += parts.get("skipped", 0)
        log.info("CIM mask steps: %d this epoch (%d in phase), %s", iters, meta["steps"],
                 ", ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "skipped"))
        if skipped:
            log.warning("CIM mask steps: %d of %d skipped this epoch (non-finite loss or φ gradient); φ kept", skipped, iters)

    def cim_first_phase_steps(self, scheduler: Any) -> None:
        """Phase 0 loaded from a shared checkpoint (``cim_first_phase_from``): give φ the mask
        steps the phase's epochs would have had, θ frozen; the inner step size follows the
        learner's own lr schedule (stepped once per epoch as its training loop would)."""
        if not (self._cim_mask.needs_branch and self._cim_bilevel.mode != "none"):
            return
        import warnings

        epochs = self._cim_phase_epochs(scheduler)
        with self._cim_timed("mask_steps"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")  # no optimizer.step: θ stays
            for _ in range(epochs):
                scheduler.step()
                self._cim_mask_steps(scheduler)
        log.info("CIM: first phase loaded; φ trained with %d mask steps over %d epochs", self._cim_meta.get("steps", 0), epochs)

    def _cim_phase_epochs(self, scheduler: Any) -> int:
        """Epochs of the current training stage, for φ's cosine schedule."""
        t_max = getattr(scheduler, "T_max", None)
        if isinstance(t_max, int) and t_max > 0:
            return t_max
        import importlib

        keys = ("init_epochs", "init_epoch") if self._cur_task == 0 else ("boosting_epochs", "epochs")
        own = next((c for c in type(self).__mro__ if c.__module__.startswith("models.") and c.__module__ != "models.base"), type(self))
        module = importlib.import_module(own.__module__)
        for key in keys:
            value = self.args.get(key, getattr(module, key, None))
            if isinstance(value, int) and value > 0:
                return value
        return 1

    def _cim_features(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        net = unwrap(self._network)
        with eval_mode(net), torch.no_grad():
            return extract_vector(net, self._cim_norm(raw, self._device)).cpu()

    def _cim_boxes(self, raw: np.ndarray, labels: np.ndarray, features: bool = True, truth: np.ndarray | None = None):
        """Boxes ``[B, 4]`` at storage resolution from the configured mask source, CAM fallback
        flags, and (when the source computes a CAM) the CIL features ``[B, D]`` and raw CAMs
        ``[B, h, w]`` (None otherwise). ``truth``: the true object boxes (``oracle`` needs them)."""
        cam = feats = None
        images = torch.from_numpy(raw).permute(0, 3, 1, 2)
        if self._cim_mask.needs_cam:
            cam, feats = self._cim_forward(raw, labels, features)
        if self._cim_mask.needs_truth and truth is None:
            raise ValueError(f"cim_mask '{self._cim.cim_mask}' needs true object boxes: dataset "
                             f"'{self.args.get('dataset')}' does not provide them (the synthetic set does)")
        res = self._cim_mask.boxes(images, torch.as_tensor(labels), (lambda *_: cam) if cam is not None else None,
                                   truth=None if truth is None else torch.as_tensor(truth))
        return res.boxes, res.fallback, feats, cam

    def _cim_fill_class(self, dm: PluginDataManager, label: int, budget: float) -> int:
        """Herd compressed exemplars of one new class into the memory; returns CAM fallbacks."""
        cfg, mem = self._cim, self._cim_memory
        items, positions = dm.class_items(label)
        raw, ok = to_storage(items, dm.use_path, cfg.cim_storage_size)
        truth = dm.object_boxes(positions[ok])
        if not ok.all():
            log.warning("CIM memory: class %d: %d of %d images unreadable, left out of the candidates",
                        label, int((~ok).sum()), len(ok))
            raw = raw[ok]
        if not len(raw):
            log.warning("CIM memory: class %d has no readable image: no exemplars stored", label)
            return 0
        labels = np.full(len(raw), label, dtype=np.int64)
        in_gallery = label < cfg.cim_gallery
        keep_cams = in_gallery or truth is not None
        boxes, clean, stored, cams, fallbacks = [], [], [], [], 0
        for start in range(0, len(raw), cfg.cam_batch_size):
            sl = slice(start, start + cfg.cam_batch_size)
            chunk, lab = raw[sl], labels[sl]
            b, fb, feats, cam = self._cim_boxes(chunk, lab, truth=None if truth is None else truth[sl])
            if keep_cams:
                cams.append(cam)
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
        all_cams = None if not cams or cams[0] is None else torch.cat(cams)
        if truth is not None:
            self._cim_record_diagnostics(label, raw, ranked, boxes_np, truth, all_cams)
        if in_gallery and len(ranked):
            first = int(ranked[0])
            cam = None if all_cams is None else all_cams[first : first + 1]
            self._cim_gallery_rows[label] = (raw[first], cam, boxes_np[first], mem.images(label, np.zeros(1, dtype=np.int64))[0])
        return fallbacks

    def _cim_record_diagnostics(self, label, raw, ranked, boxes, truth, cams) -> None:
        """Box recall / area / reconstruction error of one class's ranked exemplars, and the
        recall / area curve over τ of its candidates' CAMs (when the source computes one)."""
        recon = self._cim_memory.images(label)  # the stored prefix of the ranked list
        ranked = np.asarray(ranked, dtype=np.int64)[: len(recon)]
        size = raw.shape[1:3]
        stored_boxes, stored_truth = torch.from_numpy(boxes[ranked]), torch.from_numpy(truth[ranked])
        self._cim_stored_diag[label] = {
            "recall": box_recall(stored_boxes, stored_truth).numpy(),
            "area": box_area_fraction(stored_boxes, size).numpy(),
            "mse": image_mse(torch.from_numpy(raw[ranked]), torch.from_numpy(recon)).numpy(),
        }
        if cams is not None:  # the τ curve is computed over all of the phase's candidates at once
            self._cim_phase_diag.setdefault("cams", []).append((normalize_cams(cams.float())[0], torch.from_numpy(truth)))

    def cim_diagnostics(self) -> dict | None:
        """This phase's diagnostics (datasets that know their object boxes), or None:
        ``stored`` (over every exemplar in the memory now), ``augmentation`` (last box refresh of
        the new classes) and ``tau_curve`` (this phase's new-class candidates)."""
        mem = self._cim_memory
        if mem is None or not self._cim_stored_diag:
            return None
        counts = mem.counts()
        parts = [{k: v[: counts.get(label, 0)] for k, v in d.items()} for label, d in self._cim_stored_diag.items()]
        recall, area, mse = (np.concatenate([p[k] for p in parts]) for k in ("recall", "area", "mse"))
        out: dict[str, Any] = {"stored": {
            "exemplars": int(len(recall)),
            "mean_box_recall": float(recall.mean()) if len(recall) else None,
            "mean_box_area": float(area.mean()) if len(area) else None,
            "psnr_db": psnr_db(float(mse.mean())) if len(mse) else None,
        }}
        if "augmentation" in self._cim_phase_diag:
            out["augmentation"] = self._cim_phase_diag["augmentation"]
        cams = self._cim_phase_diag.get("cams")
        if cams:
            norm, truth = torch.cat([c for c, _ in cams]), torch.cat([t for _, t in cams])
            out["tau_curve"] = recall_area_curve(norm, truth, mem.image_shape[:2], mem.factor)
        return out

    def _cim_write_gallery(self) -> None:
        """``<log>_gallery.npz``: per gallery class its top-ranked exemplar as original, CAM
        (normalised, upsampled; NaN for mask sources without a CAM), box and reconstruction."""
        rows = self._cim_gallery_rows
        if not rows:
            return
        labels = sorted(rows)
        h, w = rows[labels[0]][0].shape[:2]
        cams = np.full((len(labels), h, w), np.nan, dtype=np.float16)
        for i, label in enumerate(labels):
            cam = rows[label][1]
            if cam is not None:
                cams[i] = upsample_cams(normalize_cams(cam.float())[0], (h, w))[0].numpy()
        path = Path(f"{run_base(self.args)}_gallery.npz")
        try:
            with atomic_open(path, "wb") as f:
                np.savez_compressed(
                    f, labels=np.asarray(labels, dtype=np.int64), originals=np.stack([rows[k][0] for k in labels]),
                    cams=cams, boxes=np.stack([rows[k][2] for k in labels]).astype(np.int64),
                    reconstructions=np.stack([np.asarray(rows[k][3]) for k in labels]), source=np.array(self._cim.cim_mask),
                )
        except OSError as err:  # a figure aid: never stop training for it
            log.warning("CIM gallery not written to %s: %s", path, err)

    def _cim_class_means(self) -> np.ndarray:
        """NME class means from the compressed exemplars (as replayed), L2-normalised."""
        mem = self._cim_memory
        means = np.zeros((self._total_classes, feature_dim(self._network)))
        for label in mem.labels:
            imgs = mem.images(label)
            feats = torch.cat(
                [_l2n(self._cim_features(imgs[s : s + self._cim.cam_batch_size])) for s in range(0, len(imgs), self._cim.cam_batch_size)]
            )
            mean = feats.mean(dim=0)
            means[label] = (mean / (mean.norm() + 1e-8)).numpy()
        return means
