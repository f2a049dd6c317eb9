"""The feature memory (``"cim_memory": "features"``) inside PyCIL's iCaRL and the plugin's LUCIR, run
in this process on a tiny setting (7 synthetic classes at 32 px, 5 then 2; resnet32 / cosine_resnet32,
one epoch per phase, the classifier step on): bytes counted exactly against the image budget, no image replayed, the
stored classes rehearsed at the classifier, drift before/after adaptation in results.json, and a
run resumed with its last checkpoint lost ends bit-identical (same state digest: networks, stored
vectors, adaptation MLP). torchrun is refused. Needs a PyCIL checkout (conftest's ``patched_pycil``)."""

import json

import numpy as np
import pytest
import torch

from cim_plugin.config import ConfigError
from cim_plugin.pycil import checkpoint as ckpt
from pycil_checkout import require_pycil_root

PYCIL_ROOT = require_pycil_root()

from test_net_skeleton import pycil, resume_after_losing_last_file, run  # noqa: E402,F401 (pycil: the fixture of PyCIL's modules from the clone)

pytestmark = pytest.mark.pycil

BASE = {"dataset": "synthetic", "synthetic_num_classes": 7, "synthetic_image_size": 32, "synthetic_train_per_class": 6,
        "synthetic_test_per_class": 2, "init_cls": 5, "increment": 2, "shuffle": True, "seed": 1993, "memory_size": 14,
        "fixed_memory": False, "num_workers": 0, "batch_size": 8, "init_epoch": 1, "epochs": 1, "init_lr": 0.01,
        "lrate": 0.01, "cim": True, "cim_memory": "features", "cim_adapt_epochs": 5, "cim_feature_batch_size": 16,
        "cim_classifier_epochs": 2}
LEARNERS = {"icarl": {"model_name": "icarl", "convnet_type": "resnet32"},
            "lucir": {"model_name": "lucir", "convnet_type": "cosine_resnet32"}}
#: 32 x 32 x 3 bytes per full image exemplar; resnet32's features are 64-d, float16: 128 bytes a vector.
FULL, VECTOR = 3072, 128


def args_of(pycil, tmp_path, learner: str, **extra) -> dict:
    return {**BASE, **LEARNERS[learner], "data_root": str(pycil.cache), "prefix": learner, "device": [torch.device("cpu")],
            "logfilename": str(tmp_path / "logs" / f"{learner}_1993"), **extra}


@pytest.mark.parametrize("learner", ["icarl", "lucir"])
def test_feature_memory_counts_bytes_rehearses_and_reports_drift(pycil, tmp_path, learner, one_thread):
    args = args_of(pycil, tmp_path, learner)
    seen = {}

    def after(model, dm, task):
        seen[task] = {"images": model._get_memory(), "kind": type(model).__name__, "means": model._class_means.copy(),
                      "rehearsal": None if model.cim.rehearsal is None else model.cim.rehearsal.steps}

    run(pycil, args, after)
    results = json.loads(ckpt.Path(f"{args['logfilename']}_results.json").read_text())
    assert results["cim_memory"] == "features" and seen[0]["kind"].endswith("FeatureMemory")
    assert seen[0]["images"] is None and seen[1]["images"] is None  # nothing replayed as an image
    assert seen[0]["rehearsal"] is None and seen[1]["rehearsal"] > 0  # one rehearsal batch per optimiser step
    for phase, units, classes in zip(results["phases"], (14 // 5, 14 // 7), (5, 7)):
        m = phase["memory"]
        # budget: the image memory's; a class keeps min(candidates, floor(units x 3072 / 128)) vectors
        per_class = min(6, units * FULL // VECTOR)
        assert m["kind"] == "features" and m["feature_dtype"] == "float16" and m["feature_dim"] == 64
        assert m["exemplars_per_class"] == {str(c): per_class for c in range(classes)}
        assert m["bytes_used"] == classes * per_class * VECTOR <= m["budget_bytes"] == units * classes * FULL
        assert m["metadata_bytes"] == classes * per_class * 8 and phase["nme_top1"] is not None
    first, second = (p["feature_memory"] for p in results["phases"])
    assert "drift_cosine_before" not in first  # nothing to adapt after the first phase
    for key in ("drift_cosine_before", "drift_cosine_after"):
        assert -1 <= second[key] <= 1
    assert second["adapter"]["pairs"] == 2 * 6 and second["adapter"]["epochs"] == 5
    assert second["rehearsal"]["steps"] == seen[1]["rehearsal"] and second["rehearsal"]["mean_loss"] > 0
    assert second["classifier"]["vectors"] == 5 * 6 + 2 * 6 and second["classifier"]["epochs"] == 2
    assert results["phases"][1]["cim_seconds"]["adaptation"] > 0
    print(f"{learner}: drift cosine {second['drift_cosine_before']:.4f} -> {second['drift_cosine_after']:.4f}; "
          f"phase images {second['adapter']['cosine_before']:.4f} -> {second['adapter']['cosine_after']:.4f}")


def test_resume_restores_the_feature_memory_bit_exactly(pycil, tmp_path, one_thread):
    def check(plugin, task):
        assert plugin["memory"]["dtype"] == "float16" and len(plugin["memory"]["classes"]) == (5, 7)[task]
        assert (plugin["adapter"] is None) == (task == 0)

    args = args_of(pycil, tmp_path, "icarl", cim_checkpoint=True)
    assert resume_after_losing_last_file(pycil, args, check) == 5 * 6  # vectors of phase 0


def test_torchrun_and_other_learners_are_refused(monkeypatch):
    from cim_plugin.pycil import hook

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = {**BASE, **LEARNERS["icarl"]}
    with pytest.raises(ConfigError, match="torchrun"):
        hook.check_args(args)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="'cim_memory' = 'features' is not built for model_name 'der'"):
        hook.check_args({**args, "model_name": "der"})
