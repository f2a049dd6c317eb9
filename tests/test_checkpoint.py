"""CheckpointMixin on a stand-in learner (no PyCIL needed): what is saved, resuming, refusals."""

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cim_plugin.config import CIMConfig, ConfigError
from cim_plugin.pycil.checkpoint import CheckpointError, CheckpointMixin, checkpoint_dir


class FakeDataManager:
    def __init__(self, order=(2, 0, 1, 3)):
        self._class_order = list(order)
        self.trained = []  # tasks the learner really trained (the data manager is never saved)

    def get_task_size(self, task):
        return 2

    def get_dataset(self, indices, source, mode, appendent=None):
        n = 4 * len(indices)
        return TensorDataset(torch.arange(n), torch.zeros(n, 3), torch.zeros(n, dtype=torch.long))


class FakeLearner:
    """The parts of a PyCIL learner the checkpoint path touches; training draws from every RNG."""

    def __init__(self):
        self.args, self._device, self._multiple_gpus = {}, torch.device("cpu"), [torch.device("cpu")]
        self._cur_task, self._known_classes, self._total_classes = -1, 0, 0
        torch.manual_seed(1)
        self._network = nn.Linear(3, 4)
        self._old_network = None

    def incremental_train(self, data_manager):
        self.data_manager = data_manager
        self._cur_task += 1
        self._total_classes = self._known_classes + data_manager.get_task_size(self._cur_task)
        self.test_loader = DataLoader(data_manager.get_dataset(np.arange(self._total_classes), "test", "test"), batch_size=3)
        self._phase_batches = (x for x in range(3))  # a generator: never saved
        with torch.no_grad():
            self._network.weight.add_(torch.randn(4, 3) + float(np.random.rand()) + random.random())
        data_manager.trained.append(self._cur_task)

    def after_task(self):
        self._old_network = nn.Linear(3, 4)
        self._old_network.load_state_dict(self._network.state_dict())
        self._known_classes = self._total_classes


class Learner(CheckpointMixin, FakeLearner):
    pass


def make(tmp_path, resume, enabled=True):
    learner = Learner()
    learner._ckpt_setup({"logfilename": str(tmp_path / "run"), "model_name": "icarl", "seed": 1993}, enabled, resume)
    return learner


def run(learner, dm, tasks=3):
    torch.manual_seed(1), np.random.seed(0), random.seed(0)
    for _ in range(tasks):
        learner.incremental_train(dm)
        learner.after_task()
    return learner


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    dm = FakeDataManager()
    a = run(make(tmp_path, resume=True), dm)
    folder = checkpoint_dir({"logfilename": str(tmp_path / "run")})
    assert sorted(p.name for p in folder.iterdir()) == ["task_0.pt", "task_1.pt", "task_2.pt"]
    saved = torch.load(folder / "task_1.pt", weights_only=False)
    assert saved["class_order"] == [2, 0, 1, 3] and saved["task"] == 1
    assert {"_network", "_old_network", "_cur_task", "_total_classes"} <= set(saved["learner"])
    assert not {"args", "data_manager", "test_loader", "_device", "_multiple_gpus", "_phase_batches"} & set(saved["learner"])
    assert saved["data_manager_attrs"] == ["data_manager"] and saved["test_loader"]["batch_size"] == 3

    digest = torch.load(folder / "task_2.pt", weights_only=False)["digest"]
    (folder / "task_2.pt").unlink()  # killed during task 2
    dm = FakeDataManager()
    b = run(make(tmp_path, resume=True), dm)
    assert dm.trained == [2]  # tasks 0 and 1 restored, not trained
    assert torch.equal(a._network.weight, b._network.weight)  # RNG states restored: task 2 is the same
    assert torch.equal(a._old_network.weight, b._old_network.weight)
    assert b.data_manager is dm and b._cur_task == 2 and b._known_classes == 6
    assert torch.load(folder / "task_2.pt", weights_only=False)["digest"] == digest


def test_restored_phase_gets_a_test_loader_and_the_data_manager(tmp_path):
    run(make(tmp_path, resume=False), FakeDataManager(), tasks=1)
    b, dm = make(tmp_path, resume=True), FakeDataManager()
    b.incremental_train(dm)
    assert dm.trained == [] and b.data_manager is dm
    assert b.test_loader.batch_size == 3 and len(b.test_loader.dataset) == 8


def test_checkpoints_are_off_unless_asked_for(tmp_path):
    run(make(tmp_path, resume=False, enabled=False), FakeDataManager(), tasks=1)
    assert not checkpoint_dir({"logfilename": str(tmp_path / "run")}).exists()


def test_once_a_phase_is_trained_later_files_are_not_restored(tmp_path):
    run(make(tmp_path, resume=True), FakeDataManager())
    folder = checkpoint_dir({"logfilename": str(tmp_path / "run")})
    (folder / "task_1.pt").unlink()
    stale = (folder / "task_2.pt").stat().st_mtime_ns
    dm = FakeDataManager()
    run(make(tmp_path, resume=True), dm)
    assert dm.trained == [1, 2] and (folder / "task_2.pt").stat().st_mtime_ns != stale


def test_another_class_order_is_refused_naming_the_file(tmp_path):
    run(make(tmp_path, resume=True), FakeDataManager(), tasks=1)
    b, dm = make(tmp_path, resume=True), FakeDataManager(order=(0, 1, 2, 3))
    with pytest.raises(CheckpointError) as err:
        b.incremental_train(dm)
    assert str(checkpoint_dir({"logfilename": str(tmp_path / "run")}) / "task_0.pt") in str(err.value)
    assert "class order" in str(err.value) and dm.trained == [] and b._cur_task == -1


def test_other_run_keys_are_refused(tmp_path):
    run(make(tmp_path, resume=True), FakeDataManager(), tasks=1)
    b = Learner()
    b._ckpt_setup({"logfilename": str(tmp_path / "run"), "model_name": "icarl", "seed": 7}, True, True)
    with pytest.raises(CheckpointError, match="key 'seed' was 1993, this run has 7"):
        b.incremental_train(FakeDataManager())


def test_truncated_checkpoint_is_refused_and_left_as_it_is(tmp_path):
    run(make(tmp_path, resume=True), FakeDataManager(), tasks=2)
    path = checkpoint_dir({"logfilename": str(tmp_path / "run")}) / "task_1.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    dm = FakeDataManager()
    with pytest.raises(CheckpointError) as err:
        run(make(tmp_path, resume=True), dm, tasks=2)
    assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value)
    assert path.read_bytes() == data[: len(data) // 2] and dm.trained == []


def test_a_half_written_file_of_a_killed_run_is_cleaned_up(tmp_path):
    folder = checkpoint_dir({"logfilename": str(tmp_path / "run")})
    folder.mkdir()
    (folder / ".task_0.pt.abc123.tmp").write_bytes(b"half")
    run(make(tmp_path, resume=True), FakeDataManager(), tasks=1)
    assert sorted(p.name for p in folder.iterdir()) == ["task_0.pt"]


def test_keys_are_validated_and_checkpoint_follows_resume():
    assert CIMConfig.from_args({}).cim_checkpoint is False
    assert CIMConfig.from_args({"cim_resume": True}).cim_checkpoint is True
    assert CIMConfig.from_args({"cim_checkpoint": True}).cim_resume is False
    with pytest.raises(ConfigError, match="'cim_resume' = 'yes': must be true or false"):
        CIMConfig.from_args({"cim_resume": "yes"})
    with pytest.raises(ConfigError, match="needs the per-phase checkpoints"):
        CIMConfig.from_args({"cim_resume": True, "cim_checkpoint": False})
