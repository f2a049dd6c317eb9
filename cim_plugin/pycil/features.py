"""The feature memory inside PyCIL's iCaRL and LUCIR (``"cim": true, "cim_memory": "features"``).

Iscen, Zhang, Lazebnik, Schmid (ECCV 2020), at PyCIL's seams; no training loop is copied:

- ``build_rehearsal_memory`` (end of every phase, after the learner's training): from the second
  phase on, the features of the phase's training images (PyCIL's test transforms) under the old
  network (``_old_network``) and the new one train the adaptation MLP (core/feature_adapter.py:
  cosine loss + classification loss of the mapped features through the new classifier, read-only),
  and every stored vector is carried through it. The old classes' lists are cut to the budget,
  the classifier alone is trained on the adapted vectors and the new-class features
  (``cim_classifier_epochs``: Iscen et al.'s classifier step, both now in the new space), and the
  new classes' features are herded (iCaRL's herding on L2-normalised features,
  core/herding.py) into the memory (core/feature_memory.py), as many per class as the byte budget
  of the image memory buys. NME class means are the stored vectors' means.
- ``_update_representation`` (later phases) gets an optimiser whose every ``step()`` first adds
  the gradient of ``cim_feature_replay_coef`` × CE(classifier(stored features), their labels) on a
  batch of ``cim_feature_batch_size`` stored vectors: old classes are rehearsed at the classifier,
  beside the learner's own loss on the new images (iCaRL: CE + KD; LUCIR: CE + less-forget + margin
  ranking). No image is replayed: ``_get_memory()`` is None.
- Per phase, results.json gets ``feature_memory``: the drift of the stored vectors (mean cosine to
  the new network's features of the same images, before and after adaptation; ``cim_feature_drift``),
  the adapter's figures, the rehearsal steps and their mean loss.

The random draws of this work (MLP initialisation, batch orders, rehearsal batches) come from
generators seeded by the run's seed and the phase, and the feature passes run inside
``isolated_rng``: the learner's own random stream is the one it would be without them, and a
resumed run repeats a phase exactly. DER and FOSTER are refused (config.py), and so is torchrun.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset

from .. import distributed
from ..config import CIMConfig
from ..core.feature_adapter import (
    AdapterSettings, FeatureAdapter, RehearsalOptimizer, mean_cosine, train_adapter, train_classifier,
)
from ..core.feature_memory import FeatureMemory
from ..core.herding import herding_rank
from ..seeding import isolated_rng
from .data import PluginDataManager, storage_shape
from .parts import CIMParts
from .nets import eval_mode, extract_vector, feature_dim, unwrap

log = logging.getLogger(__name__)

#: Offsets that make the feature memory's generators differ from each other for one seed and phase.
_ADAPTER_STREAM, _REHEARSAL_STREAM, _CLASSIFIER_STREAM = 1, 2, 3


def feature_memory_problems(args: dict) -> list[str]:
    """A feature memory under torchrun: refused (its passes and the rehearsal were not made for DDP)."""
    if distributed.launched() and args.get("cim") is True and args.get("cim_memory", "image") != "image":
        return [f"key 'cim_memory' = {args.get('cim_memory')!r} does not run under torchrun (several processes): "
                "run it as one process, or use \"image\""]
    return []


def phase_generator(seed: int, task: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1000003 + int(task) * 101 + stream)


def classifier_logits(net: Any, feats: torch.Tensor, detached: bool = False) -> torch.Tensor:
    """The network's classifier on pooled features (``fc(features)["logits"]``); ``detached``: its
    parameters read as constants (no gradient reaches them)."""
    fc = unwrap(net).fc
    if not detached:
        return fc(feats)["logits"]
    params = {n: p.detach() for n, p in fc.named_parameters()}
    return functional_call(fc, params, (feats,))["logits"]


class FeatureParts:
    """The feature memory's state in one learner (``learner.cim``)."""

    def __init__(self, cfg: CIMConfig, learner: Any):
        self.cfg = cfg
        self._learner = learner
        self.memory: FeatureMemory | None = None
        self.adapter: FeatureAdapter | None = None  # the last phase's adaptation MLP
        self.report: dict | None = None  # this phase's figures (results.json ``feature_memory``)
        self.rehearsal: RehearsalOptimizer | None = None
        self._stored: tuple[torch.Tensor, torch.Tensor] | None = None  # the memory as rehearsed this phase
        self._generator: torch.Generator | None = None
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.settings = AdapterSettings(epochs=cfg.cim_adapt_epochs, hidden=cfg.cim_adapt_hidden, lr=cfg.cim_adapt_lr,
                                        batch_size=cfg.cim_feature_batch_size, cls_coef=cfg.cim_adapt_cls_coef)

    timed = CIMParts.timed  # adds a block's wall seconds to ``seconds[part]``

    # -- a phase -------------------------------------------------------------------------------
    def begin_phase(self, dm: PluginDataManager, task: int) -> None:
        if self.memory is None:
            shape = storage_shape(dm, self.cfg.cim_storage_size)
            self.memory = FeatureMemory(feature_dim(self._learner._network), self.cfg.cim_feature_dtype,
                                        int(np.prod(shape)), shape)
        self.report = None
        self.rehearsal = None
        self._stored = None
        self._generator = phase_generator(self.cfg.seed, task, _REHEARSAL_STREAM)

    def rehearsal_loss(self) -> torch.Tensor | None:
        """``cim_feature_replay_coef`` × CE of the classifier on a random batch of stored vectors."""
        if self._stored is None or not len(self._stored[0]) or self.cfg.cim_feature_replay_coef == 0:
            return None
        feats, labels = self._stored
        idx = torch.randint(len(feats), (min(self.cfg.cim_feature_batch_size, len(feats)),), generator=self._generator)
        device = self._learner._device
        logits = classifier_logits(self._learner._network, feats[idx].to(device))
        return self.cfg.cim_feature_replay_coef * F.cross_entropy(logits, labels[idx].to(device))

    def rehearsing(self, optimizer: Any) -> Any:
        """The learner's optimiser, rehearsing the stored vectors at every step (later phases)."""
        if self.memory is None or not len(self.memory):
            return optimizer
        self._stored = self.memory.all()
        self.rehearsal = RehearsalOptimizer(optimizer, self.rehearsal_loss)
        return self.rehearsal

    # -- feature passes ------------------------------------------------------------------------
    def _features(self, net: Any, dataset) -> tuple[torch.Tensor, np.ndarray]:
        loader = DataLoader(dataset, batch_size=self.cfg.cam_batch_size, shuffle=False, num_workers=0)
        feats, labels = [], []
        net = unwrap(net)
        with eval_mode(net), torch.no_grad():
            for _, x, y in loader:
                feats.append(extract_vector(net, x.to(self._learner._device)).float().cpu())
                labels.append(np.asarray(y))
        if not feats:
            return torch.zeros(0, self.memory.dim), np.zeros(0, dtype=np.int64)
        return torch.cat(feats), np.concatenate(labels).astype(np.int64)

    def _class_set(self, dm: PluginDataManager, label: int):
        """The class's training images with PyCIL's test transforms, in data order (positions index it)."""
        return dm.get_dataset(np.arange(label, label + 1), source="train", mode="test")

    def _stored_images_features(self, dm: PluginDataManager) -> torch.Tensor:
        """The new network's features of the images of every stored vector (memory order)."""
        net = self._learner._network
        parts = [self._features(net, Subset(self._class_set(dm, label), self.memory.positions(label).tolist()))[0]
                 for label in self.memory.labels]
        return torch.cat(parts) if parts else torch.zeros(0, self.memory.dim)

    # -- end of a phase ------------------------------------------------------------------------
    def adapt(self, dm: PluginDataManager, known: int, total: int, new_feats: torch.Tensor, new_labels: np.ndarray) -> dict:
        """Train the adaptation MLP (old network → new network on this phase's images), carry the
        stored vectors through it; returns the figures (drift before and after, adapter)."""
        lrn, mem, cfg = self._learner, self.memory, self.cfg
        old_feats, _ = self._features(lrn._old_network, dm.get_dataset(np.arange(known, total), source="train", mode="test"))
        target = self._stored_images_features(dm) if cfg.cim_feature_drift else None
        before = mean_cosine(mem.all()[0], target) if target is not None else None
        gen = phase_generator(cfg.seed, lrn._cur_task, _ADAPTER_STREAM)
        self.adapter, figures = train_adapter(old_feats, new_feats, torch.from_numpy(new_labels), self.settings,
                                              lambda z: classifier_logits(lrn._network, z.to(lrn._device), detached=True).cpu(),
                                              gen)
        mem.transform(self.adapter)
        after = mean_cosine(mem.all()[0], target) if target is not None else None
        report = {"stored": len(mem), "drift_cosine_before": before, "drift_cosine_after": after,
                  "adapter": {**figures, "hidden": self.settings.hidden,
                              "parameters": sum(p.numel() for p in self.adapter.parameters())}}
        if before is not None:
            log.info("feature memory: drift of %d stored vectors, mean cosine to the new network's features %.4f before, "
                     "%.4f after adaptation (phase images %.4f -> %.4f)", len(mem), before, after,
                     figures["cosine_before"], figures["cosine_after"])
        return report

    def align_classifier(self, new_feats: torch.Tensor, new_labels: np.ndarray) -> dict:
        """The classifier alone trained on the adapted stored vectors (old classes) and the phase's
        new-class features of the new network: both in the new network's space (Iscen et al.)."""
        lrn, cfg = self._learner, self.cfg
        old_feats, old_labels = self.memory.all()
        feats = torch.cat([old_feats, new_feats])
        labels = torch.cat([old_labels, torch.from_numpy(new_labels)])
        fc, device = unwrap(lrn._network).fc, lrn._device
        figures = train_classifier(fc, lambda z: fc(z.to(device))["logits"].cpu(), feats, labels, cfg.cim_classifier_epochs,
                                   cfg.cim_adapt_lr, cfg.cim_feature_batch_size,
                                   phase_generator(cfg.seed, lrn._cur_task, _CLASSIFIER_STREAM))
        log.info("feature memory: classifier aligned on %d vectors (%d epochs): top-1 on them %.1f -> %.1f",
                 figures["vectors"], figures["epochs"], figures["top1_before"], figures["top1_after"])
        return figures

    def build_memory(self, dm: PluginDataManager, known: int, total: int, per_class: float, fixed: bool) -> np.ndarray | None:
        """Adapt the stored vectors (later phases), cut the old classes, herd the new ones; returns
        the NME class means (None without exemplars)."""
        lrn, mem = self._learner, self.memory
        with isolated_rng():
            new_feats, new_labels = self._features(lrn._network, dm.get_dataset(np.arange(known, total), source="train", mode="test"))
            report = {}
            if len(mem) and lrn._old_network is not None:  # cim_adapt_epochs 0: the identity, drift still measured
                with self.timed("adaptation"):
                    report = self.adapt(dm, known, total, new_feats, new_labels)
            if self.rehearsal is not None:
                steps = self.rehearsal.steps
                report["rehearsal"] = {"steps": steps, "mean_loss": round(self.rehearsal.loss_sum / steps, 6) if steps else None}
            if not fixed:
                mem.reduce(per_class)
            if len(mem) and lrn._old_network is not None and self.cfg.cim_classifier_epochs > 0:
                with self.timed("classifier"):
                    report["classifier"] = self.align_classifier(new_feats, new_labels)
            for label in range(known, total):
                sel = np.flatnonzero(new_labels == label)
                if not len(sel):
                    continue
                feats = new_feats[sel]
                normed = F.normalize(feats.double(), dim=1)
                ranked = herding_rank(normed, normed.mean(dim=0), budget=min(len(sel), mem.capacity(per_class)))
                mem.add_class(label, feats[ranked], ranked, per_class)  # positions: rank in the class's data order
        s = mem.summary(per_class, total)
        self.report = {**report, "stored": len(mem), "per_class_capacity": mem.capacity(per_class)}
        log.info("feature memory: %d vectors (%.1f per class, %s %d-d, %d bytes each; plain PyCIL would keep %s images), "
                 "%d/%d bytes", s["exemplars"], s["mean_exemplars_per_class"], mem.dtype, mem.dim, mem.item_bytes,
                 per_class, s["bytes_used"], s["budget_bytes"])
        return mem.class_means(total) if len(mem) else None

    # -- explicit state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"memory": None if self.memory is None else self.memory.state_dict(),
                "adapter": None if self.adapter is None else self.adapter.state(),
                "report": self.report}

    def load_state_dict(self, state: dict) -> None:
        memory = state.get("memory")
        if memory is not None:
            shape = memory.get("storage_shape")
            self.memory = FeatureMemory(memory["dim"], memory["dtype"], memory["full_exemplar_bytes"], shape)
            if self.memory.dtype != self.cfg.cim_feature_dtype:
                raise ValueError(f"feature memory was saved as {self.memory.dtype}, this run's 'cim_feature_dtype' is "
                                 f"{self.cfg.cim_feature_dtype!r}")
            self.memory.load_state_dict(memory)
        adapter = state.get("adapter")
        self.adapter = None if adapter is None else FeatureAdapter.from_state(adapter)
        self.report = state.get("report")


class RehearsedMemorySeams:
    """PyCIL's seams shared by the memories that replay no image (``features``, ``pca``): no image
    memory, the learner's optimiser wrapped to rehearse, the memory built by the parts (``self.cim``)
    at every phase end with their NME class means, and the parts' explicit state in checkpoints."""

    def _get_memory(self):
        return None  # no image is replayed: old classes are rehearsed from the memory

    @property
    def exemplar_size(self) -> int:
        return 0 if self.cim.memory is None else len(self.cim.memory)

    def _update_representation(self, train_loader, test_loader, optimizer, scheduler):
        return super()._update_representation(train_loader, test_loader, self.cim.rehearsing(optimizer), scheduler)

    def build_rehearsal_memory(self, data_manager, per_class):
        dm = data_manager if isinstance(data_manager, PluginDataManager) else PluginDataManager(data_manager)
        with self.cim.timed("memory"):
            means = self.cim.build_memory(dm, self._known_classes, self._total_classes, per_class, self._fixed_memory)
        if means is not None:
            self._class_means = means
        elif hasattr(self, "_class_means"):
            del self._class_means  # no exemplars: NME off

    # -- results and checkpoints ---------------------------------------------------------------
    def cim_diagnostics(self) -> dict | None:
        return None

    def cim_state_dict(self) -> dict:
        return self.cim.state_dict()

    def cim_load_state_dict(self, state: dict) -> None:
        self.cim.load_state_dict(state)


class FeatureMemoryMixin(RehearsedMemorySeams):
    """A feature memory in front of PyCIL's iCaRL or the plugin's LUCIR (see module docstring)."""

    cim: FeatureParts

    def cim_setup(self, cfg: CIMConfig) -> None:
        self.cim = FeatureParts(cfg, self)
        ignored = sorted(k for k in ("cim_mask", "compress_ratio", "cim_codec", "mask_threshold", "cim_bilevel")
                         if k in getattr(self, "args", {}))
        if ignored:
            log.info("feature memory: image-memory key(s) %s are not used with \"cim_memory\": \"features\"", ", ".join(ignored))

    # -- PyCIL seams ---------------------------------------------------------------------------
    def incremental_train(self, data_manager):
        dm = data_manager if isinstance(data_manager, PluginDataManager) else PluginDataManager(data_manager)
        self.cim.begin_phase(dm, self._cur_task + 1)
        return super().incremental_train(dm)

    def cim_phase_figures(self) -> dict:
        return {"feature_memory": self.cim.report}
