"""The PCA feature memory inside PyCIL's iCaRL and LUCIR (``"cim": true, "cim_memory": "pca"``).

AnytimeCL's attention-weighted per-image PCA (core/feature_pca.py) of the map that enters one
backbone stage (``cim_feature_stage``, default the last; pycil/stages.py), with the CAM of the true
class as the weights (the ResNet analogue of attention to the class token). No training loop is
copied; the seams:

- ``incremental_train``: from the second phase on the backbone below the stage is frozen
  (``FrozenStagesMixin``, composed in front of this one), so a map stored in any phase is the map
  of every later network.
- ``build_rehearsal_memory`` (end of every phase): the old classes' ranked lists are cut to the
  budget; each new class's training images (PyCIL's test transforms) go through the network once:
  the stage's input map, the CAM of the true class (classifier row · last map, min-max normalised,
  resized bilinearly to the stored map's h × w) and the pooled features. Herding on the normalised
  features ranks the images, and the ranked prefix that fits the byte budget is encoded in one batch
  (``cim_pca_components`` directions) into the memory (core/pca_memory.py). NME class means are
  the means of the stages above on the decoded maps of every stored class (decode timed).
- ``_update_representation`` (later phases) gets an optimiser whose every ``step()`` first adds the
  gradient of ``cim_feature_replay_coef`` × CE(fc(stages above(decoded maps)), labels) on a batch of
  ``cim_feature_batch_size`` stored codes, decoded in one batch: old classes are rehearsed through
  the upper stages and the classifier, in the network's current (training) mode, beside the
  learner's own loss on the new images. No image is replayed: ``_get_memory()`` is None.
- Per phase, results.json gets ``pca_memory``: the reconstruction cosine of the new exemplars
  (decoded vs original maps, over all positions and CAM-weighted), the decode figures, the
  rehearsal steps and their mean loss; ``memory`` has the bytes against the budget.

Random draws (rehearsal batches) come from a generator seeded by the run's seed and the phase; the
passes run inside ``isolated_rng``, so a resumed run repeats a phase exactly. DER, FOSTER and
torchrun are refused (config.py, features.py).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..config import CIMConfig, ConfigError
from ..core.cam import normalize_cams
from ..core.feature_adapter import RehearsalOptimizer
from ..core.feature_pca import decode, encode, position_cosine
from ..core.herding import herding_rank
from ..core.pca_memory import PCAMemory
from ..seeding import isolated_rng
from .data import PluginDataManager, storage_shape
from .features import RehearsedMemorySeams, classifier_logits, phase_generator
from .nets import cam_and_features, eval_mode, feature_dim, unwrap
from .parts import CIMParts
from .stages import check_split, resolve_stage, single_backbone, stage_input, upper_features

log = logging.getLogger(__name__)

_REHEARSAL_STREAM = 12


class PCAParts:
    """The PCA memory's state in one learner (``learner.cim``)."""

    def __init__(self, cfg: CIMConfig, learner: Any):
        self.cfg = cfg
        self._learner = learner
        self.stage = resolve_stage(learner._network, cfg.cim_feature_stage)
        self.memory: PCAMemory | None = None
        self.report: dict | None = None
        self.decode_timing: dict = {}
        self.rehearsal: RehearsalOptimizer | None = None
        self._stored = None  # (PCACode on the device, labels) as rehearsed this phase
        self._generator: torch.Generator | None = None
        self.seconds: defaultdict[str, float] = defaultdict(float)

    timed = CIMParts.timed

    @property
    def backbone(self):
        return single_backbone(unwrap(self._learner._network))

    def upper(self, maps: torch.Tensor) -> torch.Tensor:
        """Pooled features of maps entering the stage (the stages above it, then avgpool)."""
        return upper_features(self.backbone, self.stage, maps)

    # -- a phase -------------------------------------------------------------------------------
    def begin_phase(self, dm: PluginDataManager, task: int, first_class: int) -> None:
        if self.memory is None:
            self.memory = self._new_memory(dm, first_class)
        self.report = None
        self.decode_timing = {}
        self.rehearsal = None
        self._stored = None
        self._generator = phase_generator(self.cfg.seed, task, _REHEARSAL_STREAM)

    def _new_memory(self, dm: PluginDataManager, label: int) -> PCAMemory:
        """The memory for this network's map shape, found (and the split checked) on one image."""
        shape = storage_shape(dm, self.cfg.cim_storage_size)
        with isolated_rng():
            _, x, _ = self._class_set(dm, label)[0]
            net = self._learner._network
            map_shape = check_split(net, self.stage, x.unsqueeze(0).to(self._learner._device))
        c, h, w = map_shape
        k = self.cfg.cim_pca_components
        if k > min(c, h * w):
            raise ConfigError([f"key 'cim_pca_components' = {k}: the map entering {self.stage!r} is {c} × {h} × {w}, "
                               f"so at most min(C, h·w) = {min(c, h * w)} directions"])
        return PCAMemory(map_shape, k, int(np.prod(shape)), shape)

    def rehearsal_loss(self) -> torch.Tensor | None:
        """``cim_feature_replay_coef`` × CE of fc(stages above(decoded maps)) on a random batch of codes."""
        if self._stored is None or self.cfg.cim_feature_replay_coef == 0:
            return None
        code, labels = self._stored
        idx = torch.randint(len(labels), (min(self.cfg.cim_feature_batch_size, len(labels)),), generator=self._generator)
        maps = decode(code.select(idx))
        logits = classifier_logits(self._learner._network, self.upper(maps))
        return self.cfg.cim_feature_replay_coef * F.cross_entropy(logits, labels[idx.to(labels.device)])

    def rehearsing(self, optimizer: Any) -> Any:
        """The learner's optimiser, rehearsing the stored codes at every step (later phases)."""
        if self.memory is None or not len(self.memory):
            return optimizer
        code, labels = self.memory.all()
        device = self._learner._device
        self._stored = (code.to(device), labels.to(device))
        self.rehearsal = RehearsalOptimizer(optimizer, self.rehearsal_loss)
        return self.rehearsal

    # -- passes --------------------------------------------------------------------------------
    def _class_set(self, dm: PluginDataManager, label: int):
        """The class's training images with PyCIL's test transforms, in data order (positions index it)."""
        return dm.get_dataset(np.arange(label, label + 1), source="train", mode="test")

    def _maps(self, dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage-input maps ``[n, C, h, w]``, CAM weights ``[n, h, w]`` (min-max normalised, resized)
        and pooled features ``[n, D]`` of a dataset's images, and their labels."""
        loader = DataLoader(dataset, batch_size=self.cfg.cam_batch_size, shuffle=False, num_workers=0)
        net, device = unwrap(self._learner._network), self._learner._device
        maps, weights, feats, labels = [], [], [], []
        with eval_mode(net), torch.no_grad(), stage_input(self.backbone, self.stage) as box:
            for _, x, y in loader:
                y = torch.as_tensor(y, dtype=torch.int64)
                cam, f = cam_and_features(net, x.to(device), y.to(device))
                m = box[0].float()
                cam = normalize_cams(cam.float())[0]
                w = F.interpolate(cam.unsqueeze(1), size=m.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                maps.append(m.cpu()), weights.append(w.clamp(min=0).cpu()), feats.append(f.float().cpu()), labels.append(y)
        if not feats:
            c, h, w = self.memory.map_shape
            return torch.zeros(0, c, h, w), torch.zeros(0, h, w), torch.zeros(0, feature_dim(net)), torch.zeros(0, dtype=torch.int64)
        return torch.cat(maps), torch.cat(weights), torch.cat(feats), torch.cat(labels)

    def store_class(self, dm: PluginDataManager, label: int, per_class: float) -> dict | None:
        """Herd one new class, encode the ranked prefix that fits; returns its reconstruction figures."""
        mem = self.memory
        maps, weights, feats, _ = self._maps(self._class_set(dm, label))
        keep = min(len(feats), mem.capacity(per_class))
        if keep == 0:
            return None
        normed = F.normalize(feats.double(), dim=1)
        ranked = herding_rank(normed, normed.mean(dim=0), budget=keep)
        code = encode(maps[ranked], weights[ranked], mem.k)
        back = decode(code)
        cos = position_cosine(maps[ranked], back)
        per_pos = F.cosine_similarity(maps[ranked].flatten(2), back.flatten(2), dim=1)  # [n, N]
        wflat = weights[ranked].flatten(1)
        cam_cos = (per_pos * wflat).sum(1) / wflat.sum(1).clamp(min=1e-12)
        mem.add_class(label, code, ranked, cos.numpy(), per_class)
        return {"n": len(ranked), "cosine": float(cos.sum()), "cam_cosine": float(cam_cos.sum()),
                "min": float(cos.min())}

    # -- end of a phase ------------------------------------------------------------------------
    def build_memory(self, dm: PluginDataManager, known: int, total: int, per_class: float, fixed: bool) -> np.ndarray | None:
        """Cut the old classes, herd and encode the new ones; returns the NME class means (None
        without exemplars)."""
        lrn, mem = self._learner, self.memory
        report: dict = {"stage": self.stage, "map_shape": list(mem.map_shape), "pca_components": mem.k}
        if self.rehearsal is not None:
            steps = self.rehearsal.steps
            report["rehearsal"] = {"steps": steps, "mean_loss": round(self.rehearsal.loss_sum / steps, 6) if steps else None}
        with isolated_rng():
            if not fixed:
                mem.reduce(per_class)
            with self.timed("encode"):
                figures = [f for label in range(known, total) if (f := self.store_class(dm, label, per_class))]
            n = sum(f["n"] for f in figures)
            if n:
                report["new_exemplars"] = n
                report["reconstruction_cosine_new"] = round(sum(f["cosine"] for f in figures) / n, 6)
                report["reconstruction_cosine_new_cam"] = round(sum(f["cam_cosine"] for f in figures) / n, 6)
                report["reconstruction_cosine_new_min"] = round(min(f["min"] for f in figures), 6)
            means = None
            if len(mem):
                net = unwrap(lrn._network)
                with eval_mode(net), self.timed("class_means"):
                    means, decoded = mem.class_means(lambda m: self.upper(m.to(lrn._device)), total, feature_dim(net),
                                                     self.cfg.cim_feature_batch_size)
                report["decode"] = {"decoded": decoded.pop("decoded")}
                self.decode_timing = decoded  # wall times: in results.json, not in the checkpointed state
        s = mem.summary(per_class, total)
        self.report = {**report, "stored": len(mem), "per_class_capacity": mem.capacity(per_class),
                       "reconstruction_cosine": s["reconstruction_cosine"]}
        log.info("pca memory: %d codes (%.1f per class, %s map, k=%d, %d bytes each; plain PyCIL would keep %s images), "
                 "%d/%d bytes, reconstruction cosine %s", s["exemplars"], s["mean_exemplars_per_class"],
                 "×".join(map(str, mem.map_shape)), mem.k, mem.item_bytes, per_class, s["bytes_used"], s["budget_bytes"],
                 s["reconstruction_cosine"])
        return means

    # -- explicit state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stage": self.stage, "memory": None if self.memory is None else self.memory.state_dict(),
                "report": self.report}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stage") != self.stage:
            raise ValueError(f"pca memory was saved at stage {state.get('stage')!r}, this run's 'cim_feature_stage' "
                             f"is {self.stage!r}")
        memory = state.get("memory")
        if memory is not None:
            self.memory = PCAMemory(tuple(memory["map_shape"]), memory["k"], memory["full_exemplar_bytes"],
                                    memory.get("storage_shape"))
            if self.memory.k != self.cfg.cim_pca_components:
                raise ValueError(f"pca memory was saved with k = {self.memory.k}, this run's 'cim_pca_components' is "
                                 f"{self.cfg.cim_pca_components}")
            self.memory.load_state_dict(memory)
        self.report = state.get("report")


class PCAMemoryMixin(RehearsedMemorySeams):
    """A PCA feature memory in front of PyCIL's iCaRL or the plugin's LUCIR (see module docstring)."""

    cim: PCAParts

    def cim_setup(self, cfg: CIMConfig) -> None:
        self.cim = PCAParts(cfg, self)
        ignored = sorted(k for k in ("cim_mask", "compress_ratio", "cim_codec", "mask_threshold", "cim_bilevel",
                                     "cim_feature_dtype", "cim_adapt_epochs") if k in getattr(self, "args", {}))
        if ignored:
            log.info("pca memory: key(s) %s are not used with \"cim_memory\": \"pca\"", ", ".join(ignored))

    # -- PyCIL seams ---------------------------------------------------------------------------
    def incremental_train(self, data_manager):
        dm = data_manager if isinstance(data_manager, PluginDataManager) else PluginDataManager(data_manager)
        self.cim.begin_phase(dm, self._cur_task + 1, self._known_classes)
        return super().incremental_train(dm)

    def cim_phase_figures(self) -> dict:
        report = self.cim.report
        if report is not None and "decode" in report:
            report = {**report, "decode": {**report["decode"], **self.cim.decode_timing}}
        return {"pca_memory": report}
