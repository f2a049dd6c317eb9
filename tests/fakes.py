"""Fakes for tests: a tiny PyCIL-shaped network for learner tests that need no PyCIL (shared by
several files), recording stand-ins for commands such as pip (the CI script's tests), and a fake
PyCIL run for the ablation runner and the demo (``FakeRunner``)."""

import json
from pathlib import Path

from cim_plugin.launch import RunError

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

    def __call__(self, root, config_path, log_path, echo):
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
