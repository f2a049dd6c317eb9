"""Fakes for tests: a tiny PyCIL-shaped network for learner tests that need no PyCIL (shared by
several files), recording stand-ins for commands such as pip (the CI script's tests), and a fake
PyCIL run for the ablation runner and the demo (``FakeRunner``). Also, for the PyCIL-backed tests,
the tiny setting they run (``TINY_RUN``), PyCIL's own main.py run on it (``run_main``, side by
side: ``MainRuns``; ``results_of``) and what a plugin run's memory must show against a plain one's."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from cim_plugin.launch import RESULTS_MARK, RunError, available_cores

from torch import nn


class TinyBackbone(nn.Module):
    """conv-ReLU with PyCIL's backbone outputs: ``{"fmaps": [last map], "features": pooled}``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        f = self.relu(self.conv(x))
        return {"fmaps": [f], "features": f.mean((2, 3))}


class TinyNet(nn.Module):
    """PyCIL's IncrementalNet layout: ``convnet`` + ``fc`` over 4 features, 3 classes."""

    feature_dim = 4

    def __init__(self):
        super().__init__()
        self.convnet = TinyBackbone()
        self.fc = nn.Linear(4, 3)

    def extract_vector(self, x):
        return self.convnet(x)["features"]


class FakeBaseLearner:
    """The parts of PyCIL's BaseLearner the CIM mixin reads (compose it behind ``CIMLearnerMixin``)."""

    def __init__(self, network=None, device="cpu"):
        self._cur_task, self._device, self.args = 0, device, {"model_name": "icarl"}
        self._known_classes, self._total_classes = 0, 3
        self._network = TinyNet() if network is None else network
        self._old_network = None


def recording_commands(bin_dir: Path, names, log: Path) -> Path:
    """Executables ``names`` in ``bin_dir`` that only append "NAME ARGS | PYCIL_ROOT=..." to ``log``.

    Put ``bin_dir`` first on PATH and a script's ``pip``/``python`` calls are recorded, never run.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\necho "{name} $* | PYCIL_ROOT=${{PYCIL_ROOT:-}}" >> "{log}"\n')
        path.chmod(0o755)
    return bin_dir


BASE = {"model_name": "icarl", "dataset": "synthetic", "prefix": "mine", "seed": [1], "memory_size": 60,
        "cim": True, "cim_mask": "pau", "compress_ratio": 4.0, "init_cls": 6, "increment": 4}


def fake_results(config: dict) -> dict:
    """Deterministic, variant- and seed-dependent figures, shaped like pycil/results.py's."""
    seed = config["seed"][0]
    plus = {False: 0.0}.get(config["cim"], 10.0 if config.get("cim_mask") == "cam" else 20.0)
    phases = [
        {"task": t, "classes": 6 + 4 * t, "cnn_top1": 50.0 + plus + seed - 10 * t, "nme_top1": 40.0 + seed,
         "memory": {"mean_exemplars_per_class": 6.0 if not config["cim"] else 12.0, "bytes_used": 1000,
                    "budget_bytes": 1200, "units_used": 50.0, "budget_units": 60}}
        for t in range(2)
    ]
    cnn = [p["cnn_top1"] for p in phases]
    return {"finished": True, "phases": phases, "summary": {
        "avg_incremental_cnn_top1": sum(cnn) / 2, "last_cnn_top1": cnn[-1], "avg_incremental_nme_top1": 40.0 + seed,
        "last_nme_top1": 40.0 + seed, "forgetting_cnn": 5.0, "mean_exemplars_per_class": phases[-1]["memory"]["mean_exemplars_per_class"],
        "bytes_used": 1000, "budget_bytes": 1200, "wall_time_s": 10.0 * (1 + bool(config["cim"])),
        "first_phase_cnn_top1": cnn[0], "later_phases_avg_cnn_top1": cnn[1]}}


class FakeRunner:
    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, root, config_path, log_path, echo, **options):
        config = json.loads(Path(config_path).read_text())
        name = Path(config_path).parent.name
        self.calls.append(name)
        log_path.write_text("log\n")
        if name in self.fail:
            raise RunError(f"{name} crashed; see {log_path}")
        out = Path(root) / f"{name}_results.json"
        out.write_text(json.dumps(fake_results(config)))
        if config.get("cim_checkpoint"):  # as the checkpoint mixin names its files
            (Path(root) / f"{name}_ckpt").mkdir(exist_ok=True)
            (Path(root) / f"{name}_ckpt" / "task_0.pt").write_bytes(f"phase 0 of {name}".encode())
        return out, 1.0


# ------------------------------------------------------------------ PyCIL's main.py, tiny setting

#: The tiny class-incremental setting of the PyCIL-backed tests: 8 synthetic classes, 5 then 3, on the
#: CPU, no loader processes; each test file adds the image size, counts, memory and backbone it needs.
TINY_RUN = {"dataset": "synthetic", "synthetic_num_classes": 8, "init_cls": 5, "increment": 3, "shuffle": True,
            "fixed_memory": False, "device": ["-1"], "seed": [1993], "num_workers": 0}


#: Seconds one tiny main.py run may take before the test fails.
RUN_TIMEOUT_S = 900


def _main_command(root: Path, config: dict, folder: Path, name: str,
                  env: Mapping[str, str] | None) -> tuple[list[str], dict]:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return [sys.executable, "main.py", "--config", str(path)], {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}


def run_main(root: Path, config: dict, folder: Path, name: str,
             env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """PyCIL's main.py in the checkout ``root`` on ``config`` (written to ``folder/<name>.json``), with
    the variables ``env`` added to the environment; the completed process, output captured."""
    command, full_env = _main_command(root, config, folder, name, env)
    return subprocess.run(command, cwd=root, env=full_env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


class MainRuns:
    """Tiny main.py runs side by side: as many at once as the CPU has cores (at most ``width``), one
    torch thread each, so a test file's runs keep every core busy instead of running one after the
    other. ``submit`` queues a run; ``result`` starts it at once if it is still queued and returns its
    completed process (output captured in files, so a chatty run never blocks on a full pipe)."""

    def __init__(self, root: Path, width: int | None = None):
        cores = available_cores()
        self.root, self.width = Path(root), max(1, min(cores, width or cores))
        self.queued: dict = {}
        self.running: dict = {}
        self.done: dict = {}

    def submit(self, key, config: dict, folder: Path, name: str, env: Mapping[str, str] | None = None) -> None:
        if key not in self.queued and key not in self.running and key not in self.done:
            self.queued[key] = (config, Path(folder), name, {"OMP_NUM_THREADS": "1", **(env or {})})
        self._fill()

    def result(self, key) -> subprocess.CompletedProcess:
        if key in self.queued:  # the test needs it now: ahead of the other queued runs
            self.queued = {key: self.queued.pop(key), **self.queued}
        if key not in self.queued and key not in self.running and key not in self.done:
            raise KeyError(f"run {key!r} was never submitted")
        while key not in self.done:
            self._fill()
            self._reap()
        return self.done[key]

    def _fill(self) -> None:
        while self.queued and len(self.running) < self.width:
            key = next(iter(self.queued))
            config, folder, name, env = self.queued.pop(key)
            command, full_env = _main_command(self.root, config, folder, name, env)
            out, err = open(folder / f"{name}.stdout", "w+"), open(folder / f"{name}.stderr", "w+")
            proc = subprocess.Popen(command, cwd=self.root, env=full_env, stdout=out, stderr=err, text=True)
            self.running[key] = (proc, out, err, time.monotonic())

    def _reap(self) -> None:
        """Wait until one running run ends and collect it."""
        while self.running:
            for key, (proc, out, err, started) in list(self.running.items()):
                if proc.poll() is None and time.monotonic() - started > RUN_TIMEOUT_S:
                    proc.kill()
                    proc.wait()
                if proc.poll() is not None:
                    out.seek(0), err.seek(0)
                    self.done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
                    out.close(), err.close()
                    del self.running[key]
                    return
            time.sleep(0.2)


def results_of(proc: subprocess.CompletedProcess, root: Path) -> dict:
    """The results.json of a finished run of ``run_main`` (asserting it finished and wrote its log)."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULTS_MARK)]
    assert lines, "the run printed no results path"
    path = Path(lines[-1][len(RESULTS_MARK):].strip())
    path = path if path.is_absolute() else root / path
    assert path.name.endswith("_results.json") and path.with_name(path.name.replace("_results.json", ".log")).exists()
    return json.loads(path.read_text())


def assert_more_exemplars_in_no_more_bytes(off: dict, on: dict) -> None:
    """Phase by phase, the plugin run's (``on``) compressed memory holds more exemplars per class than
    the plain run's (``off``) and uses no more bytes of the same byte budget."""
    for phase_off, phase_on in zip(off["phases"], on["phases"], strict=True):
        m_off, m_on = phase_off["memory"], phase_on["memory"]
        assert m_off["kind"] == "plain" and m_on["kind"] == "compressed"
        assert m_on["budget_bytes"] == m_off["budget_bytes"] > 0
        assert m_on["bytes_used"] <= m_on["budget_bytes"]
        assert m_on["mean_exemplars_per_class"] > m_off["mean_exemplars_per_class"]
