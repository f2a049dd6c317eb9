"""Per-phase checkpoints and resuming, for every learner (plugin on or off).

``CheckpointMixin`` is composed in front of the learner by ``hook.wrap_learner``. With
``"cim_checkpoint": true`` it saves, at the end of every ``incremental_train`` (after the learner's
own training and ``build_rehearsal_memory``), ``<PyCIL log name>_ckpt/task_<k>.pt``. Format version 2
holds explicit state only — tensors, numbers, strings and lists/tuples/dicts of them — so the file is
read with ``torch.load(..., weights_only=True)``: reading it runs no code from the file. It holds:

- PyCIL's learner state: its attributes without what belongs to the run rather than to the learner
  (``args``, the device, the results recorder, the plugin's own settings) or to one phase's data
  (data loaders, datasets, data managers, generators), each encoded explicitly:

  - every network (``_network``, ``_old_network``, FOSTER's ``_snet``; a ``DataParallel`` is
    unwrapped) as its ``state_dict()``, its class name, the train/eval flag of every submodule, the
    ``requires_grad`` flag of every parameter and the plain attributes of every submodule. An
    attribute holding the same module as another (DER's and FOSTER's ``_network_module_ptr``) is a
    reference to it. On resuming, the structure is rebuilt by the learner's recipe
    (``net_skeleton.py``: a fresh network of the learner's own class grown as the learner grew it,
    from the class totals of the phases so far), checked against the saved one, then loaded with
    ``load_state_dict(strict=True)`` and given the saved flags;
  - numbers, strings, None, tensors and lists/tuples/dicts of them as they are; numpy arrays as
    ``{"__cim__": "ndarray", "dtype", "shape", ...}`` holding a tensor of the same dtype (numeric
    arrays: PyCIL's uint8 exemplar images, the targets, ``_class_means``), a tensor of the raw
    bytes (numeric dtypes torch lacks) or a list of the items (string arrays: the file paths of
    folder datasets; object arrays of plain items); numpy scalars, bytes, sets, complex numbers,
    devices and dtypes likewise under ``"__cim__"``. Anything else is a ``CheckpointError`` naming
    the attribute, raised before the file is written;

- the plugin's parts from their explicit state (``learner.cim_state_dict()``, plugin on), encoded the
  same way: the compressed memory, φ (the PAU branch as its options, ReLU sites and ``state_dict``;
  bound to the network's backbones again on loading), the stored-exemplar diagnostics, the gallery
  rows and the random mask source's generator;
- the class order and the class totals per phase of the data manager, the settings of the test
  loader, the keys that define the run (``RUN_KEYS``: every key that changes what a phase learns,
  for the compatibility check), the accuracy history recorded so far, the RNG states (torch CPU,
  CUDA when initialised, numpy's global generator, python's ``random``) and ``state_digest`` of the
  encoded learner and plugin state.

Learners without a recipe in ``net_skeleton.py`` (PyCIL learners other than iCaRL, DER and FOSTER,
plugin off; the plugin's LUCIR has one) fall back to the pickled layout of version 1 (the attributes'
values pickled as they are, networks as whole modules; ``"learner_encoding": "pickled"``) and such
files are read with ``weights_only=False``: a warning at setup says so. Which way a file is read is
decided by the learner of the run that reads it, never by the file. Files of format version 1 (any
learner) are refused with an error saying the format changed: delete them to train again.

The file is written atomically (a killed run leaves the previous file, or none, never a half-written
one). With ``"cim_resume": true``, before a phase is trained the mixin looks for that phase's file:
if it is there, the state is restored from it instead of training (the test loader is rebuilt from
the data manager), and PyCIL's trainer goes on with ``eval_task()`` and ``after_task()`` as usual,
which re-computes the phase's accuracies and the old network exactly. The first phase without a
file is trained as usual, starting from the RNG states of the previous phase's file — so a run
killed in the middle of a phase and resumed ends with the accuracies of an uninterrupted run
(CPU, ``num_workers`` 0), and its checkpoints with the same ``state_digest``. Once a phase was
trained, no later phase is restored (stale files of an older run are overwritten).

Under torchrun only rank 0 writes; on resuming, rank 0 says which files exist and every rank reads
them (the log folder must be one every machine sees).
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import pickletools
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..atomic import atomic_open
from ..config import LUCIR_KEYS, MODULE_HPARAM_KEYS, PLUGIN_KEYS, PYCIL_KEYS
from ..seeding import isolated_rng, rng_states, set_rng_states  # noqa: F401 (also imported from here)
from . import net_skeleton
from .nets import unwrap
from .results import run_base

log = logging.getLogger(__name__)

FORMAT = "cim-plugin-checkpoint"
#: 1: the learner's attributes pickled as they are (networks as modules). 2: explicit state (see above).
VERSION = 2
EXPLICIT, PICKLED = "explicit", "pickled"
#: The key of the dicts that stand for a value the explicit format encodes (arrays, networks, ...).
MARK = "__cim__"

#: Attributes that belong to the run or to one phase's data, never saved nor restored.
TRANSIENT = frozenset({"args", "data_manager", "train_loader", "test_loader", "_device", "_multiple_gpus", "_later_seed"})
#: The plugin's parts (``learner.cim``) are saved from their explicit state (``cim_state_dict``).
PLUGIN_ATTRS = frozenset({"cim"})
#: The results recorder, the checkpointer and the shared first phase: the run's, not the learner's.
TRANSIENT_PREFIXES = ("_results", "_ckpt", "_first_phase")
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
    """A checkpoint that cannot be used (or written); the message names the file or the attribute."""


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


# ------------------------------------------------------------------------------ explicit encoding

_PLAIN_TYPES = (bool, int, float, str, type(None))
#: numpy dtypes stored as a tensor of the same dtype (any torch); other numeric ones as raw bytes.
_TENSOR_DTYPES = frozenset(np.dtype(t) for t in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64,
                                                 np.float16, np.float32, np.float64, np.complex64, np.complex128))


def _encode_array(a: np.ndarray, where: str) -> dict:
    out: dict[str, Any] = {MARK: "ndarray", "dtype": a.dtype.str, "shape": list(a.shape)}
    kind = a.dtype.kind
    if a.dtype in _TENSOR_DTYPES:
        out["data"] = torch.from_numpy(np.array(a, copy=True, order="C"))
    elif kind in "biufcmMS":  # numeric dtypes torch lacks (uint16/32/64 on older torch, big-endian), dates, bytes
        out["bytes"] = torch.from_numpy(np.frombuffer(np.array(a, order="C").tobytes(), dtype=np.uint8).copy())
    elif kind == "U":  # file paths of folder datasets
        out["items"] = a.reshape(-1).tolist()
    elif kind == "O":
        items = a.reshape(-1).tolist()
        bad = next((type(v) for v in items if type(v) not in _PLAIN_TYPES), None)
        if bad is not None:
            raise CheckpointError(f"{where} is an object array holding a {bad.__module__}.{bad.__qualname__}: "
                                  "only object arrays of strings, numbers and None are stored")
        out["items"] = items
    else:
        raise CheckpointError(f"{where} is a numpy array of dtype {a.dtype} (structured), which the checkpoint cannot store")
    return out


def _decode_array(entry: dict) -> np.ndarray:
    dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
    if "data" in entry:
        a = entry["data"].cpu().numpy()
        if a.dtype != dtype:
            a = a.astype(dtype)
        return a.reshape(shape)
    if "bytes" in entry:
        return np.frombuffer(entry["bytes"].cpu().numpy().tobytes(), dtype=dtype).reshape(shape).copy()
    items = entry["items"]
    if dtype.kind == "O":
        a = np.empty(len(items), dtype=object)
        a[:] = items
        return a.reshape(shape)
    return np.array(items, dtype=dtype).reshape(shape)


def encode(value: Any, where: str = "value") -> Any:
    """``value`` as the explicit format stores it: only what ``torch.load(weights_only=True)`` reads
    (see the module docstring). ``where`` names the value in errors (``CheckpointError``)."""
    kind = type(value)
    if kind in _PLAIN_TYPES or kind in (torch.Tensor, nn.Parameter, torch.Size):
        return value
    if kind is list:
        return [v if type(v) in _PLAIN_TYPES else encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind is tuple:
        return tuple(v if type(v) in _PLAIN_TYPES else encode(v, f"{where}[{i}]") for i, v in enumerate(value))
    if kind in (dict, OrderedDict):
        if MARK in value:
            raise CheckpointError(f"{where} is a dict with the key {MARK!r}, which the checkpoint format reserves")
        if all(type(k) in (str, int) for k in value):
            return kind((k, v if type(v) in _PLAIN_TYPES else encode(v, f"{where}[{k!r}]")) for k, v in value.items())
        return {MARK: "dict", "items": [[encode(k, f"{where} (a key)"), encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, np.ndarray):
        return _encode_array(value, where)
    if isinstance(value, np.generic):
        return {**_encode_array(np.asarray(value), where), "scalar": True}
    if kind in (bytes, bytearray):
        return {MARK: kind.__name__, "data": torch.from_numpy(np.frombuffer(bytes(value), dtype=np.uint8).copy())}
    if kind in (set, frozenset):
        items = sorted((encode(v, f"{where} (an item)") for v in value), key=repr)  # repr order: digests stable
        return {MARK: kind.__name__, "items": items}
    if kind is complex:
        return {MARK: "complex", "real": value.real, "imag": value.imag}
    if kind is torch.device:
        return {MARK: "device", "value": str(value)}
    if kind is torch.dtype:
        return {MARK: "torch_dtype", "value": str(value).removeprefix("torch.")}
    if isinstance(value, nn.Module):
        from ..core.branch import PAUBranch

        if isinstance(value, PAUBranch):
            return {MARK: "pau_branch", "branch": net_skeleton.pau_branch_structure(value), **module_entry(value)}
        raise CheckpointError(f"{where} is a network ({kind.__name__}) inside another value: only the learner's "
                              "own attributes may hold networks")
    raise CheckpointError(f"{where} is a {kind.__module__}.{kind.__qualname__}, which the checkpoint cannot store "
                          "explicitly (numbers, strings, tensors, numpy arrays and lists/tuples/dicts of them)")


def decode(value: Any) -> Any:
    """The value ``encode`` encoded (networks of the learner's attributes excepted: see ``_ckpt_decode_learner``)."""
    kind = type(value)
    if kind is list:
        return [decode(v) for v in value]
    if kind is tuple:
        return tuple(decode(v) for v in value)
    if kind not in (dict, OrderedDict):
        return value
    mark = value.get(MARK)
    if mark is None:
        return kind((k, decode(v)) for k, v in value.items())
    if mark == "ndarray":
        a = _decode_array(value)
        return a[()] if value.get("scalar") else a
    if mark in ("bytes", "bytearray"):
        data = value["data"].cpu().numpy().tobytes()
        return data if mark == "bytes" else bytearray(data)
    if mark in ("set", "frozenset"):
        return (set if mark == "set" else frozenset)(decode(v) for v in value["items"])
    if mark == "dict":
        return {decode(k): decode(v) for k, v in value["items"]}
    if mark == "complex":
        return complex(value["real"], value["imag"])
    if mark == "device":
        return torch.device(value["value"])
    if mark == "torch_dtype":
        dtype = getattr(torch, value["value"], None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"unknown torch dtype {value['value']!r}")
        return dtype
    if mark == "pau_branch":
        try:
            branch = net_skeleton.pau_branch_skeleton(value["branch"])
        except (ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"the PAU branch cannot be rebuilt: {err}") from err
        return _load_into(branch, value, "the PAU branch")
    raise CheckpointError(f"unknown encoded value {mark!r}")


def module_entry(module: nn.Module) -> dict:
    """A network as the explicit format stores it (``module`` unwrapped from any DataParallel)."""
    net = unwrap(module)
    return {"class": type(net).__name__, "state_dict": net.state_dict(), "flags": net_skeleton.flags(net),
            "structure": net_skeleton.structure(net)}


def _entry_problems(module: nn.Module, entry: dict) -> list[str]:
    problems = [] if type(module).__name__ == entry["class"] else [f"class {type(module).__name__}, saved {entry['class']}"]
    return problems + net_skeleton.mismatches(module, entry["state_dict"], entry["structure"], entry["flags"])


def _load_into(module: nn.Module, entry: dict, what: str) -> nn.Module:
    """``module`` (a rebuilt structure) checked against ``entry``, then given its weights and flags."""
    problems = _entry_problems(module, entry)
    if problems:
        raise CheckpointError(f"{what} rebuilt differs from the saved one:\n" + "\n".join(f"  - {p}" for p in problems))
    device = next((t.device for t in entry["state_dict"].values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    module.to(device)
    module.load_state_dict(entry["state_dict"], strict=True)
    net_skeleton.apply_flags(module, entry["flags"])
    return module


def _is_entry(value: Any, mark: str) -> bool:
    return type(value) in (dict, OrderedDict) and value.get(MARK) == mark


def _saved_network(payload: dict, name: str) -> tuple[str, Any]:
    """(owner name, saved value) of the learner's network ``name``: a reference resolved to the
    attribute that owns the module."""
    saved = payload["learner"][name]
    if _is_entry(saved, "alias"):
        name = saved["of"]
        saved = payload["learner"][name]
    return name, saved


def network_state(payload: dict, name: str = "_network") -> dict[str, torch.Tensor]:
    """The ``state_dict`` of the learner's network ``name`` in a loaded payload (either encoding)."""
    _, saved = _saved_network(payload, name)
    if _is_entry(saved, "module"):
        return saved["state_dict"]
    if isinstance(saved, nn.Module):  # the pickled fallback
        return unwrap(saved).state_dict()
    raise KeyError(f"learner attribute {name!r} holds no network")


# ----------------------------------------------------------------------------------- reading files


def _version_problem(version: Any) -> str:
    if version == 1:
        return ("it is in format version 1 (written by an older cim-plugin: networks pickled as modules, read with "
                f"weights_only=False); this plugin writes and reads version {VERSION} (explicit state, read with "
                "weights_only=True) and does not read version 1. Delete the checkpoint (or its folder) to train "
                "again, or use another 'prefix'")
    return f"format version {version!r}, this plugin reads {VERSION}"


def _peek_header(path: Path) -> dict:
    """``format`` and ``version`` of a checkpoint read without unpickling anything (the first values
    of its pickle, which a checkpoint's dict starts with); {} when they cannot be found."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                return {}
            with archive.open(name) as f:
                head = f.read(1 << 16)
        values = []
        for op, arg, _ in pickletools.genops(io.BytesIO(head)):
            if op.name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BININT", "BININT1", "BININT2", "LONG1"):
                values.append(arg)
            elif op.name not in ("PROTO", "FRAME", "EMPTY_DICT", "MARK", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                break
            if len(values) >= 4:
                break
    except Exception:  # a truncated zip, not a zip: no header
        return {}
    return {k: v for k, v in zip(values[::2], values[1::2]) if k in ("format", "version")}


def _refused(err: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, from its error (the unpickler's own line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = next((line.split("error:", 1)[1].strip() for line in lines if "WeightsUnpickler error:" in line), None)
    return (found or (lines[0] if lines else type(err).__name__)).split(" was not an allowed global")[0]


def read_checkpoint(path: Path, device: Any, explicit: bool, context: str, hint: str = "") -> dict:
    """The payload of a checkpoint file, read with ``weights_only=explicit`` (the learner that reads
    it decides, never the file) and checked for format, version and learner encoding. Errors are
    ``CheckpointError``s starting with ``context`` (which names the file); ``hint`` ends the message
    about an unreadable file."""
    path = Path(path)

    def unreadable(err: Exception) -> CheckpointError:
        return CheckpointError(f"{context}: the file is unreadable (truncated or corrupt: {type(err).__name__}: {err}).{hint}")

    try:
        payload = torch.load(path, map_location=map_location(device), weights_only=explicit)
    except pickle.UnpicklingError as err:
        if not explicit:
            raise unreadable(err) from err
        header = _peek_header(path)
        if header.get("format") == FORMAT and header.get("version") != VERSION:
            raise CheckpointError(f"{context}: {_version_problem(header.get('version'))}") from None
        raise CheckpointError(
            f"{context}: the file holds objects that torch.load(weights_only=True) refuses ({_refused(err)}): it is not a "
            f"cim-plugin checkpoint of format version {VERSION} in the explicit encoding (a file of a learner "
            f"without a network recipe pickles its networks, and only that learner reads it).{hint}"
        ) from None
    except Exception as err:  # truncated zip, missing file parts, ...
        raise unreadable(err) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{context}: not a cim-plugin checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{context}: {_version_problem(payload.get('version'))}")
    encoding = payload.get("learner_encoding")
    if encoding != (EXPLICIT if explicit else PICKLED):
        raise CheckpointError(
            f"{context}: its learner state is {encoding!r}, but this run's learner reads {EXPLICIT if explicit else PICKLED!r} "
            f"files (it {'has' if explicit else 'has no'} network recipe): written by another learner"
        )
    return payload


def class_totals(data_manager, task: int) -> list[int]:
    """Classes seen after each task 0..``task``, from the data manager's task sizes."""
    totals, total = [], 0
    for t in range(task + 1):
        total += int(data_manager.get_task_size(t))
        totals.append(total)
    return totals


def rebuild(learner: Any, name: str, task: int, totals: list[int], entry: dict | None = None) -> nn.Module:
    """Learner attribute ``name``'s network at ``task``, rebuilt by the learner's recipe (not loaded);
    checked against ``entry`` when given. ``CheckpointError`` when it cannot be rebuilt or differs."""
    recipe = net_skeleton.recipe_for(learner)
    if recipe is None:
        raise CheckpointError(f"learner {type(learner).__name__} has no network recipe (net_skeleton.py)")
    which = net_skeleton.recipe_name(learner)
    try:
        module = recipe(name, task, list(totals))
    except net_skeleton.NoRecipe as err:
        raise CheckpointError(f"learner attribute '{name}' holds a network the {which} recipe does not rebuild ({err}): "
                              "the explicit checkpoint format cannot store it") from None
    except Exception as err:
        raise CheckpointError(f"the {which} recipe failed to rebuild learner attribute '{name}' "
                              f"({type(err).__name__}: {err})") from err
    if entry is not None:
        problems = _entry_problems(module, entry)
        if problems:
            raise CheckpointError(
                f"the {which} recipe rebuilds learner attribute '{name}' of task {task} unlike the trained network:\n"
                + "\n".join(f"  - {p}" for p in problems)
                + "\n(a PyCIL whose learner grows its network otherwise than net_skeleton.py says)"
            )
    return module


def network_from_checkpoint(path: str | Path, learner: Any, name: str = "_network", device: Any = "cpu") -> nn.Module:
    """The network ``name`` of a checkpoint file (format 2), rebuilt by ``learner``'s recipe (a learner
    of the same setting, e.g. freshly made by PyCIL's factory) and loaded; for tools outside a run."""
    payload = read_checkpoint(Path(path), device, True, f"cannot read checkpoint {path}")
    return network_from_payload(payload, learner, name)


def network_from_payload(payload: dict, learner: Any, name: str = "_network") -> nn.Module:
    """``network_from_checkpoint`` on a checkpoint already read (``read_checkpoint``), for tools that
    also need its other entries (run, class order, plugin state)."""
    name, saved = _saved_network(payload, name)
    totals = [int(t) for t in payload["class_totals"]]
    return _load_into(rebuild(learner, name, payload["task"], totals, saved), saved, f"learner attribute '{name}'")


class CheckpointMixin:
    """Saves the learner at the end of every phase and, with ``cim_resume``, restores it instead of training."""

    def _ckpt_setup(self, args: dict, enabled: bool, resume: bool) -> None:
        self._ckpt_enabled = bool(enabled)
        self._ckpt_resuming = bool(resume)  # stays true while every phase so far was restored
        self._ckpt_dir = checkpoint_dir(args)
        self._ckpt_run = {k: args.get(k) for k in RUN_KEYS}
        self._ckpt_explicit = net_skeleton.recipe_for(self) is not None
        if (enabled or resume) and not self._ckpt_explicit:
            log.warning("cim-plugin: learner %s has no network recipe (cim_plugin/pycil/net_skeleton.py): its checkpoints "
                        "keep the pickled layout (networks saved as whole modules) and are read with "
                        "torch.load(weights_only=False), which runs code from the file: resume only from your own runs",
                        type(self).__name__)
        if resume and self._ckpt_dir.is_dir() and distributed.is_main():
            for stale in self._ckpt_dir.glob(".task_*.pt.*.tmp"):  # left by a run killed while saving
                stale.unlink(missing_ok=True)

    def _ckpt_path(self, task: int) -> Path:
        return self._ckpt_dir / f"task_{task}.pt"

    # -- PyCIL seam ----------------------------------------------------------------------------
    def incremental_train(self, data_manager):
        task = self._cur_task + 1
        path = self._ckpt_path(task)
        if self._ckpt_resuming and self._ckpt_exists(path):
            self._ckpt_restore(path, task, data_manager)
            return None
        self._ckpt_resuming = False
        out = super().incremental_train(data_manager)
        if self._ckpt_enabled:
            self._ckpt_save(path, data_manager)
        return out

    @staticmethod
    def _ckpt_exists(path: Path) -> bool:
        """Whether ``path`` is there; under torchrun rank 0 decides, and every rank must see it."""
        there = distributed.broadcast_object(path.exists())
        if there and not path.exists():
            raise CheckpointError(f"cannot resume from checkpoint {path}: rank {distributed.rank()} does not see it (rank 0 "
                                  f"does); under torchrun on several machines the log folder must be on a file system "
                                  f"every machine sees")
        return there

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

    def _ckpt_encode_learner(self, state: dict, task: int, totals: list[int]) -> dict:
        """The learner's attributes in the explicit format; every network is rebuilt by the recipe
        (its random draws isolated) and checked against the trained one before anything is written."""
        networks = {name: v for name, v in state.items() if isinstance(v, nn.Module)}
        order = [n for n in net_skeleton.OWNERS if n in networks] + [n for n in networks if n not in net_skeleton.OWNERS]
        owners: dict[int, str] = {}
        encoded: dict[str, Any] = {}
        for name in order:
            net = unwrap(networks[name])
            wrapped = net is not networks[name]
            if id(net) in owners:
                encoded[name] = {MARK: "alias", "of": owners[id(net)], "data_parallel": wrapped}
                continue
            owners[id(net)] = name
            entry = {MARK: "module", "data_parallel": wrapped, **module_entry(net)}
            with isolated_rng():
                rebuild(self, name, task, totals, entry)
            encoded[name] = entry
        for name, value in state.items():
            if name not in networks:
                encoded[name] = encode(value, f"learner attribute '{name}'")
        return {name: encoded[name] for name in state}

    def _ckpt_payload(self, data_manager) -> dict:
        state, dm_attrs = self._ckpt_learner_state()
        totals = class_totals(data_manager, self._cur_task)
        plugin = self.cim_state_dict() if callable(getattr(self, "cim_state_dict", None)) else None
        plugin = None if plugin is None else encode(plugin, "the plugin's state")
        learner = self._ckpt_encode_learner(state, self._cur_task, totals) if self._ckpt_explicit else state
        test = getattr(self, "test_loader", None)
        history = getattr(self, "_results", {}).get("phases", [])
        return {
            "format": FORMAT,
            "version": VERSION,
            "learner_encoding": EXPLICIT if self._ckpt_explicit else PICKLED,
            "task": self._cur_task,
            "learner_class": type(self).__name__,
            "recipe": net_skeleton.recipe_name(self),
            "class_order": [int(c) for c in data_manager._class_order],
            "class_totals": totals,
            "run": encode(dict(self._ckpt_run), "the run's keys"),
            "learner": learner,
            "plugin": plugin,
            "data_manager_attrs": dm_attrs,
            "test_loader": None if test is None else {"batch_size": test.batch_size, "num_workers": test.num_workers},
            "history": encode([{k: p.get(k) for k in ("task", "cnn_top1", "nme_top1")} for p in history], "the accuracy history"),
            "rng": encode(rng_states(), "the RNG states"),
            "digest": state_digest({**learner, "cim": plugin}),
        }

    def _ckpt_save(self, path: Path, data_manager) -> Path:
        if not distributed.is_main():  # under torchrun rank 0 writes (every rank holds the same state)
            return path
        try:
            payload = self._ckpt_payload(data_manager)
        except CheckpointError as err:
            raise CheckpointError(f"cannot write checkpoint {path}: {err}") from err
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
        payload = read_checkpoint(path, self._device, self._ckpt_explicit, f"cannot resume from checkpoint {path}",
                                  f" Delete it to train task {task} again from the previous checkpoint.")
        if payload.get("task") != task:
            raise CheckpointError(f"cannot resume from checkpoint {path}: it holds task {payload.get('task')}, not {task}")
        return payload

    def _ckpt_check(self, path: Path, payload: dict, data_manager) -> None:
        problems = []
        order = [int(c) for c in data_manager._class_order]
        if payload["class_order"] != order:
            problems.append(f"class order {payload['class_order']} differs from this run's {order}")
        totals = class_totals(data_manager, payload["task"])
        if payload["class_totals"] != totals:
            problems.append(f"classes after each task {payload['class_totals']} differ from this run's {totals}")
        saved_run = decode(payload["run"])
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

    def _ckpt_decode_learner(self, saved: dict, task: int, totals: list[int]) -> dict:
        """The learner's attributes from the explicit format: networks rebuilt by the recipe, checked,
        loaded (``strict=True``) and given their flags; references resolved; other values decoded."""
        networks: dict[str, nn.Module] = {}
        values: dict[str, Any] = {}

        def wrapped(net: nn.Module, entry: dict) -> nn.Module:
            return nn.DataParallel(net, self._multiple_gpus) if entry.get("data_parallel") else net

        for name, entry in saved.items():
            if _is_entry(entry, "module"):
                net = rebuild(self, name, task, totals)
                networks[name] = _load_into(net, entry, f"learner attribute '{name}'")
                values[name] = wrapped(networks[name], entry)
        for name, entry in saved.items():
            if _is_entry(entry, "alias"):
                if entry["of"] not in networks:
                    raise CheckpointError(f"learner attribute '{name}' refers to '{entry['of']}', which holds no network")
                values[name] = wrapped(networks[entry["of"]], entry)
            elif name not in values:
                values[name] = decode(entry)
        return {name: values[name] for name in saved}

    def _ckpt_restore(self, path: Path, task: int, data_manager) -> None:
        payload = self._ckpt_load(path, task)
        self._ckpt_check(path, payload, data_manager)
        self._ckpt_compare_history(path, decode(payload["history"]))
        try:
            if self._ckpt_explicit:
                values = self._ckpt_decode_learner(payload["learner"], task, [int(t) for t in payload["class_totals"]])
            else:
                values = payload["learner"]
            plugin = None if payload.get("plugin") is None else decode(payload["plugin"])
            rng = decode(payload["rng"])
        except CheckpointError as err:
            raise CheckpointError(f"cannot resume from checkpoint {path}: {err}") from err
        for name, value in values.items():
            self.__dict__[name] = value
        for name in payload["data_manager_attrs"]:
            setattr(self, name, data_manager)
        settings = payload["test_loader"]
        if settings is not None:
            test_set = data_manager.get_dataset(np.arange(0, self._total_classes), source="test", mode="test")
            self.test_loader = DataLoader(test_set, batch_size=settings["batch_size"], shuffle=False,
                                          num_workers=settings["num_workers"])
        if plugin is not None:
            self.cim_load_state_dict(plugin)
        set_rng_states(rng)
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
