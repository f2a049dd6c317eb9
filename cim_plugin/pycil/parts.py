"""The plugin's parts inside a PyCIL learner (``learner.cim``), and the glue that feeds them.

``CIMParts`` holds one part per job, each PyCIL-free and tested on its own:

- ``memory`` (core/memory.py) and ``builder`` (core/memory_builder.py: candidates → boxes →
  features → herding → store), with the ``gallery`` and ``diagnostics`` as the builder's observers;
- ``trainer`` (core/branch_trainer.py): the PAU branch, φ's optimiser and schedule, mask steps;
- ``augmentation`` (core/augmentation.py): the new-class boxes and the share compressed on the fly.

What ties them to PyCIL lives here: ``NetworkEncoder`` (CAMs and features of the learner's
current network), reading a class's candidates from the data manager, the mask steps' θ, loss, BN
mode and step size, the box refresh over PyCIL's new-class training set. The mixin in learner.py
only calls these from PyCIL's seams. ``state_dict`` / ``load_state_dict`` are the parts' explicit
state in checkpoints (the memory, φ, the stored-exemplar diagnostics).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

from .. import distributed
from ..config import CIMConfig
from ..core.augmentation import ArtefactAugmentation
from ..core.bilevel import BilevelSettings
from ..core.branch import PAUBranch
from ..core.branch_trainer import BranchTrainer
from ..core.diagnostics import StoredDiagnostics
from ..core.gallery import Gallery
from ..core.masks import make_mask_source
from ..core.memory import ExemplarMemory, make_memory
from ..core.memory_builder import MemoryBuilder
from ..seeding import isolated_rng
from . import hparams
from .data import Normalizer, PluginDataManager, read_storage, storage_shape, to_storage
from .losses import cil_loss_for
from .nets import (
    backbones, branch_outputs, cam_and_features, eval_mode, extract_vector, feature_dim, inner_step_parameters,
    maps_and_features, trained_backbones_batch_statistics, unwrap,
)

log = logging.getLogger(__name__)


class NetworkEncoder:
    """``core.memory_builder.Encoder`` over the learner's current network (eval mode, no grad):
    CAMs of the CIL model, or of the CIM branch when the mask source needs it; CIL features."""

    def __init__(self, learner: Any, parts: "CIMParts"):
        self._learner, self._parts = learner, parts

    def _inputs(self, images) -> torch.Tensor:
        return self._parts.normalizer(images, self._learner._device)

    def cams(self, images, labels, features: bool = True):
        net = unwrap(self._learner._network)
        x = self._inputs(images)
        y = torch.as_tensor(labels, dtype=torch.int64, device=x.device)
        with eval_mode(net), torch.no_grad():
            if self._parts.source.needs_branch:  # the CAM from the branch: the CIL pass gives features only
                feats = maps_and_features(net, x)[1] if features else None
                cam, _ = self._parts.branch_outputs(x, y)
            else:
                cam, feats = cam_and_features(net, x, y)
        return cam.cpu(), None if feats is None else feats.cpu()

    def features(self, images) -> torch.Tensor:
        net = unwrap(self._learner._network)
        with eval_mode(net), torch.no_grad():
            return extract_vector(net, self._inputs(images)).cpu()


class CIMParts:
    """The plugin's state in one learner (see module docstring)."""

    def __init__(self, cfg: CIMConfig, learner: Any):
        self.cfg = cfg
        self._learner = learner
        self.source = make_mask_source(cfg.cim_mask, cfg.downsample_factor, cfg.mask_threshold, cfg.seed)
        self.trainer = BranchTrainer(
            BilevelSettings(factor=cfg.downsample_factor, div_coef=cfg.div_coef, reg_coef=cfg.reg_coef,
                            max_phi_grad_norm=cfg.max_phi_grad_norm, mode=cfg.cim_bilevel),
            cfg.phi_lr, cfg.phi_weight_decay, cfg.cim_train_old_paus, reduce_grads=distributed.average_gradients,
            pau_options={"init_range": cfg.cim_pau_init_range},
        )
        self.augmentation = ArtefactAugmentation(cfg.downsample_factor, cfg.cam_update_interval, cfg.randombbxblur_prob_incre)
        self.diagnostics = StoredDiagnostics()
        self.gallery = Gallery(cfg.cim_gallery, cfg.cim_mask)
        self.encoder = NetworkEncoder(learner, self)
        self.normalizer = Normalizer()
        self.memory: ExemplarMemory | None = None
        self.builder: MemoryBuilder | None = None
        self.seconds: defaultdict[str, float] = defaultdict(float)  # CIM's own work, per phase
        self.train_set: Any = None  # this phase's clean new-class training set (PyCIL's dataset)
        self.train_truth: np.ndarray | None = None  # its true object boxes, when the dataset knows them

    # -- life cycle ----------------------------------------------------------------------------
    def _new_memory(self, shape: tuple[int, int, int]) -> ExemplarMemory:
        cfg = self.cfg
        return make_memory(shape, cfg.compress_ratio, cfg.cim_codec, cfg.cim_codec_quality)

    def use_memory(self, memory: ExemplarMemory) -> None:
        self.memory = memory
        self.augmentation.compress = memory.reconstruct
        self.builder = MemoryBuilder(memory, self.source, self.encoder, self.cfg.cam_batch_size,
                                     observers=(self.gallery, self.diagnostics))

    def begin_phase(self, dm: PluginDataManager, new_classes: np.ndarray) -> None:
        """A new incremental phase over ``new_classes``: the memory made at the first phase, the
        phase's clean new-class set taken, the phase-level state of every part reset."""
        if self.memory is None:
            self.use_memory(self._new_memory(storage_shape(dm, self.cfg.cim_storage_size)))
        self.normalizer = Normalizer.from_data_manager(dm)
        self.train_set, self.train_truth = dm.clean_train_set(new_classes)
        if self.source.needs_truth and self.train_truth is None:
            raise ValueError(f"key 'cim_mask' = {self.cfg.cim_mask!r} needs true object boxes: dataset "
                             f"'{self._learner.args.get('dataset')}' does not provide them (the synthetic set does)")
        self.augmentation.reset()
        self.trainer.begin_phase()
        self.diagnostics.begin_phase()

    @contextlib.contextmanager
    def timed(self, part: str):
        """Adds the block's wall seconds to ``seconds[part]`` (reported per phase in results.json)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - t0

    # -- memory --------------------------------------------------------------------------------
    def fill_class(self, dm: PluginDataManager, label: int, budget: float) -> int:
        """Herd exemplars of one new class into the memory; returns the CAM fallbacks."""
        items, positions = dm.class_items(label)
        raw, ok, aspects = read_storage(items, dm.use_path, self.cfg.cim_storage_size, self.cfg.cim_storage_view)
        truth = dm.object_boxes(positions[ok])
        if not ok.all():
            log.warning("CIM memory: class %d: %d of %d images unreadable, left out of the candidates",
                        label, int((~ok).sum()), len(ok))
            raw, aspects = raw[ok], aspects[ok]
        if not len(raw):
            log.warning("CIM memory: class %d has no readable image: no exemplars stored", label)
            return 0
        return self.builder.fill_class(label, raw, budget, truth, aspects if dm.use_path else None)

    def build_memory(self, dm: PluginDataManager, known: int, total: int, per_class: float, fixed: bool) -> np.ndarray:
        """Cut old classes to ``per_class`` units (unless ``fixed``), fill the new ones; returns the
        NME class means computed on the stored exemplars."""
        mem = self.memory
        if not fixed:
            removed = mem.reduce(per_class)
            if removed:
                log.info("CIM memory: budget %s units/class, cut %d exemplars of old classes", per_class, sum(removed.values()))
        fallbacks = sum(self.fill_class(dm, label, per_class) for label in tqdm(range(known, total), desc="CIM exemplars", leave=False))
        stats = mem.summary(per_class, total)
        log.info("CIM memory: %d exemplars (%.1f per class, plain PyCIL would keep %d), %.2f/%s units, "
                 "%d/%d bytes; %d CAM fallbacks to full image", stats["exemplars"], stats["mean_exemplars_per_class"],
                 per_class, stats["units_used"], stats["budget_units"], stats["bytes_used"], stats["budget_bytes"], fallbacks)
        return self.builder.class_means(total, feature_dim(self._learner._network))

    # -- the branch and φ ----------------------------------------------------------------------
    def branch(self) -> PAUBranch:
        lrn = self._learner
        return self.trainer.sync(backbones(lrn._network), lrn._device)

    def branch_outputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CAM ``[B, h, w]`` and classifier logits through the branch (``nets.branch_outputs``)."""
        return branch_outputs(self._learner._network, self.branch(), x, y)

    @property
    def trains_phi(self) -> bool:
        return self.source.needs_branch and self.trainer.active

    def meta_set(self):
        """The mask steps' data: the phase's clean new-class images plus the compressed memory
        (as the official code's loader)."""
        mem, new = self.memory, self.train_set
        return ConcatDataset([new, mem.as_dataset(new.trsf)]) if mem is not None and len(mem) else new

    def _meta_batches(self):
        """Endless mask-step batches; under torchrun each process draws its share of every pass's
        global shuffle (``meta_batch_size`` per process)."""
        data = self.meta_set()
        size, device = self.cfg.meta_batch_size, self._learner._device
        sampler, share = None, len(data)
        if distributed.active():
            sampler = distributed.EpochDistributedSampler(data, num_replicas=distributed.world_size(),
                                                          rank=distributed.rank(), seed=distributed.shard_seed())
            share = sampler.num_samples
        loader = DataLoader(data, batch_size=size, shuffle=sampler is None, sampler=sampler, num_workers=0,
                            drop_last=share > size)
        while True:
            for _, x, y in loader:
                yield x.to(device), torch.as_tensor(y, dtype=torch.int64).to(device)

    def mask_steps(self, scheduler: Any) -> None:
        """One epoch's φ updates: ``num_meta_iters_per_cls`` per new class on average (fractions
        carried over to later epochs of the phase: ``BranchTrainer.steps_due``), inner step size the
        learner's current lr × ``lr_ratio``, BN as in PyCIL's own training step. Their random draws
        (batch shuffles, transforms) are isolated (``seeding.isolated_rng``): the CIL training after
        them sees the random stream it would see without them."""
        if self.train_set is None:
            return
        lrn, cfg = self._learner, self.cfg
        if not self.branch().trainable_parameters():
            return
        per_epoch = (lrn._total_classes - lrn._known_classes) * cfg.num_meta_iters_per_cls
        iters = self.trainer.steps_due(per_epoch)
        if iters == 0:
            return
        stage_steps = self.trainer.stage_steps(per_epoch, hparams.stage_epochs(lrn, scheduler))
        lr = scheduler.optimizer.param_groups[0]["lr"] if scheduler is not None else 0.0
        net = unwrap(lrn._network)
        theta = inner_step_parameters(net)
        with eval_mode(net), trained_backbones_batch_statistics(net), isolated_rng():
            parts, skipped = self.trainer.train(net, theta, self.branch_outputs, cil_loss_for(lrn), self._meta_batches,
                                                iters, stage_steps, lr * cfg.lr_ratio)
        log.info("CIM mask steps: %d this epoch (%d in phase), %s", iters, self.trainer.steps,
                 ", ".join(f"{k} {v:.4f}" for k, v in parts.items() if k not in ("skipped", "rolled_back")))
        if skipped:
            log.warning("CIM mask steps: %d of %d skipped this epoch (non-finite loss or φ gradient): φ set back to "
                        "before its last applied update, Adam's moments reset", skipped, iters)

    # -- artefact augmentation -----------------------------------------------------------------
    def refresh_boxes(self, epoch: int) -> None:
        """New boxes for every item of the phase's new-class set (unreadable items keep the full
        image and are never compressed); the compressed share grows."""
        ds, truth, size = self.train_set, self.train_truth, self.cfg.cim_storage_size
        if ds is None:
            return
        labels = np.asarray(ds.labels, dtype=np.int64)
        boxes = np.zeros((len(labels), 4), dtype=np.int64)
        step = self.cfg.cam_batch_size
        for start in range(0, len(labels), step):
            sl = slice(start, start + step)
            raw, ok = to_storage(ds.images[sl], ds.use_path, size, self.cfg.cim_storage_view)
            chunk = np.tile(np.array([0, raw.shape[1], 0, raw.shape[2]], dtype=np.int64), (len(raw), 1))
            if ok.any():
                t = None if truth is None else truth[sl][ok]
                chunk[ok] = self.builder.boxes(raw[ok], labels[sl][ok], truth=t, features=False).boxes.numpy()
            boxes[sl] = chunk
        if truth is not None:
            self.diagnostics.record_augmentation(epoch, boxes, truth, raw.shape[1:3])
        self.augmentation.refresh(boxes)
        log.info("CIM: epoch %d, refreshed %d new-class boxes; compressed share now %.2f", epoch, len(boxes), self.augmentation.share)

    # -- explicit state ------------------------------------------------------------------------
    def memory_state_dict(self) -> dict:
        """What building the memory changes: the memory, the stored-exemplar diagnostics, the
        gallery rows and the random mask source's generator (sent from rank 0 under torchrun)."""
        return {
            "memory": None if self.memory is None else self.memory.state_dict(),
            "diagnostics": self.diagnostics.state_dict(),
            "gallery_rows": dict(self.gallery.rows),
            "source_rng": None if self.source.generator is None else self.source.generator.get_state(),
        }

    def load_memory_state_dict(self, state: dict) -> None:
        memory = state.get("memory")
        if memory is not None:
            self.use_memory(self._new_memory(tuple(memory["image_shape"])))
            self.memory.load_state_dict(memory)
        self.diagnostics.load_state_dict(state.get("diagnostics", {}))
        self.gallery.rows = dict(state.get("gallery_rows", {}))
        if state.get("source_rng") is not None and self.source.generator is not None:
            self.source.generator.set_state(state["source_rng"])

    def state_dict(self) -> dict:
        return {**self.memory_state_dict(), "phi": self.trainer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.load_memory_state_dict(state)
        self.trainer.load_state_dict(state.get("phi", {}), backbones(self._learner._network))
