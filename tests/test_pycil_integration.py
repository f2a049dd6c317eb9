"""PyCIL's own main.py with the plugin, on a tiny synthetic setting, for iCaRL, DER and FOSTER.

Needs a PyCIL checkout (PYCIL_ROOT, else the one `cim-plugin patch` recorded). The checkout is
cloned into a temporary folder and patched there; the user's checkout is never touched.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cim_plugin import PYCIL_COMMIT, locate, patching
from cim_plugin.demo import RESULTS_MARK

PYCIL_ROOT, REASON = locate.find_pycil_root()
if PYCIL_ROOT is None:
    pytest.skip(REASON, allow_module_level=True)

pytestmark = pytest.mark.pycil

TINY = {
    "prefix": "tiny", "dataset": "synthetic",
    "synthetic_num_classes": 8, "synthetic_image_size": 48,
    "synthetic_train_per_class": 16, "synthetic_test_per_class": 5,
    "memory_size": 32, "memory_per_class": 4, "fixed_memory": False, "shuffle": True,
    "init_cls": 5, "increment": 3, "convnet_type": "resnet18", "device": ["-1"], "seed": [1993],
    "num_workers": 0, "batch_size": 16,
}
LEARNER_KEYS = {
    "icarl": {"init_epoch": 1, "epochs": 1, "init_lr": 0.01, "lrate": 0.01},
    "der": {"init_epoch": 1, "epochs": 1, "init_lr": 0.01, "lrate": 0.01},
    "foster": {"beta1": 0.97, "beta2": 0.97, "oofc": "ft", "is_teacher_wa": False, "is_student_wa": False,
               "lambda_okd": 1, "wa_value": 1, "init_epochs": 1, "init_lr": 0.01, "init_weight_decay": 5e-4,
               "boosting_epochs": 1, "compression_epochs": 1, "lr": 0.01, "weight_decay": 5e-4, "T": 2},
}
CIM = {"cim": True, "cim_mask": "cam", "cam_update_interval": 1, "randombbxblur_prob_incre": 0.5}


@pytest.fixture(scope="module")
def pycil(tmp_path_factory):
    """A patched clone of the user's PyCIL checkout (recording nothing in the user's config)."""
    base = tmp_path_factory.mktemp("pycil")
    clone = base / "PyCIL"
    subprocess.run(["git", "clone", "-q", str(PYCIL_ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "-c", "advice.detachedHead=false", "checkout", "-q", PYCIL_COMMIT], check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(base / "xdg"))
        patching.patch_pycil(clone)
    return clone


def run_main(root: Path, config: dict, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "main.py", "--config", str(path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)


def results_of(proc: subprocess.CompletedProcess, root: Path) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULTS_MARK)]
    assert lines, "the run printed no results path"
    path = Path(lines[-1][len(RESULTS_MARK):].strip())
    path = path if path.is_absolute() else root / path
    assert path.name.endswith("_results.json") and path.with_name(path.name.replace("_results.json", ".log")).exists()
    return json.loads(path.read_text())


@pytest.mark.parametrize("learner", ["icarl", "der", "foster"])
def test_plugin_on_holds_more_exemplars_at_no_more_bytes(pycil, tmp_path_factory, learner):
    tmp = tmp_path_factory.mktemp(learner)
    cache = tmp_path_factory.getbasetemp() / "synthetic-cache"
    base = {**TINY, **LEARNER_KEYS[learner], "model_name": learner, "data_root": str(cache)}
    off = results_of(run_main(pycil, {**base, "prefix": "off"}, tmp, "off"), pycil)
    on_proc = run_main(pycil, {**base, **CIM, "prefix": "on"}, tmp, "on")
    on = results_of(on_proc, pycil)

    assert [p["task"] for p in off["phases"]] == [0, 1] == [p["task"] for p in on["phases"]]
    assert off["cim"] is False and on["cim"] is True
    for phase_off, phase_on in zip(off["phases"], on["phases"]):
        m_off, m_on = phase_off["memory"], phase_on["memory"]
        assert m_off["kind"] == "plain" and m_on["kind"] == "compressed"
        assert m_on["budget_bytes"] == m_off["budget_bytes"] > 0
        assert m_on["bytes_used"] <= m_on["budget_bytes"]
        assert m_on["mean_exemplars_per_class"] > m_off["mean_exemplars_per_class"]
        assert 0 <= phase_on["cnn_top1"] <= 100 and phase_on["nme_top1"] is not None
    # the memory shrank with the per-class budget (32 // 5 = 6, then 32 // 8 = 4 units per class)
    assert off["phases"][0]["memory"]["units_per_class"] == 6 and off["phases"][1]["memory"]["units_per_class"] == 4
    assert all(v == 4 for v in off["phases"][1]["memory"]["exemplars_per_class"].values())
    # the log states the memory figures after every phase, and the augmentation ran
    assert on_proc.stdout.count("compressed memory:") == 2
    assert "compressed share now" in on_proc.stdout


def test_bad_plugin_key_stops_the_run_before_training(pycil, tmp_path):
    bad = {**TINY, **LEARNER_KEYS["icarl"], "model_name": "icarl", "data_root": str(tmp_path),
           "cim": True, "compress_ratio": 3, "cim_maks": "cam"}
    proc = run_main(pycil, bad, tmp_path, "bad")
    assert proc.returncode != 0
    err = proc.stderr
    assert "'compress_ratio' = 3" in err and "'cim_maks'" in err and "did you mean 'cim_mask'" in err
    assert "Learning on" not in proc.stdout
