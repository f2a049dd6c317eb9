"""Make PyCIL's iCaRL / DER module-level hyper-parameters settable from the JSON.

PyCIL's models/icarl.py and models/der.py read epochs, learning rates, milestones, batch size,
workers and T from module constants (init_epoch = 200, ...), so a short demo or test run cannot
be configured. With the plugin installed, a JSON key of the same name overrides the constant
for the run (validated in config.MODULE_HPARAM_KEYS); each override is logged. FOSTER already
reads these from the JSON and needs nothing.
"""

from __future__ import annotations

import importlib
import logging

from ..config import MODULE_HPARAM_KEYS

log = logging.getLogger(__name__)

#: Learners whose hyper-parameters are module constants, and their PyCIL module.
CONSTANT_HPARAM_MODULES = {"icarl": "models.icarl", "der": "models.der"}


def apply_module_hparams(args: dict) -> dict:
    """Set the learner module's constants from ``args``; returns {key: (old, new)} for what changed."""
    module_name = CONSTANT_HPARAM_MODULES.get(str(args.get("model_name", "")).lower())
    if module_name is None:
        return {}
    module = importlib.import_module(module_name)
    changed = {}
    for key in MODULE_HPARAM_KEYS:
        if key in args and hasattr(module, key):
            old = getattr(module, key)
            setattr(module, key, args[key])
            if old != args[key]:
                changed[key] = (old, args[key])
    for key, (old, new) in changed.items():
        log.info("cim-plugin: %s.%s = %r (from the JSON; PyCIL's constant is %r)", module_name, key, new, old)
    return changed


def stage_epochs(learner, scheduler) -> int:
    """Epochs of the learner's current training stage (for φ's cosine schedule): the scheduler's
    ``T_max`` when it has one, else the JSON key or the learner module's constant
    (``init_epoch(s)`` in the first phase, ``boosting_epochs`` / ``epochs`` later), else 1."""
    t_max = getattr(scheduler, "T_max", None)
    if isinstance(t_max, int) and t_max > 0:
        return t_max
    keys = ("init_epochs", "init_epoch") if learner._cur_task == 0 else ("boosting_epochs", "epochs")
    own = next((c for c in type(learner).__mro__ if c.__module__.startswith("models.") and c.__module__ != "models.base"),
               type(learner))
    module = importlib.import_module(own.__module__)
    for key in keys:
        value = learner.args.get(key, getattr(module, key, None))
        if isinstance(value, int) and value > 0:
            return value
    return 1
