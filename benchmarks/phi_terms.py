"""Diagnostic: which term of the bilevel objective moves the PAU branch's boxes, and which way.

The outer objective (``cim_plugin.core.bilevel``) has three terms that reach φ: the stepped model's
CE on clean images (``outer_ce``: the inner step trained on images blended with the soft mask M, so
a larger M keeps more of each image), ``div_coef``·CE of the branch's own logits (``branch_ce``),
and ``reg_coef``·mean(M²) (``mask_reg``: the only term that asks for smaller masks). From the same
start (a pau run's φ, or the untrained branch) this script takes ``--steps`` Adam steps of φ on each
objective alone and on the official sum, with the plugin's step (``mask_step``: gradient clipping,
Adam at φ's lr and weight decay, without the stage's cosine schedule; the inner step on the
backbone only), on batches of clean, unaugmented training images of the checkpoint's classes (the
evaluation images are among them), and reports the boxes the branch gives afterwards: area and recall of the
true object box at τ, the mean soft mask, and the CAM's cosine to the CIL model's own CAM. Each
recall is set beside the CIL model's CAM at the same box area (its threshold moved to give that
area): a branch whose boxes keep more of the object than cam's at the same area has learnt
something the threshold alone cannot buy.

Run: ``PYCIL_ROOT=../PyCIL python benchmarks/phi_terms.py <PyCIL>/logs/.../<pau run>_ckpt/task_0.pt``
(``--start untrained`` for the branch at the PAU start instead of the run's trained φ; then any
checkpoint of the network will do, e.g. an ablation's ``runs/<learner>_off_s<seed>/first_phase.pt``).
"""

from __future__ import annotations

import argparse
import copy
import os

import first_phase_model as fpm
import numpy as np
import torch
import torch.nn.functional as F
from pau_init_boxes import boxes_of, cosine, trained_branch

from cim_plugin.config import CIMConfig
from cim_plugin.core.bilevel import BilevelSettings, mask_step
from cim_plugin.core.boxes import box_area_fraction
from cim_plugin.core.branch import PAUBranch
from cim_plugin.core.diagnostics import box_recall
from cim_plugin.pycil.nets import (
    backbones, branch_outputs, cam_and_features, eval_mode, inner_step_parameters, trained_backbones_batch_statistics,
)

#: objective -> (mode, div_coef, reg_coef), None: the run's own coefficient. Mode "joint" has no
#: inner step, so its outer CE is the CE of θ itself, which does not depend on φ: no gradient.
OBJECTIVES = {
    "official sum": ("bilevel", None, None),
    "outer_ce only": ("bilevel", 0.0, 0.0),
    "branch_ce only": ("joint", None, 0.0),
    "mask_reg only": ("joint", 0.0, None),
}


def cam_curve(cam: torch.Tensor, truth: torch.Tensor, factor: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(areas, recalls) of the CIL model's CAM boxes over τ 0.30–0.90, ascending in area: the
    trade-off the threshold alone buys, to place a trained branch's boxes against."""
    points = []
    for t in np.arange(0.30, 0.901, 0.025):
        boxes = boxes_of(cam, float(t), factor, size)
        points.append((float(box_area_fraction(boxes, (size, size)).mean()), float(box_recall(boxes, truth).mean())))
    areas, recalls = map(np.array, zip(*sorted(points)))
    return areas, recalls


def evaluate(net, branch, x, y, truth, tau, factor, size, cam_ref) -> dict:
    with torch.no_grad(), eval_mode(net):
        cam = torch.cat([branch_outputs(net, branch, xb, yb)[0] for xb, yb in zip(x.split(50), y.split(50))])
    boxes = boxes_of(cam, tau, factor, size)
    return {"area": float(box_area_fraction(boxes, (size, size)).mean()),
            "recall": float(box_recall(boxes, truth).mean()),
            "cosine": cosine(cam, cam_ref)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="task_<n>.pt of a pau run (cim_checkpoint), or with --start untrained "
                   "any checkpoint of the network (first_phase.pt)")
    p.add_argument("--size", type=int, default=128, help="image side of the run's synthetic set")
    p.add_argument("--pycil", default=os.environ.get("PYCIL_ROOT"), help="PyCIL checkout (default: PYCIL_ROOT)")
    p.add_argument("--start", choices=("trained", "untrained"), default="trained")
    p.add_argument("--steps", type=int, default=10, help="φ steps per objective (the demo's phase 0 takes 10)")
    p.add_argument("--images", type=int, default=300, help="evaluation images, as many of each class")
    p.add_argument("--tau", type=float, default=None, help="default: the run's mask_threshold")
    p.add_argument("--inner-lr", type=float, default=None, help="default: the run's lrate × lr_ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reg-coefs", type=float, nargs="*", default=[],
                   help="also the official sum with these reg_coef values (the run's: its own)")
    a = p.parse_args(argv)

    fp = fpm.load(a.checkpoint, a.pycil, "train", a.size)
    run, net = fp.run, fp.net
    size = fp.images.shape[1]
    labels = torch.as_tensor(fp.labels)
    keep = fpm.per_class(labels, a.images)
    x_all = fpm.normalise(fp.images)
    x, y, truth = x_all[keep], labels[keep], torch.as_tensor(fp.boxes)[keep]
    cfg = CIMConfig.from_args({k: v for k, v in run.items() if v is not None}, f"the run of {a.checkpoint}")
    factor = int(round(cfg.compress_ratio ** 0.5))
    tau = a.tau if a.tau is not None else cfg.mask_threshold
    lr = float(run.get("lrate") or run.get("lr") or run.get("init_lr") or 0.01)
    inner_lr = a.inner_lr if a.inner_lr is not None else lr * cfg.lr_ratio
    div, reg, batch, r = cfg.div_coef, cfg.reg_coef, cfg.meta_batch_size, cfg.cim_pau_init_range
    start = trained_branch(fp) if a.start == "trained" else None
    started = "the run's trained φ" if start is not None else f"untrained φ (r {r:g})"
    if start is None:
        if a.start == "trained":
            print(f"{a.checkpoint} holds no trained φ: starting from the untrained branch")
        start = PAUBranch(list(backbones(net)), init_range=r).eval()
    theta = inner_step_parameters(net)

    with torch.no_grad(), eval_mode(net):
        cam_ref = torch.cat([cam_and_features(net, xb, yb)[0] for xb, yb in zip(x.split(50), y.split(50))])
    cil = boxes_of(cam_ref, tau, factor, size)
    curve = cam_curve(cam_ref, truth, factor, size)
    print(f"{a.checkpoint}: {len(x)} images, {len(y.unique())} classes, τ {tau}, {a.steps} φ steps per objective, "
          f"inner lr {inner_lr:g}, div_coef {div:g}, reg_coef {reg:g}, start: {started}")
    print(f"  {'cam (CIL model)':24s} area {float(box_area_fraction(cil, (size, size)).mean()):.3f}, "
          f"recall {float(box_recall(cil, truth).mean()):.3f}")
    first = evaluate(net, start, x, y, truth, tau, factor, size, cam_ref)
    print(f"  {'branch at the start':24s} area {first['area']:.3f}, recall {first['recall']:.3f} (cam at that area "
          f"{float(np.interp(first['area'], *curve)):.3f}), cosine to cam {first['cosine']:.4f}")

    objectives = {**OBJECTIVES, **{f"official, reg_coef {c:g}": ("bilevel", None, c) for c in a.reg_coefs}}
    for name, (mode, d, g) in objectives.items():
        branch = copy.deepcopy(start)
        branch.sync(list(backbones(net)), train_old=False)
        phi = branch.trainable_parameters()
        settings = BilevelSettings(factor=factor, div_coef=div if d is None else d, reg_coef=reg if g is None else g,
                                   max_phi_grad_norm=cfg.max_phi_grad_norm, mode=mode)
        optimizer = torch.optim.Adam(phi, lr=cfg.phi_lr, weight_decay=cfg.phi_weight_decay)
        gen = torch.Generator().manual_seed(a.seed)

        def draw():
            idx = torch.randint(len(labels), (batch,), generator=gen)
            return x_all[idx], labels[idx]

        def cil_loss(outputs, xb, yb):
            return F.cross_entropy(outputs["logits"], yb)

        def branch_fn(xb, yb):
            return branch_outputs(net, branch, xb, yb)

        mask_means = []
        with eval_mode(net), trained_backbones_batch_statistics(net):
            for _ in range(a.steps):
                inner, outer = draw(), draw()
                parts = mask_step(net, theta, branch_fn, cil_loss, inner, outer, inner_lr, phi, optimizer, settings)
                mask_means.append(parts.get("mask_mean", float("nan")))
        after = evaluate(net, branch, x, y, truth, tau, factor, size, cam_ref)
        at_area = float(np.interp(after["area"], *curve))
        print(f"  {name:24s} area {after['area']:.3f} ({after['area'] - first['area']:+.3f}), recall {after['recall']:.3f} "
              f"({after['recall'] - first['recall']:+.3f}; cam at that area {at_area:.3f}), cosine to cam "
              f"{after['cosine']:.4f}, mean soft mask {mask_means[0]:.3f} -> {mask_means[-1]:.3f}")


if __name__ == "__main__":
    main()
