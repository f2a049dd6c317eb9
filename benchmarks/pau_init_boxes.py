"""Diagnostic: the box area of the CIL model's CAM against the PAU branch's CAM on the same network
(θ shared), and the mean cosine of the two CAMs.

* The *untrained* branch (every ReLU replaced by the PAU's initial ReLU fit on [−r, r], r the run's
  ``cim_pau_init_range`` (the default, 3, when unset) or ``--init-range``): if its boxes are already looser than the CIL model's,
  pau's looser boxes come from the PAU's start, not from the mask steps.
* The *trained* branch, when the checkpoint holds φ (a ``task_<n>.pt`` of a ``pau`` run written
  with ``cim_checkpoint``): how far the mask steps moved φ (relative change of the PAU coefficients
  from their start) and its CAMs (cosine to the CIL model's and to the untrained branch's, box area,
  and box recall of the true object box). If the trained branch's CAMs are as close to the CIL
  model's as the untrained branch's are, the mask steps did not teach φ anything the CIL model's own
  CAM lacks, and pau can only match cam.

Run: ``PYCIL_ROOT=../PyCIL python benchmarks/pau_init_boxes.py <ablation>/runs/icarl_off_s1993/first_phase.pt``
or on a pau run's checkpoint: ``... pau_init_boxes.py <PyCIL>/logs/.../<prefix>_<seed>_resnet18_ckpt/task_1.pt``
"""

import argparse

import first_phase_model as fpm
import torch

from cim_plugin.core.boxes import box_area_fraction, cam_to_boxes
from cim_plugin.core.branch import PAUBranch
from cim_plugin.core.cam import normalize_cams
from cim_plugin.core.diagnostics import box_recall
from cim_plugin.core.pau import DEFAULT_INIT_RANGE
from cim_plugin.pycil.nets import backbones, branch_outputs, cam_and_features, eval_mode


def boxes_of(cams: torch.Tensor, tau: float, factor: int, size: int) -> torch.Tensor:
    norm, degenerate = normalize_cams(cams.float())
    return cam_to_boxes(norm, (size, size), tau, factor, degenerate)[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).mean())


def trained_branch(fp: fpm.FirstPhase) -> PAUBranch | None:
    """φ as the checkpoint saved it, bound to its network's backbones; None when it holds no φ."""
    from cim_plugin.pycil import checkpoint as ckpt

    plugin = ckpt.decode(fp.plugin) if fp.plugin is not None else {}
    branch = (plugin.get("phi") or {}).get("branch")
    if branch is None:
        return None
    branch.sync(list(backbones(fp.net)), train_old=False)
    return branch.eval()


def coefficient_change(trained: PAUBranch, start: PAUBranch) -> float:
    """‖φ − φ₀‖ / ‖φ₀‖ over every PAU coefficient of the trained branch's backbones."""
    now = torch.cat([p.detach().flatten() for p in trained.parameters()])
    first = torch.cat([p.detach().flatten() for p in start.parameters()])
    return float((now - first).norm() / first.norm())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fpm.add_checkpoint_arguments(p)
    p.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.6])
    p.add_argument("--init-range", type=float, default=None,
                   help="r of the untrained branch (default: the run's cim_pau_init_range, else 3)")
    a = p.parse_args(argv)
    for ck in a.checkpoints:
        fp = fpm.load(ck, a.pycil, "train", a.size, a.images)
        net, x, y = fp.net, fpm.normalise(fp.images), torch.as_tensor(fp.labels)
        truth = torch.as_tensor(fp.boxes)
        r = a.init_range if a.init_range is not None else float(fp.run.get("cim_pau_init_range") or DEFAULT_INIT_RANGE)
        untrained = PAUBranch(list(backbones(net)), init_range=r).eval()
        trained = trained_branch(fp)
        sources = {"cam": None, f"untrained pau (r {r:g})": untrained}
        if trained is not None:
            sources["trained pau"] = trained
        with torch.no_grad(), eval_mode(net):
            cams = {name: torch.cat([cam_and_features(net, xb, yb)[0] if branch is None
                                     else branch_outputs(net, branch, xb, yb)[0]
                                     for xb, yb in zip(x.split(50), y.split(50))])
                    for name, branch in sources.items()}
        print(f"{ck}: {len(x)} training images, {len(y.unique())} classes")
        for name, cam in cams.items():
            per_tau = []
            for t in a.taus:
                boxes = boxes_of(cam, t, a.factor, a.size)
                per_tau.append(f"tau {t}: area {float(box_area_fraction(boxes, (a.size, a.size)).mean()):.3f}, "
                               f"recall {float(box_recall(boxes, truth).mean()):.3f}")
            print(f"  {name:24s} {'; '.join(per_tau)}; CAM cosine to cam {cosine(cam, cams['cam']):.4f}")
        if trained is not None:
            print(f"  trained vs untrained pau: CAM cosine {cosine(cams['trained pau'], cams[f'untrained pau (r {r:g})']):.4f}, "
                  f"coefficients moved {coefficient_change(trained, untrained):.4f} of their norm")


if __name__ == "__main__":
    main()
