"""What the plugin needs from PyCIL's networks: last feature map, pooled features, classifier rows.

IncrementalNet has one backbone (``convnet``); DERNet and FOSTERNet have several (``convnets``)
whose last maps are concatenated along channels — exactly the layout their ``fc`` rows read, so
CAM = fc row of the true class · concatenated map. PyCIL wraps its network in ``nn.DataParallel``
for several GPUs (while training and building the memory): every helper here unwraps it, and the
learner mixin reaches ``fc``, ``convnet(s)``, ``feature_dim`` and ``extract_vector`` only through them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..core.cam import class_activation_maps


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DataParallel / DistributedDataParallel wrapper (or ``net`` itself)."""
    while isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        net = net.module
    return net


def backbones(net: nn.Module) -> list[nn.Module]:
    net = unwrap(net)
    if hasattr(net, "convnets"):
        return list(net.convnets)
    if hasattr(net, "convnet"):
        return [net.convnet]
    raise TypeError(f"{type(net).__name__} has neither 'convnet' nor 'convnets': cannot take its feature maps")


def inner_step_parameters(net: nn.Module) -> list[str]:
    """Names of the parameters the bilevel inner step moves (θ): every trainable backbone
    parameter, the classifier excluded."""
    return [n for n, p in unwrap(net).named_parameters() if p.requires_grad and n.startswith(("convnet.", "convnets."))]


def feature_dim(net: nn.Module) -> int:
    """Width of the pooled features (all backbones together), through any DataParallel wrapper."""
    return int(unwrap(net).feature_dim)


def extract_vector(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features ``[B, feature_dim]``, called on the wrapped module (DataParallel has no
    ``extract_vector``; the plugin's passes run on one device)."""
    return unwrap(net).extract_vector(x)


def classifier_weight(net: nn.Module) -> torch.Tensor:
    """``[num_classes, feature_dim]`` rows of the network's classifier.

    Cosine classifiers (LUCIR's CosineLinear, and SplitCosineLinear whose rows are ``fc1`` then
    ``fc2``) score a class by the cosine between the features and its row, so only the row's
    direction matters: their rows are L2-normalised. The CAM is min-max normalised afterwards, so
    a per-class scale would change nothing anyway.
    """
    fc = getattr(unwrap(net), "fc", None)
    if fc is not None and hasattr(fc, "fc1") and hasattr(fc, "fc2"):  # SplitCosineLinear
        return F.normalize(torch.cat([fc.fc1.weight, fc.fc2.weight]), p=2, dim=1)
    if fc is None or not hasattr(fc, "weight"):
        raise TypeError(f"{type(unwrap(net)).__name__} has no linear 'fc' with a weight to take CAMs from")
    if type(fc).__name__ == "CosineLinear":
        return F.normalize(fc.weight, p=2, dim=1)
    return fc.weight


def maps_and_features(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last conv map ``[B, C, h, w]`` and pooled features ``[B, C]`` (backbones concatenated)."""
    outs = [bb(x) for bb in backbones(net)]
    fmap = torch.cat([o["fmaps"][-1] for o in outs], dim=1)
    feats = torch.cat([o["features"] for o in outs], dim=1)
    return fmap, feats


def cam_and_features(net: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw CAM of the true class ``[B, h, w]`` and pooled features ``[B, C]`` from one forward pass."""
    fmap, feats = maps_and_features(net, x)
    weight = classifier_weight(net)
    if weight.shape[1] != fmap.shape[1]:
        raise ValueError(
            f"classifier reads {weight.shape[1]} features but the last maps have {fmap.shape[1]} channels"
        )
    return class_activation_maps(fmap, weight, labels), feats


@contextlib.contextmanager
def eval_mode(net: nn.Module):
    """Evaluate with BN in eval mode, then restore every submodule's own train/eval flag."""
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield net
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def trained_backbones_batch_statistics(net: nn.Module):
    """Within the block (for mask steps, inside ``eval_mode``): the backbones being trained (any
    parameter with ``requires_grad``) normalise with batch statistics, as in PyCIL's own training
    step, their running statistics kept; frozen old backbones (DER's, FOSTER's) stay in eval mode."""
    from ..core.bilevel import bn_batch_statistics

    with contextlib.ExitStack() as stack:
        for bb in backbones(net):
            if any(p.requires_grad for p in bb.parameters()):
                stack.enter_context(bn_batch_statistics(bb))
        yield net


def branch_outputs(net: nn.Module, branch, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw CAM ``[B, h, w]`` of class ``y`` and the CIL classifier's logits, both through the CIM
    branch (``branch``: a ``PAUBranch`` over ``backbones(net)``); differentiable in φ only (θ and
    ω are read detached)."""
    from torch.func import functional_call

    net = unwrap(net)
    maps, feats = [], []
    for i, bb in enumerate(backbones(net)):
        params = {n: p.detach() for n, p in bb.named_parameters()}
        with branch.activated(i):
            out = functional_call(bb, params, (x,))
        maps.append(out["fmaps"][-1])
        feats.append(out["features"])
    fmap, feat = torch.cat(maps, dim=1), torch.cat(feats, dim=1)
    logits = net.fc(feat)["logits"]  # the CIL classifier on the branch's features
    return class_activation_maps(fmap, classifier_weight(net).detach(), y), logits
