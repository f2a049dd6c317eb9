"""The network recipes (net_skeleton.py) and the explicit checkpoint format against PyCIL's own
learners, run in this process on a tiny setting (3 phases: 5, 2 and 2 classes; resnet32 at 32 px,
one epoch per stage): iCaRL, DER, FOSTER and the plugin's LUCIR, plugin off, and DER with the
plugin on ("cam" masks: the compressed memory in the plugin's state).

- after every phase, each network the learner holds (``_network``, ``_old_network``, FOSTER's
  ``_snet``) rebuilt by its recipe has the trained network's state_dict keys, shapes and dtypes,
  submodule classes and plain attributes; aliases (``_network_module_ptr``) are the network itself;
- every checkpoint loads with ``torch.load(path, weights_only=True)``;
- resumed with the last file deleted, the restored phases have the trained state (same digest,
  recomputed from the restored learner) and the retrained last phase ends with the digest of the
  uninterrupted run (bit-identical networks, memory and class means).

Needs a PyCIL checkout (conftest's ``patched_pycil``: a patched clone); its modules are imported
from the clone and removed from ``sys.modules`` afterwards.
"""

import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cim_plugin.pycil import checkpoint as ckpt
from cim_plugin.pycil import net_skeleton
from cim_plugin.pycil.nets import unwrap
from cim_plugin.seeding import isolated_rng
from pycil_checkout import require_pycil_root

PYCIL_ROOT = require_pycil_root()

pytestmark = pytest.mark.pycil

PYCIL_PACKAGES = ("models", "utils", "convs")
BASE = {"dataset": "synthetic", "synthetic_num_classes": 9, "synthetic_image_size": 32, "synthetic_train_per_class": 4,
        "synthetic_test_per_class": 2, "init_cls": 5, "increment": 2, "shuffle": True, "seed": 1993, "memory_size": 18,
        "fixed_memory": False, "num_workers": 0, "batch_size": 8, "convnet_type": "resnet32", "cim_checkpoint": True}
SCHEDULE = {"init_epoch": 1, "epochs": 1, "init_lr": 0.01, "lrate": 0.01}
LEARNERS = {
    "icarl": {"model_name": "icarl", **SCHEDULE},
    "der": {"model_name": "der", **SCHEDULE},
    "foster": {"model_name": "foster", "beta1": 0.97, "beta2": 0.97, "oofc": "ft", "is_teacher_wa": False,
               "is_student_wa": False, "lambda_okd": 1, "wa_value": 1, "init_epochs": 1, "init_lr": 0.01,
               "init_weight_decay": 5e-4, "boosting_epochs": 1, "compression_epochs": 1, "lr": 0.01,
               "weight_decay": 5e-4, "T": 2},
    "lucir": {"model_name": "lucir", **SCHEDULE, "convnet_type": "cosine_resnet32"},
    "der-cim": {"model_name": "der", **SCHEDULE, "cim": True, "cim_mask": "cam", "cam_update_interval": 1},
}


@pytest.fixture(scope="module")
def pycil(patched_pycil, tmp_path_factory):
    """PyCIL's DataManager and factory, imported from the patched clone (removed again afterwards)."""
    sys.path.insert(0, str(patched_pycil))
    try:
        from utils import factory
        from utils.data_manager import DataManager

        yield SimpleNamespace(DataManager=DataManager, factory=factory, cache=tmp_path_factory.mktemp("synthetic"))
    finally:
        sys.path.remove(str(patched_pycil))
        for name in list(sys.modules):
            if name.split(".")[0] in PYCIL_PACKAGES or name == "cim_plugin.pycil.lucir":
                del sys.modules[name]


def run(pycil, args: dict, after_phase) -> None:
    """PyCIL's trainer loop (trainer._train) without the curves: before_run (seeds the generators),
    the data manager, the learner wrapped by the plugin, then per task incremental_train, eval_task
    and after_task; ``after_phase(learner, data_manager, task)`` runs after incremental_train."""
    from cim_plugin.pycil import hook

    args = dict(args)
    hook.before_run(args)
    dm = pycil.DataManager(args["dataset"], args["shuffle"], args["seed"], args["init_cls"], args["increment"])
    learner = hook.wrap_learner(pycil.factory.get_model(args["model_name"], args), args)
    for task in range(dm.nb_tasks):
        learner.incremental_train(dm)
        after_phase(learner, dm, task)
        learner.eval_task()
        learner.after_task()
    hook.after_run(learner, args)


def resume_after_losing_last_file(pycil, args: dict, check_saved) -> int:
    """Runs ``args`` (with ``cim_checkpoint``) calling ``check_saved(plugin_state, task)`` on each saved
    phase, deletes the last phase's file (what a run killed in its last phase leaves), resumes, and
    asserts the resumed run loaded phase 0 and retrained phase 1 to the same state digest. Returns the
    size of the memory restored from phase 0."""
    import torch
    from cim_plugin.pycil import checkpoint as ckpt

    folder = ckpt.checkpoint_dir(args)
    digests = {}

    def trained(model, dm, task):
        saved = torch.load(folder / f"task_{task}.pt", weights_only=True)  # the file reads without unpickling
        digests[task] = saved["digest"]
        check_saved(ckpt.decode(saved["plugin"]), task)

    run(pycil, args, trained)
    (folder / "task_1.pt").unlink()
    restored = {}

    def resumed(model, dm, task):
        if task == 0:
            assert model._ckpt_resuming and model._ckpt_payload(dm)["digest"] == digests[0]
            restored["memory"] = len(model.cim.memory)
        restored[task] = True

    run(pycil, {**args, "cim_resume": True}, resumed)
    assert restored.keys() == {"memory", 0, 1}
    assert torch.load(folder / "task_1.pt", weights_only=True)["digest"] == digests[1]  # retrained: bit-identical
    return restored["memory"]


def networks(learner) -> dict[str, nn.Module]:
    return {name: v for name, v in vars(learner).items() if isinstance(v, nn.Module)}


def check_recipe(learner, dm, task) -> set[str]:
    """Every network of the trained learner against its recipe's rebuild; returns the names checked."""
    nets = networks(learner)
    owners = {id(unwrap(nets[n])): n for n in reversed(net_skeleton.OWNERS) if n in nets}
    checked = set()
    for name, net in nets.items():
        net = unwrap(net)
        if owners.get(id(net), name) != name:  # another attribute's network (``_network_module_ptr``)
            assert name.endswith("_module_ptr"), name
            continue
        with isolated_rng():  # building draws random weights: the run must go on as without the check
            skeleton = ckpt.rebuild(learner, name, task, ckpt.class_totals(dm, task))
        assert type(skeleton) is type(net)
        assert net_skeleton.mismatches(skeleton, net.state_dict(), net_skeleton.structure(net), net_skeleton.flags(net)) == []
        assert [(k, v.shape, v.dtype) for k, v in skeleton.state_dict().items()] == \
               [(k, v.shape, v.dtype) for k, v in net.state_dict().items()]
        checked.add(name)
    return checked


@pytest.mark.parametrize("learner", list(LEARNERS))
def test_recipes_rebuild_every_network_and_resume_is_bit_exact(pycil, tmp_path, learner, one_thread):
    args = {**BASE, **LEARNERS[learner], "data_root": str(pycil.cache), "prefix": learner,
            "device": [torch.device("cpu")], "logfilename": str(tmp_path / "logs" / f"{learner}_1993")}
    folder = ckpt.checkpoint_dir(args)
    digests, checked = {}, {}

    def trained(model, dm, task):
        checked[task] = check_recipe(model, dm, task)
        saved = torch.load(folder / f"task_{task}.pt", weights_only=True)  # the file reads without unpickling
        assert saved["learner_encoding"] == "explicit" and saved["class_totals"] == ckpt.class_totals(dm, task)
        digests[task] = saved["digest"]

    run(pycil, args, trained)
    fresh = pycil.factory.get_model(args["model_name"], args)  # what a tool outside a run reads a network with
    net = ckpt.network_from_checkpoint(folder / "task_1.pt", fresh)
    saved = torch.load(folder / "task_1.pt", weights_only=True)["learner"]["_network"]["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items()) and set(net.state_dict()) == set(saved)
    assert checked[0] >= {"_network"} and checked[2] >= {"_network"}
    if learner in ("icarl", "lucir"):
        assert checked[0] == {"_network"} and checked[2] == {"_network", "_old_network"}
    if learner == "foster":
        assert checked[0] == {"_network"} and checked[2] == {"_network", "_snet"}

    (folder / "task_2.pt").unlink()  # what a run killed in its last phase leaves
    seen = {}

    def resumed(model, dm, task):
        if task < 2:  # restored: the learner holds what was trained (the digest of its state as saved)
            assert model._ckpt_resuming
            assert model._ckpt_payload(dm)["digest"] == digests[task]
            for name, net in networks(model).items():
                if name.endswith("_module_ptr"):
                    assert net is getattr(model, name.replace("_module_ptr", ""))
        seen[task] = True

    run(pycil, {**args, "cim_resume": True}, resumed)
    assert seen == {0: True, 1: True, 2: True}
    assert torch.load(folder / "task_2.pt", weights_only=True)["digest"] == digests[2]  # the retrained phase


def test_a_recipe_that_grows_the_network_otherwise_stops_the_run_at_the_checkpoint(pycil, tmp_path, monkeypatch, one_thread):
    """FOSTER's networks rebuilt with iCaRL's recipe: ``_snet`` (task 1) has no recipe there, and the
    run stops when it writes that checkpoint, before the next phase, naming the attribute."""
    monkeypatch.setitem(net_skeleton.RECIPES, "FOSTER", net_skeleton.RECIPES["iCaRL"])
    args = {**BASE, **LEARNERS["foster"], "data_root": str(pycil.cache), "prefix": "wrong",
            "device": [torch.device("cpu")], "logfilename": str(tmp_path / "logs" / "wrong_1993")}
    done = []
    with pytest.raises(ckpt.CheckpointError) as err:
        run(pycil, args, lambda model, dm, task: done.append(task))
    assert done == [0]
    assert f"cannot write checkpoint {ckpt.checkpoint_dir(args) / 'task_1.pt'}" in str(err.value)
    assert "learner attribute '_snet' holds a network the FOSTER recipe does not rebuild" in str(err.value)
