"""The CIM mask branch: the CIL backbones with every ``nn.ReLU`` swapped for a PAU (method.md §3).

The branch is "the same network with every ReLU replaced by a PAU; all conv/BN weights shared;
only the PAU coefficients φ are the branch's own". It is built here without copying anything:

- :class:`PAUBranch` owns one :class:`~cim_plugin.core.pau.PAU` per ReLU *site* per backbone and
  nothing else, so ``branch.parameters()`` and ``branch.state_dict()`` are exactly φ.
- It keeps the backbones in a plain Python list, outside its module tree: ``branch.to()``,
  ``branch.parameters()``, ``state_dict()`` and pickling never touch the CIL model.
- :meth:`PAUBranch.activated` swaps the PAUs into one backbone (the very module objects, so the
  conv/BN tensors are the CIL model's own — an SGD step on θ changes the branch), optionally puts
  its BatchNorm layers in eval mode, and restores everything on exit, exceptions included. Inside
  it the backbone can be called normally or through ``torch.func.functional_call`` with fast
  weights (the bilevel step, method.md §4).

A *site* is one ``nn.ReLU`` module instance, named by its first qualified name in
``named_modules()``. A module called several times in a forward shares one PAU (one coefficient
set) between its calls: PyCIL's ``BasicBlock`` calls its single ``self.relu`` twice (after bn1 and
after the residual sum), so a resnet18 has 9 sites here (stem + 8 blocks). NB: the official CIM
code (xfflzl/CIM-CIL, convs/resnet.py) instead gave each BasicBlock two Rationals (``ratl_1``,
``ratl_2``), i.e. 17 coefficient sets for a resnet18; sharing per module is this plugin's choice,
the only one possible by module replacement. ReLUs applied functionally (``F.relu``/``torch.relu``
in a ``forward``) cannot be swapped: PyCIL's cifar resnet32 (convs/cifar_resnet.py) has no
``nn.ReLU`` module at all, so a branch on it would be the plain network — the constructor refuses
(``ValueError``) unless ``require_sites=False``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .pau import DEFAULT_INIT_RANGE, PAU

__all__ = ["relu_sites", "PAUBranch"]

_Place = tuple[nn.Module, str]  # (parent module, key in parent._modules)


def _relu_places(backbone: nn.Module) -> dict[str, tuple[nn.Module, list[_Place]]]:
    """site name → (the ReLU instance, every (parent, key) that holds it), in module order."""
    found: dict[int, tuple[str, nn.Module, list[_Place]]] = {}
    seen: set[tuple[int, str]] = set()  # a shared parent is reached once per path
    for name, module in backbone.named_modules(remove_duplicate=False):
        if not name or not isinstance(module, nn.ReLU):
            continue
        prefix, _, key = name.rpartition(".")
        parent = backbone.get_submodule(prefix)
        if (id(parent), key) in seen:
            continue
        seen.add((id(parent), key))
        found.setdefault(id(module), (name, module, []))[2].append((parent, key))
    return {name: (relu, places) for name, relu, places in found.values()}


def relu_sites(backbone: nn.Module) -> list[str]:
    """Qualified names of the ``nn.ReLU`` submodules of ``backbone`` (one per instance).

    A ReLU instance registered under several names (or called several times) is one site, named
    by its first name in ``named_modules()`` order. The backbone itself is never a site.
    """
    return list(_relu_places(backbone))


def _key(site: str) -> str:
    # ModuleDict keys may not contain '.'; '/' keeps the state_dict keys readable.
    return site.replace(".", "/")


def _device_of(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    return None


class PAUBranch(nn.Module):
    """φ of the CIM branch: one PAU per ReLU site of each backbone, the backbones held by reference.

    ``backbones``: the CIL model's feature extractors in order (IncrementalNet: ``[convnet]``;
    DERNet/FOSTERNet: ``list(convnets)``). All PAUs start at the ReLU fit and trainable (use
    :meth:`set_trainable` / :meth:`sync` ``train_old`` to freeze). PAU options: ``num_degree``,
    ``den_degree``, ``version``, ``init_range`` (see :class:`~cim_plugin.core.pau.PAU`).

    State dict keys: ``paus.<backbone index>.<site with '/' for '.'>.numerator|denominator``.
    ``copy.deepcopy``/pickling a branch copies φ but not the backbones: reattach them with
    :meth:`attach` (a deep copy that silently dragged a copy of the CIL model along would no longer
    share its weights).
    """

    def __init__(
        self,
        backbones: Sequence[nn.Module],
        *,
        num_degree: int = 5,
        den_degree: int = 4,
        version: str = "B",
        init_range: float = DEFAULT_INIT_RANGE,
        require_sites: bool = True,
    ):
        super().__init__()
        self.pau_options = {"num_degree": int(num_degree), "den_degree": int(den_degree), "version": version,
                            "init_range": float(init_range)}
        self.require_sites = bool(require_sites)
        self.paus = nn.ModuleList()
        self._sites: list[list[str]] = []
        self._backbones: list[nn.Module] = []
        self._active: set[int] = set()
        backbones = list(backbones)
        if not backbones:
            raise ValueError("PAUBranch needs at least one backbone")
        self._grow(backbones)
        self._backbones = backbones

    # ------------------------------------------------------------------ structure

    @property
    def num_backbones(self) -> int:
        return len(self._sites)

    @property
    def backbones(self) -> tuple[nn.Module, ...]:
        """The attached backbones (not submodules of the branch)."""
        return tuple(self._backbones)

    def sites(self, index: int) -> list[str]:
        """ReLU site names of backbone ``index``."""
        return list(self._sites[index])

    def pau(self, index: int, site: str) -> PAU:
        """The PAU that replaces ReLU ``site`` of backbone ``index``."""
        return self.paus[index][_key(site)]

    def backbone_paus(self, index: int) -> list[PAU]:
        return [self.pau(index, s) for s in self._sites[index]]

    def _check_sites(self, index: int, backbone: nn.Module) -> None:
        sites = relu_sites(backbone)
        if sites != self._sites[index]:
            raise ValueError(
                f"backbone {index} has ReLU sites {sites}, but the branch was built for {self._sites[index]}"
            )

    def _grow(self, backbones: list[nn.Module]) -> list[int]:
        added = []
        for index in range(len(self._sites), len(backbones)):
            backbone = backbones[index]
            sites = relu_sites(backbone)
            if not sites and self.require_sites:
                raise ValueError(
                    f"backbone {index} ({type(backbone).__name__}) has no nn.ReLU module: its ReLUs are "
                    "functional (F.relu), which a PAU cannot replace (e.g. PyCIL's resnet32); use a "
                    "backbone with nn.ReLU modules (resnet18/34/50) or pass require_sites=False"
                )
            keys = [_key(s) for s in sites]
            if len(set(keys)) != len(keys):
                raise ValueError(f"ReLU site names of backbone {index} collide once '.' → '/': {sites}")
            previous = self.paus[index - 1] if index > 0 else None
            group = nn.ModuleDict()
            for site, key in zip(sites, keys):
                pau = PAU(**self.pau_options)
                if previous is not None and key in previous:
                    # A new backbone of DER/FOSTER starts from the previous one's PAUs (as PyCIL
                    # starts its new convnet from the previous convnet's weights).
                    with torch.no_grad():
                        pau.numerator.copy_(previous[key].numerator)
                        pau.denominator.copy_(previous[key].denominator)
                device = _device_of(backbone)
                group[key] = pau.to(device) if device is not None else pau
            self.paus.append(group)
            self._sites.append(sites)
            added.append(index)
        return added

    def attach(self, backbones: Sequence[nn.Module]) -> None:
        """(Re)bind the branch to ``backbones`` — exactly as many as it has PAU sets, same sites."""
        backbones = list(backbones)
        if len(backbones) != self.num_backbones:
            raise ValueError(f"attach() needs {self.num_backbones} backbones, got {len(backbones)}")
        for index, backbone in enumerate(backbones):
            self._check_sites(index, backbone)
        if self._active:
            raise RuntimeError("cannot attach backbones while PAUs are swapped in")
        self._backbones = backbones

    def sync(self, backbones: Sequence[nn.Module], *, train_old: bool) -> list[int]:
        """Follow a grown backbone list; returns the indices of the backbones that got new PAUs.

        ``backbones`` must extend the current list (same sites for the existing indices; they are
        rebound, so a reloaded model is fine); nothing is dropped — a shorter list is an error
        (FOSTER replaces its network by the one-backbone student ``_snet`` after compression: build
        a new branch, or ``attach`` a matching list, for that). New backbones' PAUs start as a copy
        of the previous backbone's (site by site; sites it lacks get the ReLU fit) and are trainable.

        ``train_old`` (keyword, no default) sets ``requires_grad`` of the PAUs of every backbone but
        the last: the old backbones' φ are trained or frozen by this choice only, never because
        their conv weights were frozen. The last backbone's PAUs are made trainable.
        """
        backbones = list(backbones)
        if len(backbones) < self.num_backbones:
            raise ValueError(
                f"sync() drops no backbone: the branch has {self.num_backbones}, got {len(backbones)}"
            )
        if self._active:
            raise RuntimeError("cannot sync while PAUs are swapped in")
        for index in range(self.num_backbones):
            self._check_sites(index, backbones[index])
        added = self._grow(backbones)
        self._backbones = backbones
        last = self.num_backbones - 1
        self.set_trainable(range(last), bool(train_old))
        self.set_trainable([last], True)
        return added

    # ------------------------------------------------------------------ φ

    def set_trainable(self, indices: Iterable[int], trainable: bool) -> None:
        """Set ``requires_grad`` of every PAU coefficient of the given backbones."""
        for index in indices:
            for p in self.paus[index].parameters():
                p.requires_grad_(bool(trainable))

    def freeze_backbone_paus(self, indices: Iterable[int]) -> None:
        self.set_trainable(indices, False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The φ that currently require grad (what the φ optimiser should hold)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ swapping and forward

    def _backbone(self, index: int) -> nn.Module:
        if not self._backbones:
            raise RuntimeError("no backbones attached (a copied/unpickled branch): call attach(backbones)")
        if not 0 <= index < self.num_backbones:
            raise IndexError(f"backbone index {index} out of range 0..{self.num_backbones - 1}")
        return self._backbones[index]

    @contextlib.contextmanager
    def activated(self, index: int, *, bn_eval: bool = True) -> Iterator[nn.Module]:
        """Swap backbone ``index``'s ReLU modules for its PAUs for the duration of the block.

        Yields the backbone itself; call it, or ``torch.func.functional_call(backbone, params, x)``
        — parameters not in ``params`` (the PAU coefficients among them) are the modules' own. While
        active the PAUs are submodules of the backbone (``backbone.named_parameters()`` then lists
        them, e.g. ``layer1.0.relu.numerator``): collect fast-weight names outside the block.

        ``bn_eval``: BatchNorm layers of the backbone run in eval mode (running statistics, no
        update), each layer's own ``training`` flag restored on exit. The original ReLU modules go
        back into every place they were taken from, also when the block raises. Not re-entrant for
        the same backbone.
        """
        backbone = self._backbone(index)
        if index in self._active:
            raise RuntimeError(f"PAUs of backbone {index} are already swapped in")
        places = _relu_places(backbone)
        if list(places) != self._sites[index]:
            raise ValueError(
                f"backbone {index} has ReLU sites {list(places)}, "
                f"but the branch was built for {self._sites[index]}"
            )
        group = self.paus[index]
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        bn_flags: list[tuple[nn.Module, bool]] = []
        self._active.add(index)
        try:
            for site, (relu, holders) in places.items():
                pau = group[_key(site)]
                for parent, key in holders:
                    parent._modules[key] = pau
                    swapped.append((parent, key, relu))
            if bn_eval:
                for m in backbone.modules():
                    if isinstance(m, _BatchNorm):
                        bn_flags.append((m, m.training))
                        m.training = False
            yield backbone
        finally:
            for parent, key, relu in reversed(swapped):
                parent._modules[key] = relu
            for m, flag in bn_flags:
                m.training = flag
            self._active.discard(index)

    def forward_backbone(self, index: int, x: torch.Tensor, *, bn_eval: bool = True):
        """Backbone ``index`` on ``x`` with its PAUs active; returns whatever the backbone returns."""
        with self.activated(index, bn_eval=bn_eval) as backbone:
            return backbone(x)

    def forward(self, x: torch.Tensor, *, bn_eval: bool = True) -> list:
        """Every backbone on ``x`` with its PAUs active, in order (list of their outputs)."""
        return [self.forward_backbone(i, x, bn_eval=bn_eval) for i in range(self.num_backbones)]

    # ------------------------------------------------------------------ copying

    def __getstate__(self):
        state = super().__getstate__()
        state["_backbones"] = []
        state["_active"] = set()
        return state

    def extra_repr(self) -> str:
        sites = [len(s) for s in self._sites]
        return f"backbones={self.num_backbones}, sites per backbone={sites}, attached={bool(self._backbones)}"
