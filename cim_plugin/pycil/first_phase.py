"""Start a run from another run's trained first phase (key ``cim_first_phase_from``).

Comparing memories at tiny scale is swamped by first-phase noise: two runs that differ only in
how they store exemplars already differ by several points after phase 0, before any exemplar
exists. With ``"cim_first_phase_from": "<dir>/task_0.pt"`` (a phase-0 checkpoint written with
``cim_checkpoint`` by a run of the same learner, dataset, class order and backbone) the learner's
phase-0 training (``_init_train``) is replaced by loading that checkpoint's network and RNG
states. Everything after it is the run's own: it builds its own memory from the shared model
(plugin off: PyCIL's herding; on: its mask source's boxes and budget-consuming herding), and
trains every later phase as usual. What CIM would have learnt in phase 0 besides θ is trained on
top: for ``cim_mask: "pau"`` the PAU coefficients φ get the mask steps the phase would have had
(``CIMLearnerMixin.cim_first_phase_steps``: the phase's epochs × steps per epoch, with the inner
step size from the learner's own lr schedule, θ frozen). Not reproduced: the artefact augmentation
of phase-0 training images (it would change θ, which is shared on purpose).

The file is read as the run's own checkpoints are (checkpoint.py, format version 2): with
``torch.load(..., weights_only=True)`` for a learner with a network recipe (iCaRL, DER, FOSTER,
LUCIR); only the saved ``state_dict`` of ``_network`` (loaded with ``strict=True`` into the network
the learner built for phase 0) and the RNG states are used.

``cim_later_seed`` reseeds the generators before the second phase: runs that share a first phase
and differ only in this seed give the spread of the later phases that is chance alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..seeding import seed_everything
from . import net_skeleton
from .checkpoint import CheckpointError, decode, network_state, read_checkpoint, set_rng_states
from .nets import unwrap

log = logging.getLogger(__name__)

#: Keys that must agree between the checkpoint's run and this one for the network to fit.
SHARED_KEYS = ("model_name", "dataset", "init_cls", "increment", "convnet_type", "seed", "shuffle")


class FirstPhaseMixin:
    """Replaces phase-0 training by loading a shared phase-0 network (see module docstring)."""

    def _first_phase_setup(self, args: dict, path: str | None, later_seed: int | None = None) -> None:
        self._first_phase_from = None if path is None else Path(path).expanduser()
        self._first_phase_run = {k: args.get(k) for k in SHARED_KEYS}
        self._later_seed = later_seed

    def incremental_train(self, data_manager):
        if self._cur_task == -1:  # phase 0 is next: its classes, in the order that gives them their labels
            self._first_phase_classes = [int(c) for c in data_manager._class_order[:data_manager.get_task_size(0)]]
        if self._later_seed is not None and self._cur_task == 0:  # the second phase is next
            seed_everything(self._later_seed)
            log.info("cim-plugin: generators reseeded with cim_later_seed %d before the second phase", self._later_seed)
        return super().incremental_train(data_manager)

    def _init_train(self, train_loader, test_loader, optimizer, scheduler):
        if self._first_phase_from is None or self._cur_task != 0:
            return super()._init_train(train_loader, test_loader, optimizer, scheduler)
        self._first_phase_load(self._first_phase_from)
        steps = getattr(self, "cim_first_phase_steps", None)
        if callable(steps):
            steps(scheduler)
        return None

    def _first_phase_load(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"key 'cim_first_phase_from': no checkpoint file {path}")
        # read as this run's own checkpoints are: weights_only=True for a learner with a network recipe
        explicit = net_skeleton.recipe_for(self) is not None
        context = f"key 'cim_first_phase_from': cannot read {path} as a cim-plugin checkpoint"
        payload = read_checkpoint(path, self._device, explicit, context)
        try:
            saved_net = network_state(payload, "_network")
            run = decode(payload.get("run", {}))
            rng = decode(payload["rng"])
        except Exception as err:
            raise CheckpointError(f"{context}: {type(err).__name__}: {err}") from err
        problems = [f"key '{k}' was {run.get(k)!r} there, {v!r} here"
                    for k, v in self._first_phase_run.items() if k in run and run[k] != v]
        if payload.get("task") != 0:
            problems.append(f"it holds task {payload.get('task')}, not the first phase (task 0)")
        mine = getattr(self, "_first_phase_classes", None)
        theirs = payload.get("class_order")
        if mine is not None and theirs is not None and [int(c) for c in theirs[:len(mine)]] != mine:
            problems.append(f"its first classes (labels 0..{len(mine) - 1}) are {list(theirs[:len(mine)])}, here {mine} "
                            "(another class order: e.g. another number of classes shuffled with the same seed)")
        if problems:
            raise CheckpointError(f"key 'cim_first_phase_from': {path} belongs to another setting:\n"
                                  + "\n".join(f"  - {p}" for p in problems))
        try:
            unwrap(self._network).load_state_dict(saved_net, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"key 'cim_first_phase_from': the network in {path} does not fit this run's: {err}") from err
        set_rng_states(rng)
        log.info("cim-plugin: first phase loaded from %s (state sha256 %s): phase-0 training skipped",
                 path, payload.get("digest"))
