"""Diagnostic: the box area of the CIL model's CAM against the *untrained* PAU branch's CAM (every ReLU
replaced by the PAU's initial ReLU fit, θ shared) on the same first-phase network, and the mean cosine
of the two CAMs. If the untrained branch's boxes are already looser, pau's looser boxes come from the
PAU's start, not from the mask steps.

Run: ``PYCIL_ROOT=../PyCIL python benchmarks/pau_init_boxes.py <ablation>/runs/icarl_off_s1993/first_phase.pt``
"""

import argparse
import os

import first_phase_model as fpm
import torch

from cim_plugin.core.boxes import box_area_fraction, cam_to_boxes
from cim_plugin.core.branch import PAUBranch
from cim_plugin.core.cam import normalize_cams
from cim_plugin.pycil.nets import backbones, branch_outputs, cam_and_features, eval_mode


def mean_area(cams: torch.Tensor, tau: float, factor: int, size: int) -> float:
    norm, degenerate = normalize_cams(cams.float())
    boxes, _ = cam_to_boxes(norm, (size, size), tau, factor, degenerate)
    return float(box_area_fraction(boxes, (size, size)).mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="first_phase.pt / task_0.pt files")
    p.add_argument("--pycil", default=os.environ.get("PYCIL_ROOT"), help="PyCIL checkout (default: PYCIL_ROOT)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--images", type=int, default=300, help="first-phase training images used")
    p.add_argument("--factor", type=int, default=8, help="side factor of compress_ratio (64 -> 8)")
    p.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.6])
    a = p.parse_args(argv)
    for ck in a.checkpoints:
        fp = fpm.load(ck, a.pycil, "train", a.size, a.images)
        net, x, y = fp.net, fpm.normalise(fp.images), torch.as_tensor(fp.labels)
        branch = PAUBranch(list(backbones(net)))
        with torch.no_grad(), eval_mode(net):
            pairs = [(cam_and_features(net, xb, yb)[0], branch_outputs(net, branch, xb, yb)[0])
                     for xb, yb in zip(x.split(50), y.split(50))]
        cil, pau = (torch.cat(c) for c in zip(*pairs))
        cos = torch.nn.functional.cosine_similarity(cil.flatten(1), pau.flatten(1)).mean()
        areas = ", ".join(f"tau {t}: cam {mean_area(cil, t, a.factor, a.size):.3f} / untrained pau "
                          f"{mean_area(pau, t, a.factor, a.size):.3f}" for t in a.taus)
        print(f"{ck}: {len(x)} images; box area {areas}; CAM cosine {float(cos):.4f}")


if __name__ == "__main__":
    main()
