"""The stages of PyCIL's ResNets, split at one of them (key ``cim_feature_stage``): the map that
enters it, the stages above it run on such a map, and the part below it frozen.

PyCIL's backbones chain a stem and named stages, then average-pool: ``stage_1``..``stage_3``
(resnet32, cosine_resnet32) or ``layer1``..``layer4`` (resnet18/34/50 and their cosine versions).
``cim_feature_stage`` names the stage whose *input* is stored (any but the first; default the last,
i.e. the map entering the last stage). ``upper_features`` runs that stage and the ones after it and
pools; ``check_split`` verifies once, on a real image, that this reproduces the backbone's own
features (a backbone whose forward is not that chain stops the run with an error naming the key).

``freeze_lower`` (the ``FrozenStagesMixin``: ``"cim_memory": "pca"``, or ``"cim_freeze_lower": true``
with the plugin on or off) freezes every backbone parameter outside the upper stages (stem and
lower stages: ``requires_grad`` off, so PyCIL's SGD skips them) and keeps their BatchNorms in eval
mode (a forward pre-hook resets ``training``: PyCIL's loops call ``net.train()`` every epoch), from
the second phase on, so maps stored in one phase are the maps of the later phases' network.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from .nets import backbones, unwrap

log = logging.getLogger(__name__)

#: The stage attribute names of PyCIL's ResNets, in forward order, per family.
STAGE_FAMILIES = (("stage_1", "stage_2", "stage_3"), ("layer1", "layer2", "layer3", "layer4"))
KEY = "cim_feature_stage"


def stage_names(backbone: nn.Module) -> tuple[str, ...]:
    for family in STAGE_FAMILIES:
        if all(isinstance(getattr(backbone, n, None), nn.Module) for n in family) and hasattr(backbone, "avgpool"):
            return family
    raise ConfigError([f"key 'cim_memory' / '{KEY}': the backbone {type(backbone).__name__} has no ResNet stages "
                       f"({' / '.join(', '.join(f) for f in STAGE_FAMILIES)}) and an avgpool to split at"])


def single_backbone(net: nn.Module) -> nn.Module:
    found = backbones(net)
    if len(found) != 1:
        raise ConfigError([f"key '{KEY}': the network has {len(found)} backbones; splitting at a stage needs one "
                           "(iCaRL, LUCIR)"])
    return found[0]


def resolve_stage(net: nn.Module, stage: str | None) -> str:
    """The stage ``cim_feature_stage`` names (None: the last one), checked against the network."""
    names = stage_names(single_backbone(net))
    allowed = names[1:]
    if stage is None:
        return names[-1]
    if stage not in allowed:
        raise ConfigError([f"key '{KEY}' = {stage!r}: this backbone's stages whose input can be stored are "
                           f"{', '.join(repr(a) for a in allowed)} (the default is the last, {names[-1]!r})"])
    return stage


def upper_names(backbone: nn.Module, stage: str) -> tuple[str, ...]:
    names = stage_names(backbone)
    return names[names.index(stage):]


def upper_features(backbone: nn.Module, stage: str, maps: torch.Tensor) -> torch.Tensor:
    """Pooled features ``[B, D]`` of maps entering ``stage``: that stage, the ones above, avgpool."""
    x = maps
    for name in upper_names(backbone, stage):
        x = getattr(backbone, name)(x)
    return torch.flatten(backbone.avgpool(x), 1)


def upper_modules(backbone: nn.Module, stage: str) -> list[nn.Module]:
    return [getattr(backbone, n) for n in upper_names(backbone, stage)]


@contextlib.contextmanager
def stage_input(backbone: nn.Module, stage: str):
    """Within the block, ``box[0]`` holds the input of ``stage`` at the backbone's last forward."""
    box: list[torch.Tensor] = []

    def grab(_module, args):
        box[:] = [args[0]]

    handle = getattr(backbone, stage).register_forward_pre_hook(grab)
    try:
        yield box
    finally:
        handle.remove()


def check_split(net: nn.Module, stage: str, x: torch.Tensor) -> tuple[int, int, int]:
    """The stored map's shape (C, h, w) for input ``x`` ``[B, 3, H, W]``; raises ConfigError when the
    upper stages on that map do not give the backbone's own features (the split would be wrong)."""
    backbone = single_backbone(net)
    from .nets import eval_mode

    with eval_mode(backbone), torch.no_grad(), stage_input(backbone, stage) as box:
        feats = backbone(x)["features"]
        again = upper_features(backbone, stage, box[0])
    if not torch.allclose(feats, again, rtol=1e-4, atol=1e-5):
        raise ConfigError([f"key '{KEY}' = {stage!r}: the stages above it on its input do not reproduce the "
                           f"backbone's features ({type(backbone).__name__}'s forward is not a chain of stages)"])
    return tuple(int(v) for v in box[0].shape[1:])


def _frozen_bn(module: nn.Module, _args) -> None:
    module.training = False  # eval-mode statistics, whatever net.train() set


def freeze_lower(net: nn.Module, stage: str) -> int:
    """Freeze the backbone below ``stage`` (see module docstring); idempotent. Returns how many
    parameters are frozen."""
    backbone = single_backbone(unwrap(net))
    upper = {id(p) for m in upper_modules(backbone, stage) for p in m.parameters()}
    upper_bn = {id(b) for m in upper_modules(backbone, stage) for b in m.modules()}
    frozen = 0
    for p in backbone.parameters():
        if id(p) not in upper:
            p.requires_grad_(False)
            frozen += p.numel()
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in upper_bn:
            m.training = False
            if not getattr(m, "_cim_frozen", False):
                m.register_forward_pre_hook(_frozen_bn)
                m._cim_frozen = True
    return frozen


class FrozenStagesMixin:
    """From the second phase on, the backbone below ``cim_feature_stage`` is frozen at the start of
    every phase (before the learner builds its optimiser)."""

    def _freeze_setup(self, stage: str | None) -> None:
        self._freeze_stage = resolve_stage(self._network, stage)

    def incremental_train(self, data_manager: Any):
        if self._cur_task + 1 >= 1:
            frozen = freeze_lower(self._network, self._freeze_stage)
            log.info("cim-plugin: backbone below %s frozen (%d parameters, BatchNorm in eval mode)",
                     self._freeze_stage, frozen)
        return super().incremental_train(data_manager)
