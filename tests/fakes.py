"""Fakes for tests: a tiny PyCIL-shaped network for learner tests that need no PyCIL (shared by
several files), and recording stand-ins for commands such as pip (the CI script's tests)."""

from pathlib import Path

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
