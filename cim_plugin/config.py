"""One typed, validated config object built from PyCIL's flat JSON dict.

PyCIL merges the experiment JSON into one flat ``args`` dict. The plugin reads its own keys from
that dict (flat, with the paper's names, so PyCIL users feel at home), fills in the paper's
defaults (../shared/docs/method.md §5) and validates every key it reads *before* anything is
loaded: an unknown plugin key, a wrong type or an out-of-range value stops the run with one error
that lists every problem with its key, its value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

#: Learners the plugin can extend.
SUPPORTED_LEARNERS = ("icarl", "der", "foster", "lucir")
#: Mask sources: how the full-resolution box of an exemplar is chosen.
MASK_SOURCES = ("pau", "cam", "uniform", "random", "oracle")
#: The ablation's variants in table order (method.md §6): plain exemplars, uniform downsampling,
#: a random box, the CIL model's CAM, CIM with the PAU branch, and the true object box (a
#: diagnostic for datasets that know their objects' boxes).
ABLATION_VARIANTS = ("off", "uniform", "random", "cam", "pau", "oracle")
#: How the PAU branch's coefficients are trained: the paper's bilevel step, without the inner
#: step ("joint"), or not at all ("none": frozen at the ReLU fit).
BILEVEL_MODES = ("bilevel", "joint", "none")
#: Prefixes that mark a key as the plugin's own (an unknown key with such a prefix is an error).
PLUGIN_PREFIXES = ("cim_", "synthetic_")


class ConfigError(ValueError):
    """A config with one or more problems; ``problems`` lists them, one line each."""

    def __init__(self, problems: list[str], source: str = "the config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cim-plugin: {len(self.problems)} problem(s) in {source}:\n{lines}")


# ---------------------------------------------------------------------------------------------
# Small validators: each returns an error text or None.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def int_in(lo: int, hi: int | None = None) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not _is_int(v):
            return f"must be an integer{_range_text(lo, hi)}"
        if v < lo or (hi is not None and v > hi):
            return f"must be an integer{_range_text(lo, hi)}"
        return None

    return check


def number_in(lo: float, hi: float | None = None, hi_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = _is_number(v) and v >= lo and (hi is None or (v < hi if hi_open else v <= hi))
        if ok:
            return None
        upper = "" if hi is None else (f" and < {hi}" if hi_open else f" and <= {hi}")
        return f"must be a number >= {lo}{upper}"

    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def one_of(*allowed: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else "must be one of " + ", ".join(f'"{a}"' for a in allowed)

    return check


def square_ratio(v: Any) -> str | None:
    if not _is_number(v) or v < 4:
        return "must be the square of an integer >= 2 (4, 9, 16, ...)"
    s = round(math.sqrt(v))
    if abs(s * s - v) > 1e-9:
        return "must be the square of an integer >= 2 (4, 9, 16, ...): each side is downsampled by sqrt(ratio)"
    return None


def int_list(lo: int = 0) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, list) and all(_is_int(x) and x >= lo for x in v):
            return None
        return f"must be a list of integers >= {lo}"

    return check


def path_text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "must be a non-empty path string"


def _range_text(lo: int, hi: int | None) -> str:
    return f" >= {lo}" if hi is None else f" in [{lo}, {hi}]"


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CIMConfig:
    """The plugin's settings; every field is a flat key of the PyCIL JSON with the same name."""

    cim: bool = False
    cim_mask: str = "pau"
    compress_ratio: float = 4.0
    mask_threshold: float = 0.6
    cam_update_interval: int = 40
    randombbxblur_prob_incre: float = 0.1
    cam_batch_size: int = 16
    cim_storage_size: int = 224
    #: Classes whose top-ranked exemplar is kept (original, CAM, box, reconstruction) in
    #: ``<log>_gallery.npz`` for the gallery figure; 0 = none.
    cim_gallery: int = 16
    cim_bilevel: str = "bilevel"
    cim_train_old_paus: bool = False
    meta_batch_size: int = 16
    num_meta_iters_per_cls: float = 0.5
    lr_ratio: float = 0.1
    phi_lr: float = 0.01
    #: Adam weight decay of φ (the official code's 5e-4).
    phi_weight_decay: float = 5e-4
    max_phi_grad_norm: float = 1.0
    div_coef: float = 0.2
    reg_coef: float = 0.1
    cim_check_images: bool = False
    cim_seed: bool = True
    deterministic: bool = False
    #: Write a checkpoint at the end of every phase (default: the value of ``cim_resume``).
    cim_checkpoint: bool = False
    #: Continue from the checkpoints of an earlier run with the same log name (see pycil/checkpoint.py).
    cim_resume: bool = False
    #: A phase-0 checkpoint (``<log>_ckpt/task_0.pt`` of a run with the same learner, data and
    #: backbone) to start from instead of training phase 0 (see pycil/first_phase.py).
    cim_first_phase_from: str | None = None
    model_name: str = ""
    seed: int = 1993

    @property
    def downsample_factor(self) -> int:
        """Side factor s = sqrt(compress_ratio) (an integer, validated)."""
        return round(math.sqrt(self.compress_ratio))

    @classmethod
    def from_args(cls, args: Mapping[str, Any], source: str = "the config") -> "CIMConfig":
        """Build and validate; raises ConfigError listing every problem."""
        problems = validate_args(args)
        if problems:
            raise ConfigError(problems, source)
        values = {f.name: args[f.name] for f in fields(cls) if f.name in args}
        values["model_name"] = str(args.get("model_name", "")).lower()
        seed = args.get("seed", cls.seed)
        values["seed"] = seed if _is_int(seed) else cls.seed
        if "compress_ratio" in values:
            values["compress_ratio"] = float(values["compress_ratio"])
        values.setdefault("cim_checkpoint", values.get("cim_resume", False))
        return cls(**values)


#: Every key the plugin reads, with its check. Keys of PyCIL's iCaRL/DER module constants are
#: included: with the plugin installed they can be set from the JSON (see pycil/hparams.py).
PLUGIN_KEYS: dict[str, Callable[[Any], str | None]] = {
    "cim": boolean,
    "cim_mask": one_of(*MASK_SOURCES),
    "compress_ratio": square_ratio,
    "mask_threshold": number_in(0.0, 1.0, hi_open=True),
    "cam_update_interval": int_in(1),
    "randombbxblur_prob_incre": number_in(0.0, 1.0),
    "cam_batch_size": int_in(1),
    "cim_storage_size": int_in(8, 4096),
    "cim_gallery": int_in(0, 1000),
    "cim_bilevel": one_of(*BILEVEL_MODES),
    "cim_train_old_paus": boolean,
    "meta_batch_size": int_in(2),
    "num_meta_iters_per_cls": number_in(0.0),
    "lr_ratio": number_in(0.0),
    "phi_lr": number_in(0.0),
    "phi_weight_decay": number_in(0.0),
    "max_phi_grad_norm": number_in(0.0),
    "div_coef": number_in(0.0),
    "reg_coef": number_in(0.0),
    "cim_checkpoint": boolean,
    "cim_resume": boolean,
    "cim_first_phase_from": path_text,
    "data_root": path_text,
    "cim_check_images": boolean,
    "cim_seed": boolean,
    "deterministic": boolean,
    "synthetic_num_classes": int_in(2),
    "synthetic_image_size": int_in(32, 256),
    "synthetic_train_per_class": int_in(2),
    "synthetic_test_per_class": int_in(1),
    "synthetic_seed": int_in(0),
}

#: PyCIL's iCaRL / DER module-level hyper-parameters, settable from the JSON through the plugin.
MODULE_HPARAM_KEYS: dict[str, Callable[[Any], str | None]] = {
    "init_epoch": int_in(0),
    "init_lr": number_in(0.0),
    "init_milestones": int_list(0),
    "init_lr_decay": number_in(0.0),
    "init_weight_decay": number_in(0.0),
    "epochs": int_in(0),
    "lrate": number_in(0.0),
    "milestones": int_list(0),
    "lrate_decay": number_in(0.0),
    "batch_size": int_in(1),
    "weight_decay": number_in(0.0),
    "num_workers": int_in(0),
    "T": number_in(0.0),
}

#: LUCIR's own keys (the plugin's learner, pycil/lucir.py, where the paper's defaults live). Its
#: schedule is read from the MODULE_HPARAM_KEYS names above (init_epoch, lrate, milestones, ...).
LUCIR_KEYS: dict[str, Callable[[Any], str | None]] = {
    "lambda_base": number_in(0.0),
    "K": int_in(1),
    "margin": number_in(0.0),
    "lambda_mr": number_in(0.0),
    "imprint_weights": boolean,
}


def validate_args(args: Mapping[str, Any]) -> list[str]:
    """All problems with the keys the plugin reads (empty list = fine)."""
    problems: list[str] = []
    checks = {**PLUGIN_KEYS, **MODULE_HPARAM_KEYS, **LUCIR_KEYS}
    for key, check in checks.items():
        if key in args:
            err = check(args[key])
            if err:
                problems.append(f"key '{key}' = {args[key]!r}: {err}")
    known = set(checks)
    for key in args:
        if key in known:
            continue
        if key.startswith(PLUGIN_PREFIXES):
            problems.append(f"key '{key}' is not a cim-plugin key{_did_you_mean(key, known)}")
        else:
            close = difflib.get_close_matches(key, list(PLUGIN_KEYS), n=1, cutoff=0.85)
            if close and key not in PYCIL_KEYS:
                problems.append(f"key '{key}' is unknown (did you mean '{close[0]}'?)")
    if args.get("cim_resume") is True and args.get("cim_checkpoint") is False:
        problems.append(
            "key 'cim_resume' = True needs the per-phase checkpoints: leave 'cim_checkpoint' out or set it to true"
        )
    if args.get("cim") is True:
        name = str(args.get("model_name", "")).lower()
        if name not in SUPPORTED_LEARNERS:
            problems.append(
                f"key 'model_name' = {args.get('model_name')!r}: \"cim\": true works with "
                + ", ".join(SUPPORTED_LEARNERS)
            )
    return problems


def _did_you_mean(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


#: Keys PyCIL itself reads (so that a near-miss check never flags them).
PYCIL_KEYS = frozenset(
    """prefix dataset memory_size memory_per_class fixed_memory shuffle init_cls increment model_name
    convnet_type device seed config logfilename beta1 beta2 oofc is_teacher_wa is_student_wa
    lambda_okd wa_value init_epochs boosting_epochs compression_epochs lr batch_size weight_decay
    num_workers T csv_name time_str pretrained""".split()
)
