"""Kill-and-resume inside PyCIL's own main.py: a run SIGKILLed in the middle of a phase and resumed
ends with the results (and the very weights) of an uninterrupted run; a corrupt checkpoint is refused.

Needs a PyCIL checkout (PYCIL_ROOT, else the one `cim-plugin patch` recorded), cloned into a
temporary folder and patched there (the `pycil` fixture of test_pycil_integration.py).
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pycil_checkout import require_pycil_root

PYCIL_ROOT = require_pycil_root()

from test_pycil_integration import CIM, LEARNER_KEYS, TINY, pycil, results_of, run_main  # noqa: E402,F401 (pycil: fixture)

pytestmark = pytest.mark.pycil

# 8 classes in tasks of 5, 2 and 1 classes; 32 px and 8 images per class keep the phases short on a CPU.
CONFIG = {**TINY, **LEARNER_KEYS["icarl"], **CIM, "model_name": "icarl", "synthetic_image_size": 32,
          "synthetic_train_per_class": 8, "increment": 2, "cim_resume": True}
LAST_TASK_STARTS = "Learning on 7-8"


def config(prefix: str, cache: Path) -> dict:
    return {**CONFIG, "prefix": prefix, "data_root": str(cache)}


def run_base(root: Path, prefix: str) -> Path:
    """PyCIL's log name (without .log) of a run of CONFIG with this prefix."""
    return root / "logs" / "icarl" / "synthetic" / "5" / "2" / f"{prefix}_{CONFIG['seed'][0]}_{CONFIG['convnet_type']}"


def ckpt_dir(root: Path, prefix: str) -> Path:
    return Path(f"{run_base(root, prefix)}_ckpt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture(scope="module")
def uninterrupted(pycil, cache, tmp_path_factory):
    proc = run_main(pycil, config("whole", cache), tmp_path_factory.mktemp("whole"), "whole")
    return proc, results_of(proc, pycil)


def kill_in_last_phase(root: Path, cfg: dict, tmp_path: Path) -> str:
    """Start main.py, SIGKILL it once the last phase has trained an epoch; returns its output."""
    path = tmp_path / "killed.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "main.py", "--config", str(path)], cwd=root, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen, in_last = [], False
    try:
        for line in proc.stdout:
            seen.append(line)
            in_last = in_last or LAST_TASK_STARTS in line
            if in_last and "refreshed" in line:  # end of the phase's (only) epoch: memory not built yet
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None and not in_last:
            proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    out = "".join(seen)
    assert proc.returncode == -signal.SIGKILL and in_last, f"the run was not killed in its last phase:\n{out[-3000:]}"
    return out


def digests(output: str) -> dict[int, str]:
    """task -> state sha256 of the checkpoints a run wrote (from its log on stdout)."""
    found = re.findall(r"checkpoint of task (\d+) written to \S+ \(state sha256 ([0-9a-f]{64})\)", output)
    return {int(task): digest for task, digest in found}


def test_uninterrupted_run_writes_a_checkpoint_per_phase(pycil, uninterrupted):
    proc, res = uninterrupted
    assert [p["task"] for p in res["phases"]] == [0, 1, 2]
    assert sorted(p.name for p in ckpt_dir(pycil, "whole").iterdir()) == ["task_0.pt", "task_1.pt", "task_2.pt"]
    assert "resumed task" not in proc.stdout and sorted(digests(proc.stdout)) == [0, 1, 2]


def test_run_killed_mid_phase_and_resumed_ends_as_the_uninterrupted_one(pycil, uninterrupted, cache, tmp_path):
    whole_proc, whole = uninterrupted
    cfg = config("killed", cache)
    killed = kill_in_last_phase(pycil, cfg, tmp_path)
    folder = ckpt_dir(pycil, "killed")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["task_0.pt", "task_1.pt"]
    expected = digests(whole_proc.stdout)
    assert digests(killed) == {0: expected[0], 1: expected[1]}  # the same run as the uninterrupted one so far

    proc = run_main(pycil, cfg, tmp_path, "resumed")
    resumed = results_of(proc, pycil)
    # tasks 0 and 1 came from their checkpoints; only the killed phase was trained again
    assert f"resumed task 0 from {folder.relative_to(pycil)}/task_0.pt" in proc.stdout
    assert "resumed task 1 from" in proc.stdout and "resumed task 2" not in proc.stdout
    assert "Learning on 0-5" not in proc.stdout and LAST_TASK_STARTS in proc.stdout
    assert "re-evaluated on resuming differ" not in proc.stdout
    keys = ("task", "classes", "cnn_top1", "cnn_top5", "cnn_grouped", "nme_top1", "nme_grouped", "memory")
    assert [{k: p[k] for k in keys} for p in resumed["phases"]] == [{k: p[k] for k in keys} for p in whole["phases"]]
    assert resumed["finished"] is True
    # the retrained phase ends with bit-identical networks, class means and compressed memory
    assert digests(proc.stdout) == {2: expected[2]}


def test_corrupt_checkpoint_is_refused_naming_the_file_and_left_as_it_is(pycil, uninterrupted, cache, tmp_path):
    folder = ckpt_dir(pycil, "corrupt")
    folder.mkdir(parents=True)
    for name in ("task_0.pt", "task_1.pt"):
        shutil.copy(ckpt_dir(pycil, "whole") / name, folder / name)
    bad = folder / "task_1.pt"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()

    proc = run_main(pycil, config("corrupt", cache), tmp_path, "corrupt")
    assert proc.returncode != 0
    assert "resumed task 0 from" in proc.stdout
    assert f"cannot resume from checkpoint {bad.relative_to(pycil)}" in proc.stderr
    assert "truncated or corrupt" in proc.stderr
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in folder.iterdir()) == ["task_0.pt", "task_1.pt"]


SLOW = os.environ.get("CIM_PLUGIN_SLOW_TESTS") == "1"


@pytest.mark.skipif(not SLOW, reason="FOSTER with the PAU branch over 3 phases takes minutes on a CPU: set CIM_PLUGIN_SLOW_TESTS=1")
def test_foster_with_pau_branch_resumes_to_the_same_state(pycil, cache, tmp_path):
    """FOSTER keeps more state (the student ``_snet`` that becomes the next network, the data manager,
    class weights) and "pau" adds the branch's φ: a run that lost its last phase ends the same."""
    cfg = {**TINY, **LEARNER_KEYS["foster"], **CIM, "cim_mask": "pau", "model_name": "foster", "prefix": "foster",
           "data_root": str(cache), "synthetic_num_classes": 7, "synthetic_image_size": 32,
           "synthetic_train_per_class": 8, "increment": 1, "cim_resume": True}
    first = run_main(pycil, cfg, tmp_path, "foster")
    whole = results_of(first, pycil)
    expected = digests(first.stdout)
    assert sorted(expected) == [0, 1, 2]
    folder = pycil / "logs" / "foster" / "synthetic" / "5" / "1" / f"foster_{TINY['seed'][0]}_resnet18_ckpt"
    (folder / "task_2.pt").unlink()  # what a run killed during the last phase leaves

    second = run_main(pycil, cfg, tmp_path, "foster")
    resumed = results_of(second, pycil)
    assert "resumed task 0 from" in second.stdout and "resumed task 1 from" in second.stdout
    assert "CIM mask steps" in second.stdout.split("Learning on 6-7")[1]  # the branch trains in the retrained phase
    assert digests(second.stdout) == {2: expected[2]}
    keys = ("task", "cnn_top1", "cnn_grouped", "nme_top1", "nme_grouped", "memory")
    assert [{k: p[k] for k in keys} for p in resumed["phases"]] == [{k: p[k] for k in keys} for p in whole["phases"]]
