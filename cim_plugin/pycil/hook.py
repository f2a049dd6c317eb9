"""Entry points PyCIL calls through ``utils/plugin_hook.py`` (added by patches/0006-plugin-hook.patch)
and ``utils/ddp_hook.py`` (``before_logging``, ``train_parallel``: patches/0008-distributed.patch).

trainer._train:  before_logging(args) -> logging.basicConfig -> before_run(args) -> DataManager(...)
                 [-> get_idata(name)] -> factory.get_model(...) [-> get_model(name, args) for names
                 PyCIL lacks] -> wrap_learner(model, args) -> task loop -> after_run(model, args)

With ``"cim": false`` (or absent) the learner is PyCIL's own, composed only with the results
recorder and the per-phase checkpointer (neither changes training; the checkpointer does nothing
unless ``cim_checkpoint``/``cim_resume`` is set); with ``"cim": true`` the CIM mixin is composed
in front of it as well (learner.py), or, with ``"cim_memory": "features"``, the feature memory's
(features.py), or with ``"pca"`` the PCA memory's (pca.py) behind the stage freezer (stages.py,
also composed alone by ``"cim_freeze_lower": true``). The run's args are kept here between before_run and get_idata because
PyCIL's DataManager receives only the dataset name.

before_run also seeds python ``random``, numpy and torch with the run's ``seed`` (PyCIL seeds
torch with a constant 1; key ``cim_seed``, default true) and, with ``"deterministic": true``,
switches torch to deterministic algorithms (see ``cim_plugin/seeding.py``). Plugin on or off.

Under torchrun (``WORLD_SIZE`` > 1) before_run joins the process group and wrap_learner adds the
``DistributedMixin`` (``ddp.py``); ``train_parallel`` is FOSTER's seam for its student network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import distributed
from ..config import CIMConfig, ConfigError
from ..seeding import seed_everything, set_deterministic
from .data import FOLDER_DATASETS, folder_problems, imagenet_idata, synthetic_idata, synthetic_spec
from .checkpoint import CheckpointMixin
from .first_phase import FirstPhaseMixin
from .checks import folder_class_count, pycil_problems
from .ddp import DistributedMixin, ddp_problems
from .ddp import start as start_ddp
from .hparams import apply_module_hparams
from .features import FeatureMemoryMixin, feature_memory_problems
from .learner import CIMLearnerMixin
from .pca import PCAMemoryMixin
from .stages import FrozenStagesMixin
from .results import ResultsMixin

log = logging.getLogger(__name__)

#: The args of the run in progress (set by before_run).
_RUN: dict[str, Any] = {}

SYNTHETIC_NAME = "synthetic"
#: (classes, image side) of PyCIL's array datasets, for the combination checks.
KNOWN_DATASETS = {"cifar10": (10, 32), "cifar100": (100, 32)}


def check_args(args: dict) -> CIMConfig:
    """Validate every key the plugin reads, the dataset it must provide and, in a run (``logfilename``
    set), that its output folders are writable; one error lists all."""
    source = f"config {args['config']}" if args.get("config") else "the config"
    problems: list[str] = []
    try:
        cfg = CIMConfig.from_args(args, source)
    except ConfigError as err:
        problems += err.problems
        cfg = None
    dataset = str(args.get("dataset", "")).lower()
    num_classes, image_size = KNOWN_DATASETS.get(dataset, (None, None))
    if dataset == SYNTHETIC_NAME:
        try:
            spec = synthetic_spec(args)
            spec.validate()
            num_classes, image_size = spec.num_classes, spec.image_size
        except (ValueError, TypeError) as err:
            problems.append(f"synthetic dataset: {err}")
    elif dataset in FOLDER_DATASETS:
        if "data_root" not in args:
            problems.append(f"key 'dataset' = {dataset!r} needs 'data_root': a folder with train/ and val/ class folders")
        else:
            problems += folder_problems(args["data_root"])
            num_classes = folder_class_count(args["data_root"]) or None
    first = args.get("cim_first_phase_from")
    if isinstance(first, str) and first.strip() and not Path(first).expanduser().is_file():
        problems.append(f"key 'cim_first_phase_from' = {first!r}: no such checkpoint file")
    problems += pycil_problems(args, num_classes, image_size)
    problems += ddp_problems(args)
    problems += feature_memory_problems(args)
    from .checks import output_problems  # the run's output folders (in a run: logfilename is set)

    problems += output_problems(args)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def before_run(args: dict) -> None:
    try:
        cfg = check_args(args)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    _RUN.clear()
    _RUN["args"] = args
    _RUN["config"] = cfg
    if distributed.launched():  # torchrun: the process group, and this rank's device in args["device"]
        try:
            start_ddp(args)
        except distributed.DistributedError as err:
            raise SystemExit(f"cim-plugin: {err}") from None
    seed_run(args, cfg)
    if cfg.cim_check_images and str(args.get("dataset", "")).lower() not in FOLDER_DATASETS:
        log.info("cim-plugin: cim_check_images: %s is not read from files, nothing to scan", args.get("dataset"))
    if cfg.cim and cfg.cim_memory == "features":
        log.info("cim-plugin: on, feature memory (%s vectors, adaptation MLP %d epochs)", cfg.cim_feature_dtype, cfg.cim_adapt_epochs)
    elif cfg.cim and cfg.cim_memory == "pca":
        log.info("cim-plugin: on, pca feature memory (map entering %s, k = %d; the backbone below frozen after the "
                 "first phase)", cfg.cim_feature_stage or "the last stage", cfg.cim_pca_components)
    elif cfg.cim:
        log.info(
            "cim-plugin: on (%s masks, compress_ratio %s, mask_threshold %s)", cfg.cim_mask, cfg.compress_ratio, cfg.mask_threshold
        )
    else:
        log.info("cim-plugin: installed, \"cim\" off: plain PyCIL exemplars (results file only)")


def seed_run(args: dict, cfg: CIMConfig) -> None:
    """Seed the run with its own ``seed`` (an int here: PyCIL's trainer loops over the JSON's list)."""
    seed = args.get("seed")
    if cfg.cim_seed and isinstance(seed, int) and not isinstance(seed, bool):
        seed_everything(seed, deterministic=cfg.deterministic)
        return
    if cfg.deterministic:
        set_deterministic()
        log.info("cim-plugin: deterministic algorithms on")
    if not cfg.cim_seed:
        log.info("cim-plugin: \"cim_seed\": false: torch keeps PyCIL's constant seed 1")


def get_idata(dataset_name: str) -> Any:
    """A PyCIL iData for datasets the plugin provides, or None to let PyCIL decide."""
    args = _RUN.get("args", {})
    name = dataset_name.lower()
    if name == SYNTHETIC_NAME:
        return synthetic_idata(args)
    if name in FOLDER_DATASETS and "data_root" in args:
        cfg = _RUN.get("config")
        return imagenet_idata(name, args["data_root"], check_images=bool(cfg and cfg.cim_check_images))
    return None


def get_model(model_name: str, args: dict) -> Any:
    """A learner the plugin provides (PyCIL's factory asks for names it lacks), or None."""
    if str(model_name).lower() == "lucir":
        from .lucir import LUCIR  # imports PyCIL's modules: only ever called inside a PyCIL run

        return LUCIR(args)
    return None


def wrap_learner(model: Any, args: dict) -> Any:
    """Compose the plugin's mixins in front of the learner's own class."""
    cfg = _RUN.get("config") or check_args(args)
    apply_module_hparams(args)
    mixins = (ResultsMixin, CheckpointMixin, FirstPhaseMixin)
    if distributed.active():
        mixins += (DistributedMixin,)
    pca = cfg.cim and cfg.cim_memory == "pca"
    if pca or cfg.cim_freeze_lower:  # the backbone below cim_feature_stage frozen after the first phase
        mixins += (FrozenStagesMixin,)
    if cfg.cim:  # the memory kind decides the mixin: images (CIM), feature vectors or PCA-coded maps
        memory = {"features": FeatureMemoryMixin, "pca": PCAMemoryMixin}.get(cfg.cim_memory, CIMLearnerMixin)
        mixins += (memory,)
    base = type(model)
    # the name says what the learner is (checkpoints record it), not how many processes run it
    named = "".join(m.__name__.replace("Mixin", "") for m in mixins if m is not DistributedMixin)
    model.__class__ = type(f"{base.__name__}With{named}", (*mixins, base), {})
    model._results_setup(args, cfg.cim_storage_size)
    model._ckpt_setup(args, cfg.cim_checkpoint, cfg.cim_resume)
    model._first_phase_setup(args, cfg.cim_first_phase_from, cfg.cim_later_seed)
    if isinstance(model, FrozenStagesMixin):
        model._freeze_setup(cfg.cim_feature_stage)
    if cfg.cim:
        model.cim_setup(cfg)
    return model


def before_logging(args: dict) -> None:
    """Before PyCIL configures logging: under torchrun, ranks other than 0 open no log file."""
    if distributed.launched():
        try:
            distributed.quiet_other_ranks(distributed.env_ranks()[0])
        except distributed.DistributedError as err:
            raise SystemExit(f"cim-plugin: {err}") from None


def train_parallel(learner: Any, network: Any) -> Any:
    """The network a training stage made itself (FOSTER's student), in DDP under torchrun."""
    return learner.ddp_wrap(network) if isinstance(learner, DistributedMixin) else network


def after_run(model: Any, args: dict) -> None:
    if isinstance(model, ResultsMixin):
        model._results_finish()
