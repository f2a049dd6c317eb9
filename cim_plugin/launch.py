"""Run PyCIL's own ``main.py`` on a config file, as a subprocess, and find its results file.

Shared by the demo and the ablation runner. The patched trainer prints ``Results written to
<path>`` at the end of a run (``pycil/results.py``); that line is how a finished run is recognised.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS_MARK = "Results written to "


class RunError(RuntimeError):
    """A PyCIL run could not be made or read (the message says which and where its log is)."""


def patched_pycil_root(root: Path | None = None) -> Path:
    """``root``, else the PyCIL checkout the plugin finds (PYCIL_ROOT or the recorded one); it must be patched."""
    from . import locate

    if root is None:
        root, reason = locate.find_pycil_root()
        if root is None:
            raise RunError(reason)
    if not locate.is_patched(root):
        raise RunError(f"PyCIL at {root} is not patched: run `cim-plugin patch {root}` first")
    return Path(root)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def sigterm_raises():
    """While inside, SIGTERM raises SystemExit(143) instead of ending the process at once, so that
    the ``except``/``finally`` blocks run (and stop the child); the previous handler is restored
    after. Only the main thread can set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_pycil(root: Path, config: Path, log_path: Path, echo=None, env: dict | None = None,
              on_start=None) -> tuple[Path, float]:
    """Run ``python main.py --config config`` in ``root``, its output into ``log_path``;
    returns (results file, wall seconds). ``echo(line)`` also receives every output line; ``env``
    adds variables to this process's environment; ``on_start(proc)`` receives the child once started
    (the side-by-side runner keeps them to stop them: only the main thread gets signals).
    Stopping this process (Ctrl-C, SIGTERM) or a failing ``echo`` kills the PyCIL run first."""
    t0 = time.time()
    results = None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with sigterm_raises(), open(log_path, "w", buffering=1) as log, subprocess.Popen(
        [sys.executable, "main.py", "--config", str(Path(config).resolve())],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    ) as proc:
        try:
            if on_start is not None:
                on_start(proc)
            for line in proc.stdout:
                log.write(line)
                if line.startswith(RESULTS_MARK):
                    results = Path(line[len(RESULTS_MARK):].strip())
                if echo is not None:
                    echo(line)
            code = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM or a failing echo: never leave the PyCIL run behind
            proc.kill()
            raise
    wall = time.time() - t0
    if code != 0:
        raise RunError(f"PyCIL run {Path(config).name} failed with exit code {code}; see {log_path}")
    if results is None:
        raise RunError(f"PyCIL run {Path(config).name} printed no results file; is the checkout patched? see {log_path}")
    return (results if results.is_absolute() else Path(root) / results), wall
