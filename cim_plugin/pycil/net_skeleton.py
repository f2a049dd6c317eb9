"""Network structures rebuilt without unpickling modules (checkpoints, format version 2).

A checkpoint holds each network of the learner as its ``state_dict()`` plus its train/eval and
``requires_grad`` flags, never as a pickled module, so it loads with ``torch.load(...,
weights_only=True)``. To resume, the module must exist before its weights are loaded: a *recipe*
rebuilds it — a fresh network of the live learner's own network class, made from the live learner's
``args`` as the learner makes it, grown by the calls the learner made in the phases up to the saved
one. ``totals[t]`` is the number of classes seen after task t. Recipes (read from PyCIL's
``models/{icarl,der,foster}.py`` and ``utils/inc_net.py``, and the plugin's ``lucir.py``), for the
checkpoint of task k (written at the end of ``incremental_train``, before ``after_task``):

- iCaRL (``IncrementalNet``) and DER (``DERNet``): ``_network`` = fresh, then ``update_fc(totals[t])``
  for t = 0..k (DERNet adds one backbone per call); ``_old_network`` (iCaRL, from task 1 on: the
  frozen copy ``after_task`` made of task k-1's network) = the same for t = 0..k-1. DER never sets
  ``_old_network``.
- LUCIR (``CosineIncrementalNet``, ``nb_proxy`` of the live network): ``update_fc(totals[t], t)``
  for t = 0..k (CosineLinear, then SplitCosineLinear); ``_old_network`` the same up to k-1.
- FOSTER (``FOSTERNet``): ``_network`` at task 0 = fresh + ``update_fc(totals[0])``; from task 1 on
  it is the network that trained phase k, the previous phase's student grown by one backbone (at
  task 1 the task-0 network), i.e. fresh + ``update_fc(totals[k-1])`` + ``update_fc(totals[k])``
  (two backbones, ``oldfc``); ``_snet`` (from task 1) = fresh + ``update_fc(totals[k])``, the
  compressed student that becomes the next phase's network. FOSTER never sets ``_old_network``.
- Attributes holding the same module as another (``_network_module_ptr`` of DER and FOSTER,
  FOSTER's ``_snet_module_ptr``) are saved as references to it (checkpoint.py), not rebuilt.

The weights then come from the checkpoint (``load_state_dict(strict=True)``) and the flags from its
record. A rebuilt structure is compared with the saved one (``mismatches``: state_dict keys, shapes
and dtypes; the class and the plain attributes of every submodule, such as ``out_features`` or
DERNet's ``task_sizes``) when the checkpoint is written, so a recipe that no longer fits the PyCIL
in use stops the run at its first checkpoint rather than at resume, and again when it is read.

A learner class may bring its own recipe: a method ``cim_net_skeleton(name, task, totals)`` that
returns the module (or raises ``NoRecipe``). Learners with neither (other PyCIL learners, plugin off)
are checkpointed in the pickled fallback format (see checkpoint.py).

The plugin's PAU branch φ (``core.branch.PAUBranch``) is rebuilt the same way, from its options and
the ReLU site names of its backbones (``pau_branch_structure`` / ``pau_branch_skeleton``).

No PyCIL imports here.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .nets import unwrap

#: A recipe bound to a learner: (attribute name, task, class totals up to that task) -> module.
Recipe = Callable[[str, int, Sequence[int]], nn.Module]

#: Attributes that own their module when several attributes hold the same one (the others are saved
#: as references to it), in this order; then any other attribute, in the learner's attribute order.
OWNERS = ("_network", "_old_network", "_snet")


class NoRecipe(LookupError):
    """The learner's recipe cannot rebuild this attribute."""


def _fresh(learner: Any, **kwargs) -> nn.Module:
    """A new network of the live learner's network class, made as PyCIL's learners make it
    (``Net(args, False)``)."""
    live = getattr(learner, "_network", None)
    if live is None:
        raise NoRecipe("the learner has no network to take the class from")
    return type(unwrap(live))(learner.args, False, **kwargs)


def _incremental(learner: Any, name: str, task: int, totals: Sequence[int]) -> nn.Module:
    """iCaRL (IncrementalNet), DER (DERNet): ``update_fc(total)`` once per task."""
    upto = {"_network": task, "_old_network": task - 1}.get(name)
    if upto is None or upto < 0:
        raise NoRecipe(name)
    net = _fresh(learner)
    for total in totals[: upto + 1]:
        net.update_fc(total)
    return net


def _lucir(learner: Any, name: str, task: int, totals: Sequence[int]) -> nn.Module:
    """LUCIR (CosineIncrementalNet): ``update_fc(total, task)`` once per task."""
    upto = {"_network": task, "_old_network": task - 1}.get(name)
    if upto is None or upto < 0:
        raise NoRecipe(name)
    net = _fresh(learner, nb_proxy=unwrap(learner._network).nb_proxy)
    for t, total in enumerate(totals[: upto + 1]):
        net.update_fc(total, t)
    return net


def _foster(learner: Any, name: str, task: int, totals: Sequence[int]) -> nn.Module:
    """FOSTER (FOSTERNet): the network of phase k is the student of phase k-1 grown by a backbone."""
    if name == "_network":
        calls = totals[:1] if task == 0 else totals[task - 1: task + 1]
    elif name == "_snet" and task >= 1:
        calls = totals[task: task + 1]
    else:
        raise NoRecipe(name)
    net = _fresh(learner)
    for total in calls:
        net.update_fc(total)
    return net


#: Recipes by learner class name (the first class of the learner's MRO found here).
RECIPES: dict[str, Callable[[Any, str, int, Sequence[int]], nn.Module]] = {
    "iCaRL": _incremental,
    "DER": _incremental,
    "LUCIR": _lucir,
    "FOSTER": _foster,
}


def _recipe_class(learner: Any) -> str | None:
    """The first class name of ``learner``'s MRO that has a recipe in ``RECIPES``."""
    return next((cls.__name__ for cls in type(learner).__mro__ if cls.__name__ in RECIPES), None)


def recipe_for(learner: Any) -> Recipe | None:
    """The recipe that rebuilds ``learner``'s networks: its own ``cim_net_skeleton`` method, else
    the one of the first class of its MRO in ``RECIPES``; None for a learner without one."""
    own = getattr(learner, "cim_net_skeleton", None)
    if callable(own):
        return own
    name = _recipe_class(learner)
    return None if name is None else functools.partial(RECIPES[name], learner)


def recipe_name(learner: Any) -> str | None:
    """Which recipe ``recipe_for`` picks (for log lines and errors)."""
    if callable(getattr(learner, "cim_net_skeleton", None)):
        return f"{type(learner).__name__}.cim_net_skeleton"
    return _recipe_class(learner)


# ---------------------------------------------------------------------------- structure and flags

_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def structure(module: nn.Module) -> dict[str, dict]:
    """What a rebuilt module must reproduce beyond its state_dict: for every submodule (by qualified
    name, ``""`` for the module itself) its class name and its plain public attributes (numbers,
    strings, None and lists/tuples of them: ``out_features``, ``kernel_size``, ``task_sizes``, ...).
    Dicts (a network's ``args``) and private attributes (``_parameters``, hooks, ...) are left out."""
    out = {}
    for name, sub in module.named_modules():
        attrs = {k: v for k, v in vars(sub).items() if not k.startswith("_") and k != "training" and _plain(v)}
        out[name] = {"class": type(sub).__name__, **{k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}}
    return out


def flags(module: nn.Module) -> dict[str, dict[str, bool]]:
    """Every submodule's train/eval flag and every parameter's ``requires_grad``."""
    return {"training": {name: sub.training for name, sub in module.named_modules()},
            "requires_grad": {name: p.requires_grad for name, p in module.named_parameters()}}


def apply_flags(module: nn.Module, saved: dict[str, dict[str, bool]]) -> None:
    """Set the flags ``flags`` recorded (names the module lacks were reported by ``mismatches``)."""
    for name, sub in module.named_modules():
        if name in saved["training"]:
            sub.training = bool(saved["training"][name])
    for name, p in module.named_parameters():
        if name in saved["requires_grad"]:
            p.requires_grad_(bool(saved["requires_grad"][name]))


def mismatches(module: nn.Module, state_dict: dict[str, torch.Tensor], saved_structure: dict[str, dict],
               saved_flags: dict | None = None, limit: int = 6) -> list[str]:
    """How a rebuilt ``module`` differs from the saved network (empty: it fits): missing or extra
    state_dict keys, other shapes or dtypes, other submodules, classes or plain attributes."""
    problems = []
    mine = module.state_dict()
    missing, extra = sorted(set(state_dict) - set(mine)), sorted(set(mine) - set(state_dict))
    if missing:
        problems.append(f"the rebuilt network lacks {len(missing)} saved weight(s): {', '.join(missing[:limit])}")
    if extra:
        problems.append(f"the rebuilt network has {len(extra)} weight(s) the saved one lacks: {', '.join(extra[:limit])}")
    for key in (k for k in mine if k in state_dict):
        a, b = mine[key], state_dict[key]
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            problems.append(f"weight '{key}': rebuilt {tuple(a.shape)} {a.dtype}, saved {tuple(b.shape)} {b.dtype}")
    now = structure(module)
    for name in sorted(set(now) | set(saved_structure)):
        if name not in now:
            problems.append(f"the rebuilt network lacks submodule '{name}' ({saved_structure[name].get('class')})")
        elif name not in saved_structure:
            problems.append(f"the rebuilt network has submodule '{name}' ({now[name].get('class')}) the saved one lacks")
        elif now[name] != saved_structure[name]:
            diff = {k: (now[name].get(k), saved_structure[name].get(k)) for k in set(now[name]) | set(saved_structure[name])
                    if now[name].get(k) != saved_structure[name].get(k)}
            shown = ", ".join(f"{k} rebuilt {a!r}, saved {b!r}" for k, (a, b) in sorted(diff.items()))
            problems.append(f"submodule '{name or '(top)'}': {shown}")
    if saved_flags is not None:
        params = {n for n, _ in module.named_parameters()}
        if set(saved_flags["requires_grad"]) != params:
            problems.append("the rebuilt network's parameters are not the ones whose requires_grad flags were saved")
    if len(problems) > limit:
        problems = problems[:limit] + [f"... and {len(problems) - limit} more"]
    return problems


# ------------------------------------------------------------------------------------ PAU branch


def pau_branch_structure(branch: nn.Module) -> dict:
    """What rebuilds a ``PAUBranch``: its PAU options and the ReLU site names of each backbone."""
    return {"options": dict(branch.pau_options), "require_sites": bool(branch.require_sites),
            "sites": [list(branch.sites(i)) for i in range(branch.num_backbones)]}


def _stand_in_backbone(sites: Sequence[str]) -> nn.Module:
    """A module with an ``nn.ReLU`` at each site name (in order) and nothing else."""
    root = nn.Module()
    for site in sites:
        parent = root
        *path, leaf = site.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, nn.ReLU())
    return root


def pau_branch_skeleton(saved: dict) -> nn.Module:
    """A ``PAUBranch`` with the saved options and sites, bound to no backbone (as an unpickled one:
    the plugin binds it to the network's backbones when its state is loaded)."""
    from ..core.branch import PAUBranch

    sites = [list(s) for s in saved["sites"]]
    branch = PAUBranch([_stand_in_backbone(s) for s in sites], require_sites=saved["require_sites"], **saved["options"])
    rebuilt = [branch.sites(i) for i in range(branch.num_backbones)]
    if rebuilt != sites:
        raise ValueError(f"the rebuilt branch has ReLU sites {rebuilt}, saved {sites}")
    branch.__setstate__(branch.__getstate__())  # drops the stand-in backbones, as pickling does
    return branch
