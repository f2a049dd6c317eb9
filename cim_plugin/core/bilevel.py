"""The bilevel mask step of CIM (../shared/docs/method.md §4), on any network, no PyCIL imports.

One mask-level step on two batches (x, y) and (x', y'):

  inner:  M  = soft CAM of the PAU branch on x (min-max normalised, upsampled; differentiable in φ)
          x̂  = M·x + (1 − M)·x_η                        (x_η: x downsampled by s and back)
          θ⁺ = θ − β₁ ∇_θ L_CIL(f(x̂; θ), y)             (backbone parameters only, create_graph)
  outer:  L  = CE(f(x'; θ⁺), y') + div_coef·CE(branch logits on x, y) + reg_coef·mean(M²)
          φ ← Adam step on ∇_φ L, gradient norm clipped at max_phi_grad_norm.

Fast weights go through ``torch.func.functional_call`` over the whole network, so every backbone
layer (downsample convs and BN affine parameters included) is stepped; the classifier is not.
The branch reads θ detached: the mask is a function of φ only, as in the paper.

BatchNorm: the step is the CIL training step's twin, so ``bn_batch_statistics`` lets BN normalise
with the batch's own statistics (as in training) without touching the running statistics; with
running statistics of an early epoch the inner loss on blended images reached 10^3 and the outer
CE 10^8 or NaN on the synthetic demo. A step whose loss or φ-gradient is not finite is skipped
(φ unchanged, counted in the returned parts as ``skipped``).

Modes: ``"bilevel"`` (the above), ``"joint"`` (no inner step: φ trained on the outer loss with
θ itself, i.e. only the branch CE and the regulariser reach φ), ``"none"`` (φ frozen).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .cam import normalize_cams, upsample_cams
from .choices import BILEVEL_MODES
from .codec import soft_blend

#: ``branch_fn(x) -> (raw CAM [B, h, w] for the labels, branch logits [B, K])``, differentiable in φ.
BranchFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: ``cil_loss(outputs, x, y) -> scalar``: the learner's own loss on outputs of the network.
CILLoss = Callable[[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BilevelSettings:
    factor: int
    div_coef: float = 0.2
    reg_coef: float = 0.1
    max_phi_grad_norm: float = 1.0
    mode: str = "bilevel"

    def __post_init__(self):
        if self.mode not in BILEVEL_MODES:
            raise ValueError(f"mode must be one of {', '.join(BILEVEL_MODES)}, got {self.mode!r}")


@contextlib.contextmanager
def bn_batch_statistics(net: nn.Module):
    """Within the block every BatchNorm of ``net`` normalises with batch statistics and leaves its
    running statistics (and ``num_batches_tracked``) as they are; flags restored afterwards."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.training, m.track_running_stats) for m in bns]
    for m in bns:
        m.training, m.track_running_stats = True, False
    try:
        yield net
    finally:
        for m, training, track in saved:
            m.training, m.track_running_stats = training, track


def soft_masks(cam_raw: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """``[B, 1, H, W]`` soft masks in [0, 1] from raw CAMs (degenerate maps give all-zero masks)."""
    norm, _ = normalize_cams(cam_raw)
    return upsample_cams(norm, image_size).clamp(0.0, 1.0).unsqueeze(1)


def logits_of(outputs) -> torch.Tensor:
    return outputs["logits"] if isinstance(outputs, Mapping) else outputs


def outer_terms(
    net: nn.Module,
    theta_names: Sequence[str],
    branch_fn: BranchFn,
    cil_loss: CILLoss,
    inner: tuple[torch.Tensor, torch.Tensor],
    outer: tuple[torch.Tensor, torch.Tensor],
    inner_lr: float,
    settings: BilevelSettings,
) -> dict[str, torch.Tensor]:
    """The outer objective's terms as functions of φ (through the branch), unweighted: ``inner``
    (the inner CIL loss on blended images), ``outer_ce`` (the stepped model's CE on clean images),
    ``branch_ce``, ``mask_reg`` (mean M²) and ``mask`` (the soft masks ``[B, 1, H, W]``)."""
    x, y = inner
    x2, y2 = outer
    cam, branch_logits = branch_fn(x, y)
    mask = soft_masks(cam, x.shape[-2:])
    params = dict(net.named_parameters())
    if settings.mode == "bilevel":
        x_hat = soft_blend(x, mask, settings.factor)
        loss_in = cil_loss(functional_call(net, params, (x_hat,)), x_hat, y)
        theta = [params[n] for n in theta_names]
        grads = torch.autograd.grad(loss_in, theta, create_graph=True, allow_unused=True)
        fast = {n: p - inner_lr * g for n, p, g in zip(theta_names, theta, grads) if g is not None}
        params = {**params, **fast}
    else:
        loss_in = torch.zeros((), device=x.device)
    return {
        "inner": loss_in,
        "outer_ce": F.cross_entropy(logits_of(functional_call(net, params, (x2,))), y2),
        "branch_ce": F.cross_entropy(branch_logits, y),
        "mask_reg": mask.pow(2).mean(),
        "mask": mask,
    }


def outer_loss(terms: dict[str, torch.Tensor], settings: BilevelSettings) -> tuple[torch.Tensor, dict]:
    """The outer objective from ``outer_terms``: outer CE + div_coef·branch CE + reg_coef·mean(M²),
    with its parts as floats."""
    total = terms["outer_ce"] + settings.div_coef * terms["branch_ce"] + settings.reg_coef * terms["mask_reg"]
    parts = {name: float(terms[name].detach()) for name in ("inner", "outer_ce", "branch_ce", "mask_reg")}
    parts["mask_mean"] = float(terms["mask"].detach().mean())
    return total, parts


def mask_step(
    net: nn.Module,
    theta_names: Sequence[str],
    branch_fn: BranchFn,
    cil_loss: CILLoss,
    inner: tuple[torch.Tensor, torch.Tensor],
    outer: tuple[torch.Tensor, torch.Tensor],
    inner_lr: float,
    phi: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    settings: BilevelSettings,
    reduce_grads: Callable[[list[torch.Tensor]], None] | None = None,
) -> dict:
    """One φ update (nothing else changes: θ, ω and BN statistics are left as they were).

    ``reduce_grads`` (several processes): replaces φ's gradients, in place, by their mean over the
    processes before the finiteness check and the clipping, so every process takes the same step
    (a non-finite loss anywhere gives NaN gradients everywhere: the step is skipped by all)."""
    if settings.mode == "none":
        return {}
    phi = [p for p in phi if p.requires_grad]
    total, parts = outer_loss(outer_terms(net, theta_names, branch_fn, cil_loss, inner, outer, inner_lr, settings), settings)
    finite = bool(torch.isfinite(total))
    raw = torch.autograd.grad(total, phi, allow_unused=True) if finite else [None] * len(phi)
    grads = [torch.full_like(p, float("nan")) if not finite else torch.zeros_like(p) if g is None else g.detach()
             for p, g in zip(phi, raw)]
    if reduce_grads is not None:
        reduce_grads(grads)
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        parts.update(skipped=1, total=float(total.detach()))
        return parts  # φ unchanged: a non-finite step would poison φ and Adam's moments
    for p, g in zip(phi, grads):
        p.grad = g
    parts["phi_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(phi, settings.max_phi_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parts.update(skipped=0, total=float(total.detach()))
    return parts
