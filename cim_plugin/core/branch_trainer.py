"""The CIM branch and the training of its PAU coefficients φ (method.md §2–3), PyCIL-free.

``BranchTrainer`` owns the ``PAUBranch`` over the CIL network's backbones (conv/BN weights shared,
ReLUs replaced by PAUs), φ's Adam optimiser and cosine schedule for one training stage, the endless
iterator of mask-step batches and the step count. The caller says when to step and hands in what
belongs to the network: the trained parameter names θ, the branch's forward, the learner's CIL
loss, the batches and the inner step size.

Life cycle: ``begin_phase`` at the start of every incremental phase (a new stage: optimiser,
schedule and batches are made at the first step); ``sync`` before every use (the backbones of DER
and FOSTER change between phases, FOSTER's student takes index 0); ``state_dict`` /
``load_state_dict`` carry φ in checkpoints (written at the end of a phase). The optimiser's state
is not carried: it is made anew at the first step of every phase. With several processes
(``reduce_grads``), φ's gradients are averaged over them before each step.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .bilevel import BilevelSettings, BranchFn, CILLoss, mask_step
from .branch import PAUBranch

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def _whole(x: float) -> int:
    """``floor(x)``, forgiving float round-off just below a whole number (0.1 × 5 × 2 = 0.999...)."""
    return int(x + 1e-9)


class BranchTrainer:
    def __init__(self, settings: BilevelSettings, phi_lr: float, phi_weight_decay: float, train_old: bool,
                 reduce_grads: Callable[[list[torch.Tensor]], None] | None = None,
                 pau_options: dict | None = None):
        self.settings = settings
        self.pau_options = dict(pau_options or {})  # PAUBranch options of a new branch (e.g. init_range)
        self.reduce_grads = reduce_grads  # several processes: φ's gradients averaged over them (mask_step)
        self.phi_lr = float(phi_lr)
        self.phi_weight_decay = float(phi_weight_decay)
        self.train_old = bool(train_old)
        self.branch: PAUBranch | None = None
        self._stage: dict | None = None
        self._synced = False
        self._carry = 0.0  # the fraction of a mask step owed from earlier epochs of this phase

    @property
    def active(self) -> bool:
        """Whether φ is trained at all (``cim_bilevel`` is not "none")."""
        return self.settings.mode != "none"

    @property
    def steps(self) -> int:
        """Mask steps taken in the current stage."""
        return 0 if self._stage is None else self._stage["steps"]

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return None if self._stage is None else self._stage["optimizer"]

    def begin_phase(self) -> None:
        self._stage, self._synced, self._carry = None, False, 0.0

    def steps_due(self, per_epoch: float) -> int:
        """Mask steps to take after this epoch when ``per_epoch`` are due per epoch on average:
        the fractions add up over the phase's epochs (0.25: one step after every 4th epoch; 2.5:
        2, 3, 2, 3, ...), so a rate below one step per epoch is not rounded up to one."""
        due = self._carry + max(0.0, float(per_epoch))
        steps = _whole(due)
        self._carry = max(0.0, due - steps)
        return steps

    @staticmethod
    def stage_steps(per_epoch: float, epochs: int) -> int:
        """The steps ``steps_due`` gives over a stage of ``epochs`` epochs (at least 1: the length
        of φ's cosine schedule)."""
        return max(1, _whole(max(0.0, float(per_epoch)) * epochs))

    def sync(self, backbones: Sequence[nn.Module], device: torch.device | str) -> PAUBranch:
        """The branch over ``backbones``: grown by PAUs for new ones, rebound when they changed
        (the first call of a phase always re-syncs); a change starts a new stage."""
        if self.branch is None:
            self.branch = PAUBranch(list(backbones), **self.pau_options)
        branch = self.branch
        changed = len(branch.backbones) != len(backbones) or any(a is not b for a, b in zip(branch.backbones, backbones))
        if changed or not self._synced:
            self._synced = True
            branch.sync(list(backbones), train_old=self.train_old)
            branch.to(device)
            self._stage = None
        return branch

    def attach(self, backbones: Sequence[nn.Module]) -> None:
        """Bind a restored branch (saved without its backbones) to the network's backbones."""
        if self.branch is not None:
            try:
                self.branch.attach(list(backbones))
            except ValueError:  # another backbone list (FOSTER's student): the next sync rebinds it
                pass

    def train(self, net: nn.Module, theta: Sequence[str], branch_fn: BranchFn, cil_loss: CILLoss,
              batches: Callable[[], Iterator[Batch]], iters: int, stage_steps: int, inner_lr: float) -> tuple[dict, int]:
        """``iters`` φ updates (the branch must be synced); ``batches`` makes the stage's endless
        batch iterator, ``stage_steps`` the stage's total steps (cosine schedule length). Returns
        the last step's loss parts and how many steps were skipped (non-finite loss or gradient)."""
        phi = self.branch.trainable_parameters() if self.branch is not None else []
        if not phi:
            return {}, 0
        if self._stage is None:
            optimizer = torch.optim.Adam(phi, lr=self.phi_lr, weight_decay=self.phi_weight_decay)
            self._stage = {
                "optimizer": optimizer,
                "scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, stage_steps)),
                "batches": batches(),
                "steps": 0,
            }
        stage, parts, skipped = self._stage, {}, 0
        for _ in range(iters):
            inner, outer = next(stage["batches"]), next(stage["batches"])
            before = [p.detach().clone() for p in phi]
            parts = mask_step(net, theta, branch_fn, cil_loss, inner, outer, inner_lr, phi, stage["optimizer"], self.settings,
                              self.reduce_grads)
            stage["scheduler"].step()
            stage["steps"] += 1
            if parts.get("skipped", 0):
                skipped += parts["skipped"]
                # the step kept φ, but a non-finite loss can come from φ itself (an earlier update that
                # made the branch overflow): back to φ before the last applied update, Adam's moments reset
                if stage.get("last_good") is not None:
                    with torch.no_grad():
                        for p, good in zip(phi, stage["last_good"]):
                            p.copy_(good)
                    stage["optimizer"].state.clear()
                    stage["last_good"] = None
                    parts["rolled_back"] = 1
            else:
                stage["last_good"] = before
        return parts, skipped

    def state_dict(self) -> dict:
        """φ: the branch itself (its PAU sets and their coefficients; it pickles without the
        backbones it is bound to), or None before the first phase."""
        return {"branch": self.branch}

    def load_state_dict(self, state: dict, backbones: Sequence[nn.Module]) -> None:
        """Restore φ and bind it to ``backbones`` when they fit (else the next ``sync`` rebinds it)."""
        branch = state.get("branch")
        if branch is not None and not isinstance(branch, PAUBranch):
            raise ValueError(f"saved φ is a {type(branch).__name__}, not a PAUBranch")
        self.branch, self._stage, self._synced = branch, None, False
        self.attach(backbones)
