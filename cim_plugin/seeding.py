"""Seed every random number generator a run draws from, and optionally ask for determinism.

PyCIL's trainer seeds torch with a constant 1 (``trainer._set_random``), whatever the run's
``seed``; the seed only shuffles the class order. With the plugin installed, ``before_run`` calls
``seed_everything(args["seed"], deterministic)`` (keys ``cim_seed`` and ``deterministic``), so
that each seed of the JSON's list is a different, reproducible run.

No PyCIL imports here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)

#: cuBLAS needs a fixed workspace for deterministic matmuls on CUDA >= 10.2 (PyTorch's docs).
CUBLAS_WORKSPACE = ":4096:8"
_CUBLAS_VALID = (":4096:8", ":16:8")


def seed_everything(seed: int, deterministic: bool = False) -> dict:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device).

    ``deterministic`` also calls ``set_deterministic()``. Returns what was done (also logged).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds the CPU generator and every CUDA device's
    torch.cuda.manual_seed_all(seed)  # no-op without CUDA (lazy)
    done = {"seed": seed, "random": True, "numpy": seed % 2**32, "torch": True, "cuda": torch.cuda.is_available()}
    if deterministic:
        done.update(set_deterministic())
    log.info("cim-plugin: seeded python random, numpy%s and torch%s with %d%s",
             "" if done["numpy"] == seed else f" (as {done['numpy']})", " (CPU and CUDA)" if done["cuda"] else "",
             seed, "; deterministic algorithms on" if deterministic else "")
    return done


def set_deterministic() -> dict:
    """Deterministic algorithms (``warn_only``), cudnn deterministic and benchmark off, and a fixed
    cuBLAS workspace.

    ``warn_only=True``: a few CUDA kernels have no deterministic version (the backward pass of
    ``AdaptiveAvgPool2d``, in every ResNet, among them); with ``warn_only=False`` the first
    backward pass would stop the run. PyTorch warns about each such op instead. The cuBLAS variable
    must be set before the first cuBLAS call: set here, before any model is built, it is; a value
    already set to one of the two valid ones is kept.
    """
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _CUBLAS_VALID:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return {"deterministic": True, "cublas_workspace_config": os.environ["CUBLAS_WORKSPACE_CONFIG"]}


def deterministic_state() -> dict:
    """The global flags ``set_deterministic`` changes (to restore them with ``restore_deterministic``)."""
    return {
        "algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def restore_deterministic(state: dict) -> None:
    torch.use_deterministic_algorithms(state["algorithms"], warn_only=state["warn_only"])
    torch.backends.cudnn.deterministic = state["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = state["cudnn_benchmark"]
    if state["cublas"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = state["cublas"]


def rng_states() -> dict:
    """The states of every generator a run draws from (checkpoints, ``isolated_rng``)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    """Put back states taken by ``rng_states``."""
    torch.set_rng_state(states["torch"].cpu())
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            log.warning("saved CUDA RNG states are for %d devices, this machine has %d: not restored",
                        len(cuda), torch.cuda.device_count())
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


@contextlib.contextmanager
def isolated_rng():
    """Within the block, draws from python ``random``, numpy's global RNG and torch (CPU, and CUDA
    when initialised) leave the generators as they were before it (``rng_states`` taken before,
    ``set_rng_states`` after): the block's randomness does not shift the random stream of what runs
    after it (the mask steps do not change the CIL training's data order and augmentation draws)."""
    states = rng_states()
    try:
        yield
    finally:
        set_rng_states(states)
