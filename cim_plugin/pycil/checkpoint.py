"""Per-phase checkpoints and resuming, for every learner (plugin on or off).

``CheckpointMixin`` is composed in front of the learner by ``hook.wrap_learner``. With
``"cim_checkpoint": true`` it saves, at the end of every ``incremental_train`` (after the learner's
own training and ``build_rehearsal_memory``), ``<PyCIL log name>_ckpt/task_<k>.pt`` holding:

- PyCIL's learner state: its ``__dict__`` without what belongs to the run rather than to the
  learner (``args``, the device, the results recorder) or to one phase's data (data loaders,
  datasets, data managers, generators). So it holds the network(s) (``_network``,
  ``_old_network``, FOSTER's ``_snet``), PyCIL's exemplar arrays, ``_class_means``, the counters
  (``_cur_task``, ``_known_classes``, ``_total_classes``) and FOSTER's ``per_cls_weights``;
- the plugin's parts from their explicit state (``learner.cim_state_dict()``, plugin on): the
  compressed memory, φ (the PAU branch, saved without its backbones and bound again on loading),
  the stored-exemplar diagnostics, the gallery rows and the random mask source's generator;
- the class order of the data manager, the settings of the test loader, the keys that define the
  run (``RUN_KEYS``: every key that changes what a phase learns, for the compatibility check), the
  accuracy history recorded so far, and the RNG states (torch CPU, CUDA when initialised, numpy's
  global generator, python's ``random``).

The file is written atomically (a killed run leaves the previous file, or none, never a half-written
one). With ``"cim_resume": true``, before a phase is trained the mixin looks for that phase's file:
if it is there, the state is restored from it instead of training (the test loader is rebuilt from
the data manager), and PyCIL's trainer goes on with ``eval_task()`` and ``after_task()`` as usual,
which re-computes the phase's accuracies and the old network exactly. The first phase without a
file is trained as usual, starting from the RNG states of the previous phase's file — so a run
killed in the middle of a phase and resumed ends with the accuracies of an uninterrupted run
(CPU, ``num_workers`` 0). Once a phase was trained, no later phase is restored (stale files of an
older run are overwritten).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..atomic import atomic_open
from ..config import LUCIR_KEYS, MODULE_HPARAM_KEYS, PLUGIN_KEYS, PYCIL_KEYS
from ..seeding import rng_states, set_rng_states  # noqa: F401 (also imported from here)
from .results import run_base

log = logging.getLogger(__name__)

FORMAT = "cim-plugin-checkpoint"
VERSION = 1

#: Attributes that belong to the run or to one phase's data, never saved nor restored.
TRANSIENT = frozenset({"args", "data_manager", "train_loader", "test_loader", "_device", "_multiple_gpus"})
#: The plugin's parts (``learner.cim``) are saved from their explicit state (``cim_state_dict``).
PLUGIN_ATTRS = frozenset({"cim"})
TRANSIENT_PREFIXES = ("_results", "_ckpt")
#: Keys of the key tables (config.py) that change neither what a phase learns nor its results, so a
#: resumed run may change them:
#:
#: - where the outputs go and whether they are written: ``prefix``, ``logfilename``, ``csv_name``,
#:   ``time_str``, ``config`` (the JSON's path), ``cim_checkpoint``, ``cim_resume``, ``cim_gallery``
#:   (which classes' top exemplar is copied into the gallery file);
#: - the hardware and the speed: ``device``, ``num_workers`` (loader processes; the bit-identical
#:   resume holds for ``num_workers`` 0 in any case);
#: - where the data is read from: ``data_root`` (the same data may be moved), ``cim_check_images``
#:   (a scan that only leaves unreadable files out, which a run without it replaces by readable
#:   images of their class: turning it on to diagnose the data must not lose the checkpoints).
NOT_RUN_KEYS = frozenset({"prefix", "logfilename", "csv_name", "time_str", "config", "cim_checkpoint", "cim_resume",
                          "cim_gallery", "device", "num_workers", "data_root", "cim_check_images"})
#: Keys that define the run: a checkpoint written with other values is refused. Those that say what
#: is learned (learner, data, class split, seed, memory, compression), then every other key of the
#: tables in config.py — PyCIL's (FOSTER's schedule and losses), the iCaRL/DER module
#: hyper-parameters, LUCIR's and the plugin's — but NOT_RUN_KEYS. Includes ``cim_first_phase_from``.
_DEFINING = ("model_name", "dataset", "init_cls", "increment", "convnet_type", "seed", "shuffle", "memory_size",
             "memory_per_class", "fixed_memory", "cim", "cim_mask", "compress_ratio", "cim_storage_size")
RUN_KEYS = _DEFINING + tuple(sorted(
    (set(PYCIL_KEYS) | set(MODULE_HPARAM_KEYS) | set(LUCIR_KEYS) | set(PLUGIN_KEYS)) - NOT_RUN_KEYS - set(_DEFINING)
))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def checkpoint_dir(args: dict) -> Path:
    return Path(f"{run_base(args)}_ckpt")


def map_location(device: Any) -> Any:
    """Tensors saved on a GPU go to this run's device; CPU tensors stay where they were."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    return {"cuda": str(device), **{f"cuda:{i}": str(device) for i in range(64)}}


def _is_data_manager(value: Any) -> bool:
    return callable(getattr(type(value), "get_dataset", None)) and hasattr(value, "get_task_size")


def _is_transient_value(value: Any) -> bool:
    return isinstance(value, (DataLoader, Dataset, types.GeneratorType)) or _is_data_manager(value)


def state_digest(state: dict) -> str:
    """sha256 of the learned state: every network, tensor and array among ``state``'s values (and
    of objects with a ``state_dict()``, e.g. the compressed memory), attribute names in sorted order.
    Two runs that end a phase with this digest equal hold bit-identical weights and memory."""
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, np.ndarray):
            h.update(f"{obj.dtype}{obj.shape}".encode())
            h.update(repr(obj.tolist()).encode() if obj.dtype == object else np.ascontiguousarray(obj).tobytes())
        elif isinstance(obj, (nn.Module,)) or callable(getattr(obj, "state_dict", None)):
            feed(obj.state_dict())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                h.update(str(key).encode())
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                feed(item)
        elif isinstance(obj, (bool, int, float, str, np.generic)) or obj is None:
            h.update(repr(obj).encode())

    for name in sorted(state):
        h.update(name.encode())
        feed(state[name])
    return h.hexdigest()


class CheckpointMixin:
    """Saves the learner at the end of every phase and, with ``cim_resume``, restores it instead of training."""

    def _ckpt_setup(self, args: dict, enabled: bool, resume: bool) -> None:
        self._ckpt_enabled = bool(enabled)
        self._ckpt_resuming = bool(resume)  # stays true while every phase so far was restored
        self._ckpt_dir = checkpoint_dir(args)
        self._ckpt_run = {k: args.get(k) for k in RUN_KEYS}
        if resume and self._ckpt_dir.is_dir():
            for stale in self._ckpt_dir.glob(".task_*.pt.*.tmp"):  # left by a run killed while saving
                stale.unlink(missing_ok=True)

    def _ckpt_path(self, task: int) -> Path:
        return self._ckpt_dir / f"task_{task}.pt"

    # -- PyCIL seam ----------------------------------------------------------------------------
    def incremental_train(self, data_manager):
        task = self._cur_task + 1
        path = self._ckpt_path(task)
        if self._ckpt_resuming and path.exists():
            self._ckpt_restore(path, task, data_manager)
            return None
        self._ckpt_resuming = False
        out = super().incremental_train(data_manager)
        if self._ckpt_enabled:
            self._ckpt_save(path, data_manager)
        return out

    # -- saving --------------------------------------------------------------------------------
    def _ckpt_learner_state(self) -> tuple[dict, list[str]]:
        """(attributes to save, names of attributes that held the data manager)."""
        state, dm_attrs = {}, []
        for name, value in vars(self).items():
            if name in TRANSIENT or name in PLUGIN_ATTRS or name.startswith(TRANSIENT_PREFIXES):
                if name == "data_manager":
                    dm_attrs.append(name)
                continue
            if _is_transient_value(value):
                if _is_data_manager(value):
                    dm_attrs.append(name)
                continue
            state[name] = value
        return state, dm_attrs

    def _ckpt_payload(self, data_manager) -> dict:
        state, dm_attrs = self._ckpt_learner_state()
        plugin = self.cim_state_dict() if callable(getattr(self, "cim_state_dict", None)) else None
        test = getattr(self, "test_loader", None)
        history = getattr(self, "_results", {}).get("phases", [])
        return {
            "format": FORMAT,
            "version": VERSION,
            "task": self._cur_task,
            "learner_class": type(self).__name__,
            "class_order": [int(c) for c in data_manager._class_order],
            "run": dict(self._ckpt_run),
            "learner": state,
            "plugin": plugin,
            "data_manager_attrs": dm_attrs,
            "test_loader": None if test is None else {"batch_size": test.batch_size, "num_workers": test.num_workers},
            "history": [{k: p.get(k) for k in ("task", "cnn_top1", "nme_top1")} for p in history],
            "rng": rng_states(),
            "digest": state_digest({**state, "cim": plugin}),
        }

    def _ckpt_save(self, path: Path, data_manager) -> Path:
        payload = self._ckpt_payload(data_manager)
        try:
            with atomic_open(path, "wb") as f:
                torch.save(payload, f)
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            bad = [k for k, v in payload["learner"].items() if not _picklable(v)]
            raise CheckpointError(f"cannot write checkpoint {path}: learner attribute(s) {bad or '?'} cannot be saved ({err})") from err
        log.info("cim-plugin: checkpoint of task %d written to %s (state sha256 %s)", self._cur_task, path, payload["digest"])
        return path

    # -- resuming ------------------------------------------------------------------------------
    def _ckpt_load(self, path: Path, task: int) -> dict:
        try:
            payload = torch.load(path, map_location=map_location(self._device), weights_only=False)
        except Exception as err:  # truncated zip, bad pickle, missing class, ...
            raise CheckpointError(
                f"cannot resume from checkpoint {path}: the file is unreadable (truncated or corrupt: "
                f"{type(err).__name__}: {err}). Delete it to train task {task} again from the previous checkpoint."
            ) from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"cannot resume from checkpoint {path}: not a cim-plugin checkpoint")
        if payload.get("version") != VERSION:
            raise CheckpointError(
                f"cannot resume from checkpoint {path}: format version {payload.get('version')}, this plugin reads {VERSION}"
            )
        if payload.get("task") != task:
            raise CheckpointError(f"cannot resume from checkpoint {path}: it holds task {payload.get('task')}, not {task}")
        return payload

    def _ckpt_check(self, path: Path, payload: dict, data_manager) -> None:
        problems = []
        order = [int(c) for c in data_manager._class_order]
        if payload["class_order"] != order:
            problems.append(f"class order {payload['class_order']} differs from this run's {order}")
        saved_run = payload["run"]
        for key, now in self._ckpt_run.items():
            if key in saved_run and saved_run[key] != now:
                problems.append(f"key '{key}' was {_shown(saved_run[key])}, this run has {_shown(now)}")
        unchecked = sorted(k for k, v in self._ckpt_run.items() if k not in saved_run and v is not None)
        if unchecked:  # a file of an older cim-plugin, which recorded fewer keys
            log.warning("cim-plugin: checkpoint %s does not record key(s) %s (written by an older cim-plugin): "
                        "not checked against this run", path, ", ".join(unchecked))
        if payload["learner_class"] != type(self).__name__:
            problems.append(f"written by learner {payload['learner_class']}, this run's is {type(self).__name__}")
        if problems:
            raise CheckpointError(
                f"cannot resume from checkpoint {path}: it belongs to another run:\n"
                + "\n".join(f"  - {p}" for p in problems)
                + "\nUse another 'prefix', set 'cim_resume' to false, or delete the checkpoint folder."
            )

    def _ckpt_restore(self, path: Path, task: int, data_manager) -> None:
        payload = self._ckpt_load(path, task)
        self._ckpt_check(path, payload, data_manager)
        self._ckpt_compare_history(path, payload["history"])
        for name, value in payload["learner"].items():
            self.__dict__[name] = value
        for name in payload["data_manager_attrs"]:
            setattr(self, name, data_manager)
        settings = payload["test_loader"]
        if settings is not None:
            test_set = data_manager.get_dataset(np.arange(0, self._total_classes), source="test", mode="test")
            self.test_loader = DataLoader(test_set, batch_size=settings["batch_size"], shuffle=False,
                                          num_workers=settings["num_workers"])
        if payload.get("plugin") is not None:
            self.cim_load_state_dict(payload["plugin"])
        set_rng_states(payload["rng"])
        log.info("cim-plugin: resumed task %d from %s (state sha256 %s)", task, path, payload.get("digest"))

    def _ckpt_compare_history(self, path: Path, saved: list[dict]) -> None:
        """The accuracies re-evaluated so far in this run should be the ones the checkpoint recorded."""
        now = [{k: p.get(k) for k in ("task", "cnn_top1", "nme_top1")} for p in getattr(self, "_results", {}).get("phases", [])]
        if saved and now and saved != now[: len(saved)]:
            log.warning("cim-plugin: the accuracies re-evaluated on resuming differ from those recorded in %s: %s vs %s",
                        path, now[: len(saved)], saved)


def _shown(value: Any) -> str:
    return "not set" if value is None else repr(value)


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False
