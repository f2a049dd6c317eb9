"""The trainer mixin: PyCIL's seams, delegating to the plugin's parts (``learner.cim``, parts.py).

Composed in front of the learner's own class at get_model time (see hook.py); none of the
learners' training loops is copied. The seams:

- ``incremental_train(data_manager)``: the learner gets a ``PluginDataManager`` for the phase, so
  its own ``get_dataset(..., appendent=self._get_memory())`` call replays the compressed memory
  and compresses a share of new-class images on the fly (artefact augmentation);
- ``_init_train`` / ``_update_representation`` / ``_feature_boosting`` receive a scheduler whose
  once-per-epoch ``step()`` also runs the epoch's mask steps (pau) and, every
  ``cam_update_interval`` epochs, refreshes the new-class boxes;
- ``build_rehearsal_memory(data_manager, per_class)``: budget-consuming herding into the
  compressed memory, NME class means computed on the compressed exemplars.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import numpy as np

from .. import distributed
from ..config import CIMConfig
from .data import PluginDataManager
from .parts import CIMParts
from .results import run_base

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


class CIMLearnerMixin:
    """Adds CIM's compressed exemplar memory to a PyCIL BaseLearner subclass."""

    cim: CIMParts

    def cim_setup(self, cfg: CIMConfig) -> None:
        self.cim = CIMParts(cfg, self)

    # -- PyCIL seams ---------------------------------------------------------------------------
    def incremental_train(self, data_manager):
        known = self._known_classes
        new = np.arange(known, known + data_manager.get_task_size(self._cur_task + 1))
        cfg = self.cim.cfg
        dm = PluginDataManager(getattr(data_manager, "_dm", data_manager), self.cim.augmentation,
                               cfg.cim_storage_size, new, cfg.cim_storage_view)
        self.cim.begin_phase(dm, new)
        return super().incremental_train(dm)

    def _get_memory(self):
        mem = self.cim.memory
        return mem if mem is not None and len(mem) else None

    @property
    def exemplar_size(self) -> int:
        return 0 if self.cim.memory is None else len(self.cim.memory)

    @property
    def samples_old_class(self):
        """FOSTER's old-class count for its class-balance weights: PyCIL's budget units per old class,
        or with ``cim_foster_old_count`` "stored" the exemplars the memory replays per old class."""
        budget = super().samples_old_class
        mem = self.cim.memory
        if self.cim.cfg.cim_foster_old_count != "stored" or mem is None or not len(mem) or not self._known_classes:
            return budget
        stored = len(mem) / self._known_classes
        log.info("CIM: FOSTER class balance counts %.1f stored exemplars per old class (budget %s)", stored, budget)
        return stored

    def _init_train(self, train_loader, test_loader, optimizer, scheduler):
        return super()._init_train(train_loader, test_loader, optimizer, self._hooked(scheduler))

    def _update_representation(self, train_loader, test_loader, optimizer, scheduler):
        return super()._update_representation(train_loader, test_loader, optimizer, self._hooked(scheduler))

    def _feature_boosting(self, train_loader, test_loader, optimizer, scheduler):
        return super()._feature_boosting(train_loader, test_loader, optimizer, self._hooked(scheduler))

    def build_rehearsal_memory(self, data_manager, per_class):
        dm = data_manager if isinstance(data_manager, PluginDataManager) else PluginDataManager(data_manager)
        with self.cim.timed("memory"):
            self._class_means = self.cim.build_memory(dm, self._known_classes, self._total_classes, per_class,
                                                      self._fixed_memory)
        if distributed.is_main():  # under torchrun rank 0 writes
            self.cim.gallery.write(f"{run_base(self.args)}_gallery.npz")

    # -- once per epoch ------------------------------------------------------------------------
    def _hooked(self, scheduler):
        return EpochEndScheduler(scheduler, self.cim_on_epoch_end)

    def cim_on_epoch_end(self, epoch: int, scheduler: Any = None) -> None:
        """After each CIL epoch: the mask steps (pau), then, on schedule, new-class boxes (also
        after a stage's last epoch: FOSTER's compression stage trains on them next)."""
        if self.cim.trains_phi:
            with self.cim.timed("mask_steps"):
                self.cim.mask_steps(scheduler)
        if self.cim.augmentation.due(epoch):
            with self.cim.timed("box_refresh"):
                self.cim.refresh_boxes(epoch)

    def cim_first_phase_steps(self, scheduler: Any) -> None:
        """Phase 0 loaded from a shared checkpoint (``cim_first_phase_from``): give φ the mask
        steps the phase's epochs would have had, θ frozen; the inner step size follows the
        learner's own lr schedule (stepped once per epoch as its training loop would)."""
        if not self.cim.trains_phi:
            return
        from .hparams import stage_epochs

        epochs = stage_epochs(self, scheduler)
        with self.cim.timed("mask_steps"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")  # no optimizer.step: θ stays
            for _ in range(epochs):
                scheduler.step()
                self.cim.mask_steps(scheduler)
        log.info("CIM: first phase loaded; φ trained with %d mask steps over %d epochs", self.cim.trainer.steps, epochs)

    # -- results and checkpoints ---------------------------------------------------------------
    def cim_diagnostics(self) -> dict | None:
        """This phase's diagnostics (datasets that know their object boxes), or None."""
        return self.cim.diagnostics.summary(self.cim.memory)

    def cim_state_dict(self) -> dict:
        return self.cim.state_dict()

    def cim_load_state_dict(self, state: dict) -> None:
        self.cim.load_state_dict(state)
