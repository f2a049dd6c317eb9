"""One typed, validated config object built from PyCIL's flat JSON dict.

PyCIL merges the experiment JSON into one flat ``args`` dict. The plugin reads its own keys from
that dict (flat, with the paper's names, so PyCIL users feel at home), fills in the paper's
defaults (../shared/docs/method.md §5) and validates every key it reads *before* anything is
loaded: an unknown plugin key, a wrong type or an out-of-range value stops the run with one error
that lists every problem with its key, its value and what is allowed.

Each plugin key is defined once, as a field declared with ``key(default, check, doc)``: its name,
type, default, check and the one-line doc of the README's key table. ``CIMConfig`` holds the keys of
the method, ``DataKeys`` those of the plugin's datasets; ``PLUGIN_KEYS`` (name -> check) and
``key_table_markdown()`` (the README's table, checked by tests/test_readme_keys.py) derive from them.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import Field, dataclass, field, fields
from typing import Any, Callable, Mapping

# BILEVEL_MODES and MASK_SOURCES: the core's vocabularies, also importable from here
from .core.choices import (
    BILEVEL_MODES, FEATURE_DTYPES, MASK_SOURCES, MEMORY_KINDS, PIXEL_CODECS, SQUARE_RATIOS, STORAGE_VIEWS, downsample_factor,
)
from .data.synthetic import COLOUR_MODES, SyntheticSpec

#: Learners the plugin can extend.
SUPPORTED_LEARNERS = ("icarl", "der", "foster", "lucir")
#: The ablation's variants in table order (method.md §6): plain exemplars ("off"), then each mask
#: source (core/choices.py: uniform downsampling, a random box, the CIL model's CAM, CIM with the
#: PAU branch, and the true object box, a diagnostic for datasets that know their objects' boxes).
ABLATION_VARIANTS = ("off", *MASK_SOURCES, "mrdc")
#: Variants that are not a mask source by name, and their plugin keys: MRDC (Wang et al., ICLR 2022)
#: is the whole image as one JPEG (quality from ``cim_codec_quality``, MRDC's 50 by default);
#: ``features`` is the adapted feature memory (Iscen et al., ECCV 2020), ``pca`` the PCA-coded stage
#: maps (AnytimeCL), ``frozen`` the plugin off with the backbone below ``cim_feature_stage`` frozen
#: after the first phase as ``pca`` does (what the freezing alone costs); iCaRL and LUCIR only, so
#: they are not among the default variants, ``ABLATION_VARIANTS``.
NAMED_VARIANTS: dict[str, dict] = {"mrdc": {"cim_mask": "full", "cim_codec": "jpeg"},
                                   "features": {"cim_memory": "features"},
                                   "pca": {"cim_memory": "pca"},
                                   "frozen": {"cim": False, "cim_freeze_lower": True}}
#: Every variant the ablation knows by name, in table order.
ALL_VARIANTS = (*ABLATION_VARIANTS, "features", "pca", "frozen")
#: Learners a feature memory (``cim_memory`` "features") works with.
FEATURE_MEMORY_LEARNERS = ("icarl", "lucir")


def variant_keys(variant: str) -> dict | None:
    """The plugin keys of an ablation variant: None for "off" (plugin off); a mask source
    (``"pau"``: raw pixels), a mask source and a pixel codec (``"pau+jpeg"``), or a named variant
    (``"mrdc"``); any of these with a codec, ``@q`` sets its quality (``"mrdc@30"``, ``"pau+jpeg@75"``:
    a quality pilot in one ablation). Raises ValueError naming what is allowed."""
    name, at, quality = str(variant).partition("@")
    if at:
        keys = variant_keys(name)
        if keys is None or keys.get("cim_codec", "raw") == "raw":
            raise ValueError(f"variant {variant!r}: @quality needs a pixel codec, e.g. mrdc@30 or pau+jpeg@75")
        if not quality.isdigit() or not 1 <= int(quality) <= 100:
            raise ValueError(f"variant {variant!r}: the quality after @ must be an integer in [1, 100]")
        return {**keys, "cim_codec_quality": int(quality)}
    if variant == "off":
        return None
    if variant in NAMED_VARIANTS:
        return {"cim": True, **NAMED_VARIANTS[variant]}
    mask, plus, codec = str(variant).partition("+")
    if mask in MASK_SOURCES and (not plus or codec in PIXEL_CODECS):
        return {"cim": True, "cim_mask": mask, "cim_codec": codec or "raw"}
    raise ValueError(f"unknown variant {variant!r}: use off, mrdc, features, pca, frozen, a mask source ({', '.join(MASK_SOURCES)}) or "
                     f"a mask source + a pixel codec ({', '.join(PIXEL_CODECS)}), e.g. pau+jpeg, and @quality "
                     "after a codec, e.g. mrdc@30")
#: Prefixes that mark a key as the plugin's own (an unknown key with such a prefix is an error).
PLUGIN_PREFIXES = ("cim_", "synthetic_")

#: A key's check: the value -> None if it is allowed, else what is allowed ("must be ...").
Check = Callable[[Any], str | None]


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


def int_in(lo: int, hi: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if not _is_int(v):
            return f"must be an integer{_range_text(lo, hi)}"
        if v < lo or (hi is not None and v > hi):
            return f"must be an integer{_range_text(lo, hi)}"
        return None

    return check


def number_in(lo: float, hi: float | None = None, hi_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = _is_number(v) and v >= lo and (hi is None or (v < hi if hi_open else v <= hi))
        if ok:
            return None
        upper = "" if hi is None else (f" and < {hi}" if hi_open else f" and <= {hi}")
        return f"must be a number >= {lo}{upper}"

    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def one_of(*allowed: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in allowed else "must be one of " + ", ".join(f'"{a}"' for a in allowed)

    return check


def square_ratio(v: Any) -> str | None:
    """The codec's rule (core/choices.py ``downsample_factor``)."""
    try:
        downsample_factor(v)
    except ValueError:
        return f"must be {SQUARE_RATIOS}: each side is downsampled by sqrt(ratio)"
    return None


def int_list(lo: int = 0) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, list) and all(_is_int(x) and x >= lo for x in v):
            return None
        return f"must be a list of integers >= {lo}"

    return check


def path_text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "must be a non-empty path string"


def name_text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "must be a non-empty string (a name)"


def _range_text(lo: int, hi: int | None) -> str:
    return f" >= {lo}" if hi is None else f" in [{lo}, {hi}]"


# ---------------------------------------------------------------------------------------------
# The plugin's keys


def key(default: Any, check: Check, doc: str, shown: str | None = None) -> Any:
    """A dataclass field that is a plugin key: its default, its check and its one-line doc (the
    README's key table row). ``shown``: the default as the table shows it, when the field's default
    is not what a run gets (``cim_checkpoint``); a default of None means "unset"."""
    return field(default=default, metadata={"check": check, "doc": doc, "shown": shown})


@dataclass(frozen=True)
class CIMConfig:
    """The plugin's settings; every field is a flat key of the PyCIL JSON with the same name."""

    cim: bool = key(False, boolean, "turn the plugin on (iCaRL, LUCIR, DER, FOSTER)")
    cim_memory: str = key(
        "image", one_of(*MEMORY_KINDS),
        'what the memory keeps of an exemplar: `"image"` (its pixels: CIM\'s compressed exemplars, or plain ones with '
        '`"cim_mask": "full"`), `"features"` (its final feature vector, herded, carried to every new model by an '
        "adaptation MLP and rehearsed at the classifier; Iscen et al., ECCV 2020; iCaRL and LUCIR, needs `\"cim\": true`; "
        'see *Feature memories*), `"pca"` (the map entering `cim_feature_stage`, coded per exemplar as '
        "`cim_pca_components` CAM-weighted principal directions and coefficients in uint8, replayed through the stages "
        "above it, which alone keep training after the first phase; iCaRL and LUCIR, see *Feature memories*). Same byte "
        "budget for every kind")
    cim_feature_stage: str | None = key(
        None, name_text,
        '`"pca"` and `cim_freeze_lower`: the backbone stage whose *input* map is stored (`"stage_2"`, `"stage_3"` for '
        'resnet32; `"layer2"`..`"layer4"` for resnet18/34/50), checked against the network; the stem and the stages '
        "below it are frozen after the first phase",
        shown="the last stage")
    cim_pca_components: int = key(
        5, int_in(1), '`"pca"`: principal directions k stored per exemplar (at most the map\'s channels and positions)')
    cim_freeze_lower: bool = key(
        False, boolean,
        "freeze the stem and the stages below `cim_feature_stage` from the second phase on (`requires_grad` off, "
        'BatchNorm in eval mode), as `"pca"` always does; plugin on or off (iCaRL, LUCIR): measures what the freezing '
        "alone costs")
    cim_feature_dtype: str = key(
        "float16", one_of(*FEATURE_DTYPES),
        '`"features"`: how a stored vector is kept (2 or 4 bytes per value); an exemplar costs feature width × that')
    cim_adapt_epochs: int = key(
        20, int_in(0),
        '`"features"`: epochs of the adaptation MLP over the phase\'s training images (their features from the old and '
        "the new model, computed once); `0` keeps the stored features as they are")
    cim_adapt_hidden: int = key(1024, int_in(1), '`"features"`: hidden width of the adaptation MLP (x + W₂ ReLU(W₁x))')
    cim_adapt_lr: float = key(1e-3, number_in(0.0), '`"features"`: Adam lr of the adaptation MLP')
    cim_adapt_cls_coef: float = key(
        0.1, number_in(0.0),
        '`"features"`: weight of the classification loss of the mapped features (through the new classifier, '
        "read-only) beside the cosine loss (1 − cos); 0.1 chosen by the drift measured in *Feature memories*")
    cim_classifier_epochs: int = key(
        0, int_in(0),
        '`"features"`: after adaptation, epochs of Adam (lr `cim_adapt_lr`) on the classifier alone over the adapted '
        "stored vectors and the phase's new-class features, which aligns it with the new feature space (Iscen et al.'s "
        "classifier step; LUCIR's frozen old-class rows stay frozen); `0` (the default: no gain measured, see "
        "*Feature memories*) skips it")
    cim_feature_replay_coef: float = key(
        1.0, number_in(0.0),
        '`"features"`, `"pca"`: weight of the stored features\' (decoded maps\') classification loss, added to the learner\'s own loss at '
        "every optimiser step of the later phases")
    cim_feature_batch_size: int = key(
        128, int_in(1),
        '`"features"`, `"pca"`: stored exemplars per rehearsal step; the adaptation MLP\'s batch size; `"pca"`: decode batch')
    cim_feature_drift: bool = key(
        True, boolean,
        '`"features"`: measure per phase how far the stored features drifted (cosine to the new model\'s features of '
        "the same images, before and after adaptation); reads the stored exemplars' images again, which the memory "
        "does not keep: a diagnostic, one feature pass")
    cim_mask: str = key(
        "pau", one_of(*MASK_SOURCES),
        'mask source: `"pau"` (CAM of the CIM branch: PAU activations, shared conv/BN), `"cam"` '
        '(fixed-threshold CAM of the CIL model), `"full"` (the whole image is the box: plain exemplars in the '
        'plugin\'s memory — with a codec, MRDC), `"uniform"` (whole image downsampled, no box), `"random"` '
        '(a box of the CAM box\'s size at a random place), `"oracle"` (the true object box, grid-aligned: '
        "a diagnostic for datasets that know their boxes — the synthetic set)")
    cim_bilevel: str = key(
        "bilevel", one_of(*BILEVEL_MODES),
        'how φ (the PAU coefficients) is trained: `"bilevel"` (inner SGD step on CAM-compressed inputs, '
        'outer loss on clean ones), `"joint"` (outer loss without the inner step), `"none"` (φ frozen at '
        "the ReLU fit)")
    num_meta_iters_per_cls: float = key(
        0.5, number_in(0.0), "mask steps per CIL epoch = new classes × this, on average (fractions carry to later epochs: 0.05 × 5 classes = one step every 4th epoch)")
    meta_batch_size: int = key(16, int_in(2), "batch size of each of the two batches of a mask step")
    lr_ratio: float = key(0.1, number_in(0.0), "inner step size of a mask step = current CIL lr × this")
    phi_lr: float = key(0.01, number_in(0.0), "Adam lr of φ (cosine schedule over the stage)")
    max_phi_grad_norm: float = key(1.0, number_in(0.0), "φ gradient-norm clip")
    phi_weight_decay: float = key(5e-4, number_in(0.0), "Adam weight decay of φ (the official code's)")
    div_coef: float = key(0.2, number_in(0.0), "weight of the branch's CE term in the outer loss")
    reg_coef: float = key(0.1, number_in(0.0), "weight of the mask regulariser mean(M²) in the outer loss")
    cim_foster_old_count: str = key(
        "budget", one_of("budget", "stored"),
        'FOSTER: the old classes\' sample count in its class-balance weights (`beta1`, `beta2`): `"budget"` = '
        "PyCIL's and the official code's `samples_old_class` (budget units per old class), `\"stored\"` = the "
        "exemplars the memory really replays per old class (the mean over old classes; equal to the budget "
        "with plain exemplars). See docs/results.md, *FOSTER at the demo setting*")
    cim_pau_init_range: float = key(
        3.0, number_in(0.5, 100.0),
        "φ's PAUs start as the official rational fit of ReLU on [−3, 3]; r ≠ 3 evaluates them as s·P(x/s), "
        "s = r/3, i.e. the fit on [−r, r] with the same coefficients. Pre-activations of a trained ResNet "
        "reach well past 3, where the r = 3 fit bends away from ReLU: the untrained branch's CAMs then "
        "differ from the network's (cosine 0.86 on the iCaRL demo) and its boxes are looser; r = 10 makes "
        "them agree (0.998). See docs/results.md, *FOSTER at the demo setting*")
    cim_train_old_paus: bool = key(
        False, boolean,
        "DER/FOSTER: whether the PAUs of old backbones keep training (an explicit choice, not a side "
        "effect of frozen convs)")
    compress_ratio: float = key(
        4.0, square_ratio,
        "area ratio outside the box; must be a square (4, 9, 16, …): each side is downsampled by its root")
    cim_codec: str = key(
        "raw", one_of(*PIXEL_CODECS),
        'how stored pixels are kept: `"raw"` (uint8 as they are), or entropy-coded `"jpeg"`, `"webp"`, '
        '`"png"` — the box crop and the low-resolution rest as two files; an exemplar costs its encoded '
        "bytes (with a 4-byte length header) over the bytes of one raw full exemplar")
    cim_codec_quality: int = key(
        50, int_in(1, 100), "quality of `\"jpeg\"` (capped at 95) and `\"webp\"`; MRDC's anchor is JPEG 50. "
        "How to choose it for your data and budget: *Choosing the quality: the rule* under *Memory codecs* (a one-seed pilot, "
        "`benchmarks/quality_pilot.py`)")
    mask_threshold: float = key(0.6, number_in(0.0, 1.0, hi_open=True), "CAM threshold τ in [0, 1)")
    cam_update_interval: int = key(
        40, int_in(1), "epochs between refreshes of the new-class boxes used for the artefact augmentation")
    randombbxblur_prob_incre: float = key(
        0.1, number_in(0.0, 1.0), "share of new-class images compressed on the fly, added at every refresh")
    cam_batch_size: int = key(16, int_in(1), "batch size of the CAM / feature passes")
    cim_storage_size: int = key(
        224, int_in(8, 4096),
        "storage side S for path datasets (ImageNet): each exemplar is stored as S×S uint8 (see "
        "`cim_storage_view`); array datasets are stored at their own size")
    cim_storage_view: str = key(
        "whole", one_of(*STORAGE_VIEWS),
        'path datasets: `"whole"` squeezes the whole image (views wider than 4:1 centre-cropped to 4:1) '
        "into S×S and keeps its aspect (4 bytes), replay rebuilds it at shorter side S — the field of "
        "view PyCIL's own replay of the file sees; `\"crop\"`: PyCIL's test view (shorter side "
        "S·256/224, centre S×S crop)")
    cim_gallery: int = key(
        16, int_in(0, 1000),
        "classes (the first ones learnt) whose top-ranked exemplar is saved as original, CAM, box and "
        "reconstruction in `<log>_gallery.npz` for the gallery figure; `0` = none")
    cim_check_images: bool = key(
        False, boolean,
        "`imagenet100` / `imagenet1000` folders: decode every file once when the data is loaded (before "
        "training; threads, JPEG at reduced scale) and leave unreadable ones out of `train/` and `val/`, "
        "each named in a warning. Plugin on or off")
    cim_seed: bool = key(
        True, boolean,
        "seed python `random`, numpy and torch (CPU and CUDA) with the run's `seed` before the run (PyCIL "
        "itself seeds torch with a constant 1 and uses `seed` only for the class order); `false` keeps "
        "PyCIL's behaviour. Plugin on or off")
    deterministic: bool = key(
        False, boolean,
        "also `torch.use_deterministic_algorithms(True, warn_only=True)` (warn-only: the CUDA backward of "
        "`AdaptiveAvgPool2d`, in every ResNet, has no deterministic kernel and would stop the run), cudnn "
        "deterministic, benchmark off, `CUBLAS_WORKSPACE_CONFIG=:4096:8`")
    cim_checkpoint: bool = key(
        False, boolean,
        "write a checkpoint at the end of every phase (any learner, plugin on or off; see *Checkpoints and "
        "resuming*)",
        shown="value of `cim_resume`")
    cim_resume: bool = key(
        False, boolean,
        "continue from the checkpoints of an earlier run with the same log name (needs `cim_checkpoint`, "
        "so `false` there is refused)")
    cim_first_phase_from: str | None = key(
        None, path_text,
        "a phase-0 checkpoint (`<log>_ckpt/task_0.pt` of a run with the same learner, dataset, class order "
        "and backbone): phase 0 is loaded instead of trained, and the run builds its own memory from that "
        "model (see *Shared first phase*). Plugin on or off")
    cim_later_seed: int | None = key(
        None, int_in(0),
        "reseed python, numpy and torch with this value before the second phase: runs that share their "
        "first phase and differ only here measure the later phases' run-to-run spread (the noise floor of "
        "an ablation). Plugin on or off")
    #: PyCIL's own keys, copied for the plugin's parts (validated in pycil/checks.py, not plugin keys).
    model_name: str = ""
    seed: int = 1993

    @property
    def downsample_factor(self) -> int:
        """Side factor s = sqrt(compress_ratio) (an integer, validated)."""
        return downsample_factor(self.compress_ratio)

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


@dataclass(frozen=True)
class DataKeys:
    """The plugin's dataset keys: pycil/hook.py and pycil/data.py read them from the args
    themselves; declared here so that they are validated and documented with the others. The
    synthetic set's defaults are ``SyntheticSpec``'s."""

    data_root: str | None = key(
        None, path_text,
        "`imagenet100` / `imagenet1000`: folder with `train/` and `val/` class folders; `synthetic`: cache folder")
    synthetic_num_classes: int = key(
        SyntheticSpec.num_classes, int_in(2), 'classes of the built-in synthetic set (`"dataset": "synthetic"`)')
    synthetic_image_size: int = key(
        SyntheticSpec.image_size, int_in(32, 256), "image side of the synthetic set, in pixels")
    synthetic_train_per_class: int = key(
        SyntheticSpec.train_per_class, int_in(2), "training images per class of the synthetic set")
    synthetic_test_per_class: int = key(
        SyntheticSpec.test_per_class, int_in(1), "test images per class of the synthetic set")
    synthetic_seed: int = key(SyntheticSpec.seed, int_in(0), "seed the synthetic set is generated from")
    synthetic_colour: str = key(
        SyntheticSpec.colour, one_of(*COLOUR_MODES),
        '`"class"`: a class is a shape × texture × colour triple; `"random"`: a shape × texture pair '
        "painted in a colour drawn per image (32 classes at most), so that only the object's shape and "
        "fine texture tell classes apart and a whole-image downsampling loses them")


#: Every plugin key's field (name, type, default, ``metadata``: check, doc, shown), in table order.
PLUGIN_FIELDS: tuple[Field, ...] = tuple(
    f for cls in (CIMConfig, DataKeys) for f in fields(cls) if "check" in f.metadata
)

#: Every key the plugin reads, with its check. Keys of PyCIL's iCaRL/DER module constants are
#: in MODULE_HPARAM_KEYS: with the plugin installed they can be set from the JSON (see pycil/hparams.py).
PLUGIN_KEYS: dict[str, Check] = {f.name: f.metadata["check"] for f in PLUGIN_FIELDS}

#: PyCIL's iCaRL / DER module-level hyper-parameters, settable from the JSON through the plugin.
MODULE_HPARAM_KEYS: dict[str, Check] = {
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
LUCIR_KEYS: dict[str, Check] = {
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
    for arg, check in checks.items():
        if arg in args:
            err = check(args[arg])
            if err:
                problems.append(f"key '{arg}' = {args[arg]!r}: {err}")
    known = set(checks)
    for arg in args:
        if arg in known:
            continue
        if arg.startswith(PLUGIN_PREFIXES):
            problems.append(f"key '{arg}' is not a cim-plugin key{_did_you_mean(arg, known)}")
        else:
            close = difflib.get_close_matches(arg, list(PLUGIN_KEYS), n=1, cutoff=0.85)
            if close and arg not in PYCIL_KEYS:
                problems.append(f"key '{arg}' is unknown (did you mean '{close[0]}'?)")
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
    problems += memory_kind_problems(args)
    return problems


def memory_kind_problems(args: Mapping[str, Any]) -> list[str]:
    """``cim_memory`` other than "image" needs the plugin on and a learner it is built for; so does
    ``cim_freeze_lower`` (plugin on or off)."""
    kind = args.get("cim_memory", "image")
    name = str(args.get("model_name", "")).lower()
    problems = []
    if args.get("cim_freeze_lower") is True and name not in FEATURE_MEMORY_LEARNERS:
        problems.append(f"key 'cim_freeze_lower' = True is not built for model_name {name!r}: it works with "
                        f"{', '.join(FEATURE_MEMORY_LEARNERS)} (one backbone split at a stage)")
    if kind == "image" or kind not in MEMORY_KINDS:
        return problems
    if args.get("cim") is not True:
        problems.append(f"key 'cim_memory' = {kind!r} needs \"cim\": true (with the plugin off PyCIL keeps its own "
                        "image exemplars)")
    if name in SUPPORTED_LEARNERS and name not in FEATURE_MEMORY_LEARNERS:
        why = ("one adaptation MLP per phase does not carry stored features to their next model" if kind == "features"
               else "their grown or distilled backbones do not keep one frozen stage split")
        problems.append(f"key 'cim_memory' = {kind!r} is not built for model_name {name!r}: it works with "
                        f"{', '.join(FEATURE_MEMORY_LEARNERS)} (DER and FOSTER grow or distil their networks, so {why})")
    return problems


def _did_you_mean(arg: str, known: set[str]) -> str:
    close = difflib.get_close_matches(arg, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


#: Keys PyCIL itself reads (so that a near-miss check never flags them).
PYCIL_KEYS = frozenset(
    """prefix dataset memory_size memory_per_class fixed_memory shuffle init_cls increment model_name
    convnet_type device seed config logfilename beta1 beta2 oofc is_teacher_wa is_student_wa
    lambda_okd wa_value init_epochs boosting_epochs compression_epochs lr batch_size weight_decay
    num_workers T csv_name time_str pretrained""".split()
)


# ---------------------------------------------------------------------------------------------
# The README's key table


#: The key table's row for the iCaRL/DER module constants (MODULE_HPARAM_KEYS): default and meaning.
MODULE_HPARAM_ROW = ("PyCIL's constants", "with the plugin installed, iCaRL's and DER's module constants can be set "
                     "from the JSON (each override is logged)")


def shown_default(key_field: Field) -> str:
    """A plugin key's default as the key table shows it: the JSON of the default in backticks
    (`4.0`, `"pau"`, `false`), "–" for a key that is unset by default, or the field's ``shown``."""
    if key_field.metadata["shown"] is not None:
        return key_field.metadata["shown"]
    return "–" if key_field.default is None else f"`{json.dumps(key_field.default)}`"


def key_table_markdown() -> str:
    """The README's key table (section "Keys"): a row per plugin key, then one for the module constants."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{f.name}` | {shown_default(f)} | {f.metadata['doc']} |" for f in PLUGIN_FIELDS]
    rows.append(f"| {', '.join(f'`{k}`' for k in MODULE_HPARAM_KEYS)} | {' | '.join(MODULE_HPARAM_ROW)} |")
    return "\n".join(rows) + "\n"
