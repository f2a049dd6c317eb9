"""Starting from a shared first phase (``cim_first_phase_from``), without PyCIL: the phase-0
network is loaded instead of trained (from a checkpoint in the explicit format, read with
``weights_only=True``), a checkpoint of another setting is refused, and the CIM learner gives φ the
first phase's mask steps on top."""

import pytest
import torch

from torch import nn

from cim_plugin.pycil.checkpoint import FORMAT, MARK, VERSION, CheckpointError, encode, module_entry, rng_states
from cim_plugin.pycil.first_phase import FirstPhaseMixin

from fakes import TinyNet

ARGS = {"model_name": "icarl", "dataset": "synthetic", "init_cls": 5, "increment": 5, "convnet_type": "resnet18",
        "seed": 1993, "shuffle": True}


class Trainer:
    """PyCIL's learner as far as phase 0 goes: ``_init_train`` trains (here: records the call)."""

    def __init__(self):
        self._cur_task, self._device, self._network, self.trained = 0, "cpu", TinyNet(), []

    def _init_train(self, train_loader, test_loader, optimizer, scheduler):
        self.trained.append(self._cur_task)

    def incremental_train(self, data_manager):  # PyCIL's: the task counter, then (phase 0) _init_train
        self._cur_task += 1
        self._init_train(None, None, None, None)

    def cim_net_skeleton(self, name, task, totals):  # a network recipe: its files are read with weights_only=True
        return TinyNet()


class Learner(FirstPhaseMixin, Trainer):
    pass


def checkpoint(path, net, task=0, class_order=(3, 1, 0, 2, 4, 5, 6, 7, 8, 9), **run):
    """A checkpoint of ``task`` as checkpoint.py writes it (the parts the first phase reads)."""
    torch.save({"format": FORMAT, "version": VERSION, "learner_encoding": "explicit", "task": task,
                "run": encode({**ARGS, **run}), "learner": {"_network": {MARK: "module", **module_entry(net)}},
                "rng": encode(rng_states()), "digest": "x", "class_order": list(class_order)}, path)
    return path


def make(path=None, **args):
    learner = Learner()
    learner._first_phase_setup({**ARGS, **args}, None if path is None else str(path))
    return learner


def test_phase_zero_is_loaded_not_trained_and_later_phases_train(tmp_path):
    torch.manual_seed(0)
    shared = TinyNet()
    path = checkpoint(tmp_path / "task_0.pt", shared)
    learner = make(path)
    assert not torch.equal(learner._network.fc.weight, shared.fc.weight)
    learner._init_train(None, None, None, None)
    assert learner.trained == []
    for a, b in zip(learner._network.state_dict().values(), shared.state_dict().values()):
        assert torch.equal(a, b)
    learner._cur_task = 1
    learner._init_train(None, None, None, None)
    assert learner.trained == [1]


def test_without_the_key_phase_zero_trains():
    learner = make()
    learner._init_train(None, None, None, None)
    assert learner.trained == [0]


def test_a_checkpoint_of_another_setting_is_refused_naming_the_key(tmp_path):
    path = checkpoint(tmp_path / "task_0.pt", TinyNet(), init_cls=6)
    with pytest.raises(CheckpointError, match="key 'init_cls' was 6 there, 5 here"):
        make(path)._init_train(None, None, None, None)
    later = checkpoint(tmp_path / "task_1.pt", TinyNet(), task=1)
    with pytest.raises(CheckpointError, match="not the first phase"):
        make(later)._init_train(None, None, None, None)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        make(tmp_path / "missing.pt")._init_train(None, None, None, None)


def test_the_cim_learner_trains_phi_on_top(tmp_path):
    calls = []

    class WithSteps(Learner):
        def cim_first_phase_steps(self, scheduler):
            calls.append(scheduler)

    learner = WithSteps()
    learner._first_phase_setup(ARGS, str(checkpoint(tmp_path / "task_0.pt", TinyNet())))
    learner._init_train(None, None, None, "the phase's scheduler")
    assert calls == ["the phase's scheduler"] and learner.trained == []


def test_a_checkpoint_with_a_pickled_network_is_refused(tmp_path):
    path = tmp_path / "task_0.pt"
    torch.save({"format": FORMAT, "version": 1, "task": 0, "run": ARGS, "learner": {"_network": TinyNet()},
                "rng": rng_states()}, path)
    with pytest.raises(CheckpointError, match="it is in format version 1"):
        make(path)._init_train(None, None, None, None)


def test_a_network_that_does_not_fit_is_refused(tmp_path):
    class Wider(TinyNet):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)

    with pytest.raises(CheckpointError, match="does not fit this run's"):
        make(checkpoint(tmp_path / "task_0.pt", Wider()))._init_train(None, None, None, None)


def test_a_checkpoint_whose_first_classes_differ_is_refused(tmp_path):
    """Same seed, another number of classes: the shuffled order, and so the phase-0 classes, differ."""

    class Data:
        def __init__(self, order):
            self._class_order = list(order)

        def get_task_size(self, task):
            return 5

    path = checkpoint(tmp_path / "task_0.pt", TinyNet(), class_order=[3, 1, 0, 2, 4, 9, 8, 7, 6, 5, 10])
    learner = make(path)
    learner._cur_task = -1
    learner.incremental_train(Data([3, 1, 0, 2, 4, 5, 6, 7, 8, 9]))  # the same first five: later ones may differ
    assert learner.trained == []
    other = make(path)
    other._cur_task = -1
    with pytest.raises(CheckpointError, match=r"its first classes \(labels 0..4\) are \[3, 1, 0, 2, 4\], here \[3, 1, 0, 2, 5\]"):
        other.incremental_train(Data([3, 1, 0, 2, 5, 4, 6, 7, 8, 9]))
