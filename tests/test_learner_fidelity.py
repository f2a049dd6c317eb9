"""The adapter's choices checked against PyCIL and the official CIM code (no PyCIL needed):
FOSTER's class-balance count, BN in mask steps, the mask steps' data, φ's weight decay."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, TensorDataset

from cim_plugin.config import CIMConfig
from cim_plugin.core.memory import CompressedExemplarMemory, MemoryDataset
from cim_plugin.pycil.data import ArtefactAugmentedDataset, PluginDataManager
from cim_plugin.pycil.learner import CIMLearnerMixin
from cim_plugin.pycil.nets import trained_backbones_batch_statistics

from fakes import TinyNet


class BudgetBase:
    """PyCIL's BaseLearner/FOSTER view: per-class budget units, not the stored count."""

    _device = "cpu"
    args: dict = {}

    @property
    def samples_old_class(self):
        return 6


class Learner(CIMLearnerMixin, BudgetBase):
    pass


def make(**keys):
    learner = Learner()
    learner._network = TinyNet()
    learner._cur_task, learner._known_classes, learner._total_classes = 1, 1, 2
    learner.cim_setup(CIMConfig.from_args({"cim": True, "model_name": "foster", "cim_mask": "pau", **keys}))
    return learner


def memory_with(n):
    mem = CompressedExemplarMemory((8, 8, 3), 4.0)
    imgs = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    mem.add_class(0, imgs, np.array([[0, 4, 0, 4]] * n))
    return mem


def test_foster_samples_old_class_is_the_budget_not_the_compressed_count():
    learner = make()
    learner.cim.use_memory(memory_with(15))  # 15 compressed exemplars in a 6-unit budget
    assert learner.samples_old_class == 6


def test_foster_samples_old_class_can_count_the_stored_exemplars():
    learner = make(cim_foster_old_count="stored")
    assert learner.samples_old_class == 6  # no memory yet (first phase): the budget
    learner.cim.use_memory(memory_with(15))
    assert learner.samples_old_class == 15
    learner._known_classes = 3  # the mean over old classes
    assert learner.samples_old_class == 5


def test_stored_count_moves_fosters_weights_toward_balance():
    """FOSTER's effective-number weights (models/foster.py) with 150 new images per class: the stored
    count gives the old classes a smaller weight than the budget does."""
    def old_weight(old_count, beta=0.97, new=150):
        eff = 1.0 - np.power(beta, [old_count, new])
        w = (1.0 - beta) / eff
        return (w / w.sum() * 2)[0]
    budget, stored = make(), make(cim_foster_old_count="stored")
    for learner in (budget, stored):
        learner.cim.use_memory(memory_with(15))
    assert old_weight(stored.samples_old_class) < old_weight(budget.samples_old_class)


class TwoBackbones(nn.Module):
    """DER/FOSTER layout: ``convnets`` with a frozen old backbone and a trained new one."""

    def __init__(self):
        super().__init__()
        self.convnets = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)) for _ in range(2)])
        self.convnets[0].requires_grad_(False)


def test_mask_steps_keep_frozen_old_backbones_in_eval_mode():
    net = TwoBackbones().eval()
    old_bn, new_bn = net.convnets[0][1], net.convnets[1][1]
    with trained_backbones_batch_statistics(net):
        assert not old_bn.training and old_bn.track_running_stats
        assert new_bn.training and not new_bn.track_running_stats  # batch statistics, running stats kept
        before = new_bn.running_mean.clone()
        net.convnets[1](torch.randn(4, 3, 6, 6))
        assert torch.equal(new_bn.running_mean, before)
    assert not new_bn.training and new_bn.track_running_stats


def test_mask_step_batches_are_clean_new_class_images_plus_the_memory():
    learner = make()
    plain = TensorDataset(torch.zeros(5), torch.zeros(5))
    plain.trsf, plain.images, plain.labels, plain.use_path = None, np.zeros((5, 8, 8, 3), np.uint8), np.ones(5), False

    class DM:  # PyCIL's DataManager: its get_dataset gives the plain set
        use_path, _train_data, _train_targets, _common_trsf, _test_trsf = False, plain.images, np.ones(5), [], []

        def get_dataset(self, indices, source, mode, appendent=None, ret_data=False, m_rate=None):
            return plain

    dm = PluginDataManager(DM(), learner.cim.augmentation, 8, new_classes=[1])
    assert isinstance(dm.get_dataset([1], "train", "train"), ArtefactAugmentedDataset)  # what PyCIL trains on
    learner.cim.begin_phase(dm, np.array([1]))
    learner.cim.use_memory(memory_with(3))
    data = learner.cim.meta_set()
    assert isinstance(data, ConcatDataset) and len(data) == 8
    assert data.datasets[0] is plain and isinstance(data.datasets[1], MemoryDataset)


def with_plain_meta_set(learner):
    """The learner's mask steps drawing from 4 plain images of class 1, its CIL loss a no-op."""
    plain = TensorDataset(torch.arange(4), torch.rand(4, 3, 8, 8), torch.tensor([1, 1, 1, 1]))
    learner.cim.train_set, learner.cil_loss = plain, lambda *a: None
    learner.cim.meta_set = lambda: plain
    return learner


class Sched:
    """A scheduler's face for mask_steps: the CIL optimiser (lr 0.1) and a one-epoch stage."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    T_max = 1


def test_phi_adam_has_the_official_weight_decay(monkeypatch):
    from cim_plugin.core import branch_trainer

    monkeypatch.setattr(branch_trainer, "mask_step", lambda *a, **k: {})  # only the optimiser is checked
    learner = with_plain_meta_set(make(num_meta_iters_per_cls=1.0))
    learner.cim.mask_steps(Sched())
    assert learner.cim.trainer.optimizer.param_groups[0]["weight_decay"] == 5e-4
    assert CIMConfig.from_args({"phi_weight_decay": 0.0}).phi_weight_decay == 0.0


def test_first_phase_steps_give_phi_the_phase_epochs_of_mask_steps(monkeypatch):
    from cim_plugin.core import branch_trainer
    from cim_plugin.pycil import hparams

    lrs = []
    monkeypatch.setattr(branch_trainer, "mask_step", lambda net, theta, fn, loss, inner, outer, lr, *a: lrs.append(lr) or {})
    monkeypatch.setattr(hparams, "stage_epochs", lambda learner, scheduler: 3)
    learner = make(num_meta_iters_per_cls=2.0, lr_ratio=0.1)  # 1 new class x 2 = 2 steps per epoch
    learner._cur_task, learner._known_classes = 0, 0
    plain = TensorDataset(torch.arange(4), torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))
    learner.cim.train_set, learner.cil_loss = plain, lambda *a: None
    learner.cim.meta_set = lambda: plain
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    learner.args = {"init_epoch": 3}
    learner.cim_first_phase_steps(sched)
    # 3 epochs x 4 steps (2 classes x 2), inner step size = the learner's lr after each epoch x lr_ratio
    assert learner.cim.trainer.steps == 12
    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 8)


def test_a_fractional_mask_step_rate_is_carried_over_epochs_not_rounded_up(monkeypatch):
    """0.25 steps per epoch (one new class × 0.25) is one step after every 4th epoch of the phase;
    rounding it up to one step per epoch made the mask steps 4× as many as configured."""
    from cim_plugin.core import branch_trainer
    from cim_plugin.pycil import hparams

    calls = []
    monkeypatch.setattr(branch_trainer, "mask_step", lambda *a: calls.append(1) or {})
    monkeypatch.setattr(hparams, "stage_epochs", lambda learner, scheduler: 8)
    learner = with_plain_meta_set(make(num_meta_iters_per_cls=0.25))
    per_epoch = []
    for _ in range(8):
        before = len(calls)
        learner.cim.mask_steps(Sched())
        per_epoch.append(len(calls) - before)
    assert per_epoch == [0, 0, 0, 1, 0, 0, 0, 1]
    assert learner.cim.trainer.optimizer.param_groups[0]["initial_lr"] == learner.cim.trainer.phi_lr
    # the cosine schedule spans the phase's 2 steps, not 8 (one per epoch)
    assert learner.cim.trainer._stage["scheduler"].T_max == 2


def test_branch_trainer_steps_due_adds_fractions_and_resets_per_phase():
    from cim_plugin.core.bilevel import BilevelSettings
    from cim_plugin.core.branch_trainer import BranchTrainer

    t = BranchTrainer(BilevelSettings(factor=2), phi_lr=0.01, phi_weight_decay=0.0, train_old=False)
    assert [t.steps_due(2.5) for _ in range(4)] == [2, 3, 2, 3]
    t.begin_phase()
    assert [t.steps_due(0.4) for _ in range(5)] == [0, 0, 1, 0, 1]
    t.begin_phase()
    assert [t.steps_due(0.0) for _ in range(3)] == [0, 0, 0]
    assert [t.steps_due(1.0) for _ in range(3)] == [1, 1, 1]
