"""Reliability: what a run refuses or stops on before it trains, and what it never overwrites.

- resuming checks every key that changes what a phase learns (checkpoint.RUN_KEYS);
- a run that does not finish never replaces a finished ``<log>_results.json``;
- unwritable output folders, bad ``device`` / ``seed`` / missing ``prefix``, malformed JSON and a
  class with no readable image are clear errors before training, naming the key, file or folder;
- stopping ``cim-plugin ablate`` (SIGTERM, Ctrl-C) stops its PyCIL child.

The tests marked ``pycil`` run PyCIL's own main.py in a patched clone (the ``patched_pycil``
fixture); the others need no PyCIL.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cim_plugin
from cim_plugin import ablation
from cim_plugin.config import LUCIR_KEYS, MODULE_HPARAM_KEYS, PLUGIN_KEYS, PYCIL_KEYS, ConfigError
from cim_plugin.pycil import checks
from cim_plugin.pycil.checkpoint import NOT_RUN_KEYS, RUN_KEYS, CheckpointError, checkpoint_dir
from cim_plugin.pycil.data import UnreadableClassError, drop_unreadable
from cim_plugin.pycil.hook import check_args
from cim_plugin.pycil.results import ResultsMixin, partial_results_path, results_path

from test_checkpoint import FakeDataManager, Learner, run as run_phases

REPO = Path(cim_plugin.__file__).resolve().parent.parent
GOOD = {"prefix": "p", "dataset": "synthetic", "memory_size": 20, "shuffle": True, "init_cls": 5, "increment": 3,
        "model_name": "icarl", "convnet_type": "resnet18", "device": ["-1"], "seed": 1, "synthetic_num_classes": 8}


# ------------------------------------------------------------------------- 1. resume check


def test_run_keys_are_every_key_of_the_tables_but_the_output_ones():
    tables = set(PLUGIN_KEYS) | set(MODULE_HPARAM_KEYS) | set(LUCIR_KEYS) | set(PYCIL_KEYS) | set(checks.FOSTER_KEYS)
    assert set(RUN_KEYS) | NOT_RUN_KEYS == tables and not set(RUN_KEYS) & NOT_RUN_KEYS
    assert len(RUN_KEYS) == len(set(RUN_KEYS))
    for key in ("mask_threshold", "epochs", "lrate", "init_epochs", "boosting_epochs", "compression_epochs", "lr",
                "beta1", "beta2", "oofc", "lambda_base", "K", "phi_lr", "cim_bilevel", "cim_first_phase_from",
                "synthetic_seed", "batch_size", "T"):
        assert key in RUN_KEYS, key


def resumed(tmp_path, **changed):
    """A learner of a 1-phase run with checkpoints, resumed with ``changed`` keys: (learner, data manager)."""
    base = {"logfilename": str(tmp_path / "run"), "model_name": "icarl", "seed": 1993, "mask_threshold": 0.6,
            "epochs": 1, "lrate": 0.1, "cim_gallery": 16, "num_workers": 0}
    first = Learner()
    first._ckpt_setup(base, True, True)
    run_phases(first, FakeDataManager(), tasks=1)
    learner = Learner()
    learner._ckpt_setup({**base, **changed}, True, True)
    return learner, FakeDataManager()


@pytest.mark.parametrize("key,value,shown", [
    ("mask_threshold", 0.5, "was 0.6, this run has 0.5"),
    ("epochs", 3, "was 1, this run has 3"),
    ("lrate", 0.2, "was 0.1, this run has 0.2"),
    ("boosting_epochs", 2, "was not set, this run has 2"),
    ("cim_first_phase_from", "off/first_phase.pt", "was not set, this run has 'off/first_phase.pt'"),
])
def test_resume_refuses_a_checkpoint_trained_with_other_training_keys(tmp_path, key, value, shown):
    learner, dm = resumed(tmp_path, **{key: value})
    with pytest.raises(CheckpointError) as err:
        learner.incremental_train(dm)
    text = str(err.value)
    assert f"key '{key}' {shown}" in text and str(checkpoint_dir({"logfilename": str(tmp_path / "run")}) / "task_0.pt") in text
    assert dm.trained == [] and learner._cur_task == -1


def test_resume_accepts_changed_output_and_speed_keys(tmp_path):
    learner, dm = resumed(tmp_path, cim_gallery=0, num_workers=4, data_root="/elsewhere", cim_check_images=True)
    learner.incremental_train(dm)
    assert dm.trained == [] and learner._cur_task == 0  # restored, not trained


# ---------------------------------------------------------------------- 2. results.json


class PhaseLearner:
    """What ResultsMixin reads of a learner after a phase (plain PyCIL memory of 2 classes)."""

    def __init__(self):
        self.args, self._cur_task, self._total_classes, self.samples_per_class = {}, 0, 2, 2
        self._targets_memory = np.array([0, 0, 1, 1])
        self._data_memory = np.zeros((4, 8, 8, 3), np.uint8)

    def after_task(self):
        return None


class Recorder(ResultsMixin, PhaseLearner):
    pass


def test_a_run_that_does_not_finish_leaves_the_finished_results_file(tmp_path, capsys):
    args = {"logfilename": str(tmp_path / "run"), "model_name": "icarl", "dataset": "synthetic", "seed": 1}
    final, partial = results_path(args), partial_results_path(args)
    assert partial.name == "run_results.partial.json"
    final.write_text(json.dumps({"finished": True, "phases": ["earlier run"]}))
    before = final.read_bytes()

    rec = Recorder()
    rec._results_setup(args, 32)
    rec._results_pending = {"task": 0, "classes": 2, "cnn_top1": 50.0}
    rec.after_task()  # a phase ends; the run then fails (e.g. a checkpoint refused)
    assert final.read_bytes() == before
    progress = json.loads(partial.read_text())
    assert [p["task"] for p in progress["phases"]] == [0] and "finished" not in progress

    assert rec._results_finish() == final  # a run that finishes replaces it, and says where it is
    done = json.loads(final.read_text())
    assert done["finished"] is True and [p["task"] for p in done["phases"]] == [0]
    assert not partial.exists()
    assert capsys.readouterr().out.strip().endswith(f"Results written to {final}")


# -------------------------------------------------------------------- 3. output folders


@contextlib.contextmanager
def unprivileged():
    """Run the body as a user without root's right to write anywhere (root: effective uid nobody)."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.seteuid(65534)
    except PermissionError:
        pytest.skip("root without CAP_SETUID: cannot test an unwritable folder")
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unwritable_log_folder_is_a_config_error_before_training():
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)  # reachable by any user
        logs = Path(top) / "logs" / "icarl"
        logs.mkdir(parents=True)
        args = {**GOOD, "logfilename": str(logs / "p_1_resnet18")}
        check_args(dict(args))  # writable: fine (and every module the check needs is imported)
        logs.chmod(0o555)
        try:
            with unprivileged(), pytest.raises(ConfigError) as err:
                check_args(dict(args))
        finally:
            logs.chmod(0o755)
        assert f"the log folder (PyCIL's log, the results file) {logs} is not writable" in str(err.value)
        assert sorted(p.name for p in logs.iterdir()) == []  # the probe left nothing


def test_a_checkpoint_folder_that_cannot_be_made_is_a_config_error(tmp_path):
    base = tmp_path / "p_1_resnet18"
    args = {**GOOD, "logfilename": str(base), "cim_resume": True}
    check_args(dict(args))
    assert not checkpoint_dir(args).exists()  # checked, not made
    checkpoint_dir(args).write_text("a file where the folder goes")
    with pytest.raises(ConfigError) as err:
        check_args(dict(args))
    assert f"key 'cim_checkpoint': the checkpoint folder {checkpoint_dir(args)} cannot be made: it is not a folder" in str(err.value)
    check_args({**args, "cim_resume": False})  # no checkpoints: not checked
    check_args({k: v for k, v in args.items() if k != "logfilename"})  # outside a run (ablation planning)


# ------------------------------------------------------------------- 4. PyCIL's run keys


def whole_config(**changed):
    return {**GOOD, "seed": [1993], **changed}


@pytest.mark.parametrize("changed,fragment", [
    ({"device": "-1"}, """key 'device' = '-1': must be a list such as ["-1"]"""),
    ({"device": []}, "key 'device' = []: must be a list"),
    ({"device": ["gpu"]}, "key 'device' = ['gpu']: must be a list such as"),
    ({"seed": 1993}, "key 'seed' = 1993: must be a list of integers >= 0 such as [1993]"),
    ({"seed": ["1993"]}, "key 'seed' = ['1993']: must be a list of integers"),
    ({"prefix": None}, "key 'prefix' is missing"),
])
def test_whole_config_keys_are_checked(changed, fragment):
    config = whole_config(**changed)
    if changed.get("prefix", "") is None:
        del config["prefix"]
    problems = checks.main_config_problems(config)
    assert len(problems) == 1 and fragment in problems[0], problems
    with pytest.raises(SystemExit) as stop:
        checks.check_main_config(config, "exps/x.json")
    assert str(stop.value).startswith("cim-plugin: 1 problem(s) in config exps/x.json:") and fragment in str(stop.value)


def fake_cuda(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_a_gpu_on_a_machine_without_cuda_is_a_config_error(monkeypatch):
    fake_cuda(monkeypatch, 0)
    for device in (["0"], [0], ["-1", "1"]):
        problems = checks.main_config_problems(whole_config(device=device))
        assert len(problems) == 1 and "key 'device'" in problems[0] and "no CUDA device" in problems[0], problems
    # in a run, before_run sees the list PyCIL's trainer made of it
    with pytest.raises(ConfigError, match=r"key 'device' = \[device\(type='cuda', index=0\)\]: asks for GPU 0"):
        check_args({**GOOD, "device": [torch.device("cuda:0")]})
    fake_cuda(monkeypatch, 2)
    assert checks.main_config_problems(whole_config(device=["0", "1"])) == []
    assert "has 2 CUDA device(s)" in checks.main_config_problems(whole_config(device=["2"]))[0]


def test_valid_devices_and_the_shipped_configs_pass(monkeypatch):
    fake_cuda(monkeypatch, 4)  # the shipped GPU configs ask for GPU 0
    for device in (["-1"], [-1], ["cpu"], [" -1 "], ["0", "1", "2", "3"]):
        assert checks.main_config_problems(whole_config(device=device)) == [], device
    check_args({**GOOD, "device": [torch.device("cpu")]})
    check_args({**GOOD, "device": [torch.device("cuda:0"), torch.device("cuda:1")]})
    shipped = sorted((REPO / "exps").glob("*.json")) + sorted((REPO / "benchmarks" / "configs").glob("*.json"))
    assert shipped
    for path in shipped:
        assert checks.main_config_problems(json.loads(path.read_text())) == [], path


# ------------------------------------------------------------------------ 5. malformed JSON


def test_ablation_config_with_a_syntax_error_names_file_line_and_column(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "model_name": "icarl",\n  "dataset" "cifar100"\n}\n')
    with pytest.raises(ablation.AblationError) as err:
        ablation.load_config(broken)
    assert str(err.value) == f"config file {broken}:3:13: not valid JSON: Expecting ':' delimiter"


# ------------------------------------------------------------------ 6. unreadable classes


def image_folder(root: Path, classes=5, bad=()) -> Path:
    """``root``/train and /val with ``classes`` class folders of tiny PNGs; classes in ``bad`` hold
    only unreadable files in train/."""
    for split, n in (("train", 2), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                if split == "train" and c in bad:
                    (folder / f"{i}.png").write_text("not an image\n")
                else:
                    Image.new("RGB", (8, 8), (40 * c, 20, 30)).save(folder / f"{i}.png")
    return root


def test_a_class_with_no_readable_file_is_an_error_naming_its_folder(tmp_path):
    root = image_folder(tmp_path, bad=(3,))
    imgs = [(str(p), int(p.parent.name[-1])) for p in sorted((root / "train").glob("*/*.png"))]
    with pytest.raises(UnreadableClassError) as err:
        drop_unreadable(imgs, "train")
    text = str(err.value)
    assert f"  - {root / 'train' / 'class3'} (2 file(s), none readable)" in text and "class2" not in text
    (root / "train" / "class3" / "0.png").unlink()
    Image.new("RGB", (8, 8)).save(root / "train" / "class3" / "0.png")  # one readable file is enough
    imgs = [(str(p), int(p.parent.name[-1])) for p in sorted((root / "train").glob("*/*.png"))]
    assert len(drop_unreadable(imgs, "train")) == 9


# ------------------------------------------------------------ 7. stopping the ablation runner

FAKE_MAIN = """\
import os, sys, time
print("child", os.getpid(), flush=True)
time.sleep(120)
"""
PARENT = """\
import signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when started in the background
from cim_plugin.launch import run_pycil
run_pycil(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_launcher_stops_its_pycil_child(tmp_path, sig):
    (tmp_path / "main.py").write_text(FAKE_MAIN)
    (tmp_path / "config.json").write_text("{}")
    log = tmp_path / "pycil.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), str(tmp_path / "config.json"), str(log)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    child = None
    try:
        deadline = time.time() + 60
        while child is None and time.time() < deadline and parent.poll() is None:
            lines = log.read_text().split() if log.exists() else []
            child = int(lines[1]) if len(lines) >= 2 and lines[0] == "child" else None
            time.sleep(0.05)
        assert child is not None, parent.communicate(timeout=10)[0] if parent.poll() is not None else "no child started"
        parent.send_signal(sig)
        out = parent.communicate(timeout=120)[0]  # a guard against hanging, generous for a loaded CI machine
        assert parent.returncode == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGINT), out
        assert not alive(child), f"the PyCIL child {child} outlived its launcher"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)


SIDE_BY_SIDE = """\
import signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)
from cim_plugin import ablation
config = {"model_name": "icarl", "dataset": "synthetic", "prefix": "p"}
ablation.execute(ablation.plan([config], ["off"], [1, 2]), Path(sys.argv[2]), Path(sys.argv[1]), jobs=2)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_runs_side_by_side_stops_every_pycil_child(tmp_path, sig):
    """With --jobs the runs are watched by threads, which get no signals: the main thread stops them."""
    (tmp_path / "main.py").write_text(FAKE_MAIN)
    out = tmp_path / "out"
    logs = [out / "runs" / f"icarl_off_s{seed}" / "pycil.log" for seed in (1, 2)]
    parent = subprocess.Popen([sys.executable, "-c", SIDE_BY_SIDE, str(tmp_path), str(out)],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    children = {}
    try:
        deadline = time.time() + 60
        while len(children) < 2 and time.time() < deadline and parent.poll() is None:
            for log in logs:
                words = log.read_text().split() if log.exists() else []
                if len(words) >= 2 and words[0] == "child":
                    children[log] = int(words[1])
            time.sleep(0.05)
        assert len(children) == 2, parent.communicate(timeout=10)[0] if parent.poll() is not None else "children missing"
        parent.send_signal(sig)
        try:  # the children sleep 120 s: a launcher that waits for them instead of stopping them is too late
            text = parent.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            pytest.fail("the launcher did not stop its PyCIL children within 60 s")
        assert parent.returncode == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGINT), text
        assert [pid for pid in children.values() if alive(pid)] == [], "a PyCIL child outlived its launcher"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in children.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_sigterm_handler_is_restored_after_the_run(tmp_path):
    from cim_plugin.launch import RunError, run_pycil

    (tmp_path / "main.py").write_text("print('no results')\n")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunError, match="printed no results file"):
        run_pycil(tmp_path, tmp_path / "config.json", tmp_path / "log")
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------- the same, in PyCIL's own main.py

# 8 classes in tasks of 5 and 3, 32 px, 8 images per class, 1 epoch: a short run on a CPU.
TINY = {"prefix": "keep", "dataset": "synthetic", "synthetic_num_classes": 8, "synthetic_image_size": 32,
        "synthetic_train_per_class": 8, "synthetic_test_per_class": 4, "memory_size": 24, "memory_per_class": 3,
        "fixed_memory": False, "shuffle": True, "init_cls": 5, "increment": 3, "model_name": "icarl",
        "convnet_type": "resnet18", "device": ["-1"], "seed": [1993], "num_workers": 0, "batch_size": 16,
        "init_epoch": 1, "epochs": 1, "init_lr": 0.01, "lrate": 0.01}


def main_py(root: Path, config, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return subprocess.run([sys.executable, "main.py", "--config", str(path)], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}, timeout=900)


@pytest.mark.pycil
def test_main_py_names_the_json_error_and_the_bad_run_keys(patched_pycil, tmp_path):
    proc = main_py(patched_pycil, '{\n  "prefix": "x",\n  "seed": [1993],,\n}\n', tmp_path, "broken")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"{tmp_path / 'broken.json'}:3:18: not valid JSON: Expecting property name enclosed in double quotes"

    bad = {k: v for k, v in TINY.items() if k != "prefix"}
    proc = main_py(patched_pycil, {**bad, "device": "-1", "seed": 1993}, tmp_path, "bad")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"cim-plugin: 3 problem(s) in config {tmp_path / 'bad.json'}:")
    for fragment in ("key 'prefix' is missing", "key 'device' = '-1': must be a list", "key 'seed' = 1993: must be a list"):
        assert fragment in proc.stderr, fragment
    if not torch.cuda.is_available():
        proc = main_py(patched_pycil, {**TINY, "device": ["0"]}, tmp_path, "gpu")
        assert proc.returncode == 1 and "key 'device' = ['0']: asks for GPU 0 but this machine has no CUDA device" in proc.stderr


@pytest.mark.pycil
def test_main_py_stops_before_training_on_a_class_without_readable_images(patched_pycil, tmp_path):
    root = image_folder(tmp_path / "data", bad=(4,))
    config = {**TINY, "dataset": "imagenet100", "data_root": str(root), "cim_check_images": True, "increment": 5}
    proc = main_py(patched_pycil, config, tmp_path, "folder")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"  - {root / 'train' / 'class4'} (2 file(s), none readable)" in proc.stderr
    assert "Learning on" not in proc.stdout


@pytest.mark.pycil
def test_a_failed_or_refused_resume_leaves_the_finished_results(patched_pycil, tmp_path):
    config = {**TINY, "data_root": str(tmp_path / "cache"), "cim_checkpoint": True}
    proc = main_py(patched_pycil, config, tmp_path, "keep")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base = patched_pycil / "logs" / "icarl" / "synthetic" / "5" / "3" / "keep_1993_resnet18"
    final, partial = Path(f"{base}_results.json"), Path(f"{base}_results.partial.json")
    finished = final.read_bytes()
    assert json.loads(finished)["finished"] is True and not partial.exists()
    assert f"Results written to {final.relative_to(patched_pycil)}" in proc.stdout

    # a changed training key: the checkpoint is refused, before any phase
    proc = main_py(patched_pycil, {**config, "cim_resume": True, "epochs": 2}, tmp_path, "changed")
    assert proc.returncode != 0 and "key 'epochs' was 1, this run has 2" in proc.stderr, proc.stderr[-3000:]
    assert final.read_bytes() == finished

    # phase 0 resumed, phase 1's checkpoint unreadable: the run stops after a phase
    ckpt = Path(f"{base}_ckpt") / "task_1.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    proc = main_py(patched_pycil, {**config, "cim_resume": True}, tmp_path, "corrupt")
    assert proc.returncode != 0 and "resumed task 0 from" in proc.stdout and "truncated or corrupt" in proc.stderr
    assert final.read_bytes() == finished
    progress = json.loads(partial.read_text())
    assert [p["task"] for p in progress["phases"]] == [0] and "finished" not in progress
