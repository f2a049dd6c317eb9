"""PyCIL's learners under torchrun: DistributedDataParallel at PyCIL's seams (``cim_plugin/distributed.py``).

``torchrun --nproc_per_node N main.py --config X.json`` starts N copies of PyCIL's trainer. The
plugin (``hook.before_run``) joins them into one process group and gives each its device;
``DistributedMixin``, composed in front of the learner (plugin on or off), then changes only:

- the training stages (``_init_train``, ``_update_representation``, FOSTER's ``_feature_boosting``
  and ``_feature_compression``): the stage's train loader is replaced by one over the same dataset
  in which each rank reads its share of every epoch's global shuffle, and the trained network is
  wrapped in DDP for the stage (FOSTER's student ``_snet``, made inside ``_feature_compression``,
  through ``ddp_hook.train_parallel``: patches/0008-distributed.patch). After the stage every
  rank holds rank 0's parameters and buffers (BN statistics of the last batch differ otherwise;
  parameters that differ, which DDP should never let happen, are named in a warning);
- the memory (``build_rehearsal_memory``): built once, on rank 0 (plugin off: PyCIL's herding;
  on: boxes and budget-consuming herding), and sent to every rank with the NME class means and
  rank 0's RNG states. Every rank logs the sha256 of the memory it holds; differing digests stop
  the run. φ (plugin on, pau) is compared (and copied from rank 0) there too;
- after each CIL epoch (plugin on), before the mask steps and box refreshes: rank 0's BN buffers.

Evaluation runs on every rank over the whole test set, with the same network: each rank computes
the accuracy one process would. Only rank 0 writes the log file, results, checkpoints and gallery.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from torch import nn

from .. import distributed
from ..config import SUPPORTED_LEARNERS
from ..seeding import rng_states, set_rng_states
from .nets import unwrap

log = logging.getLogger("cim_plugin.distributed")

#: Learners whose training stages the mixin knows (the others' loops were never checked under DDP).
DDP_LEARNERS = SUPPORTED_LEARNERS
#: Learners whose loss gives every trained parameter a gradient at every step (checked): DDP need
#: not look for unused ones. The others (FOSTER's heads the student's loss does not read, LUCIR's
#: split cosine classifier) need ``find_unused_parameters``.
EVERY_PARAMETER_USED = frozenset({"icarl"})


def ddp_problems(args: dict) -> list[str]:
    """What cannot run under torchrun (nothing when the process was not started by it)."""
    if not distributed.launched():
        return []
    problems = []
    name = str(args.get("model_name", "")).lower()
    if name not in DDP_LEARNERS:
        problems.append(f"key 'model_name' = {args.get('model_name')!r}: under torchrun (several processes, DDP) "
                        f"only {', '.join(DDP_LEARNERS)} are supported; run it as one process (python main.py)")
    try:
        distributed.env_ranks()
    except distributed.DistributedError as err:
        problems.append(f"torchrun: {err}")
    devices = [str(d).strip().lower() for d in args.get("device", [])]
    kinds = {d in ("-1", "cpu") for d in devices}
    if len(kinds) > 1:
        problems.append(f"key 'device' = {args.get('device')!r}: under torchrun either CPUs (\"-1\": gloo) or GPUs "
                        "(one per process, cuda:LOCAL_RANK: nccl), not both")
    return problems


def start(args: dict) -> None:
    """Join the process group; the rank's one device replaces the JSON's list (no DataParallel)."""
    devices = [str(d).strip().lower() for d in args.get("device", [])]
    use_cuda = any(d not in ("-1", "cpu") for d in devices)
    device = distributed.setup(use_cuda)
    args["device"] = [device]


class DistributedMixin:
    """Several processes, one model and one memory (see module docstring)."""

    # -- training stages -----------------------------------------------------------------------
    def _ddp_stage(self, stage, train_loader, *rest):
        """Run a training stage of the learner with its network in DDP and a sharded loader."""
        loader = distributed.sharded_loader(train_loader, distributed.shard_seed())
        self._ddp_trained = [self._network]
        self._network = self.ddp_wrap(self._network)
        return self._ddp_run(stage, loader, *rest)

    def _ddp_run(self, stage, *args):
        try:
            out = stage(*args)
        except BaseException:  # no collective here: the other ranks are stopped by torchrun, not waited for
            self._ddp_unwrap(sync=False)
            raise
        self._ddp_unwrap()
        return out

    def ddp_wrap(self, network: nn.Module) -> nn.Module:
        """``network`` in DDP for the current stage (``ddp_hook.train_parallel`` for FOSTER's student)."""
        trained = getattr(self, "_ddp_trained", None)
        if trained is not None and network not in trained:
            trained.append(network)
        find_unused = str(self.args.get("model_name", "")).lower() not in EVERY_PARAMETER_USED
        return distributed.wrap_ddp(network, self._device, find_unused)

    def _ddp_unwrap(self, sync: bool = True) -> None:
        """Every attribute that holds a DDP wrapper gets its module back (DER's ``_network_module_ptr``
        too); with ``sync``, the trained networks get rank 0's parameters and buffers."""
        for name, value in list(vars(self).items()):
            if isinstance(value, nn.parallel.DistributedDataParallel):
                setattr(self, name, value.module)
        trained, self._ddp_trained = getattr(self, "_ddp_trained", None) or [], None
        for net in trained if sync else []:
            distributed.ensure_same(net, f"task {self._cur_task}: the trained network {type(net).__name__}")

    def _init_train(self, train_loader, test_loader, optimizer, scheduler):
        return self._ddp_stage(super()._init_train, train_loader, test_loader, optimizer, scheduler)

    def _update_representation(self, train_loader, test_loader, optimizer, scheduler):
        return self._ddp_stage(super()._update_representation, train_loader, test_loader, optimizer, scheduler)

    def _feature_boosting(self, train_loader, test_loader, optimizer, scheduler):
        return self._ddp_stage(super()._feature_boosting, train_loader, test_loader, optimizer, scheduler)

    def _feature_compression(self, train_loader, test_loader):
        """FOSTER's student stage: the teacher (``_network``) is not trained, the student is wrapped
        where it is made (``ddp_hook.train_parallel``)."""
        loader = distributed.sharded_loader(train_loader, distributed.shard_seed())
        self._ddp_trained = []
        return self._ddp_run(super()._feature_compression, loader, test_loader)

    def cim_on_epoch_end(self, epoch: int, scheduler: Any = None) -> None:
        """Plugin on: rank 0's BN buffers before the mask steps and box refreshes (each rank's last
        training batch moved its own)."""
        distributed.sync_module(unwrap(self._network), buffers_only=True)
        return super().cim_on_epoch_end(epoch, scheduler)

    # -- one memory ----------------------------------------------------------------------------
    def build_rehearsal_memory(self, data_manager, per_class):
        if distributed.is_main():
            super().build_rehearsal_memory(data_manager, per_class)
        state = distributed.broadcast_object(self._ddp_memory_state() if distributed.is_main() else None)
        if not distributed.is_main():
            self._ddp_load_memory_state(state)
        self._ddp_check_memory()

    def _ddp_memory_state(self) -> dict:
        parts = getattr(self, "cim", None)
        state = {"class_means": getattr(self, "_class_means", None), "rng": rng_states()}
        if parts is not None:
            state["cim"] = parts.memory_state_dict()
        else:
            state["plain"] = {"data": self._data_memory, "targets": self._targets_memory}
        return state

    def _ddp_load_memory_state(self, state: dict) -> None:
        if "cim" in state:
            self.cim.load_memory_state_dict(state["cim"])
        else:
            self._data_memory, self._targets_memory = state["plain"]["data"], state["plain"]["targets"]
        if state["class_means"] is not None:
            self._class_means = state["class_means"]
        elif hasattr(self, "_class_means"):
            del self._class_means
        set_rng_states(state["rng"])

    def ddp_memory_digest(self) -> str:
        """sha256 of the memory this rank holds (the stored arrays) and of the NME class means."""
        from .checkpoint import state_digest

        parts = getattr(self, "cim", None)
        if parts is not None:
            memory = None if parts.memory is None else parts.memory.state_dict()
        else:
            memory = {"data": np.asarray(self._data_memory), "targets": np.asarray(self._targets_memory)}
        return state_digest({"memory": memory, "class_means": getattr(self, "_class_means", None)})

    def _ddp_check_memory(self) -> None:
        trainer = getattr(getattr(self, "cim", None), "trainer", None)
        if trainer is not None and trainer.branch is not None:  # φ: each rank stepped it with the averaged gradients
            distributed.ensure_same(trainer.branch, f"task {self._cur_task}: φ (the PAU coefficients)")
        digest = self.ddp_memory_digest()
        figures = self._results_memory() if callable(getattr(self, "_results_memory", None)) else {}
        log.info("cim-plugin DDP: task %d memory sha256 %s on rank %d of %d (%s exemplars, %s/%s bytes)",
                 self._cur_task, digest, distributed.rank(), distributed.world_size(), figures.get("exemplars", "?"),
                 figures.get("bytes_used", "?"), figures.get("budget_bytes", "?"), extra=distributed.for_every_rank())
        digests = distributed.all_gather_object(digest)
        if len(set(digests)) > 1:
            raise distributed.DistributedError(f"task {self._cur_task}: the ranks hold different memories "
                                               f"(sha256 by rank: {digests})")
