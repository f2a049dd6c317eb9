"""CheckpointMixin on a stand-in learner (no PyCIL needed): what is saved, resuming, refusals, the
explicit format (read with ``weights_only=True``) and the pickled fallback of learners without a recipe."""

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cim_plugin.config import CIMConfig, ConfigError
from cim_plugin.pycil import checkpoint as ckpt
from cim_plugin.pycil.checkpoint import CheckpointError, CheckpointMixin, checkpoint_dir
from cim_plugin.pycil.net_skeleton import NoRecipe


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
        self._old_network.requires_grad_(False).eval()
        self._known_classes = self._total_classes

    def cim_net_skeleton(self, name, task, totals):
        """The stand-in's network recipe (net_skeleton.py): every network is a Linear(3, 4)."""
        if name in ("_network", "_old_network"):
            return nn.Linear(3, 4)
        raise NoRecipe(name)


class Learner(CheckpointMixin, FakeLearner):
    pass


class PickledLearner(Learner):
    """A learner without a network recipe (another PyCIL learner, plugin off): the pickled fallback."""

    cim_net_skeleton = None


def make(tmp_path, resume, enabled=True, cls=None):
    learner = (cls or Learner)()
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
    saved = torch.load(folder / "task_1.pt", weights_only=True)
    assert saved["class_order"] == [2, 0, 1, 3] and saved["task"] == 1 and saved["class_totals"] == [2, 4]
    assert saved["version"] == 2 and saved["learner_encoding"] == "explicit"
    assert {"_network", "_old_network", "_cur_task", "_total_classes"} <= set(saved["learner"])
    assert not {"args", "data_manager", "test_loader", "_device", "_multiple_gpus", "_phase_batches"} & set(saved["learner"])
    assert saved["data_manager_attrs"] == ["data_manager"] and saved["test_loader"]["batch_size"] == 3
    net = saved["learner"]["_network"]
    assert net["__cim__"] == "module" and net["class"] == "Linear" and set(net["state_dict"]) == {"weight", "bias"}

    digest = torch.load(folder / "task_2.pt", weights_only=True)["digest"]
    (folder / "task_2.pt").unlink()  # killed during task 2
    dm = FakeDataManager()
    b = run(make(tmp_path, resume=True), dm)
    assert dm.trained == [2]  # tasks 0 and 1 restored, not trained
    assert torch.equal(a._network.weight, b._network.weight)  # RNG states restored: task 2 is the same
    assert torch.equal(a._old_network.weight, b._old_network.weight)
    assert b.data_manager is dm and b._cur_task == 2 and b._known_classes == 6
    assert torch.load(folder / "task_2.pt", weights_only=True)["digest"] == digest


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


# ------------------------------------------------------------------ the explicit format (version 2)


def saved_path(tmp_path, task):
    return checkpoint_dir({"logfilename": str(tmp_path / "run")}) / f"task_{task}.pt"


def test_restored_networks_keep_their_flags_and_references(tmp_path):
    a = make(tmp_path, resume=False)
    a._network_module_ptr = a._network  # DER's and FOSTER's pointer to the network
    run(a, FakeDataManager(), tasks=2)
    entry = torch.load(saved_path(tmp_path, 1), weights_only=True)["learner"]
    assert entry["_network_module_ptr"] == {"__cim__": "alias", "of": "_network", "data_parallel": False}
    assert entry["_old_network"]["flags"] == {"training": {"": False}, "requires_grad": {"weight": False, "bias": False}}

    b, dm = make(tmp_path, resume=True), FakeDataManager()
    b.incremental_train(dm)
    b.after_task()
    b.incremental_train(dm)  # task 1 restored; its old network is the one saved, not after_task's
    assert dm.trained == [] and b._network_module_ptr is b._network
    assert not b._old_network.training and not any(p.requires_grad for p in b._old_network.parameters())
    assert b._network.training and all(p.requires_grad for p in b._network.parameters())
    saved = torch.load(saved_path(tmp_path, 1), weights_only=True)["learner"]["_old_network"]["state_dict"]
    assert torch.equal(b._old_network.weight, saved["weight"])


class Arrays(FakeLearner):
    """Learner state of the kinds PyCIL keeps: exemplar images or file paths, targets, class means."""

    def incremental_train(self, data_manager):
        super().incremental_train(data_manager)
        rng = np.random.default_rng(self._cur_task)
        self._data_memory = rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
        self._path_memory = np.array([f"/data/train/n{i:08d}/img_{i}.JPEG" for i in range(3)])
        self._targets_memory = np.array([0, 0, 1, 1])
        self._class_means = rng.standard_normal((4, 3))
        self._empty = np.array([])
        self._mixed = {np.int64(3): (np.float32(0.5), b"\x00\xff", {1, 2}), "seen": [np.uint16(7), None, 2 + 1j]}
        self._weights = torch.arange(4.0)


class ArraysLearner(CheckpointMixin, Arrays):
    pass


def test_arrays_and_plain_values_round_trip_through_weights_only(tmp_path):
    a = make(tmp_path, resume=False, cls=ArraysLearner)
    run(a, FakeDataManager(), tasks=1)
    saved = torch.load(saved_path(tmp_path, 0), weights_only=True)
    images = saved["learner"]["_data_memory"]
    assert images["__cim__"] == "ndarray" and images["data"].dtype == torch.uint8 and images["data"].shape == (4, 5, 5, 3)
    assert saved["learner"]["_path_memory"]["items"][2] == "/data/train/n00000002/img_2.JPEG"

    b = make(tmp_path, resume=True, cls=ArraysLearner)
    b.incremental_train(FakeDataManager())
    for name in ("_data_memory", "_path_memory", "_targets_memory", "_class_means", "_empty"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    assert b._mixed == a._mixed and type(next(iter(b._mixed))) is np.int64
    assert type(b._mixed[np.int64(3)][0]) is np.float32 and type(b._mixed["seen"][0]) is np.uint16
    assert torch.equal(b._weights, a._weights)


def test_an_attribute_the_format_cannot_hold_is_an_error_naming_it_and_no_file_is_written(tmp_path):
    class Odd(FakeLearner):
        def incremental_train(self, data_manager):
            super().incremental_train(data_manager)
            self._sampler = random.Random(0)

    with pytest.raises(CheckpointError) as err:
        run(make(tmp_path, resume=False, cls=type("OddLearner", (CheckpointMixin, Odd), {})), FakeDataManager(), tasks=1)
    assert "learner attribute '_sampler' is a random.Random" in str(err.value)
    assert str(saved_path(tmp_path, 0)) in str(err.value) and not saved_path(tmp_path, 0).exists()


def test_a_recipe_that_does_not_fit_the_trained_network_stops_the_first_checkpoint(tmp_path):
    class Grown(FakeLearner):
        def incremental_train(self, data_manager):
            super().incremental_train(data_manager)
            self._network = nn.Linear(3, 5)  # grown otherwise than its recipe says

    with pytest.raises(CheckpointError) as err:
        run(make(tmp_path, resume=False, cls=type("GrownLearner", (CheckpointMixin, Grown), {})), FakeDataManager(), tasks=1)
    text = str(err.value)
    assert "rebuilds learner attribute '_network' of task 0 unlike the trained network" in text
    assert "weight 'weight': rebuilt (4, 3) torch.float32, saved (5, 3) torch.float32" in text
    assert "submodule '(top)': out_features rebuilt 4, saved 5" in text
    assert not saved_path(tmp_path, 0).exists()


def test_a_version_1_file_is_refused_saying_the_format_changed(tmp_path):
    run(make(tmp_path, resume=False), FakeDataManager(), tasks=1)
    path = saved_path(tmp_path, 0)
    old = torch.load(path, weights_only=True)
    old.update(version=1, learner={"_network": nn.Linear(3, 4), "_cur_task": 0})  # networks pickled as modules
    torch.save(old, path)
    with pytest.raises(CheckpointError) as err:
        make(tmp_path, resume=True).incremental_train(FakeDataManager())
    assert f"cannot resume from checkpoint {path}: it is in format version 1" in str(err.value)
    assert "does not read version 1" in str(err.value)


def test_a_file_with_pickled_objects_is_refused_by_a_learner_with_a_recipe(tmp_path):
    run(make(tmp_path, resume=False, cls=PickledLearner), FakeDataManager(), tasks=1)
    with pytest.raises(CheckpointError) as err:
        make(tmp_path, resume=True).incremental_train(FakeDataManager())
    assert "holds objects that torch.load(weights_only=True) refuses" in str(err.value)


def test_a_learner_without_a_recipe_falls_back_to_the_pickled_layout(tmp_path, caplog):
    dm = FakeDataManager()
    with caplog.at_level("WARNING"):
        a = run(make(tmp_path, resume=True, cls=PickledLearner), dm, tasks=2)
    assert "has no network recipe" in caplog.text and "weights_only=False" in caplog.text
    saved = torch.load(saved_path(tmp_path, 1), weights_only=False)
    assert saved["learner_encoding"] == "pickled" and isinstance(saved["learner"]["_network"], nn.Linear)
    with pytest.raises(Exception):
        torch.load(saved_path(tmp_path, 1), weights_only=True)
    saved_path(tmp_path, 1).unlink()
    dm = FakeDataManager()
    b = run(make(tmp_path, resume=True, cls=PickledLearner), dm, tasks=2)
    assert dm.trained == [1] and torch.equal(a._network.weight, b._network.weight)


def test_encode_refuses_what_weights_only_could_not_read_and_round_trips_the_rest():
    value = {"a": [1, 2.5, "x", None, True], 7: (np.arange(3, dtype=">i4"), np.datetime64("2024-01-02")),
             "obj": np.array(["p", None, 3], dtype=object), "dev": torch.device("cpu"), "dt": torch.float16,
             "fs": frozenset({"b", "a"}), "ba": bytearray(b"xy")}
    back = ckpt.decode(ckpt.encode(value))
    assert back["a"] == value["a"] and back["dev"] == value["dev"] and back["dt"] is torch.float16
    assert back[7][0].dtype == np.dtype(">i4") and np.array_equal(back[7][0], value[7][0]) and back[7][1] == value[7][1]
    assert back["obj"].tolist() == ["p", None, 3] and back["fs"] == value["fs"] and back["ba"] == value["ba"]
    with pytest.raises(CheckpointError, match=r"value\['bad'\]\[0\] is a pathlib"):
        ckpt.encode({"bad": [__import__("pathlib").Path("x")]})
    with pytest.raises(CheckpointError, match="object array holding a builtins.list"):
        ckpt.encode(np.array([[1], None], dtype=object))
