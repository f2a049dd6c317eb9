"""Checks of the PyCIL keys a run needs and of combinations that cannot work.

PyCIL reads its keys with ``args["..."]`` deep inside training, so a missing or mistyped key shows
up as a KeyError hours into a run, and some combinations fail only at the first evaluation. These
checks run in ``before_run``, before anything is loaded, and their problems are reported together
with the plugin's own (one error listing every problem with its key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..config import boolean, int_in, number_in, one_of

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
    "device": lambda v: None if isinstance(v, list) and v else 'must be a list such as ["0"] or ["-1"] for the CPU',
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
    if args.get("cim") is True and args.get("cim_mask", "pau") == "pau" and convnet in ("resnet32", "cosine_resnet32"):
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
