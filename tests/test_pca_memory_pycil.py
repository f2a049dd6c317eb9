"""The PCA feature memory (``"cim_memory": "pca"``) inside PyCIL's iCaRL and the plugin's LUCIR, run in
this process on a tiny setting (7 synthetic classes at 32 px, 5 then 2; resnet32 / cosine_resnet32,
one epoch per phase): the map entering stage_3 (32 × 16 × 16) coded at k = 5 in 1,516 bytes, counted
exactly against the image budget; reconstruction cosine >= 0.8 (measured 0.85: the issue's 0.95 is
not reached at this setting, see the README); the backbone below stage_3 bit-for-bit
unchanged by the second phase (also with the plugin off and ``cim_freeze_lower``); the rehearsal
step's gradient reaching stage_3 and fc only; a run resumed with its last checkpoint lost ends
bit-identical; bad stages and k named. Needs a PyCIL checkout (conftest's ``patched_pycil``)."""

import json

import pytest
import torch

from cim_plugin.config import ConfigError
from cim_plugin.core.feature_pca import code_bytes
from cim_plugin.pycil import checkpoint as ckpt
from pycil_checkout import require_pycil_root

PYCIL_ROOT = require_pycil_root()

from test_net_skeleton import pycil, resume_after_losing_last_file, run  # noqa: E402,F401 (pycil: the fixture of PyCIL's modules from the clone)

pytestmark = pytest.mark.pycil

BASE = {"dataset": "synthetic", "synthetic_num_classes": 7, "synthetic_image_size": 32, "synthetic_train_per_class": 6,
        "synthetic_test_per_class": 2, "init_cls": 5, "increment": 2, "shuffle": True, "seed": 1993, "memory_size": 14,
        "fixed_memory": False, "num_workers": 0, "batch_size": 8, "init_epoch": 1, "epochs": 1, "init_lr": 0.01,
        "lrate": 0.01, "cim": True, "cim_memory": "pca", "cim_feature_batch_size": 8}
LEARNERS = {"icarl": {"model_name": "icarl", "convnet_type": "resnet32"},
            "lucir": {"model_name": "lucir", "convnet_type": "cosine_resnet32"}}
#: 32 x 32 x 3 bytes per full image exemplar; the map entering stage_3 is 32 x 16 x 16: 1,516 bytes at k = 5.
FULL, CODE = 3072, code_bytes(32, 256, 5)


def args_of(pycil, tmp_path, learner: str, **extra) -> dict:
    return {**BASE, **LEARNERS[learner], "data_root": str(pycil.cache), "prefix": learner, "device": [torch.device("cpu")],
            "logfilename": str(tmp_path / "logs" / f"{learner}_1993"), **extra}


def lower_state(model) -> dict:
    """Parameters and BN buffers of resnet32 below stage_3 (stem, stage_1, stage_2)."""
    convnet = model._network.convnet
    return {k: v.detach().clone() for k, v in convnet.state_dict().items() if not k.startswith("stage_3")}


def upper_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model._network.convnet.state_dict().items() if k.startswith("stage_3")}


def rehearsal_grads(model) -> dict[str, bool]:
    """Which parts get a gradient from one rehearsal loss alone (grads cleared first)."""
    from cim_plugin.pycil.nets import eval_mode

    model._network.zero_grad(set_to_none=True)
    model.cim._stored = model.cim.memory.all()
    with eval_mode(model._network):  # no BN statistics updated by the probe
        model.cim.rehearsal_loss().backward()
    named = dict(model._network.named_parameters())
    got = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in named.items()}
    model._network.zero_grad(set_to_none=True)
    return {"lower": any(v for n, v in got.items() if n.startswith("convnet.") and not n.startswith("convnet.stage_3")),
            "upper": any(v for n, v in got.items() if n.startswith("convnet.stage_3")),
            "fc": any(v for n, v in got.items() if n.startswith("fc."))}


@pytest.mark.parametrize("learner", ["icarl", "lucir"])
def test_pca_memory_counts_bytes_freezes_the_lower_stages_and_rehearses_the_upper_ones(pycil, tmp_path, learner, one_thread):
    args = args_of(pycil, tmp_path, learner)
    seen = {}

    def after(model, dm, task):
        seen[task] = {"images": model._get_memory(), "kind": type(model).__name__, "lower": lower_state(model),
                      "upper": upper_state(model), "rehearsal": None if model.cim.rehearsal is None else model.cim.rehearsal.steps,
                      "frozen": [not p.requires_grad for n, p in model._network.convnet.named_parameters()
                                 if not n.startswith("stage_3")]}
        if task == 1:
            seen["grads"] = rehearsal_grads(model)

    run(pycil, args, after)
    results = json.loads(ckpt.Path(f"{args['logfilename']}_results.json").read_text())
    assert results["cim_memory"] == "pca" and seen[0]["kind"].endswith("FrozenStagesPCAMemory")
    assert seen[0]["images"] is None and seen[1]["images"] is None  # nothing replayed as an image
    assert seen[0]["rehearsal"] is None and seen[1]["rehearsal"] > 0  # one rehearsal batch per optimiser step
    # the backbone below stage_3 is frozen in phase 1: parameters and BN statistics bit-identical
    assert all(seen[1]["frozen"]) and not any(seen[0]["frozen"])
    assert all(torch.equal(seen[0]["lower"][k], v) for k, v in seen[1]["lower"].items())
    assert any(not torch.equal(seen[0]["upper"][k], v) for k, v in seen[1]["upper"].items())  # stage_3 trained
    assert seen["grads"] == {"lower": False, "upper": True, "fc": True}
    for phase, units, classes in zip(results["phases"], (14 // 5, 14 // 7), (5, 7)):
        m = phase["memory"]
        per_class = min(6, units * FULL // CODE)  # floor(units x 3072 / 1516) codes of the ranked list
        assert m["kind"] == "pca" and m["map_shape"] == [32, 16, 16] and m["pca_components"] == 5
        assert m["exemplars_per_class"] == {str(c): per_class for c in range(classes)}
        assert m["bytes_used"] == classes * per_class * CODE <= m["budget_bytes"] == units * classes * FULL
        assert m["bytes_per_exemplar"]["mean"] == m["analytic_bytes_per_exemplar"] == CODE
        assert m["metadata_bytes"] == classes * per_class * (8 + 4) and phase["nme_top1"] is not None
        # measured 0.85 here (one epoch, 32 channels): the 0.95 at k = 5 is not reached (README)
        assert 0.8 <= m["reconstruction_cosine"] <= 1
    first, second = (p["pca_memory"] for p in results["phases"])
    assert "rehearsal" not in first and second["rehearsal"]["steps"] == seen[1]["rehearsal"] > 0
    assert first["new_exemplars"] == 5 * min(6, 2 * FULL // CODE) and second["new_exemplars"] == 2 * min(6, 2 * FULL // CODE)
    assert second["decode"]["decoded"] == 7 * 4 and second["decode"]["decode_seconds"] > 0
    assert 0.8 <= first["reconstruction_cosine_new"] <= 1 and 0.8 <= first["reconstruction_cosine_new_cam"] <= 1
    print(f"{learner}: reconstruction cosine {first['reconstruction_cosine_new']:.4f} (CAM-weighted "
          f"{first['reconstruction_cosine_new_cam']:.4f}, min {first['reconstruction_cosine_new_min']:.4f}); decode "
          f"{second['decode']['decode_ms_per_exemplar']:.3f} ms per exemplar; top1 {results['phases'][1]['cnn_top1']}")


def test_plugin_off_with_cim_freeze_lower_freezes_the_same_stages(pycil, tmp_path, one_thread):
    args = {**args_of(pycil, tmp_path, "icarl", cim=False, cim_freeze_lower=True), "memory_size": 14}
    del args["cim_memory"]
    seen = {}
    run(pycil, args, lambda model, dm, task: seen.__setitem__(task, (lower_state(model), upper_state(model),
                                                                     type(model).__name__)))
    assert seen[0][2].endswith("FrozenStages") and "PCA" not in seen[0][2]
    assert all(torch.equal(seen[0][0][k], v) for k, v in seen[1][0].items())
    assert any(not torch.equal(seen[0][1][k], v) for k, v in seen[1][1].items())


def test_resume_restores_the_pca_memory_bit_exactly(pycil, tmp_path, one_thread):
    def check(plugin, task):
        assert plugin["stage"] == "stage_3" and len(plugin["memory"]["classes"]) == (5, 7)[task]
        assert plugin["memory"]["classes"][0]["coeffs"].dtype == torch.uint8

    args = args_of(pycil, tmp_path, "icarl", cim_checkpoint=True)
    assert resume_after_losing_last_file(pycil, args, check) == 5 * 4  # codes of phase 0


@pytest.mark.parametrize("extra, message", [
    ({"cim_feature_stage": "stage_1"}, "key 'cim_feature_stage' = 'stage_1': this backbone's stages whose input can be "
                                       "stored are 'stage_2', 'stage_3'"),
    ({"cim_feature_stage": "layer4"}, "key 'cim_feature_stage' = 'layer4'"),
    ({"cim_pca_components": 33}, r"key 'cim_pca_components' = 33: the map entering 'stage_3' is 32 × 16 × 16"),
])
def test_a_stage_or_k_the_network_does_not_have_is_named(pycil, tmp_path, extra, message, one_thread):
    with pytest.raises(ConfigError, match=message):
        run(pycil, args_of(pycil, tmp_path, "icarl", init_epoch=0, **extra), lambda *a: None)
