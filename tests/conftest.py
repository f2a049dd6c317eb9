"""Fixtures shared by several test files."""

import os

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small tensors: one thread is faster; the setting is restored for the other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_pycil_env(tmp_path):
    """An environment for subprocesses in which no PyCIL can be found: no PYCIL_ROOT, no CI, no bundle
    override, and a home and config folder of their own (so no checkout recorded by `cim-plugin patch`)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYCIL_ROOT", "CI", "CIM_PYCIL_BUNDLE") and not k.startswith("GIT_")}
    (tmp_path / "home").mkdir(exist_ok=True)
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"))
    return env


@pytest.fixture(scope="module")
def patched_pycil(tmp_path_factory):
    """A patched clone of the user's PyCIL checkout at the pinned commit, for test modules that also
    hold tests without PyCIL: only the tests that use it are skipped (in CI: failed) without one."""
    import subprocess

    from cim_plugin import PYCIL_COMMIT, locate, patching
    from pycil_checkout import pycil_unavailable

    root, reason = locate.find_pycil_root()
    if root is None:
        pycil_unavailable(reason)
    base = tmp_path_factory.mktemp("pycil")
    clone = base / "PyCIL"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "-c", "advice.detachedHead=false", "checkout", "-q", PYCIL_COMMIT], check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(base / "xdg"))
        patching.patch_pycil(clone)
    return clone
