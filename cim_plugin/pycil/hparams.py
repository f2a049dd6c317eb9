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
