"""Checks of the PyCIL keys a run needs and of combinations that cannot work.

PyCIL reads its keys with ``args["..."]`` deep inside training, so a missing or mistyped key shows
up as a KeyError hours into a run, and some combinations fail only at the first evaluation. These
checks run in ``before_run``, before anything is loaded, and their problems are reported together
with the plugin's own (one error listing every problem with its key); so is a log or checkpoint
folder the run could not write into (``output_problems``).

PyCIL's trainer reads a few keys of the whole JSON before any run's ``before_run``: it loops over
the ``seed`` list, turns ``device`` into torch devices and names the log after ``prefix`` & co. Those
are checked by ``check_main_config``, which PyCIL's main.py calls once the JSON is loaded
(patches/0007-json-errors.patch; the ablation runner checks ``device`` through ``check_args``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError, boolean, int_in, number_in, one_of

DEVICE_TEXT = 'must be a list such as ["-1"] (the CPU) or ["0", "1"] (GPUs 0 and 1)'


def device_problem(v: Any) -> str | None:
    """``device`` as PyCIL's trainer reads it: a non-empty list of "-1"/"cpu" or GPU numbers (as
    text or integers; in a run, ``before_run`` sees the list already turned into torch devices);
    a GPU must exist on this machine."""
    import torch

    if not isinstance(v, list) or not v:
        return DEVICE_TEXT
    gpus = []
    for item in v:
        if isinstance(item, torch.device):
            if item.type == "cuda":
                gpus.append(item.index or 0)
            elif item.type != "cpu":
                return f"{DEVICE_TEXT}; {item} is not a CPU or CUDA device"
            continue
        text = str(item).strip().lower() if isinstance(item, (str, int)) and not isinstance(item, bool) else None
        if text in ("-1", "cpu"):
            continue
        if text is None or not text.isdigit():
            return f"{DEVICE_TEXT}; {item!r} is not a GPU number"
        gpus.append(int(text))
    if gpus and not torch.cuda.is_available():
        return (f"asks for GPU {', '.join(str(g) for g in gpus)} but this machine has no CUDA device: "
                'use ["-1"] to run on the CPU')
    if gpus and max(gpus) >= torch.cuda.device_count():
        return f"asks for GPU {max(gpus)} but this machine has {torch.cuda.device_count()} CUDA device(s) (0-based)"
    return None


def seed_list_problem(v: Any) -> str | None:
    """``seed`` in the JSON: PyCIL's trainer runs once per seed of the list."""
    if isinstance(v, list) and v and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v):
        return None
    return "must be a list of integers >= 0 such as [1993] (PyCIL runs once per seed)"


#: Keys every PyCIL run reads (trainer.py, DataManager, BaseLearner).
COMMON_KEYS: dict[str, Callable[[Any], str | None]] = {
    "prefix": lambda v: None if isinstance(v, str) else "must be a string",
    "dataset": lambda v: None if isinstance(v, str) and v else "must be a dataset name",
    "memory_size": int_in(0),
    "shuffle": boolean,
    "init_cls": int_in(1),
    "increment": int_in(1),
    "model_name": lambda v: None if isinstance(v, str) and v else "must be a learner name",
    "convnet_type": lambda v: None if isinstance(v, str) and v else "must be a backbone name",
    "device": device_problem,
    "seed": lambda v: None if isinstance(v, int) and not isinstance(v, bool) else "must be an integer (or a list of them in the JSON)",
}

#: Keys FOSTER reads from the JSON (models/foster.py); iCaRL and DER read module constants.
FOSTER_KEYS: dict[str, Callable[[Any], str | None]] = {
    "beta1": number_in(0.0, 1.0, hi_open=True),
    "beta2": number_in(0.0, 1.0, hi_open=True),
    "oofc": one_of("ft", "az"),
    "is_teacher_wa": boolean,
    "is_student_wa": boolean,
    "lambda_okd": number_in(0.0),
    "wa_value": number_in(0.0),
    "init_epochs": int_in(0),
    "init_lr": number_in(0.0),
    "init_weight_decay": number_in(0.0),
    "boosting_epochs": int_in(0),
    "compression_epochs": int_in(0),
    "lr": number_in(0.0),
    "batch_size": int_in(1),
    "weight_decay": number_in(0.0),
    "num_workers": int_in(0),
    "T": number_in(0.0),
}

REQUIRED_BY_LEARNER = {"foster": FOSTER_KEYS}

#: PyCIL's eval_task takes the top-5 predictions: fewer classes in the first task crash it.
TOPK = 5


def pycil_problems(args: dict, num_classes: int | None, image_size: int | None) -> list[str]:
    """Problems with PyCIL's own keys and with combinations (``num_classes`` / ``image_size`` of the
    dataset when the plugin knows them, else None)."""
    problems: list[str] = []
    required = {**COMMON_KEYS, **REQUIRED_BY_LEARNER.get(str(args.get("model_name", "")).lower(), {})}
    for key, check in required.items():
        if key not in args:
            problems.append(f"key '{key}' is missing (PyCIL reads it)")
        else:
            err = check(args[key])
            if err:
                problems.append(f"key '{key}' = {args[key]!r}: {err}")
    init, inc = args.get("init_cls"), args.get("increment")
    if isinstance(init, int) and init < TOPK:
        problems.append(f"key 'init_cls' = {init}: PyCIL evaluates top-{TOPK} accuracy, so the first task needs at least {TOPK} classes")
    if num_classes is not None and isinstance(init, int) and init > num_classes:
        problems.append(f"key 'init_cls' = {init}: the dataset has only {num_classes} classes")
    if num_classes is not None and isinstance(init, int) and isinstance(inc, int) and init < num_classes and inc > num_classes - init:
        problems.append(f"key 'increment' = {inc}: only {num_classes - init} classes are left after the first task")
    if args.get("fixed_memory") is True and not isinstance(args.get("memory_per_class"), int):
        problems.append("key 'memory_per_class' must be an integer when 'fixed_memory' is true")
    convnet = str(args.get("convnet_type", "")).lower()
    if convnet in ("resnet32", "cosine_resnet32") and image_size is not None and image_size != 32:
        problems.append(f"key 'convnet_type' = {convnet!r} works only at 32 px (fixed AvgPool2d(8)); the images are {image_size} px")
    if args.get("cim") is True and args.get("cim_memory", "image") == "image" and args.get("cim_mask", "pau") == "pau" and convnet in ("resnet32", "cosine_resnet32"):
        problems.append(
            f"key 'cim_mask' = 'pau' needs nn.ReLU modules to swap for PAUs; PyCIL's {convnet} uses F.relu: "
            "use a resnet18/34/50 backbone or cim_mask 'cam'"
        )
    return problems


def folder_class_count(root: str) -> int | None:
    train = Path(root).expanduser() / "train"
    if not train.is_dir():
        return None
    return sum(1 for p in train.iterdir() if p.is_dir())


#: Keys PyCIL's trainer reads for the whole file (its loop over seeds) and to name the log, before
#: a run's ``before_run`` sees them.
MAIN_KEYS = ("prefix", "dataset", "model_name", "convnet_type", "init_cls", "increment", "device", "seed")


def main_config_problems(param: Any) -> list[str]:
    """Problems with the keys of a whole PyCIL JSON that its trainer reads before any run starts:
    ``seed`` must be a list (of the seeds to run), ``device`` a list of devices this machine has,
    and the keys of the log name must be there."""
    if not isinstance(param, dict):
        return ["must hold a JSON object of PyCIL keys"]
    problems = []
    for key in MAIN_KEYS:
        if key not in param:
            problems.append(f"key '{key}' is missing (PyCIL reads it)")
            continue
        err = (seed_list_problem if key == "seed" else COMMON_KEYS[key])(param[key])
        if err:
            problems.append(f"key '{key}' = {param[key]!r}: {err}")
    return problems


def check_main_config(param: Any, path: str) -> None:
    """Called by PyCIL's patched main.py (patches/0007-json-errors.patch) with the loaded JSON:
    stops with one message listing every problem of :func:`main_config_problems`."""
    problems = main_config_problems(param)
    if problems:
        raise SystemExit(str(ConfigError(problems, f"config {path}")))


def writable_problem(folder: Path, what: str) -> str | None:
    """None if files can be written in ``folder`` (or, when it does not exist yet, in the nearest
    folder above it, where it will be made); else why not, naming ``folder``."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f" ({existing} is in the way)"
        return f"{what} {folder} cannot be made: it is not a folder{where}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".cim-plugin-write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{what} {folder} is not writable ({err.strerror or err})"
    return None


def output_problems(args: dict) -> list[str]:
    """The folders a run writes into must be writable before it trains: the log folder (PyCIL's
    log, the results and gallery files) and, with ``cim_checkpoint`` (or ``cim_resume``), the
    checkpoint folder. Needs ``logfilename`` (set by the patched trainer); else nothing is checked."""
    if not args.get("logfilename"):
        return []
    from .checkpoint import checkpoint_dir
    from .results import results_path

    problems = []
    err = writable_problem(results_path(args).parent, "the log folder (PyCIL's log, the results file)")
    if err:
        problems.append(err)
    if args.get("cim_checkpoint", args.get("cim_resume", False)) is True:
        err = writable_problem(checkpoint_dir(args), "key 'cim_checkpoint': the checkpoint folder")
        if err:
            problems.append(err)
    return problems
